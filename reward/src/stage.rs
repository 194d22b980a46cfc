//! The reward stage: config → preference pairs → Bradley-Terry training →
//! checkpoints → evaluation → final reward model with its statistics.

use crate::data::{self, make_pair_batch, plan_epoch, EncodedPairs, PairTokens, Truncation};
use crate::eval::{self, EvalReport};
use crate::loss::reward_loss;
use crate::model::{self, RewardStats, ARCHITECTURE};
use anyhow::{bail, Context, Result};
use datasets::{Mixture, MixtureConfig, RecordKind};
use lm::peft::TaskType;
use lm::stage_settings::StageSettings;
use lm::train;
use lm::train::session::{Precision, Session, SessionSpec, Trainable, Updater};
use lm::Tokenizer;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind};

/// The `[reward]` section of a recipe (or a standalone `align reward` config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// The settings every stage has; `model` is the checkpoint to start
    /// from: a causal LM (an SFT model; the head is new) or a reward model
    /// (trained further); `seed` seeds the head's init and the batch order;
    /// bf16 runs on CUDA.
    #[serde(flatten)]
    pub stage: StageSettings,
    /// Preference pairs (`prompt`, `chosen`, `rejected`, optional `margin`
    /// and `category`); the held-out split is the evaluation set.
    pub data: MixtureConfig,
    /// Longest sequence (prompt + response, in tokens) of either side.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Pairs per micro-batch (each pair is two rows).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    #[serde(default = "lm::train::defaults::one")]
    pub grad_accum: usize,
    /// Over-long pairs: `truncate_prompt` (default) or `drop`.
    #[serde(default)]
    pub truncation: Truncation,
    #[serde(default = "lm::train::defaults::one_u64")]
    pub epochs: u64,
    /// Stop after this many optimiser steps (0: run `epochs`).
    #[serde(default)]
    pub max_steps: u64,
    /// Stop once this many steps are done, saving a checkpoint but no final
    /// model, as an interrupted run would; running again resumes. Unlike
    /// `max_steps` it changes neither the schedule nor the config hash.
    #[serde(default)]
    pub stop_after: Option<u64>,
    /// Coefficient of the reward-centring term mean((r_c + r_r)²), as TRL's
    /// `center_rewards_coefficient` (0 disables; 0.01 is TRL's suggestion).
    #[serde(default)]
    pub center_rewards_coefficient: f64,
    /// Std of the new head's normal init (default: the model's `initializer_range`).
    #[serde(default)]
    pub head_init_std: Option<f64>,
}

fn default_max_seq_len() -> usize {
    512
}
fn default_batch_size() -> usize {
    8
}

impl RewardConfig {
    /// Reads a TOML config: a top-level `[reward]` table or the fields alone.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let cfg: RewardConfig = lm::stage_settings::read_stage_config(path, "reward")?;
        cfg.validate().with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.stage.validate()?;
        if self.batch_size == 0 || self.grad_accum == 0 {
            bail!("batch_size and grad_accum must be at least 1");
        }
        if self.max_seq_len < 8 {
            bail!("max_seq_len must be at least 8 tokens, got {}", self.max_seq_len);
        }
        if self.epochs == 0 && self.max_steps == 0 {
            bail!("set epochs or max_steps");
        }
        if !(self.center_rewards_coefficient.is_finite() && self.center_rewards_coefficient >= 0.0) {
            bail!("center_rewards_coefficient must be >= 0, got {}", self.center_rewards_coefficient);
        }
        if let Some(s) = self.head_init_std {
            if !(s.is_finite() && s > 0.0) {
                bail!("head_init_std must be a positive number, got {s}");
            }
        }
        if self.stop_after == Some(0) {
            bail!("stop_after must be at least 1 (or absent)");
        }
        if let Some(k) = self.data.kind.filter(|&k| k != RecordKind::Preference) {
            bail!("data.kind is {k}; the reward stage trains on preference pairs (kind = \"preference\")");
        }
        Ok(())
    }

    /// Resolves relative paths against `base` (the config file's
    /// directory); the mixture's paths are resolved when it is loaded.
    pub fn resolve_paths(&mut self, base: &Path) {
        self.stage.resolve_paths(base);
    }

    /// The checkpoints' config hash ([`train::checkpoint_hash`]).
    pub fn hash(&self) -> Result<String> {
        train::checkpoint_hash(self, |c| {
            c.stop_after = None;
            c.stage.clear_run_only();
        })
    }
}

/// What a run reports (also written as `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardSummary {
    /// Optimiser steps done.
    pub steps: u64,
    pub total_steps: u64,
    /// False when the run stopped at `stop_after` (no final model yet).
    pub completed: bool,
    pub first_losses: Vec<f64>,
    pub final_loss: f64,
    /// Accuracy on the last step's training pairs.
    pub final_train_accuracy: f64,
    /// On the held-out pairs (absent without a held-out split or when stopped early).
    pub eval: Option<EvalReport>,
    /// Stored as `reward_stats.json` in `model_dir`.
    pub reward_stats: Option<RewardStats>,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    /// Training pairs cut on the prompt side / left out for length.
    pub truncated: usize,
    pub dropped: usize,
    pub eval_truncated: usize,
    pub eval_dropped: usize,
    /// Bad rows skipped by the readers (`on_bad_row = "skip"`).
    pub skipped_bad_rows: usize,
    /// Tensors initialised fresh (`score.weight` when starting from a causal LM).
    pub new_tensors: Vec<String>,
    pub pairs_per_s: f64,
    pub tokens_per_s: f64,
    pub resumed_from: Option<u64>,
    pub model_dir: Option<PathBuf>,
    #[serde(default)]
    pub sources: serde_json::Value,
}

/// Encoded training and held-out pairs with the mixture that orders them.
pub struct RewardData {
    /// One entry per training row of the mixture (all sources, in order).
    pub train: EncodedPairs,
    pub eval: EncodedPairs,
    pub mixture: Mixture,
    /// (source, row within the source) → index into `train.pairs`.
    pub index: HashMap<(usize, usize), usize>,
    pub skipped_bad_rows: usize,
}

/// Reads the preference mixture of `cfg` (relative paths resolved against
/// `base`), formats every pair and applies the length policy. Bad rows fail
/// with the file, row and field, or are skipped and counted, per the
/// mixture's `on_bad_row`.
pub fn load_data(cfg: &RewardConfig, tok: &Tokenizer, base: &Path) -> Result<RewardData> {
    let mut mcfg = cfg.data.clone();
    mcfg.kind = Some(RecordKind::Preference);
    let mixture = Mixture::load(&mcfg, base).context(
        "reading the reward data: each row needs `chosen` and `rejected` (text or message lists), \
         a `prompt` unless they are whole dialogues, and optionally `margin` and `category`",
    )?;
    let mut index = HashMap::new();
    let mut rows = vec![];
    for s in 0..mixture.source_names().len() {
        for (i, ex) in mixture.train_rows(s).iter().enumerate() {
            index.insert((s, i), rows.len());
            rows.push(ex);
        }
    }
    let train = data::encode_pairs(tok, &rows, cfg.max_seq_len, cfg.truncation)?;
    if train.kept_count() == 0 {
        bail!(
            "no training pair fits in max_seq_len = {} ({} pairs, {} left out for length); raise max_seq_len",
            cfg.max_seq_len,
            rows.len(),
            train.dropped
        );
    }
    let held: Vec<&datasets::Example> = mixture.held_out().iter().collect();
    let eval = data::encode_pairs(tok, &held, cfg.max_seq_len, Truncation::TruncatePrompt)?;
    let skipped_bad_rows = mixture.report().skipped.len();
    Ok(RewardData { train, eval, mixture, index, skipped_bad_rows })
}

/// The training order of one epoch as indices into `data.train.pairs`.
fn epoch_order(data: &RewardData, epoch: u64) -> Vec<usize> {
    data.mixture
        .epoch(epoch)
        .into_iter()
        .map(|d| data.index[&(d.source, d.index)])
        .filter(|&i| data.train.pairs[i].is_some())
        .collect()
}

fn json_f64(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn eval_row(step: u64, r: &EvalReport) -> serde_json::Value {
    serde_json::json!({
        "step": step,
        "eval_loss": json_f64(r.loss),
        "eval_accuracy": json_f64(r.accuracy),
        "eval_margin": json_f64(r.mean_margin),
        "eval_reward_mean": json_f64(r.reward_mean),
        "eval_reward_std": json_f64(r.reward_std),
    })
}

/// Writes `loss.png` from `metrics.jsonl` in `dir`: the training loss per
/// step (faint, under its moving average) and the held-out loss, above the
/// accuracy (the share of pairs whose chosen answer scores higher) on the
/// training batches and on the held-out pairs, on a 0–1 axis.
pub fn plot_metrics(dir: &Path) -> Result<()> {
    use lm::plot::{ema, line_charts, Panel, Series, SeriesStyle};
    let rows = train::read_metrics(&dir.join("metrics.jsonl"))?;
    let pick = |key: &str| -> Vec<(f64, f64)> {
        rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r.get(key)?.as_f64()?))).collect()
    };
    let (loss, acc) = (pick("loss"), pick("accuracy"));
    let span = (loss.len() / 20).clamp(2, 100);
    let smooth =
        |pts: &[(f64, f64)]| Series::line(format!("train, moving average ({span} steps)"), ema(pts, span));
    let held_out =
        |key: &str| Series { style: SeriesStyle::LinePoints, ..Series::line("held-out", pick(key)) };
    let panels = [
        Panel {
            title: "loss".into(),
            y_label: "loss".into(),
            series: vec![Series::faint("train", loss.clone()), smooth(&loss), held_out("eval_loss")],
            ..Default::default()
        },
        Panel {
            title: "accuracy (chosen scored above rejected)".into(),
            y_label: "accuracy".into(),
            series: vec![Series::faint("train", acc.clone()), smooth(&acc), held_out("eval_accuracy")],
            y_range: Some((0.0, 1.0)),
        },
    ];
    line_charts(&dir.join("loss.png"), "Reward model: loss and accuracy", "step", &panels)
}

/// Runs the stage. Resumes from the newest checkpoint in
/// `output_dir/checkpoints` when its config hash matches; bit-identical to an
/// uninterrupted run on the CPU with the same thread count.
pub fn run(cfg: &RewardConfig, base: &Path) -> Result<RewardSummary> {
    cfg.validate()?;
    let device = lm::device::parse_device(&cfg.stage.device)?;
    let precision = Precision::of(&cfg.stage)?;
    if precision.compute == Kind::BFloat16 && device == Device::Cpu && !cfg.stage.uses_lora() {
        bail!(
            "dtype = \"bf16\" training is for CUDA; use f32 on the CPU (or LoRA with base_dtype = \"bf16\")"
        );
    }
    // The output directory: this run's alone (locked), never an input or
    // someone else's; a finished run is not redone.
    let sources: Vec<PathBuf> = cfg.data.sources.iter().map(|s| base.join(&s.path)).collect();
    let mut inputs: Vec<(&str, &Path)> = vec![("model", cfg.stage.model.as_path())];
    inputs.extend(sources.iter().map(|p| ("data source", p.as_path())));
    let _claim = lm::output_dir::claim(&cfg.stage.output_dir, "reward", &inputs)?;
    if let Some(done) =
        lm::output_dir::finished::<RewardSummary>(&cfg.stage.output_dir, &cfg.hash()?).filter(|s| s.completed)
    {
        eprintln!(
            "reward: {} holds a finished run ({} steps); nothing to do (summary.json left as it is)",
            cfg.stage.output_dir.display(),
            done.steps
        );
        return Ok(done);
    }
    let load_kind = precision.load_kind(cfg.stage.uses_lora());
    let loaded = model::load(&cfg.stage.model, device, load_kind, cfg.head_init_std, cfg.stage.seed)?;
    let (mut model, tok) = (loaded.model, loaded.tokenizer);
    let mut weights = Trainable::prepare(loaded.vs, &mut model.backbone, &cfg.stage, TaskType::SeqCls)?;
    let data = load_data(cfg, &tok, base)?;
    eprintln!("{}", data.mixture.report());
    eprintln!(
        "reward data: {} training pairs ({} truncated on the prompt side, {} left out for length), {} held out ({} truncated, {} left out)",
        data.train.kept_count(),
        data.train.truncated,
        data.train.dropped,
        data.eval.kept_count(),
        data.eval.truncated,
        data.eval.dropped
    );
    let lens: Vec<usize> = data.train.pairs.iter().map(|p| p.as_ref().map_or(0, PairTokens::len)).collect();
    let plan = |epoch: u64| {
        plan_epoch(&lens, &epoch_order(&data, epoch), cfg.batch_size, cfg.stage.seed ^ (epoch << 20))
    };
    // Data-parallel: a step is grad_accum micro-batches per rank, taken
    // from one global sequence (the single process's order): rank r runs
    // the step's micro-batches i with i % world == r.
    let dist = lm::dist::init(device)?;
    let (rank, world) = (dist.rank, dist.world);
    let global_accum = cfg.grad_accum * world;
    let batches_per_epoch = plan(0).len() as u64;
    let steps_per_epoch = batches_per_epoch.div_ceil(global_accum as u64).max(1);
    let total_steps = if cfg.max_steps > 0 { cfg.max_steps } else { cfg.epochs * steps_per_epoch };

    let spec = SessionSpec {
        name: "reward",
        settings: &cfg.stage,
        total_steps,
        config_hash: cfg.hash()?,
        extra: serde_json::json!({}),
        architecture: ARCHITECTURE,
        ignore: &[],
    };
    let mut up = Updater::new(&mut weights, &cfg.stage.optim)?;
    let mut s = Session::start(spec, &weights, &model.backbone, &mut up)?;
    let resumed_from = s.resumed_from;
    let eval_pairs: Vec<&PairTokens> = data.eval.kept().collect();
    let pad = tok.special.pad;
    let coef = cfg.center_rewards_coefficient;
    let mut first_losses = vec![];
    let (mut last_loss, mut last_acc) = (f64::NAN, f64::NAN);
    let (mut pair_count, mut tok_count, t0) = (0usize, 0usize, Instant::now());
    let mut epoch_batches = plan(s.state.epoch);
    let mut last_saved = None;
    // The reward statistics of the latest evaluation go into every
    // checkpoint saved after it, so any checkpoint can normalise rewards.
    // After a resume they are those the resumed checkpoint carried.
    let mut eval_stats: Option<RewardStats> = match resumed_from {
        None => None,
        Some(step) => match train::list_checkpoints(&s.ckpt_root)?.into_iter().find(|(st, _)| *st == step) {
            Some((_, dir)) => RewardStats::read(&dir)?,
            None => None,
        },
    };
    let save =
        |s: &Session, weights: &Trainable, up: &Updater, stats: Option<&RewardStats>| -> Result<PathBuf> {
            let extra = match stats {
                Some(st) => vec![(lm::reward_model::STATS_FILE, serde_json::to_vec_pretty(st)?)],
                None => vec![],
            };
            s.save(weights, up, &model.cfg, &tok, &extra)
        };
    let stop_at = cfg.stop_after.filter(|&st| st < total_steps);

    while s.state.step < total_steps {
        if stop_at.is_some_and(|st| s.state.step >= st) {
            break;
        }
        // This step's micro-batches, crossing epochs as needed.
        let mut micro = vec![];
        for i in 0..global_accum {
            if s.state.batch_in_epoch as usize >= epoch_batches.len() {
                s.state.epoch += 1;
                s.state.batch_in_epoch = 0;
                epoch_batches = plan(s.state.epoch);
            }
            if i % world == rank {
                let idx = &epoch_batches[s.state.batch_in_epoch as usize];
                let pairs: Vec<&PairTokens> =
                    idx.iter().filter_map(|&i| data.train.pairs[i].as_ref()).collect();
                micro.push(make_pair_batch(&pairs, pad, device)?);
            }
            s.state.batch_in_epoch += 1;
        }
        // The denominator is the global count of pairs.
        let counts = up.global_sums(&[
            micro.iter().map(|b| b.pairs).sum::<usize>() as f64,
            micro.iter().map(|b| b.tokens).sum::<usize>() as f64,
        ])?;
        let denom = counts[0].max(1.0);
        let (mut correct, mut margin_sum) = (0.0, 0.0);
        let checkpointing = cfg.stage.gradient_checkpointing;
        let t_step = std::time::Instant::now();
        let r = up.step(micro.len(), total_steps, s.state.step, |i| {
            let b = &micro[i];
            let (positions, mask) = lm::reward_model::RewardModel::inputs(&b.valid)?;
            let backbone = &model.backbone;
            backbone.forward_backward(&b.ids, &positions, Some(&mask), checkpointing, |h| {
                let r = model.score_hidden(h, &b.valid)?; // (2P,)
                let p = b.pairs as i64;
                let (rc, rr) = (r.narrow(0, 0, p), r.narrow(0, p, p)); // (P,), (P,)
                let loss = reward_loss(&rc, &rr, Some(&b.margin), coef, denom)?;
                let v = loss.double_value(&[]);
                if !v.is_finite() {
                    return Ok(v);
                }
                loss.backward();
                let diff = (&rc - &rr).detach(); // (P,)
                correct += diff.gt(0.0).to_kind(Kind::Float).sum(Kind::Float).double_value(&[]);
                margin_sum += diff.sum(Kind::Float).double_value(&[]);
                Ok(v)
            })
        })?;
        if dist.is_distributed() {
            let g = up.global_sums(&[correct, margin_sum])?;
            (correct, margin_sum) = (g[0], g[1]);
        }
        pair_count += counts[0] as usize;
        tok_count += counts[1] as usize;
        s.state.step += 1;
        let (step, loss_sum, lr) = (s.state.step, r.loss, r.lr);
        (last_loss, last_acc) = (loss_sum, correct / denom);
        if first_losses.len() < 5 && resumed_from.is_none() {
            first_losses.push(loss_sum);
        }
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        let (pps, tps) = (pair_count as f64 / secs, tok_count as f64 / secs);
        s.log.write(&serde_json::json!({
            "step": step, "loss": loss_sum, "accuracy": last_acc, "margin": margin_sum / denom,
            "lr": lr, "grad_norm": r.grad_norm, "pairs_per_s": pps, "tokens_per_s": tps, "epoch": s.state.epoch,
            "step_s": t_step.elapsed().as_secs_f64(), "allreduce_s": r.comm_s,
        }))?;
        s.progress.set_position(step);
        s.progress.set_message(format!("loss {loss_sum:.4} acc {last_acc:.2} lr {lr:.2e} {pps:.1} pairs/s"));
        // The last step's evaluation is the final one, below (logged once).
        if s.due(cfg.stage.eval_every) && !eval_pairs.is_empty() {
            let (r, all) = eval::evaluate(&model, &eval_pairs, cfg.batch_size, pad, coef)?;
            s.log.write(&eval_row(step, &r))?;
            eval_stats = RewardStats::of(&all, "eval");
        }
        if s.due(cfg.stage.save_every) {
            save(&s, &weights, &up, eval_stats.as_ref())?;
            last_saved = Some(step);
        }
    }
    s.progress.finish_and_clear();
    let (state, log) = (&s.state, &s.log);
    if last_loss.is_nan() {
        // Resumed at the last step (cut off before the summary): as logged.
        last_loss = log.kept_value(state.step, "loss").unwrap_or(f64::NAN);
        last_acc = log.kept_value(state.step, "accuracy").unwrap_or(f64::NAN);
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    let mut summary = RewardSummary {
        steps: state.step,
        total_steps,
        completed: state.step >= total_steps,
        first_losses,
        final_loss: last_loss,
        final_train_accuracy: last_acc,
        eval: None,
        reward_stats: None,
        train_pairs: data.train.kept_count(),
        eval_pairs: eval_pairs.len(),
        truncated: data.train.truncated,
        dropped: data.train.dropped,
        eval_truncated: data.eval.truncated,
        eval_dropped: data.eval.dropped,
        skipped_bad_rows: data.skipped_bad_rows,
        new_tensors: loaded.new_tensors,
        pairs_per_s: pair_count as f64 / secs,
        tokens_per_s: tok_count as f64 / secs,
        resumed_from,
        model_dir: None,
        sources: serde_json::to_value(&data.mixture.report().sources).unwrap_or_default(),
    };
    let summary_path = cfg.stage.output_dir.join("summary.json");
    let plot = || {
        if !dist.is_main() {
            return;
        }
        if let Err(e) = plot_metrics(&cfg.stage.output_dir) {
            eprintln!("warning: no loss.png: {e:#}");
        }
    };
    if !summary.completed {
        plot();
        if last_saved != Some(state.step) {
            save(&s, &weights, &up, eval_stats.as_ref())?;
        }
        eprintln!("stopped after step {} of {total_steps} (stop_after); run again to resume", state.step);
        if dist.is_main() {
            lm::fsio::write_atomic(&summary_path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
        }
        return Ok(summary);
    }

    // Evaluation and the statistics stored with the model: on the held-out
    // pairs, or on the training pairs when there are none.
    let stats = if eval_pairs.is_empty() {
        let train_pairs: Vec<&PairTokens> = data.train.kept().collect();
        let (_, all) = eval::evaluate(&model, &train_pairs, cfg.batch_size, pad, coef)?;
        RewardStats::of(&all, "train")
    } else {
        let (r, all) = eval::evaluate(&model, &eval_pairs, cfg.batch_size, pad, coef)?;
        if s.log.kept_value(s.state.step, "eval_loss").is_none() {
            s.log.write(&eval_row(s.state.step, &r))?;
        }
        summary.eval = Some(r);
        RewardStats::of(&all, "eval")
    };
    save(&s, &weights, &up, stats.as_ref())?;
    let model_dir = cfg.stage.output_dir.join("model");
    let adapter_dir = cfg.stage.output_dir.join("adapter");
    s.write_model(&weights, &model.backbone, &model_dir, &adapter_dir, &model.cfg, &tok)?;
    if dist.is_main() {
        if let Some(st) = &stats {
            st.write(&model_dir)?;
        }
    }
    // The model is complete (with its statistics) on every rank's return.
    dist.barrier()?;
    summary.reward_stats = stats;
    summary.model_dir = Some(model_dir);
    if !dist.is_main() {
        return Ok(summary);
    }
    plot();
    lm::fsio::write_atomic(&summary_path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RewardConfig {
        toml::from_str(
            r#"model = "m"
output_dir = "o"
[data]
sources = [{ name = "s", path = "p.jsonl" }]
"#,
        )
        .unwrap()
    }

    #[test]
    fn hash_ignores_where_a_run_stops_and_what_it_keeps_but_not_training_settings() {
        let a = cfg();
        let mut b = a.clone();
        b.stop_after = Some(3);
        b.stage.save_every = 7;
        b.stage.eval_every = 2;
        b.stage.keep_last = 9;
        assert_eq!(a.hash().unwrap(), b.hash().unwrap());
        b.stage.optim.lr *= 2.0;
        assert_ne!(a.hash().unwrap(), b.hash().unwrap());
        let mut c = a.clone();
        c.center_rewards_coefficient = 0.01;
        assert_ne!(a.hash().unwrap(), c.hash().unwrap());
    }

    #[test]
    fn defaults_and_validation() {
        let c = cfg();
        assert_eq!(
            (c.batch_size, c.grad_accum, c.max_seq_len, c.truncation),
            (8, 1, 512, Truncation::TruncatePrompt)
        );
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.center_rewards_coefficient = -1.0;
        assert!(bad.validate().unwrap_err().to_string().contains("center_rewards_coefficient"));
        let mut bad = c;
        bad.stop_after = Some(0);
        assert!(bad.validate().is_err());
    }
}
