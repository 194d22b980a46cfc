//! The one training loop the SFT, reward and RL stages share.
//!
//! A stage brings its data, its loss and its evaluation; the session owns
//! everything else, written once:
//!
//! - **what is trained** ([`Trainable`]): every weight of the base (a full
//!   fine-tune), or LoRA adapters over a frozen base, plus the variables a
//!   stage always trains (the reward head);
//! - **precision**: `dtype = "bf16"` computes in bf16 with f32 master
//!   weights, f32 optimiser state and f32 gradient accumulation; under LoRA
//!   the frozen base may be stored in `base_dtype` while adapters stay f32;
//! - **the step** ([`Session::optimizer_step`]): micro-batches whose
//!   forward and backward the stage runs, the NaN guard, accumulation, the
//!   learning-rate schedule, clipping and the AdamW update;
//! - **checkpoints**: resume from the newest one (bit-identical on the CPU),
//!   periodic and final saves, the final `model/` (merged) and `adapter/`;
//! - **metrics and progress**: `metrics.jsonl` and the progress bar.

use super::{AdamW, MetricsLog, Progress, TrainerState};
use crate::checkpoint::{self, SaveOptions};
use crate::config::GemmaConfig;
use crate::stage_settings::StageSettings;
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

/// The dtypes a stage computes and stores in, from its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// `dtype`: what the trained weights compute in (f32 masters behind
    /// them when not f32).
    pub compute: Kind,
    /// Under LoRA, the frozen base's dtype (`base_dtype`, default `dtype`);
    /// equal to `compute` otherwise.
    pub base: Kind,
}

impl Precision {
    pub fn of(s: &StageSettings) -> Result<Self> {
        let compute = crate::device::parse_dtype(&s.dtype)?;
        let base = match (&s.base_dtype, &s.lora) {
            (Some(b), Some(_)) => crate::device::parse_dtype(b)?,
            (Some(_), None) => anyhow::bail!(
                "base_dtype = {:?} is for LoRA (the frozen base's dtype); without a [lora] table set dtype instead",
                s.base_dtype.as_deref().unwrap_or_default()
            ),
            (None, _) => compute,
        };
        Ok(Precision { compute, base })
    }
}

/// What a stage trains: the model's variables (`base`) and which of them
/// get gradients and optimiser state.
pub struct Trainable {
    /// Every variable of the model as loaded (trained in a full fine-tune).
    pub base: nn::VarStore,
    /// Exact f32 copies of the trained variables taken before a cast to a
    /// lower precision: the optimiser's master weights.
    exact: BTreeMap<String, Tensor>,
}

impl Trainable {
    /// A full fine-tune of `vs` (loaded in f32) in `precision`: the
    /// variables are cast to the compute dtype, their exact f32 values kept
    /// as master weights.
    pub fn full(mut vs: nn::VarStore, precision: Precision) -> Self {
        let exact = if precision.compute != Kind::Float {
            let e = vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
            vs.set_kind(precision.compute);
            e
        } else {
            BTreeMap::new()
        };
        Trainable { base: vs, exact }
    }

    /// The variables that get gradients and optimiser state, by name.
    pub fn trained(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> =
            self.base.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// What the session needs to know about the stage.
pub struct SessionSpec<'a> {
    /// The stage's name: the progress bar's prefix.
    pub name: &'static str,
    pub settings: &'a StageSettings,
    /// Steps of the whole run (the schedule's length for SFT and reward).
    pub total_steps: u64,
    /// The stage config's checkpoint hash.
    pub config_hash: String,
    /// The `extra` of a fresh trainer state (a KL controller, …).
    pub extra: serde_json::Value,
    /// `architectures` of the checkpoints saved.
    pub architecture: &'static str,
    /// Checkpoint tensors that have no variable (a tied `lm_head.weight`).
    pub ignore: &'static [&'static str],
}

/// One optimiser step's figures.
#[derive(Debug, Clone, Copy)]
pub struct StepResult {
    /// The sum of the micro-batches' losses (each normalised by the whole
    /// step's denominator, so this is the step's loss).
    pub loss: f64,
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
}

/// A training run in progress: the optimiser, the trainer state, the
/// metrics log and the progress bar.
pub struct Session {
    pub opt: AdamW,
    pub state: TrainerState,
    /// The step resumed from, if the run resumed.
    pub resumed_from: Option<u64>,
    pub log: MetricsLog,
    pub progress: Progress,
    /// `output_dir/checkpoints`.
    pub ckpt_root: PathBuf,
    settings: StageSettings,
    architecture: &'static str,
}

impl Session {
    /// Sets up the optimiser over what `t` trains, then resumes from the
    /// newest checkpoint under `output_dir/checkpoints` (a checkpoint of
    /// another config hash is refused) or starts fresh; opens the metrics
    /// log (dropping rows logged after the checkpoint) and the progress bar.
    pub fn start(spec: SessionSpec, t: &mut Trainable) -> Result<Session> {
        let s = spec.settings;
        let mut opt = AdamW::new(&t.base, &s.optim);
        opt.set_masters(std::mem::take(&mut t.exact))?;
        let ckpt_root = s.output_dir.join("checkpoints");
        let fresh = TrainerState {
            step: 0,
            total_steps: spec.total_steps,
            epoch: 0,
            batch_in_epoch: 0,
            rng_word_pos: "0".into(),
            config_hash: spec.config_hash,
            extra: spec.extra,
        };
        let (state, resumed_from) =
            super::resume_or_start(&ckpt_root, &t.base, &mut opt, fresh, spec.ignore)?;
        std::fs::create_dir_all(&s.output_dir)?;
        let log = MetricsLog::open(&s.output_dir.join("metrics.jsonl"), Some(state.step))?;
        let progress = super::progress_bar(spec.total_steps, state.step);
        progress.set_prefix(spec.name);
        Ok(Session {
            opt,
            state,
            resumed_from,
            log,
            progress,
            ckpt_root,
            settings: s.clone(),
            architecture: spec.architecture,
        })
    }

    /// One optimiser step over `micro` micro-batches. `f(i)` runs micro-batch
    /// `i`'s forward and backward and returns its loss, normalised by the
    /// whole step's denominator (so that the accumulated gradient is the
    /// step's). A non-finite loss stops before anything is updated, naming
    /// the step and the last good checkpoint. The learning rate is the
    /// schedule's at optimiser update `opt.t` of `total_updates`. Does not
    /// advance `state.step` (a stage step may take several updates, RL).
    pub fn optimizer_step(
        &mut self,
        micro: usize,
        total_updates: u64,
        mut f: impl FnMut(usize) -> Result<f64>,
    ) -> Result<StepResult> {
        self.opt.zero_grad();
        let mut loss = 0.0;
        for i in 0..micro {
            let v = f(i)?;
            if !v.is_finite() {
                return Err(super::non_finite_loss(v, self.state.step + 1, &self.ckpt_root));
            }
            loss += v;
        }
        let lr = super::lr_at(self.opt.t, total_updates, &self.settings.optim);
        let grad_norm = self.opt.clip_and_step(
            self.settings.optim.grad_clip,
            lr,
            self.state.step + 1,
            Some(&self.ckpt_root),
        )?;
        Ok(StepResult { loss, lr, grad_norm })
    }

    /// Whether a periodic action every `every` steps is due after the
    /// current step (never at the last step, which the stage's finish does).
    pub fn due(&self, every: u64) -> bool {
        every > 0 && self.state.step.is_multiple_of(every) && self.state.step < self.state.total_steps
    }

    /// Saves a resumable checkpoint of the current step; `extra_files`
    /// (`(name, bytes)`) go into it too.
    pub fn save(
        &self,
        t: &Trainable,
        cfg: &GemmaConfig,
        tok: &Tokenizer,
        extra_files: &[(&str, Vec<u8>)],
    ) -> Result<PathBuf> {
        super::save_checkpoint(
            &self.ckpt_root,
            &t.base,
            cfg,
            tok,
            &self.opt,
            &self.state,
            self.architecture,
            self.settings.keep_last,
            extra_files,
        )
    }

    /// Writes the trained model as a complete Hugging Face checkpoint in
    /// `dir` (`output_dir/model`).
    pub fn write_model(&self, t: &Trainable, dir: &Path, cfg: &GemmaConfig, tok: &Tokenizer) -> Result<()> {
        let opts = SaveOptions { architecture: self.architecture.to_string(), ..Default::default() };
        checkpoint::save(dir, &t.base, cfg, tok, &opts)
    }
}
