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
//! - **the update** ([`Updater::step`]): micro-batches whose
//!   forward and backward the stage runs, the NaN guard, accumulation, the
//!   learning-rate schedule, clipping and the AdamW update;
//! - **checkpoints**: resume from the newest one (bit-identical on the CPU),
//!   periodic and final saves, the final `model/` (merged) and `adapter/`;
//! - **metrics and progress**: `metrics.jsonl` and the progress bar.

use super::{AdamW, MetricsLog, OptimConfig, Progress, TrainerState};
use crate::checkpoint::{self, SaveOptions};
use crate::config::GemmaConfig;
use crate::dist::Dist;
use crate::lora::LoraConfig;
use crate::model::Gemma;
use crate::peft::{self, TaskType};
use crate::safetensors_io::WeightReader;
use crate::stage_settings::StageSettings;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
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
        s.validate()?;
        let compute = crate::device::parse_dtype(&s.dtype)?;
        let base = match &s.base_dtype {
            Some(b) => crate::device::parse_dtype(b)?,
            None => compute,
        };
        Ok(Precision { compute, base })
    }
}

impl Precision {
    /// The dtype to load the checkpoint's weights in: the frozen base's
    /// under LoRA (straight into bf16 when it is bf16), else f32 (the exact
    /// values become the master weights before the cast to `compute`).
    pub fn load_kind(&self, lora: bool) -> Kind {
        if lora {
            self.base
        } else {
            Kind::Float
        }
    }
}

/// What a stage trains: the model's variables (`base`) and which of them
/// get gradients and optimiser state.
pub struct Trainable {
    /// Every variable of the model as loaded (trained in a full fine-tune;
    /// frozen under LoRA except the variables a stage always trains).
    pub base: nn::VarStore,
    /// Under LoRA: the adapters.
    pub lora: Option<LoraWeights>,
    /// Exact f32 copies of the trained variables taken before a cast to a
    /// lower precision: the optimiser's master weights.
    exact: BTreeMap<String, Tensor>,
}

/// LoRA adapters over a frozen base.
pub struct LoraWeights {
    /// The adapters' variables (f32), at the base weights' key paths.
    pub vs: nn::VarStore,
    pub cfg: LoraConfig,
    /// `base_model_name_or_path` of the saved adapters: the stage's `model`.
    pub base_model: String,
    pub task: TaskType,
}

impl Trainable {
    /// What the stage's settings ask for: a full fine-tune of `vs`, or
    /// LoRA adapters attached to `model` (whose variables `vs` holds,
    /// loaded in [`Precision::load_kind`]), seeded by the stage's seed.
    /// `task` says what the adapters are saved as (a reward model's are
    /// `SEQ_CLS`, with its head).
    pub fn prepare(vs: nn::VarStore, model: &mut Gemma, s: &StageSettings, task: TaskType) -> Result<Self> {
        let precision = Precision::of(s)?;
        let start = match &s.adapter {
            Some(dir) => {
                Some(peft::load_adapter(dir).with_context(|| format!("adapter = {}", dir.display()))?)
            }
            None => None,
        };
        let cfg = match (&s.lora, &start) {
            (None, None) => return Ok(Self::full(vs, precision)),
            (Some(c), None) => c.clone(),
            (None, Some(f)) => f.config.clone(),
            (Some(c), Some(f)) => {
                let (a, b) =
                    (model.lora_targets(&c.target_modules)?, model.lora_targets(&f.config.target_modules)?);
                if c.rank != f.config.rank || a != b {
                    bail!(
                        "[lora] asks for rank {} on {a:?} but the adapter {} has rank {} on {b:?};                          drop the [lora] table to continue the adapter as it is",
                        c.rank,
                        s.adapter.as_deref().unwrap_or(Path::new("")).display(),
                        f.config.rank
                    );
                }
                c.clone()
            }
        };
        if let Some(f) = &start {
            if f.task_type != task {
                bail!(
                    "the adapter {} is a {} adapter; this stage trains {}",
                    s.adapter.as_deref().unwrap_or(Path::new("")).display(),
                    f.task_type.as_str(),
                    task.as_str()
                );
            }
        }
        let mut vs = vs;
        if vs.kind() != precision.base {
            vs.set_kind(precision.base);
        }
        let adapters = nn::VarStore::new(vs.device());
        // The adapters start alike on every rank (a data-parallel run trains
        // one model); LoRA dropout draws per rank (see Updater::step).
        model.attach_lora(&adapters.root(), &cfg, s.seed)?;
        if let (Some(f), Some(dir)) = (&start, &s.adapter) {
            model.load_adapter_tensors(&f.tensors, dir)?;
            // A SEQ_CLS adapter carries the reward head (PEFT's modules_to_save).
            if let (Some(src), Some(head)) = (&f.score, vs.variables().get(crate::reward_model::SCORE_WEIGHT))
            {
                tch::no_grad(|| head.shallow_clone().f_copy_(src))?;
            }
        }
        let base_model = s.model.display().to_string();
        let lora = LoraWeights { vs: adapters, cfg, base_model, task };
        Ok(Trainable { base: vs, lora: Some(lora), exact: BTreeMap::new() })
    }

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
        Trainable { base: vs, lora: None, exact }
    }

    /// The variables that get gradients and optimiser state, by name: the
    /// adapters and the base variables still trained (all of them in a full
    /// fine-tune; the reward head under LoRA).
    pub fn trained(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> =
            self.base.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        if let Some(l) = &self.lora {
            v.extend(l.vs.variables());
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Writes the adapters `l` (this one's) in PEFT's format at `dir`, with
    /// the trained base variables (a reward model's head).
    fn save_adapter(&self, l: &LoraWeights, dir: &Path) -> Result<()> {
        let head = self.trained_base();
        let extra: Vec<(&str, &Tensor)> = head.iter().map(|(n, v)| (n.as_str(), v)).collect();
        peft::save_adapter(dir, &l.vs, &l.cfg, &l.base_model, l.task, &extra)
    }

    /// The trained base variables (the reward head under LoRA), by name.
    fn trained_base(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> =
            self.base.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// `seed` for rank `rank`'s own randomness (its [`RankRng`] stream: LoRA
/// dropout): `seed` itself on rank 0 (and in a single process), distinct
/// per rank.
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    seed ^ (rank as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// One rank's random stream for what an update draws from torch's
/// generator (LoRA dropout): a ChaCha8 stream keyed by the stage's seed and
/// the rank ([`rank_seed`]). Before each update, [`Updater::step`] reseeds
/// torch's generator with the stream's next word, so the masks are a
/// function of the stream's position alone. torch's own generator state
/// cannot be saved through tch; this position can: checkpoints record each
/// rank's ([`TrainerState::rank_rng`]) and a resumed run continues from it,
/// drawing the masks an uninterrupted run draws.
pub struct RankRng {
    rng: ChaCha8Rng,
}

impl RankRng {
    /// Rank `rank`'s stream for a stage seeded by `seed`, at its start.
    pub fn new(seed: u64, rank: usize) -> Self {
        RankRng { rng: ChaCha8Rng::seed_from_u64(rank_seed(seed, rank)) }
    }

    /// The stream's position (ChaCha words drawn).
    pub fn word_pos(&self) -> u128 {
        self.rng.get_word_pos()
    }

    /// Moves the stream to `pos` ([`RankRng::word_pos`]).
    pub fn set_word_pos(&mut self, pos: u128) {
        self.rng.set_word_pos(pos);
    }

    /// Reseeds torch's generator with the stream's next word.
    fn reseed_torch(&mut self) {
        tch::manual_seed((self.rng.next_u64() >> 1) as i64);
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
    /// Seconds this rank spent in the step's collectives over the loss and
    /// the gradients (the bucketed all-reduce) and, under ZeRO-1, the
    /// broadcast of the updated weights from their owners: 0 in one
    /// process. Waiting for a slower rank counts here too.
    pub comm_s: f64,
}

/// The optimiser over what a [`Trainable`] trains, and the guarded update:
/// what a stage's step calls (once, or several times per step in RL).
pub struct Updater {
    pub opt: AdamW,
    optim: OptimConfig,
    /// Where the last good checkpoint is, for the errors that stop a run.
    pub ckpt_root: Option<PathBuf>,
    /// This process's place in a data-parallel run (one process unless
    /// launched by torchrun).
    pub dist: &'static Dist,
    /// This rank's random stream (set by [`Session::start`]; without it
    /// torch's generator is left as it is).
    pub rng: Option<RankRng>,
}

impl Updater {
    /// AdamW over what `t` trains, with `t`'s exact f32 values as masters.
    /// Under `optim.zero = 1` in a data-parallel run the state is sharded
    /// over the ranks (ZeRO-1, [`AdamW::from_vars_sharded`]).
    pub fn new(t: &mut Trainable, optim: &OptimConfig) -> Result<Self> {
        let dist = crate::dist::init(t.base.device())?;
        let mut opt = match optim.zero {
            1 if dist.world > 1 => AdamW::from_vars_sharded(t.trained(), optim, dist.rank, dist.world)?,
            0 | 1 => AdamW::from_vars(t.trained(), optim)?,
            z => bail!("optim.zero must be 0 or 1, got {z}"),
        };
        opt.set_masters(std::mem::take(&mut t.exact))?;
        if opt.is_sharded() {
            eprintln!(
                "rank {} of {}: ZeRO-1 optimiser state for {} of {} tensors, {} state elements ({} trained)",
                dist.rank,
                dist.world,
                opt.num_owned(),
                opt.num_params(),
                opt.num_state_elements(),
                opt.num_elements()
            );
        }
        Ok(Updater { opt, optim: optim.clone(), ckpt_root: None, dist, rng: None })
    }

    /// The sum of `v` over the ranks of a data-parallel run (`v` in one
    /// process): a stage's loss denominator (tokens, pairs) is the global
    /// count, so each rank's micro-batch losses are scaled as one process
    /// would scale them.
    pub fn global_sum(&self, v: f64) -> Result<f64> {
        Ok(self.dist.sum(&[v])?[0])
    }

    /// [`Updater::global_sum`] of several values in one collective.
    pub fn global_sums(&self, v: &[f64]) -> Result<Vec<f64>> {
        self.dist.sum(v)
    }

    /// One optimiser update over `micro` micro-batches. `f(i)` runs
    /// micro-batch `i`'s forward and backward and returns its loss,
    /// normalised by the whole update's denominator (so that the
    /// accumulated gradient is the update's). A non-finite loss, or
    /// gradient norm, stops before anything is updated, naming the stage
    /// step `step` (0-based, the one running) and the last good checkpoint.
    /// The learning rate is the schedule's at update `opt.t` of
    /// `total_updates`.
    ///
    /// In a data-parallel run each rank runs its own micro-batches (losses
    /// normalised by the global denominator, [`Updater::global_sum`]); the
    /// gradients are then summed over ranks (bucketed), before clipping,
    /// so the update, the norm and the loss returned are the global ones.
    /// A non-finite loss on any rank stops every rank. Under ZeRO-1
    /// (`optim.zero = 1`) each rank then updates only the tensors it owns
    /// and every tensor is broadcast from its owner.
    pub fn step(
        &mut self,
        micro: usize,
        total_updates: u64,
        step: u64,
        mut f: impl FnMut(usize) -> Result<f64>,
    ) -> Result<StepResult> {
        self.opt.zero_grad();
        if let Some(r) = &mut self.rng {
            r.reseed_torch();
        }
        let mut loss = 0.0;
        let non_finite = |v: f64, root: &Option<PathBuf>| match root {
            Some(root) => super::non_finite_loss(v, step + 1, root),
            None => anyhow::anyhow!("non-finite loss ({v}) at step {}", step + 1),
        };
        let distributed = self.dist.is_distributed();
        for i in 0..micro {
            let v = f(i)?;
            // Distributed: the sum over ranks below carries it to every rank.
            if !v.is_finite() && !distributed {
                return Err(non_finite(v, &self.ckpt_root));
            }
            // bf16 variables: their gradient joins the f32 accumulator.
            self.opt.accumulate()?;
            loss += v;
        }
        let mut comm_s = 0.0;
        if distributed {
            let t0 = std::time::Instant::now();
            loss = self.global_sum(loss)?;
            if !loss.is_finite() {
                return Err(non_finite(loss, &self.ckpt_root));
            }
            let grads = self.opt.gradients()?;
            self.dist.all_reduce_sum(&grads)?;
            comm_s = t0.elapsed().as_secs_f64();
        }
        let lr = super::lr_at(self.opt.t, total_updates, &self.optim);
        let grad_norm =
            self.opt.clip_and_step(self.optim.grad_clip, lr, step + 1, self.ckpt_root.as_deref())?;
        if self.opt.is_sharded() {
            // ZeRO-1: each rank updated its own share; the owners send theirs.
            let t0 = std::time::Instant::now();
            self.opt.broadcast_owned(self.dist)?;
            comm_s += t0.elapsed().as_secs_f64();
        }
        Ok(StepResult { loss, lr, grad_norm, comm_s })
    }
}

/// A training run in progress: the trainer state, the metrics log, the
/// progress bar and the checkpoints.
pub struct Session {
    pub state: TrainerState,
    /// The step resumed from, if the run resumed.
    pub resumed_from: Option<u64>,
    pub log: MetricsLog,
    pub progress: Progress,
    /// `output_dir/checkpoints`.
    pub ckpt_root: PathBuf,
    settings: StageSettings,
    architecture: &'static str,
    /// Rank 0 writes; every rank reads.
    pub dist: &'static Dist,
}

impl Session {
    /// Resumes from the newest checkpoint under `output_dir/checkpoints`
    /// (weights into `t`, optimiser state into `up`; a checkpoint of another
    /// config hash is refused) or starts fresh; opens the metrics log
    /// (dropping rows logged after the checkpoint) and the progress bar.
    /// `model` is the Gemma the adapters are attached to (under LoRA).
    pub fn start(spec: SessionSpec, t: &Trainable, model: &Gemma, up: &mut Updater) -> Result<Session> {
        let s = spec.settings;
        let ckpt_root = s.output_dir.join("checkpoints");
        up.ckpt_root = Some(ckpt_root.clone());
        let fresh = TrainerState {
            step: 0,
            total_steps: spec.total_steps,
            epoch: 0,
            batch_in_epoch: 0,
            rng_word_pos: "0".into(),
            rank_rng: vec![],
            config_hash: spec.config_hash,
            extra: spec.extra,
        };
        let (state, resumed_from) = match &t.lora {
            None => super::resume_or_start(&ckpt_root, &t.base, &mut up.opt, fresh, spec.ignore)?,
            Some(_) => resume_lora(&ckpt_root, t, model, &mut up.opt, fresh)?,
        };
        let dist = up.dist;
        up.rng = Some(rank_rng(&state, s.seed, dist, resumed_from.is_some())?);
        let metrics = s.output_dir.join("metrics.jsonl");
        let (log, progress) = if dist.is_main() {
            std::fs::create_dir_all(&s.output_dir)?;
            (MetricsLog::open(&metrics, Some(state.step))?, super::progress_bar(spec.total_steps, state.step))
        } else {
            (MetricsLog::read_only(&metrics, Some(state.step)), Progress::hidden())
        };
        progress.set_prefix(spec.name);
        // Every rank has read the checkpoint before rank 0 may write the next.
        dist.barrier()?;
        Ok(Session {
            state,
            resumed_from,
            log,
            progress,
            ckpt_root,
            settings: s.clone(),
            architecture: spec.architecture,
            dist,
        })
    }

    /// Whether a periodic action every `every` steps is due after the
    /// current step (never at the last step, which the stage's finish does).
    pub fn due(&self, every: u64) -> bool {
        every > 0 && self.state.step.is_multiple_of(every) && self.state.step < self.state.total_steps
    }

    /// Saves a resumable checkpoint of the current step; `extra_files`
    /// (`(name, bytes)`) go into it too. A full fine-tune's checkpoint is a
    /// complete model directory; under LoRA it is a PEFT adapter directory
    /// (with the reward head for a reward model), the base being the
    /// stage's `model`, unchanged.
    pub fn save(
        &self,
        t: &Trainable,
        up: &Updater,
        cfg: &GemmaConfig,
        tok: &Tokenizer,
        extra_files: &[(&str, Vec<u8>)],
    ) -> Result<PathBuf> {
        // Each rank's random stream position, in rank order.
        let pos = up.rng.as_ref().map_or(0, RankRng::word_pos);
        let all = self.dist.all_gather_cat(&Tensor::from_slice(&[i64::try_from(pos)?]))?;
        let mut state = self.state.clone();
        state.rank_rng = Vec::<i64>::try_from(all)?.iter().map(|p| p.to_string()).collect();
        state.rng_word_pos = pos.to_string();
        // The whole optimiser state on rank 0 (under ZeRO-1 each owner
        // sends its share), dropped once written.
        let opt_state = up.opt.gather_state(self.dist)?;
        // Rank 0 writes (every rank holds the same weights); the others
        // wait for the checkpoint to be complete.
        let dir = if let Some(opt_state) = opt_state {
            self.save_here(&state, t, &opt_state, cfg, tok, extra_files)?
        } else {
            super::step_dir(&self.ckpt_root, self.state.step)
        };
        self.dist.barrier()?;
        Ok(dir)
    }

    fn save_here(
        &self,
        state: &TrainerState,
        t: &Trainable,
        opt_state: &BTreeMap<String, Tensor>,
        cfg: &GemmaConfig,
        tok: &Tokenizer,
        extra_files: &[(&str, Vec<u8>)],
    ) -> Result<PathBuf> {
        let Some(l) = &t.lora else {
            return super::save_checkpoint_state(
                &self.ckpt_root,
                &t.base,
                cfg,
                tok,
                opt_state,
                state,
                self.architecture,
                self.settings.keep_last,
                extra_files,
            );
        };
        super::check_finite_weights(&l.vs)?;
        let dir = super::step_dir(&self.ckpt_root, self.state.step);
        t.save_adapter(l, &dir)?;
        super::finish_checkpoint(
            &self.ckpt_root,
            &dir,
            opt_state,
            state,
            self.settings.keep_last,
            extra_files,
        )
    }

    /// Writes the trained model as a complete Hugging Face checkpoint in
    /// `dir` (`output_dir/model`): under LoRA the adapters merged into the
    /// base (in the base's dtype), and the adapters alone in PEFT's format
    /// in `adapter_dir` (`output_dir/adapter`).
    pub fn write_model(
        &self,
        t: &Trainable,
        model: &Gemma,
        dir: &Path,
        adapter_dir: &Path,
        cfg: &GemmaConfig,
        tok: &Tokenizer,
    ) -> Result<()> {
        if self.dist.is_main() {
            self.write_model_here(t, model, dir, adapter_dir, cfg, tok)?;
        }
        self.dist.barrier()
    }

    fn write_model_here(
        &self,
        t: &Trainable,
        model: &Gemma,
        dir: &Path,
        adapter_dir: &Path,
        cfg: &GemmaConfig,
        tok: &Tokenizer,
    ) -> Result<()> {
        let opts = SaveOptions { architecture: self.architecture.to_string(), ..Default::default() };
        let Some(l) = &t.lora else {
            return checkpoint::save(dir, &t.base, cfg, tok, &opts);
        };
        let merged = peft::MergedWeights::new(&t.base, model, t.base.kind())?;
        checkpoint::save_source(dir, &merged, cfg, tok, &opts)?;
        t.save_adapter(l, adapter_dir)
    }
}

/// This rank's random stream: at the position the checkpoint of `state`
/// recorded for it when the run `resumed`, else at its start. A checkpoint
/// written by another number of ranks (or before positions were recorded)
/// restarts the streams, with a note.
fn rank_rng(state: &TrainerState, seed: u64, dist: &Dist, resumed: bool) -> Result<RankRng> {
    let mut r = RankRng::new(seed, dist.rank);
    if !resumed {
        return Ok(r);
    }
    if state.rank_rng.len() != dist.world {
        if dist.is_main() {
            eprintln!(
                "note: the checkpoint records the random streams of {} rank(s), this run has {}; the streams (LoRA dropout) restart",
                state.rank_rng.len(),
                dist.world
            );
        }
        return Ok(r);
    }
    let text = &state.rank_rng[dist.rank];
    let pos = text.parse::<u128>().with_context(|| {
        format!("the checkpoint's rank_rng[{}] ({text:?}) is not a stream position", dist.rank)
    })?;
    r.set_word_pos(pos);
    Ok(r)
}

/// Resumes a LoRA run from the newest checkpoint under `root` (a PEFT
/// adapter directory with the optimiser state): the adapters into `model`,
/// the reward head into `t.base`, the moments into `opt`.
fn resume_lora(
    root: &Path,
    t: &Trainable,
    model: &Gemma,
    opt: &mut AdamW,
    fresh: TrainerState,
) -> Result<(TrainerState, Option<u64>)> {
    let Some((step, dir, st)) = super::newest_checkpoint(root, &fresh.config_hash)? else {
        return Ok((fresh, None));
    };
    let file = peft::load_adapter(&dir)?;
    model.load_adapter_tensors(&file.tensors, &dir)?;
    let head = t.trained_base();
    if !head.is_empty() {
        let mut heads = BTreeMap::new();
        if let Some(sc) = file.score {
            heads.insert(crate::reward_model::SCORE_WEIGHT.to_string(), sc);
        }
        tch::no_grad(|| -> Result<()> {
            for (name, var) in &head {
                let src =
                    heads.get(name).with_context(|| format!("checkpoint {} lacks {name}", dir.display()))?;
                var.shallow_clone().f_copy_(src)?;
            }
            Ok(())
        })?;
    }
    let opt_file = dir.join(super::OPTIMIZER_FILE);
    opt.load_state_from(&WeightReader::open_files(std::slice::from_ref(&opt_file), &opt_file)?, st.step)?;
    eprintln!("resuming from {} (step {step})", dir.display());
    Ok((st, Some(step)))
}
