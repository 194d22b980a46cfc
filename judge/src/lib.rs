//! `judge`: side-by-side comparison of two systems' answers (with an
//! OpenAI-compatible client for `http:` judges) and the memorization eval.
//! `align serve`, the OpenAI-compatible server, is the `serve` crate.
//!
//! - [`verdict`] — verdicts and the `[[A]]`/`[[B]]`/`[[C]]` parser.
//! - [`stats`] — win rate (wins + ties/2)/n with a seeded bootstrap interval.
//! - [`template`] — the judge prompt templates (`judge/templates/`).
//! - [`pairwise`] — the [`pairwise::Judge`] trait and the both-orders method.
//! - [`oracle`] — programmatic checkers with a registry (`oracle:NAME`).
//! - [`judges`] — `lm:DIR`, `reward:DIR`, `oracle:NAME` and `http:URL`.
//! - [`http`] — the `http:URL` judge (an OpenAI-compatible client).
//! - [`harness`] — `align judge`: answers, judging, report.
//! - [`html`] — `report.html`, the self-contained side-by-side page.
//! - [`config`] — a judge run's settings as a serde config (recipes).
//! - [`memorization`] — `align eval memorization`: exact and approximate
//!   memorization rates of 50-token continuations.

pub mod config;
pub mod harness;
pub mod html;
pub mod http;
pub mod judges;
pub mod memorization;
pub mod oracle;
pub mod pairwise;
pub mod stats;
pub mod template;
pub mod verdict;

pub use harness::{cli_judge, JudgeArgs};
pub use memorization::{cli_memorization, MemArgs};
