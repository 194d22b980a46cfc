//! The reward model: the Gemma backbone plus a linear `score` head, laid out
//! as transformers' `GemmaForSequenceClassification` with `num_labels = 1`.
//!
//! The reward of a sequence is the head's output at its last real (non-pad)
//! token. That index is found from the validity mask, so the result is the
//! same for right, left or no padding (transformers finds it from
//! `input_ids != pad_token_id`, which agrees for sequences without pad ids).

use crate::checkpoint::{self, SaveOptions};
use crate::fsio;
use crate::model::{padded_causal_mask, Linear, WeightInit};
use crate::safetensors_io::WeightReader;
use crate::{Gemma, GemmaConfig, Tokenizer};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// The `architectures` entry of a saved reward model.
pub const ARCHITECTURE: &str = "GemmaForSequenceClassification";
/// The head's tensor name in checkpoints.
pub const SCORE_WEIGHT: &str = "score.weight";
/// Reward statistics stored beside the weights (see [`RewardStats`]).
pub const STATS_FILE: &str = "reward_stats.json";
/// A causal LM's head; a reward model has none, so it is never loaded.
const LM_HEAD: &str = "lm_head.weight";

/// Mean and standard deviation of the rewards on the evaluation pairs
/// (chosen and rejected pooled), stored as `reward_stats.json` in a trained
/// model directory so that later stages can normalise rewards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardStats {
    pub mean: f64,
    /// Population standard deviation (divided by n).
    pub std: f64,
    /// Number of rewards the statistics cover (two per pair).
    pub n: usize,
    /// Which split they were measured on: `"eval"`, or `"train"` when the
    /// run had no held-out split.
    pub split: String,
}

impl RewardStats {
    /// Statistics of `rewards`; `None` when empty.
    pub fn of(rewards: &[f64], split: &str) -> Option<Self> {
        if rewards.is_empty() {
            return None;
        }
        let n = rewards.len() as f64;
        let mean = rewards.iter().sum::<f64>() / n;
        let var = rewards.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / n;
        Some(RewardStats { mean, std: var.sqrt(), n: rewards.len(), split: split.into() })
    }

    /// `(r − mean) / std` (std floored at 1e-8).
    pub fn normalize(&self, r: f64) -> f64 {
        (r - self.mean) / self.std.max(1e-8)
    }

    /// Reads `dir/reward_stats.json`; `None` when the file does not exist.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join(STATS_FILE);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let s = serde_json::from_str(&text).with_context(|| {
            format!("{} is not a reward statistics file (mean, std, n, split)", p.display())
        })?;
        Ok(Some(s))
    }

    /// Writes `dir/reward_stats.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fsio::write_atomic(&dir.join(STATS_FILE), serde_json::to_string_pretty(self)?.as_bytes())
    }
}

/// Number of labels a sequence classifier's config declares: `num_labels`,
/// else the size of `id2label`. `None` for other architectures (a causal
/// LM's label fields, if any, mean nothing).
fn declared_labels(cfg: &GemmaConfig) -> Option<i64> {
    let classifier = cfg.architectures.iter().flatten().any(|a| a.ends_with("ForSequenceClassification"));
    if !classifier {
        return None;
    }
    cfg.num_labels.or_else(|| cfg.extra.get("id2label").and_then(|v| v.as_object()).map(|m| m.len() as i64))
}

/// The config a reward model is saved with: `GemmaForSequenceClassification`,
/// one label (`num_labels`, `id2label`, `label2id` as transformers writes
/// them). Fails for a sequence classifier with another number of labels.
pub fn reward_config(cfg: &GemmaConfig) -> Result<GemmaConfig> {
    if let Some(n) = declared_labels(cfg).filter(|&n| n != 1) {
        bail!(
            "the model config declares {n} labels; a reward model has one output (num_labels = 1). \
             Start from a causal LM or a one-label reward model"
        );
    }
    let mut c = cfg.clone();
    c.architectures = Some(vec![ARCHITECTURE.into()]);
    c.num_labels = Some(1);
    c.extra.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
    c.extra.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
    Ok(c)
}

/// `GemmaForSequenceClassification` with one label: variables `model.*`
/// (the backbone) and `score.weight` [1, hidden], no bias, no LM head.
pub struct RewardModel {
    pub backbone: Gemma,
    pub score: Linear,
    /// The config the model is saved with (see [`reward_config`]).
    pub cfg: GemmaConfig,
}

impl RewardModel {
    /// Builds the model under `p` (the root of a `VarStore`): the backbone
    /// initialised as [`Gemma::new`] does, the head from normal(0, `head_std`).
    pub fn new(p: &nn::Path, cfg: &GemmaConfig, head_std: f64) -> Result<Self> {
        Self::with_init(p, cfg, head_std, WeightInit::Random)
    }

    /// [`RewardModel::new`] with the backbone filled as `init` says (zeros
    /// for weights about to be loaded from a checkpoint).
    pub fn with_init(p: &nn::Path, cfg: &GemmaConfig, head_std: f64, init: WeightInit) -> Result<Self> {
        let cfg = reward_config(cfg)?;
        // A sequence classifier has no LM head: build the backbone as if the
        // head were tied so that no `lm_head` variable exists, whatever the
        // causal LM had. The saved config keeps the original value.
        let mut backbone_cfg = cfg.clone();
        backbone_cfg.tie_word_embeddings = true;
        let backbone = Gemma::with_init(p, &backbone_cfg, init)?;
        let score = Linear::new(p / "score", cfg.hidden_size, 1, head_std);
        Ok(RewardModel { backbone, score, cfg })
    }

    /// A reward model over an existing backbone and head: e.g. a backbone
    /// from [`Gemma::share_base`] (one copy of the base weights for the RL
    /// policy, its reference and the reward model, each with its own LoRA
    /// adapters). `score` is (1, hidden); `cfg` as for [`RewardModel::new`].
    pub fn from_backbone(backbone: Gemma, score: Linear, cfg: &GemmaConfig) -> Result<Self> {
        let cfg = reward_config(cfg)?;
        if score.weight.size() != [1, cfg.hidden_size] {
            bail!(
                "the score head has shape {:?}, a reward model's is [1, {}]",
                score.weight.size(),
                cfg.hidden_size
            );
        }
        if backbone.cfg.hidden_size != cfg.hidden_size {
            bail!(
                "the backbone's hidden size is {}, the config's {}",
                backbone.cfg.hidden_size,
                cfg.hidden_size
            );
        }
        Ok(RewardModel { backbone, score, cfg })
    }

    pub fn device(&self) -> Device {
        self.backbone.device()
    }

    /// Rewards (B,) in f32 for `ids` (B, T) int64 and `valid` (B, T) bool or
    /// 0/1 marking real tokens. Any padding side; every row needs at least
    /// one real token. Positions count real tokens only, so a left-padded
    /// row sees the same positions as the unpadded sequence.
    pub fn forward(&self, ids: &Tensor, valid: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.size2()?;
        if valid.size() != [b, t] {
            bail!("valid mask has shape {:?}, the ids ({b}, {t})", valid.size());
        }
        let (positions, mask) = Self::inputs(valid)?;
        let hidden = self.backbone.forward_hidden(ids, &positions, Some(&mask), None)?; // (B, T, H)
        self.score_hidden(&hidden, valid)
    }

    /// The positions (B, T) and attention mask (B, 1, T, T) of a batch whose
    /// real tokens `valid` (B, T) marks: positions count real tokens only.
    pub fn inputs(valid: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, t) = valid.size2()?;
        let valid = valid.to_kind(Kind::Bool);
        let counts = valid.to_kind(Kind::Int64);
        let positions = (counts.cumsum(1, Kind::Int64) - 1).clamp_min(0); // (B, T)
        Ok((positions, padded_causal_mask(&valid, t)?)) // (B, 1, T, T)
    }

    /// Rewards (B,) f32 from the backbone's final hidden states (B, T, H):
    /// the head at each row's last real token.
    pub fn score_hidden(&self, hidden: &Tensor, valid: &Tensor) -> Result<Tensor> {
        let (b, _, h) = hidden.size3()?;
        let last = last_index(&valid.to_kind(Kind::Bool))?; // (B,)
        let index = last.view([b, 1, 1]).expand([b, 1, h], false); // (B, 1, H)
        let pooled = hidden.gather(1, &index, false).squeeze_dim(1); // (B, H)
        Ok(self.score.forward(&pooled).squeeze_dim(-1).to_kind(Kind::Float)) // (B,)
    }
}

/// Index of the last true entry of each row of `valid` (B, T): the argmax of
/// `arange(T) · valid`, as transformers computes it (0 for an empty row).
pub fn last_index(valid: &Tensor) -> Result<Tensor> {
    let (_, t) = valid.size2()?;
    let ar = Tensor::arange(t, (Kind::Int64, valid.device())).unsqueeze(0); // (1, T)
    Ok((ar * valid.to_kind(Kind::Int64)).argmax(-1, false)) // (B,)
}

/// A reward model with its variables and tokenizer.
pub struct LoadedReward {
    pub vs: nn::VarStore,
    pub model: RewardModel,
    pub tokenizer: Tokenizer,
    /// Tensors absent from the directory and freshly initialised (the head,
    /// when starting from a causal LM; empty for a reward model directory).
    pub new_tensors: Vec<String>,
    /// `reward_stats.json`, when the directory has one.
    pub stats: Option<RewardStats>,
}

/// Loads a reward model from `dir`: a reward model directory (with
/// `score.weight`) as it is, or a causal LM (an SFT checkpoint) whose
/// backbone is loaded and whose head is new, drawn from normal(0,
/// `head_std`, default the config's `initializer_range`) by
/// [`crate::init::seeded_normal`] keyed by `head_seed`: the same seed gives
/// the same head, whatever other threads do with torch's generator. Only `score.weight` may be new: any other missing tensor is an
/// error. A causal LM's `lm_head.weight` is not used. The new tensors are
/// logged to stderr and returned.
pub fn load(
    dir: &Path,
    device: Device,
    kind: Kind,
    head_std: Option<f64>,
    head_seed: u64,
) -> Result<LoadedReward> {
    let file_cfg = checkpoint::read_config(dir)?;
    let tokenizer = Tokenizer::from_file(&dir.join(checkpoint::TOKENIZER))?;
    if tokenizer.vocab_size() > file_cfg.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but vocab_size is {}",
            dir.display(),
            tokenizer.vocab_size(),
            file_cfg.vocab_size
        );
    }
    let std = head_std.unwrap_or(file_cfg.initializer_range);
    if !(std.is_finite() && std > 0.0) {
        bail!("the score head's init std must be a positive number, got {std}");
    }
    let reader = WeightReader::open_dir(dir)?;
    let mut vs = nn::VarStore::new(device);
    vs.set_kind(kind);
    let model = RewardModel::with_init(&vs.root(), &file_cfg, std, WeightInit::Zeros)
        .with_context(|| format!("model {}", dir.display()))?;
    if reader.contains(LM_HEAD) && !file_cfg.tie_word_embeddings {
        eprintln!(
            "{}: the causal LM head {LM_HEAD} is not part of a reward model; not loaded",
            dir.display()
        );
    }
    let mut new_tensors = vec![];
    let mut skip: Vec<&str> = vec![];
    if !reader.contains(SCORE_WEIGHT) {
        // A fresh head; the name and shape checks still cover every other
        // tensor.
        let head = crate::init::seeded_normal(&[1, model.cfg.hidden_size], std, head_seed, SCORE_WEIGHT);
        tch::no_grad(|| model.score.weight.shallow_clone().f_copy_(&head))?;
        new_tensors.push(SCORE_WEIGHT.to_string());
        skip.push(SCORE_WEIGHT);
    }
    checkpoint::load_from(&vs, &reader, &[LM_HEAD], &skip, dir)?;
    if !new_tensors.is_empty() {
        eprintln!(
            "{}: new tensors, not in the checkpoint: {SCORE_WEIGHT} [1, {}] (normal, std {std}); every other tensor loaded",
            dir.display(),
            model.cfg.hidden_size
        );
    }
    let stats = RewardStats::read(dir)?;
    Ok(LoadedReward { vs, model, tokenizer, new_tensors, stats })
}

/// Saves a reward model directory (architecture
/// `GemmaForSequenceClassification`, head `score.weight`) and, when given,
/// its reward statistics.
pub fn save(
    dir: &Path,
    vs: &nn::VarStore,
    model: &RewardModel,
    tok: &Tokenizer,
    stats: Option<&RewardStats>,
) -> Result<()> {
    let opts = SaveOptions { architecture: ARCHITECTURE.into(), ..Default::default() };
    checkpoint::save(dir, vs, &model.cfg, tok, &opts)?;
    if let Some(s) = stats {
        s.write(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_index_handles_both_padding_sides() {
        let valid =
            Tensor::from_slice(&[1i64, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0]).view([3, 4]).to_kind(Kind::Bool);
        let got: Vec<i64> = Vec::try_from(last_index(&valid).unwrap()).unwrap();
        assert_eq!(got, vec![2, 3, 0]);
    }

    #[test]
    fn stats_are_population_mean_and_std() {
        let s = RewardStats::of(&[1.0, 3.0], "eval").unwrap();
        assert_eq!((s.mean, s.std, s.n), (2.0, 1.0, 2));
        assert_eq!(s.normalize(3.0), 1.0);
        assert!(RewardStats::of(&[], "eval").is_none());
    }

    #[test]
    fn reward_config_sets_one_label_and_refuses_others() {
        let c = reward_config(&GemmaConfig::preset("tiny").unwrap()).unwrap();
        assert_eq!(c.architectures, Some(vec![ARCHITECTURE.to_string()]));
        assert_eq!(c.num_labels, Some(1));
        let mut two = GemmaConfig::preset("tiny").unwrap();
        two.num_labels = Some(2);
        // A causal LM's label count means nothing; a classifier's must be 1.
        assert_eq!(reward_config(&two).unwrap().num_labels, Some(1));
        two.architectures = Some(vec![ARCHITECTURE.into()]);
        let e = reward_config(&two).unwrap_err().to_string();
        assert!(e.contains("2 labels"), "{e}");
    }
}
