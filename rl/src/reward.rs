//! Reward functions: the [`RewardFn`] trait the stage scores rollouts
//! through, a trained reward model ([`RewardModelFn`]), the oracle of the
//! built-in tasks, the rule rewards (for tests, smoke runs and toy
//! problems), and their config section.

use crate::rollout::Rollout;
use anyhow::{bail, Context, Result};
use lm::reward_model::{self, RewardModel};
use lm::Tokenizer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Scores a batch of rollouts: one reward per rollout, in order. A reward
/// function is frozen: it must not keep a gradient graph.
pub trait RewardFn {
    /// A short description for logs and the summary.
    fn name(&self) -> String;

    /// The reward of each rollout of `batch` (same length, same order).
    fn score(&mut self, batch: &[Rollout]) -> Result<Vec<f64>>;

    /// Stored statistics `(mean, std)` of this reward (a reward model's
    /// `reward_stats.json`), used by `normalize_reward` when the config gives
    /// none.
    fn stats(&self) -> Option<(f64, f64)> {
        None
    }
}

/// The `[rl.reward]` section: which reward the stage optimises.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RewardConfig {
    /// The number of response tokens (the stop token not counted), capped at
    /// `max_tokens` when given, times `scale`.
    Length {
        #[serde(default)]
        max_tokens: Option<usize>,
        #[serde(default = "one")]
        scale: f64,
    },
    /// 1 when the decoded response contains `text` (ASCII case-insensitive
    /// unless `case_sensitive`), else 0.
    Contains {
        text: String,
        #[serde(default)]
        case_sensitive: bool,
    },
    /// 1 when the response is the correct answer to a built-in task prompt
    /// (`builtin:rl?…` data, checked by `datasets::tasks::check`), else 0.
    Oracle,
    /// A trained reward model directory (`GemmaForSequenceClassification`
    /// with `score.weight`, as `align reward` writes it).
    Model {
        path: PathBuf,
        /// Sequences per forward pass.
        #[serde(default = "default_rm_batch")]
        batch_size: usize,
        /// Longest scored sequence; longer ones lose their earliest prompt
        /// tokens. Default: the model's `max_position_embeddings`.
        #[serde(default)]
        max_seq_len: Option<usize>,
    },
}

fn one() -> f64 {
    1.0
}
fn default_rm_batch() -> usize {
    16
}

impl RewardConfig {
    pub fn validate(&self) -> Result<()> {
        match self {
            RewardConfig::Length { max_tokens, scale } => {
                if *max_tokens == Some(0) {
                    bail!("reward.max_tokens must be at least 1 (or left out for no cap)");
                }
                if !scale.is_finite() {
                    bail!("reward.scale must be a finite number, got {scale}");
                }
            }
            RewardConfig::Contains { text, .. } => {
                if text.is_empty() {
                    bail!("reward.text is empty; give the text a rewarded response contains");
                }
            }
            RewardConfig::Oracle => {}
            RewardConfig::Model { batch_size, max_seq_len, .. } => {
                if *batch_size == 0 || *max_seq_len == Some(0) {
                    bail!("reward.batch_size and reward.max_seq_len must be at least 1");
                }
            }
        }
        Ok(())
    }

    /// Resolves relative paths against `base` (the reward model's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        if let RewardConfig::Model { path, .. } = self {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }

    /// Builds the reward function; a reward model is loaded on `device` in
    /// `kind`, frozen.
    pub fn build(&self, device: Device, kind: Kind) -> Result<Box<dyn RewardFn>> {
        self.validate()?;
        Ok(match self {
            RewardConfig::Length { max_tokens, scale } => {
                Box::new(LengthReward { max_tokens: *max_tokens, scale: *scale })
            }
            RewardConfig::Contains { text, case_sensitive } => {
                Box::new(ContainsReward { text: text.clone(), case_sensitive: *case_sensitive })
            }
            RewardConfig::Oracle => Box::new(OracleReward),
            RewardConfig::Model { path, batch_size, max_seq_len } => {
                Box::new(RewardModelFn::load(path, device, kind, *batch_size, *max_seq_len)?)
            }
        })
    }
}

/// The content of the prompt's last user message (where a built-in task's
/// question is).
pub fn last_user_text(r: &Rollout) -> Option<&str> {
    r.prompt.messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.as_str())
}

/// The oracle of a rollout: `Some(correct)` when its prompt is a built-in
/// task, `None` otherwise.
pub fn oracle(r: &Rollout) -> Option<bool> {
    datasets::tasks::check(last_user_text(r)?, &r.text)
}

/// Reward = 1 for a correct answer to a built-in task, else 0; an error for
/// a prompt that is not a built-in task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OracleReward;

impl RewardFn for OracleReward {
    fn name(&self) -> String {
        "oracle (built-in tasks)".into()
    }

    fn score(&mut self, batch: &[Rollout]) -> Result<Vec<f64>> {
        batch
            .iter()
            .map(|r| match oracle(r) {
                Some(ok) => Ok(f64::from(u8::from(ok))),
                None => bail!(
                    "the oracle reward needs built-in task prompts (builtin:rl data); {:?} is not one",
                    last_user_text(r).unwrap_or("")
                ),
            })
            .collect()
    }
}

/// A trained reward model, frozen: each rollout is formatted as the
/// dialogue prompt + model turn (the response text, closed by
/// `<end_of_turn>` when the response ended with it), exactly as the reward
/// model was trained, and scored at its last token. A response that never
/// emitted `<end_of_turn>` (cut at `max_new_tokens`, or ended by `<eos>`) is
/// scored as it is, without a closing `<end_of_turn>` it never generated.
/// Prompts without messages (raw ids, benchmarks) are scored on prompt ids
/// followed by the response ids as generated, which assumes the reward
/// model shares the policy's tokenizer. A sequence longer than
/// `max_seq_len` loses its earliest prompt tokens (after `<bos>`), never
/// response tokens; a response too long to fit alone is an error.
pub struct RewardModelFn {
    /// Owns the variables of `model` (frozen).
    pub vs: nn::VarStore,
    pub model: RewardModel,
    pub tokenizer: Tokenizer,
    pub stats: Option<reward_model::RewardStats>,
    pub batch_size: usize,
    pub max_seq_len: usize,
    pub dir: PathBuf,
}

impl RewardModelFn {
    /// Loads a reward model directory (one with `score.weight`; a causal LM
    /// is refused: its head would be untrained).
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        batch_size: usize,
        max_seq_len: Option<usize>,
    ) -> Result<Self> {
        let l = reward_model::load(dir, device, kind, None, 0)
            .with_context(|| format!("loading the reward model {}", dir.display()))?;
        if !l.new_tensors.is_empty() {
            bail!(
                "{} is not a reward model: it has no {} (a causal LM?). Train one with `align reward`",
                dir.display(),
                l.new_tensors.join(", ")
            );
        }
        let mut vs = l.vs;
        vs.freeze();
        let max_seq_len = max_seq_len.unwrap_or(l.model.cfg.max_position_embeddings.max(2) as usize);
        Ok(RewardModelFn {
            vs,
            model: l.model,
            tokenizer: l.tokenizer,
            stats: l.stats,
            batch_size: batch_size.max(1),
            max_seq_len,
            dir: dir.to_path_buf(),
        })
    }

    /// The token ids the reward model scores for `r`: see
    /// [`RewardModelFn`] for the formatting and [`cut_prompt_from_left`] for
    /// the truncation to `max_seq_len`.
    pub fn format(&self, r: &Rollout) -> Result<Vec<i64>> {
        let ids = if r.prompt.messages.is_empty() {
            let mut v = r.prompt.ids.clone();
            v.extend_from_slice(&r.response_ids);
            v
        } else {
            let mut m = r.prompt.messages.clone();
            m.push(lm::Message::model(&r.text));
            let mut ids = lm::chat::encode(&self.tokenizer, &m, false)?.ids;
            if !r.ended() {
                // Drop the `<end_of_turn>\n` the template closes the turn with.
                let eot = self.tokenizer.special.end_of_turn;
                if let Some(last) = ids.iter().rposition(|&t| t == eot) {
                    ids.truncate(last);
                }
            }
            ids
        };
        // The prompt's tokens: those the formatted ids share with the
        // prompt as generated (a conservative bound where the tokenizer
        // merges across the prompt/response boundary).
        let prompt_len = ids.iter().zip(&r.prompt.ids).take_while(|(a, b)| a == b).count();
        cut_prompt_from_left(ids, prompt_len, self.max_seq_len)
    }

    /// Rewards of token sequences (each non-empty), batched by length.
    /// Rows are right-padded, so plain causal attention (the fused kernel,
    /// no mask tensor) gives every real token exactly the context
    /// [`RewardModel::forward`] gives it; the head reads each row's last
    /// real token.
    pub fn score_ids(&self, seqs: &[Vec<i64>]) -> Result<Vec<f64>> {
        let _g = tch::no_grad_guard();
        let dev = self.model.device();
        let pad = self.tokenizer.special.pad;
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
        let mut out = vec![0.0; seqs.len()];
        for chunk in order.chunks(self.batch_size) {
            let b = chunk.len() as i64;
            let t = chunk.iter().map(|&i| seqs[i].len()).max().unwrap_or(1) as i64;
            let mut ids = vec![pad; (b * t) as usize];
            let mut last = Vec::with_capacity(chunk.len());
            for (r, &i) in chunk.iter().enumerate() {
                let s = &seqs[i];
                if s.is_empty() {
                    bail!("sequence {i} is empty; nothing to score");
                }
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
}

impl RewardFn for RewardModelFn {
    fn name(&self) -> String {
        format!("reward model {}", self.dir.display())
    }

    fn score(&mut self, batch: &[Rollout]) -> Result<Vec<f64>> {
        let seqs: Vec<Vec<i64>> = batch
            .iter()
            .enumerate()
            .map(|(i, r)| {
                self.format(r).with_context(|| format!("formatting rollout {i} for the reward model"))
            })
            .collect::<Result<_>>()?;
        self.score_ids(&seqs)
    }

    fn stats(&self) -> Option<(f64, f64)> {
        self.stats.as_ref().map(|s| (s.mean, s.std))
    }
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
            "the response is {} tokens and with <bos> does not fit in the reward model's {max_len} tokens (reward.max_seq_len); the prompt may be cut, the response never: raise reward.max_seq_len or lower max_new_tokens",
            ids.len() - prompt_len.min(ids.len())
        );
    }
    ids.drain(1..1 + cut);
    Ok(ids)
}

/// Reward = min(response tokens, `max_tokens`) · `scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct LengthReward {
    pub max_tokens: Option<usize>,
    pub scale: f64,
}

impl RewardFn for LengthReward {
    fn name(&self) -> String {
        match self.max_tokens {
            Some(m) => format!("length (cap {m}, scale {})", self.scale),
            None => format!("length (scale {})", self.scale),
        }
    }

    fn score(&mut self, batch: &[Rollout]) -> Result<Vec<f64>> {
        Ok(batch
            .iter()
            .map(|r| {
                let n = r.content().len();
                self.max_tokens.map_or(n, |m| n.min(m)) as f64 * self.scale
            })
            .collect())
    }
}

/// Reward = 1 when the response text contains `text`, else 0.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainsReward {
    pub text: String,
    pub case_sensitive: bool,
}

impl RewardFn for ContainsReward {
    fn name(&self) -> String {
        format!("contains {:?}", self.text)
    }

    fn score(&mut self, batch: &[Rollout]) -> Result<Vec<f64>> {
        Ok(batch
            .iter()
            .map(|r| {
                let hit = if self.case_sensitive {
                    r.text.contains(&self.text)
                } else {
                    r.text.to_ascii_lowercase().contains(&self.text.to_ascii_lowercase())
                };
                f64::from(u8::from(hit))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Prompt;
    use lm::StopReason;
    use std::sync::Arc;

    fn rollout(ids: Vec<i64>, text: &str, stop: StopReason) -> Rollout {
        Rollout {
            group: 0,
            prompt: Arc::new(Prompt::from_ids(vec![2])),
            sample_logprobs: vec![0.0; ids.len()],
            response_ids: ids,
            text: text.into(),
            stop_reason: stop,
        }
    }

    #[test]
    fn length_reward_counts_content_tokens_with_a_cap() {
        let b = [
            rollout(vec![10, 11, 12, 5], "abc", StopReason::EndOfTurn),
            rollout(vec![10, 11, 12, 13, 14], "abcde", StopReason::Length),
        ];
        let mut r = LengthReward { max_tokens: Some(4), scale: 0.5 };
        assert_eq!(r.score(&b).unwrap(), vec![1.5, 2.0]);
    }

    #[test]
    fn contains_reward_matches_text() {
        let b = [
            rollout(vec![10], "Hello World", StopReason::Length),
            rollout(vec![10], "bye", StopReason::Length),
        ];
        let mut r = ContainsReward { text: "world".into(), case_sensitive: false };
        assert_eq!(r.score(&b).unwrap(), vec![1.0, 0.0]);
        let mut r = ContainsReward { text: "world".into(), case_sensitive: true };
        assert_eq!(r.score(&b).unwrap(), vec![0.0, 0.0]);
    }

    #[test]
    fn reward_config_is_a_tagged_table_and_rejects_unknown_fields() {
        let c: RewardConfig = toml::from_str("kind = \"length\"\nmax_tokens = 8").unwrap();
        assert_eq!(c, RewardConfig::Length { max_tokens: Some(8), scale: 1.0 });
        let err = toml::from_str::<RewardConfig>("kind = \"length\"\nmax_token = 8").unwrap_err().to_string();
        assert!(err.contains("max_token"), "{err}");
        let err = toml::from_str::<RewardConfig>("kind = \"bogus\"").unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        assert_eq!(toml::from_str::<RewardConfig>("kind = \"oracle\"").unwrap(), RewardConfig::Oracle);
        let mut m: RewardConfig = toml::from_str("kind = \"model\"\npath = \"rm\"").unwrap();
        m.resolve_paths(Path::new("/runs"));
        assert_eq!(m, RewardConfig::Model { path: "/runs/rm".into(), batch_size: 16, max_seq_len: None });
    }

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
