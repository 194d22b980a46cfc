//! The prompts of a run: the training prompts by (source, row) of the
//! mixture, drawn in the mixture's epoch order, and the held-out
//! evaluation prompts, all formatted with the chat template.

use crate::config::RlConfig;
use crate::rollout::Prompt;
use anyhow::{bail, Context, Result};
use datasets::Mixture;
use lm::train::TrainerState;
use lm::Tokenizer;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The training and evaluation prompts of a run.
pub struct Prompts {
    /// Every training row's prompt, by (source, row); rows skipped (empty,
    /// or longer than `max_prompt_len`) are absent.
    pub train: HashMap<(usize, usize), Arc<Prompt>>,
    pub eval: Vec<Arc<Prompt>>,
    pub mixture: Mixture,
    /// Rows skipped: empty prompt or longer than `max_prompt_len`.
    pub skipped: usize,
}

fn encode_prompt(tok: &Tokenizer, ex: &datasets::Example) -> Result<Option<Prompt>> {
    let msgs = ex.record.prompt_messages();
    if msgs.is_empty() {
        return Ok(None);
    }
    let ids = lm::chat::prompt_ids(tok, &msgs).with_context(|| {
        format!("{} row {}: formatting the prompt", ex.origin.file.display(), ex.origin.row)
    })?;
    Ok(Some(Prompt { messages: msgs, ids, category: ex.category.clone() }))
}

/// Reads the prompt mixture of `cfg` (paths relative to `base`) and
/// formats every prompt with the chat template.
pub fn load_prompts(cfg: &RlConfig, tok: &Tokenizer, base: &Path) -> Result<Prompts> {
    let mixture = Mixture::load(&cfg.data, base)?;
    let mut train = HashMap::new();
    let mut skipped = 0;
    for s in 0..mixture.source_names().len() {
        for (i, ex) in mixture.train_rows(s).iter().enumerate() {
            match encode_prompt(tok, ex)? {
                Some(p) if p.ids.len() <= cfg.max_prompt_len => {
                    train.insert((s, i), Arc::new(p));
                }
                _ => skipped += 1,
            }
        }
    }
    if train.is_empty() {
        bail!(
            "no training prompt left: {skipped} rows are empty or longer than max_prompt_len ({} tokens)",
            cfg.max_prompt_len
        );
    }
    let mut eval = vec![];
    for ex in mixture.held_out() {
        if eval.len() >= cfg.eval_prompts {
            break;
        }
        if let Some(p) = encode_prompt(tok, ex)?.filter(|p| p.ids.len() <= cfg.max_prompt_len) {
            eval.push(Arc::new(p));
        }
    }
    Ok(Prompts { train, eval, mixture, skipped })
}

impl Prompts {
    /// The next `b` training prompts from the position (epoch, index within
    /// the epoch) in `state`, which advances; epochs follow one another.
    pub fn next_batch(&self, state: &mut TrainerState, b: usize) -> Result<Vec<Arc<Prompt>>> {
        let mut out = Vec::with_capacity(b);
        let mut order = self.mixture.epoch(state.epoch);
        let mut empty_epochs = 0;
        while out.len() < b {
            if state.batch_in_epoch as usize >= order.len() {
                if out.is_empty() {
                    empty_epochs += 1;
                    if empty_epochs > 100 {
                        bail!(
                            "100 epochs of the prompt mixture in a row gave no usable prompt (all skipped)"
                        );
                    }
                }
                state.epoch += 1;
                state.batch_in_epoch = 0;
                order = self.mixture.epoch(state.epoch);
                continue;
            }
            let d = order[state.batch_in_epoch as usize];
            state.batch_in_epoch += 1;
            if let Some(p) = self.train.get(&(d.source, d.index)) {
                out.push(Arc::clone(p));
            }
        }
        Ok(out)
    }
}
