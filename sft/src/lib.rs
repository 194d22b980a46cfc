//! `sft`: the supervised fine-tuning stage.
//!
//! Not built yet: masked next-token cross-entropy over the dialogue
//! formatter's trained spans, packing, AdamW with warmup + cosine decay,
//! checkpoints that resume bit-identically.
