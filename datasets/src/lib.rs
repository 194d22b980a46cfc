//! `datasets`: records, readers, mixtures and filters for the align stages.
//!
//! The main types:
//!
//! - [`Message`] (`role`, `content`) and [`Record`], one of four kinds
//!   ([`RecordKind`]): a conversation (`messages`), a prompt–completion pair
//!   (`prompt` + `completion`/`response`/`output`, or Alpaca's `instruction` +
//!   `input` + `output`), a preference pair (`prompt` + `chosen` + `rejected`
//!   as text, message lists or HH-RLHF transcripts, with an optional
//!   `margin`), or a prompt alone. [`Record::messages`],
//!   [`Record::chosen_messages`] and [`Record::rejected_messages`] give the
//!   dialogues a stage formats. An [`Example`] is a record with its optional
//!   `category` and its [`Origin`] (file and row).
//! - [`read_dataset`] reads JSONL, JSON, Parquet or CSV files (or a
//!   directory of shards) with [`ReadOptions`]: the wanted kind (detected from
//!   the columns otherwise), a column renaming map and the [`OnBadRow`]
//!   policy. It returns a [`Dataset`] whose [`ReadReport`] lists every skipped
//!   [`BadRow`] (file, line/row, field, what was expected).
//! - [`Mixture`] samples named sources by weight from a seed, one epoch at a
//!   time, with a held-out split; [`MixtureConfig`] is its recipe section
//!   and [`MixtureReport`] says what each source gave.
//! - [`Filters`], compiled from [`FilterConfig`]: length bounds, personal
//!   information, wrong self-identification, decontamination against
//!   evaluation prompts, exact and near duplicates; a [`FilterReport`] counts
//!   removals per filter and can keep the removed rows with their reasons.
//!
//! - [`tasks`] — the built-in verifiable instruction tasks (reverse, sort,
//!   add, count, uppercase, format) with their oracle, addressed as
//!   `builtin:sft|preferences|rl|eval?n=…&seed=…` wherever a data path goes.
//!
//! Configs are serde structs with `deny_unknown_fields`, so a recipe can
//! embed them. This crate does not depend on libtorch.

pub mod filter;
pub mod mixture;
pub mod read;
pub mod record;
pub mod tasks;
pub mod text;

pub use filter::{
    DecontaminateConfig, Decontaminator, ExactDedupConfig, FilterConfig, FilterReport, Filters, LengthConfig,
    LengthUnit, NearDedupConfig, PiiConfig, Rejection, Removed, SelfIdConfig, TextScope,
};
pub use mixture::{
    BadRowEntry, DataReportSummary, Draw, FilterCount, FilterSummary, HeldOutConfig, MixSettings, Mixture,
    MixtureConfig, MixtureReport, Source, SourceConfig, SourceReport,
};
pub use read::{
    read_dataset, read_table, shard_files, write_dataset, write_jsonl, BadRow, BadRowError, Dataset, Format,
    OnBadRow, ReadOptions, ReadReport,
};
pub use record::{
    detect_kind, parse_hh_transcript, Example, Message, Origin, Record, RecordKind, ROLE_ASSISTANT,
    ROLE_MODEL, ROLE_SYSTEM, ROLE_USER,
};
