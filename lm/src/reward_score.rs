//! The one reward-scoring path: `align score`, the RL stage's reward model
//! and the `reward:DIR` judge all score through [`RewardScorer`], so the same
//! conversation gets the same reward from each.
//!
//! - **Formatting** ([`format`]): the prompt turns followed by the response
//!   turn(s) through the dialogue formatter, exactly as `align reward` trains
//!   on them. A response that was cut before it closed its turn (an RL
//!   rollout stopped at `max_new_tokens`) is scored as it is, without the
//!   `<end_of_turn>` it never generated.
//! - **Truncation** ([`cut_prompt_from_left`]): a sequence longer than
//!   `max_seq_len` loses its earliest prompt tokens after `<bos>`, never a
//!   response token (the model turn's header counts as response, as in
//!   training); a response too long to fit with `<bos>` alone is an error.
//! - **Batching** ([`RewardScorer::score_ids`]): sequences sorted by length
//!   and scored `batch_size` at a time, right-padded, so plain causal
//!   attention (no mask tensor) gives every real token the context a
//!   one-at-a-time forward gives it; the head reads each row's last real
//!   token. Results come back in input order.

use crate::reward_model::{self, RewardModel, RewardStats};
use crate::{Message, Tokenizer};
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// A formatted sequence: its ids and how many leading tokens (`<bos>` and
/// the prompt turns) prompt-side truncation may cut (all but `<bos>`).
#[derive(Debug, Clone, PartialEq)]
pub struct Formatted {
    pub ids: Vec<i64>,
    /// Tokens 1..prompt_len are the prompt turns (after `<bos>`, before the
    /// first response turn's header).
    pub prompt_len: usize,
}

/// Formats `prompt` followed by `response` (one or more model turns). With
/// `closed` false, the `<end_of_turn>` (and what follows it) closing the
/// last turn is dropped: the response is scored as it was generated.
pub fn format(tok: &Tokenizer, prompt: &[Message], response: &[Message], closed: bool) -> Result<Formatted> {
    if response.is_empty() {
        bail!("the response is empty; there is nothing to score");
    }
    let all: Vec<Message> = prompt.iter().chain(response).cloned().collect();
    let mut ids = crate::chat::encode(tok, &all, false)?.ids;
    if !closed {
        let eot = tok.special.end_of_turn;
        if let Some(last) = ids.iter().rposition(|&t| t == eot) {
            ids.truncate(last);
        }
    }
    // The prompt turns as the formatter renders them alone; the whole text
    // is tokenized at once, so take the shared prefix rather than trusting
    // the boundary to fall between tokens.
    let prompt_len = if prompt.is_empty() {
        1
    } else {
        let p = crate::chat::encode(tok, prompt, false)?.ids;
        ids.iter().zip(&p).take_while(|(a, b)| a == b).count().max(1)
    };
    let prompt_len = prompt_len.min(ids.len());
    Ok(Formatted { ids, prompt_len })
}

/// Cuts `ids` (`<bos>`, a prompt of `prompt_len` tokens counting `<bos>`,
/// then the response) to at most `max_len` tokens by dropping the earliest
/// prompt tokens after `<bos>`, never a response token: an error when the
/// response (with `<bos>`) alone is longer than `max_len`.
pub fn cut_prompt_from_left(mut ids: Vec<i64>, prompt_len: usize, max_len: usize) -> Result<Vec<i64>> {
    if ids.len() <= max_len {
        return Ok(ids);
    }
    let cut = ids.len() - max_len;
    let droppable = prompt_len.min(ids.len()).saturating_sub(1);
    if cut > droppable {
        bail!(
            "the response is {} tokens and with <bos> does not fit in the reward model's max_seq_len = {max_len} \
             ({} tokens with the prompt); the prompt may be cut from the left, the response never",
            ids.len() - prompt_len.min(ids.len()),
            ids.len()
        );
    }
    ids.drain(1..1 + cut);
    Ok(ids)
}

/// One conversation to score: the prompt turns, the response turn(s), and
/// whether the response closed its turn (`false` for a rollout cut at its
/// length limit).
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation<'a> {
    pub prompt: &'a [Message],
    pub response: Vec<Message>,
    pub closed: bool,
}

impl<'a> Conversation<'a> {
    /// `prompt` answered by one model turn of `text`, closed.
    pub fn new(prompt: &'a [Message], text: &str) -> Self {
        Conversation { prompt, response: vec![Message::model(text)], closed: true }
    }
}

/// A conversation's scored ids and whether its prompt was cut.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub truncated: bool,
}

/// A loaded reward model, frozen, with the one formatting, truncation and
/// batching every caller scores through (see the module docs).
pub struct RewardScorer {
    /// Owns the variables of `model` (frozen).
    pub vs: nn::VarStore,
    pub model: RewardModel,
    pub tokenizer: Tokenizer,
    /// `reward_stats.json`, when the directory has one.
    pub stats: Option<RewardStats>,
    /// Sequences per forward pass (at least 1).
    pub batch_size: usize,
    /// Longest scored sequence.
    pub max_seq_len: usize,
}

impl RewardScorer {
    /// Loads a reward model directory (one with `score.weight`; a causal LM
    /// is refused from its tensor names, before loading: its head would be
    /// untrained) on `device` in `kind`, frozen. `max_seq_len` defaults to
    /// the model's `max_position_embeddings`.
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        batch_size: usize,
        max_seq_len: Option<usize>,
    ) -> Result<Self> {
        let not_rm = |what: &str| {
            anyhow::anyhow!(
                "{} is not a reward model: it has no {what} (a causal LM?). Train one with `align reward`",
                dir.display()
            )
        };
        crate::checkpoint::read_config(dir)?;
        if !crate::checkpoint::tensor_names(dir)?.contains(reward_model::SCORE_WEIGHT) {
            return Err(not_rm(reward_model::SCORE_WEIGHT));
        }
        let l = reward_model::load(dir, device, kind, None, 0)
            .with_context(|| format!("loading the reward model {}", dir.display()))?;
        if !l.new_tensors.is_empty() {
            return Err(not_rm(&l.new_tensors.join(", ")));
        }
        Self::from_model(l.vs, l.model, l.tokenizer, l.stats, batch_size, max_seq_len)
    }

    /// A scorer over a reward model built elsewhere (the RL stage's LoRA
    /// reward model over the policy's base weights): `vs` holds the
    /// variables the scorer owns (frozen here; shared base weights are
    /// frozen by their owner), the rest as for [`RewardScorer::load`].
    pub fn from_model(
        mut vs: nn::VarStore,
        model: RewardModel,
        tokenizer: Tokenizer,
        stats: Option<RewardStats>,
        batch_size: usize,
        max_seq_len: Option<usize>,
    ) -> Result<Self> {
        if max_seq_len == Some(0) {
            bail!("the reward model's max_seq_len must be at least 1");
        }
        vs.freeze();
        let max_seq_len = max_seq_len.unwrap_or(model.cfg.max_position_embeddings.max(2) as usize);
        Ok(RewardScorer { vs, model, tokenizer, stats, batch_size: batch_size.max(1), max_seq_len })
    }

    /// Formats `c` ([`format`]) and cuts it to `max_seq_len`
    /// ([`cut_prompt_from_left`]).
    pub fn encode(&self, c: &Conversation) -> Result<Encoded> {
        let f = format(&self.tokenizer, c.prompt, &c.response, c.closed)?;
        self.fit(f.ids, f.prompt_len)
    }

    /// Cuts ready-made ids (`<bos>` and a prompt of `prompt_len` tokens
    /// counting `<bos>`, then the response) to `max_seq_len`.
    pub fn fit(&self, ids: Vec<i64>, prompt_len: usize) -> Result<Encoded> {
        let truncated = ids.len() > self.max_seq_len;
        Ok(Encoded { ids: cut_prompt_from_left(ids, prompt_len, self.max_seq_len)?, truncated })
    }

    /// Rewards of conversations, in order; an error names the conversation
    /// by its index.
    pub fn score(&self, convs: &[Conversation]) -> Result<Vec<f64>> {
        let seqs: Vec<Vec<i64>> = convs
            .iter()
            .enumerate()
            .map(|(i, c)| Ok(self.encode(c).with_context(|| format!("conversation {i}"))?.ids))
            .collect::<Result<_>>()?;
        self.score_ids(&seqs.iter().map(Vec::as_slice).collect::<Vec<_>>())
    }

    /// Rewards of token sequences (each a whole formatted sequence, at
    /// least one token, at most `max_seq_len`), batched by length; in input
    /// order. Rows are right-padded, so plain causal attention (the fused
    /// kernel, no mask tensor) gives every real token exactly the context
    /// [`RewardModel::forward`] gives it; the head reads each row's last
    /// real token.
    pub fn score_ids(&self, seqs: &[&[i64]]) -> Result<Vec<f64>> {
        let _g = tch::no_grad_guard();
        let dev = self.model.device();
        let pad = self.tokenizer.special.pad;
        if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
            bail!("sequence {i} is empty; nothing to score");
        }
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
        let mut out = vec![0.0; seqs.len()];
        for chunk in order.chunks(self.batch_size.max(1)) {
            let b = chunk.len() as i64;
            let t = chunk.iter().map(|&i| seqs[i].len()).max().unwrap_or(1) as i64;
            let mut ids = vec![pad; (b * t) as usize];
            let mut last = Vec::with_capacity(chunk.len());
            for (r, &i) in chunk.iter().enumerate() {
                let s = seqs[i];
                ids[r * t as usize..r * t as usize + s.len()].copy_from_slice(s);
                last.push(s.len() as i64 - 1);
            }
            let ids = Tensor::from_slice(&ids).view([b, t]).to_device(dev); // (b, T), right-padded
            let positions = Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(0).expand([b, t], true); // (b, T)
            let hidden = self.model.backbone.forward_hidden(&ids, &positions, None, None)?; // (b, T, H)
            let h = hidden.size()[2];
            let idx = Tensor::from_slice(&last).to_device(dev).view([b, 1, 1]).expand([b, 1, h], false); // (b, 1, H)
            let pooled = hidden.gather(1, &idx, false).squeeze_dim(1); // (b, H)
            let r = self.model.score.forward(&pooled).squeeze_dim(-1); // (b,)
            let r: Vec<f64> = Vec::try_from(r.to_kind(Kind::Double).to_device(Device::Cpu))?;
            for (&i, v) in chunk.iter().zip(r) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// `(r − mean) / std` with the stored statistics; `r` unchanged when the
    /// model directory has none.
    pub fn normalize(&self, r: f64) -> f64 {
        self.stats.as_ref().map_or(r, |s| s.normalize(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_prompt_is_cut_from_the_left_and_the_response_never() {
        // <bos>=2, prompt 10 11 12 13, response 20 21 22.
        let ids = vec![2, 10, 11, 12, 13, 20, 21, 22];
        assert_eq!(cut_prompt_from_left(ids.clone(), 5, 8).unwrap(), ids);
        assert_eq!(cut_prompt_from_left(ids.clone(), 5, 6).unwrap(), vec![2, 12, 13, 20, 21, 22]);
        assert_eq!(cut_prompt_from_left(ids.clone(), 5, 4).unwrap(), vec![2, 20, 21, 22]);
        let err = cut_prompt_from_left(ids, 5, 3).unwrap_err().to_string();
        assert!(err.contains("response is 3 tokens") && err.contains("max_seq_len"), "{err}");
    }
}
