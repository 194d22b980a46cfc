//! `datasets`: records, readers, mixtures, filters and the built-in tasks.
//!
//! Not built yet: this crate will hold the record kinds (conversational,
//! prompt–completion, preference, prompt-only), the JSONL/JSON/Parquet/CSV
//! readers, seeded mixtures, the Gemma-report filters and the built-in
//! verifiable tasks. Stages read data only through it.
