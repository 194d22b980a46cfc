//! The SFT stage: config → data → train → checkpoints → final model.

use crate::batch::{apply_truncation, make_batch, plan_epoch, windows, Batch, Row, Sequence, Truncation};
use crate::loss::masked_cross_entropy_sum;
use anyhow::{bail, Context, Result};
use datasets::{DataReportSummary, Mixture, MixtureConfig};
use lm::checkpoint;
use lm::peft::TaskType;
use lm::stage_settings::StageSettings;
use lm::train;
use lm::train::session::{Precision, Session, SessionSpec, Trainable, Updater};
use lm::{Gemma, Tokenizer};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Tensor;

/// What the stage trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Dialogues through the formatter; loss on the model's turns only.
    #[default]
    Chat,
    /// Plain text; loss on every token (for building a base model).
    Pretrain,
}

/// The `[sft]` section of a recipe (or a standalone `align sft` config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// The settings every stage has (`model`: the checkpoint to start from).
    #[serde(flatten)]
    pub stage: StageSettings,
    #[serde(default)]
    pub mode: Mode,
    /// Chat mode: a mixture of conversational or prompt–completion sources.
    #[serde(default)]
    pub data: Option<MixtureConfig>,
    /// Pretrain mode: text files, one document per line (`.txt`), or JSONL
    /// with a `text` field.
    #[serde(default)]
    pub text_files: Vec<PathBuf>,
    /// Pretrain mode: the fraction of documents held out for evaluation
    /// (whole documents, drawn from `seed`).
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Pretrain mode: a document longer than `max_seq_len` is cut into
    /// windows of `max_seq_len` tokens, one every `stride` tokens (default
    /// `max_seq_len`: no overlap); overlapping tokens are context only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<usize>,
    /// Rows per micro-batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    #[serde(default = "lm::train::defaults::one")]
    pub grad_accum: usize,
    #[serde(default)]
    pub packing: bool,
    #[serde(default)]
    pub truncation: Truncation,
    #[serde(default = "lm::train::defaults::one_u64")]
    pub epochs: u64,
    /// Stop after this many optimiser steps (0: run `epochs`).
    #[serde(default)]
    pub max_steps: u64,
}

fn default_eval_fraction() -> f64 {
    0.02
}
fn default_max_seq_len() -> usize {
    512
}
fn default_batch_size() -> usize {
    8
}

impl SftConfig {
    /// The checkpoints' config hash ([`train::checkpoint_hash`]).
    pub fn hash(&self) -> Result<String> {
        train::checkpoint_hash(self, |c| c.stage.clear_run_only())
    }

    /// Reads a TOML config; a top-level `[sft]` table or the fields alone.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let cfg: SftConfig = lm::stage_settings::read_stage_config(path, "sft")?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.stage.validate()?;
        if self.batch_size == 0 || self.grad_accum == 0 || self.max_seq_len < 2 {
            bail!("batch_size and grad_accum must be at least 1 and max_seq_len at least 2");
        }
        match self.mode {
            Mode::Chat if self.data.is_none() => bail!("mode = \"chat\" needs a [data] mixture"),
            Mode::Pretrain if self.text_files.is_empty() => bail!("mode = \"pretrain\" needs text_files"),
            _ => {}
        }
        if self.epochs == 0 && self.max_steps == 0 {
            bail!("set epochs or max_steps");
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            bail!("eval_fraction must be in [0, 1)");
        }
        if let Some(s) = self.stride {
            if s == 0 || s > self.max_seq_len {
                bail!("stride must be in 1..=max_seq_len ({}), got {s}", self.max_seq_len);
            }
        }
        Ok(())
    }

    /// Resolves relative paths against `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.stage.resolve_paths(base);
        self.text_files.iter_mut().for_each(fix);
    }
}

/// What a finished run reports (also written as `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftSummary {
    pub steps: u64,
    pub first_losses: Vec<f64>,
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
    pub eval_ppl: Option<f64>,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub truncated: usize,
    pub dropped: usize,
    pub tokens_per_s: f64,
    pub resumed_from: Option<u64>,
    pub model_dir: PathBuf,
    #[serde(default)]
    pub sources: serde_json::Value,
    /// Chat mode: what the filters removed (per filter) and the bad rows
    /// skipped (file, line or row, field, reason; the first
    /// [`DataReportSummary::MAX_LISTED`]). Empty in pretrain mode.
    #[serde(default)]
    pub data: DataReportSummary,
    /// Pretrain mode: the documents of each split and the windows cut from them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<WindowCounts>,
}

/// Pretrain mode: how the documents were split and cut into windows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowCounts {
    pub documents: usize,
    pub train_documents: usize,
    pub eval_documents: usize,
    /// Documents longer than `max_seq_len`, cut into more than one window.
    pub long_documents: usize,
    pub train_windows: usize,
    pub eval_windows: usize,
    pub max_seq_len: usize,
    pub stride: usize,
}

/// The chat-mode sampler: the mixture and, per (source, row), the index of
/// its tokenized sequence.
pub type Sampler = (Mixture, HashMap<(usize, usize), usize>);

/// Training and held-out sequences, with what the data report says.
pub struct Data {
    pub train: Vec<Sequence>,
    pub eval: Vec<Sequence>,
    pub truncated: usize,
    pub dropped: usize,
    pub sources: serde_json::Value,
    /// Pretrain mode: the split and window counts.
    pub windows: Option<WindowCounts>,
}

fn encode_examples(tok: &Tokenizer, examples: &[&datasets::Example]) -> Result<Vec<Sequence>> {
    let mut out = Vec::with_capacity(examples.len());
    for ex in examples {
        let enc = lm::chat::encode(tok, &ex.record.messages(), false)
            .with_context(|| format!("{} row {}", ex.origin.file.display(), ex.origin.row))?;
        if let Some(s) = Sequence::from_ids(&enc.ids, &enc.loss_mask) {
            out.push(s);
        }
    }
    Ok(out)
}

fn read_text_docs(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut docs = vec![];
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        let jsonl = f.extension().is_some_and(|e| e == "jsonl");
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if jsonl {
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: not a JSON object", f.display(), i + 1))?;
                let t = v["text"].as_str().with_context(|| {
                    format!("{}:{}: field \"text\" missing or not a string", f.display(), i + 1)
                })?;
                docs.push(t.to_string());
            } else {
                docs.push(line.to_string());
            }
        }
    }
    if docs.is_empty() {
        bail!("no text in {:?}", files);
    }
    Ok(docs)
}

/// Loads and tokenizes the data of `cfg` (relative paths in the mixture are
/// resolved against `base`). Returns the per-epoch sampler too (chat mode).
pub fn load_data(cfg: &SftConfig, tok: &Tokenizer, base: &Path) -> Result<(Data, Option<Sampler>)> {
    match cfg.mode {
        Mode::Pretrain => {
            let docs = read_text_docs(&cfg.text_files)?;
            let n_eval = ((docs.len() as f64) * cfg.eval_fraction).round() as usize;
            // Held out: whole documents, drawn from the seed (not the last ones).
            let mut order: Vec<usize> = (0..docs.len()).collect();
            {
                use rand::seq::SliceRandom;
                use rand::SeedableRng;
                order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
                    cfg.stage.seed ^ 0x6865_6c64_5f6f_7574,
                ));
            }
            let mut is_eval = vec![false; docs.len()];
            order.iter().take(n_eval.min(docs.len())).for_each(|&i| is_eval[i] = true);
            let stride = cfg.stride.unwrap_or(cfg.max_seq_len);
            let mut counts = WindowCounts {
                documents: docs.len(),
                max_seq_len: cfg.max_seq_len,
                stride,
                ..Default::default()
            };
            let (mut train, mut eval) = (vec![], vec![]);
            for (i, d) in docs.iter().enumerate() {
                let mut ids = vec![tok.special.bos];
                // A document's text is text: a literal "<eos>" in it is not the token.
                ids.extend(tok.encode_content(d)?);
                ids.push(tok.special.eos);
                let mask = vec![true; ids.len()];
                let Some(seq) = Sequence::from_ids(&ids, &mask) else { continue };
                // A long document is cut into windows, not truncated.
                let w = windows(&seq, cfg.max_seq_len, stride);
                counts.long_documents += usize::from(w.len() > 1);
                if is_eval[i] {
                    counts.eval_documents += 1;
                    counts.eval_windows += w.len();
                    eval.extend(w);
                } else {
                    counts.train_documents += 1;
                    counts.train_windows += w.len();
                    train.extend(w);
                }
            }
            if train.is_empty() {
                bail!("no training text in {:?}", cfg.text_files);
            }
            let sources = serde_json::json!({"text_files": cfg.text_files, "documents": docs.len()});
            Ok((Data { train, eval, truncated: 0, dropped: 0, sources, windows: Some(counts) }, None))
        }
        Mode::Chat => {
            let mcfg = cfg.data.as_ref().context("chat mode needs data")?;
            let mix = Mixture::load(mcfg, base)?;
            // Tokenize every distinct training row once.
            let mut index = HashMap::new();
            let mut rows: Vec<&datasets::Example> = vec![];
            for (s, _) in mix.source_names().iter().enumerate() {
                for (i, ex) in mix.train_rows(s).iter().enumerate() {
                    index.insert((s, i), rows.len());
                    rows.push(ex);
                }
            }
            let seqs = encode_examples(tok, &rows)?;
            if seqs.len() != rows.len() {
                bail!("{} training rows are too short to train on", rows.len() - seqs.len());
            }
            let held: Vec<&datasets::Example> = mix.held_out().iter().collect();
            let eval = encode_examples(tok, &held)?;
            let (eval, _, _) = apply_truncation(eval, cfg.max_seq_len, Truncation::Truncate);
            // Truncation is applied per row, keeping indices stable: dropped
            // rows are marked empty and skipped when epochs are planned.
            let mut train = Vec::with_capacity(seqs.len());
            let (mut truncated, mut dropped) = (0, 0);
            for s in seqs {
                let (mut kept, t, d) = apply_truncation(vec![s], cfg.max_seq_len, cfg.truncation);
                truncated += t;
                dropped += d;
                train.push(kept.pop().unwrap_or(Sequence { input: vec![], target: vec![], mask: vec![] }));
            }
            if train.iter().all(|s| s.is_empty()) {
                bail!("no training example left after truncation (max_seq_len {})", cfg.max_seq_len);
            }
            let sources = serde_json::to_value(&mix.report().sources).unwrap_or_default();
            Ok((Data { train, eval, truncated, dropped, sources, windows: None }, Some((mix, index))))
        }
    }
}

/// What the mixture removed before training (chat mode): per-filter counts
/// and the skipped bad rows. With `filters.keep_removed` the removed rows are
/// written to `out_dir/filtered_out.jsonl` for review.
pub fn data_report(sampler: &Option<Sampler>, out_dir: &Path) -> Result<DataReportSummary> {
    let Some((mix, _)) = sampler else {
        return Ok(DataReportSummary::default());
    };
    let mut summary = DataReportSummary::from_report(mix.report());
    if let Some(fr) = mix.report().filters.as_ref().filter(|fr| !fr.removed.is_empty()) {
        let path = out_dir.join(FILTERED_OUT_FILE);
        // Rank 0 writes for a distributed run.
        if lm::dist::env_rank() == 0 {
            fr.write_removed(&path)?;
        }
        summary.removed_rows_file = Some(path);
    }
    Ok(summary)
}

/// The removed rows of the filters, for review (with `keep_removed`).
pub const FILTERED_OUT_FILE: &str = "filtered_out.jsonl";

/// Mean per-token loss over `batch` rows for one micro-batch, normalised by
/// `denom` trained tokens (the whole accumulated batch's count).
pub fn batch_loss(model: &Gemma, batch: &Batch, denom: f64) -> Result<Tensor> {
    let hidden = model.forward_hidden(&batch.input, &batch.positions, batch.attn.as_ref(), None)?; // (B, T, H)
    let logits = model.logits(&hidden); // (B, T, V)
    Ok(masked_cross_entropy_sum(&logits, &batch.target, &batch.mask)? / denom)
}

/// One micro-batch's forward and backward, as training runs it: the
/// cross-entropy of its trained tokens summed and divided by `denom` (the
/// whole step's trained tokens), computed over chunks of the trained
/// positions only, so that no (B, T, V) logits are built
/// ([`lm::chunked`]), with the decoder layers recomputed in the backward
/// pass when `checkpointing` ([`Gemma::forward_backward`]). Gradients
/// accumulate into the trained variables; returns the loss. Its value and
/// gradients equal [`batch_loss`]'s and its `backward()`.
pub fn micro_step(model: &Gemma, batch: &Batch, denom: f64, checkpointing: bool) -> Result<f64> {
    model.forward_backward(&batch.input, &batch.positions, batch.attn.as_ref(), checkpointing, |h| {
        let picked = lm::chunked::select(h, &batch.mask)?; // (N, H)
        let targets = batch.target.f_masked_select(&batch.mask)?; // (N,)
        lm::chunked::cross_entropy_sum(
            model,
            &picked,
            &targets,
            1.0 / denom,
            lm::chunked::chunk_size(model),
            true,
        )
    })
}

/// Mean per-token loss on `seqs` (no gradients). The head and the
/// cross-entropy run over chunks of the trained positions only
/// ([`lm::chunked::cross_entropy_sum`]): no (B, T, V) logits.
pub fn evaluate(model: &Gemma, seqs: &[Sequence], batch_size: usize, pad: i64) -> Result<f64> {
    let _g = tch::no_grad_guard();
    let (mut sum, mut n) = (0.0, 0usize);
    let idx: Vec<usize> = (0..seqs.len()).collect();
    for chunk in idx.chunks(batch_size) {
        let rows: Vec<Row> = chunk.iter().map(|&i| vec![i]).collect();
        let b = make_batch(seqs, &rows, pad, model.device())?;
        let hidden = model.forward_hidden(&b.input, &b.positions, b.attn.as_ref(), None)?; // (B, T, H)
        let picked = lm::chunked::select(&hidden, &b.mask)?; // (N, H)
        drop(hidden);
        let targets = b.target.f_masked_select(&b.mask)?; // (N,)
        let chunk = lm::chunked::chunk_size(model);
        sum += lm::chunked::cross_entropy_sum(model, &picked, &targets, 1.0, chunk, false)?;
        n += b.trained;
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

/// The training order of one epoch as sequence indices (what [`run`] plans
/// the epoch's batches from, with [`crate::batch::plan_epoch`]).
pub fn epoch_order(data: &Data, sampler: &Option<Sampler>, epoch: u64, seed: u64) -> Vec<usize> {
    match sampler {
        Some((mix, index)) => mix
            .epoch(epoch)
            .into_iter()
            .map(|d| index[&(d.source, d.index)])
            .filter(|&i| !data.train[i].is_empty())
            .collect(),
        None => {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            let mut order: Vec<usize> = (0..data.train.len()).collect();
            let mut rng =
                rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            order.shuffle(&mut rng);
            order
        }
    }
}

/// Writes `loss.png` (train loss per step, faint, under its moving
/// average; eval loss points) from `metrics.jsonl` in `dir`.
pub fn plot_losses(dir: &Path) -> Result<()> {
    let rows = train::read_metrics(&dir.join("metrics.jsonl"))?;
    let pick = |key: &str| -> Vec<(f64, f64)> {
        rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r.get(key)?.as_f64()?))).collect()
    };
    let loss = pick("loss");
    let span = (loss.len() / 20).clamp(2, 100);
    let series = [
        lm::plot::Series::faint("train loss", loss.clone()),
        lm::plot::Series::line(
            format!("train loss, moving average ({span} steps)"),
            lm::plot::ema(&loss, span),
        ),
        lm::plot::Series {
            style: lm::plot::SeriesStyle::LinePoints,
            ..lm::plot::Series::line("eval loss", pick("eval_loss"))
        },
    ];
    lm::plot::line_chart(&dir.join("loss.png"), "SFT loss", "step", "loss", &series)
}

/// Runs the stage. Resumes from the newest checkpoint in
/// `output_dir/checkpoints` when its config hash matches.
pub fn run(cfg: &SftConfig, base: &Path) -> Result<SftSummary> {
    cfg.validate()?;
    // The output directory: this run's alone (locked), never an input or
    // someone else's; a finished run is not redone.
    let sources: Vec<PathBuf> =
        cfg.data.iter().flat_map(|d| d.sources.iter()).map(|s| base.join(&s.path)).collect();
    let mut inputs: Vec<(&str, &Path)> = vec![("model", cfg.stage.model.as_path())];
    inputs.extend(sources.iter().map(|p| ("data source", p.as_path())));
    inputs.extend(cfg.text_files.iter().map(|p| ("text_files", p.as_path())));
    let _claim = lm::output_dir::claim(&cfg.stage.output_dir, "sft", &inputs)?;
    if let Some(done) = lm::output_dir::finished::<SftSummary>(&cfg.stage.output_dir, &cfg.hash()?) {
        eprintln!(
            "sft: {} holds a finished run ({} steps); nothing to do (summary.json left as it is)",
            cfg.stage.output_dir.display(),
            done.steps
        );
        return Ok(done);
    }
    let device = lm::device::parse_device(&cfg.stage.device)?;
    let precision = Precision::of(&cfg.stage)?;
    let load_kind = precision.load_kind(cfg.stage.uses_lora());
    let loaded = checkpoint::load_causal_lm(&cfg.stage.model, device, load_kind)?;
    let (mut model, tok) = (loaded.model, loaded.tokenizer);
    let mut weights = Trainable::prepare(loaded.vs, &mut model, &cfg.stage, TaskType::CausalLm)?;
    let (data, sampler) = load_data(cfg, &tok, base)?;

    // Plan: batches per epoch are a pure function of (seed, epoch).
    let plan = |epoch: u64| -> Vec<Vec<Row>> {
        let order = epoch_order(&data, &sampler, epoch, cfg.stage.seed);
        plan_epoch(
            &data.train,
            &order,
            cfg.batch_size,
            cfg.max_seq_len,
            cfg.packing,
            cfg.stage.seed ^ (epoch << 20),
        )
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
        name: "sft",
        settings: &cfg.stage,
        total_steps,
        config_hash: cfg.hash()?,
        extra: serde_json::json!({}),
        architecture: "GemmaForCausalLM",
        ignore: &["lm_head.weight"],
    };
    let mut up = Updater::new(&mut weights, &cfg.stage.optim)?;
    let mut s = Session::start(spec, &weights, &model, &mut up)?;
    let resumed_from = s.resumed_from;
    let data_report = data_report(&sampler, &cfg.stage.output_dir)?;
    let mut first_losses = vec![];
    let mut last_loss = f64::NAN;
    let (mut tok_count, t0) = (0usize, Instant::now());
    let mut epoch_batches = plan(s.state.epoch);

    while s.state.step < total_steps {
        // Gather this step's micro-batches, crossing epochs as needed.
        let mut micro = vec![];
        for i in 0..global_accum {
            if s.state.batch_in_epoch as usize >= epoch_batches.len() {
                s.state.epoch += 1;
                s.state.batch_in_epoch = 0;
                epoch_batches = plan(s.state.epoch);
            }
            if i % world == rank {
                micro.push(make_batch(
                    &data.train,
                    &epoch_batches[s.state.batch_in_epoch as usize],
                    tok.special.pad,
                    device,
                )?);
            }
            s.state.batch_in_epoch += 1;
        }
        // The denominator is the global count of trained tokens.
        let counts = up.global_sums(&[
            micro.iter().map(|b| b.trained).sum::<usize>() as f64,
            micro.iter().map(|b| b.tokens).sum::<usize>() as f64,
        ])?;
        let denom = counts[0].max(1.0);
        let t_step = std::time::Instant::now();
        let r = up.step(micro.len(), total_steps, s.state.step, |i| {
            micro_step(&model, &micro[i], denom, cfg.stage.gradient_checkpointing)
        })?;
        tok_count += counts[1] as usize;
        s.state.step += 1;
        let (step, loss_sum, lr) = (s.state.step, r.loss, r.lr);
        last_loss = loss_sum;
        if first_losses.len() < 5 && resumed_from.is_none() {
            first_losses.push(loss_sum);
        }
        let tps = tok_count as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        // step_s: this optimiser step's forward, backward, all-reduce and
        // update; allreduce_s: its collectives (0 in one process).
        let step_s = t_step.elapsed().as_secs_f64();
        s.log.write(&serde_json::json!({"step": step, "loss": loss_sum, "lr": lr, "grad_norm": r.grad_norm, "tokens_per_s": tps, "epoch": s.state.epoch, "step_s": step_s, "allreduce_s": r.comm_s}))?;
        s.progress.set_position(step);
        s.progress.set_message(format!("loss {loss_sum:.4} lr {lr:.2e} {tps:.0} tok/s"));
        // The last step's evaluation is the final one, below (logged once).
        if s.due(cfg.stage.eval_every) && !data.eval.is_empty() {
            let el = evaluate(&model, &data.eval, cfg.batch_size, tok.special.pad)?;
            s.log.write(&serde_json::json!({"step": step, "eval_loss": el, "eval_ppl": el.exp()}))?;
        }
        if s.due(cfg.stage.save_every) {
            s.save(&weights, &up, &model.cfg, &tok, &[])?;
        }
    }
    s.progress.finish_and_clear();
    if last_loss.is_nan() {
        // Resumed at the last step (cut off before the summary): its loss as logged.
        last_loss = s.log.kept_value(s.state.step, "loss").unwrap_or(f64::NAN);
    }
    let (eval_loss, eval_ppl) = if data.eval.is_empty() {
        (None, None)
    } else {
        let el = match s.log.kept_value(s.state.step, "eval_loss") {
            Some(el) => el,
            None => {
                let el = evaluate(&model, &data.eval, cfg.batch_size, tok.special.pad)?;
                s.log.write(
                    &serde_json::json!({"step": s.state.step, "eval_loss": el, "eval_ppl": el.exp()}),
                )?;
                el
            }
        };
        (Some(el), Some(el.exp()))
    };
    s.save(&weights, &up, &model.cfg, &tok, &[])?;
    if dist.is_main() {
        if let Err(e) = plot_losses(&cfg.stage.output_dir) {
            eprintln!("warning: no loss.png: {e:#}");
        }
    }
    let model_dir = cfg.stage.output_dir.join("model");
    let adapter_dir = cfg.stage.output_dir.join("adapter");
    s.write_model(&weights, &model, &model_dir, &adapter_dir, &model.cfg, &tok)?;
    let summary = SftSummary {
        steps: s.state.step,
        first_losses,
        final_loss: last_loss,
        eval_loss,
        eval_ppl,
        train_examples: data.train.iter().filter(|s| !s.is_empty()).count(),
        eval_examples: data.eval.len(),
        truncated: data.truncated,
        dropped: data.dropped,
        tokens_per_s: tok_count as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        resumed_from,
        model_dir,
        sources: data.sources.clone(),
        data: data_report,
        windows: data.windows.clone(),
    };
    if !dist.is_main() {
        return Ok(summary);
    }
    lm::fsio::write_atomic(
        &cfg.stage.output_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    if sampler.is_some() {
        eprintln!(
            "sft data report ({}):\n{}",
            cfg.stage.output_dir.join("summary.json").display(),
            summary.data
        );
    }
    Ok(summary)
}
