//! The training machinery every stage shares: AdamW with decoupled weight
//! decay, the learning-rate schedule, global-norm clipping, training
//! checkpoints that resume bit-identically, metrics as JSON lines and a
//! progress bar.
//!
//! A training checkpoint is a directory `step-NNNNNNNN/` holding a complete
//! Hugging Face model directory plus `optimizer.safetensors` (the AdamW
//! moments, fp32) and `trainer_state.json` (step, data position, RNG word
//! position, config hash). It is written atomically; the last K are kept.

pub mod session;

use crate::checkpoint::{self, SaveOptions};
use crate::config::GemmaConfig;
use crate::dist::Dist;
use crate::fsio;
use crate::safetensors_io::WeightReader;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

/// The learning-rate schedule after warm-up (`optim.lr_scheduler_type`,
/// TRL's key and names). Every schedule starts with the same linear
/// warm-up from `lr / warmup` to `lr` over the warm-up steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Cosine decay from `lr` to `lr * min_lr_ratio` at the last step
    /// (transformers' `cosine` with `min_lr_ratio = 0`, its
    /// `cosine_with_min_lr` otherwise).
    #[default]
    Cosine,
    /// Linear decay from `lr` to `lr * min_lr_ratio` at the last step
    /// (transformers' `get_linear_schedule_with_warmup` with
    /// `min_lr_ratio = 0`).
    Linear,
    /// `lr` after warm-up (transformers' `constant_with_warmup`, also
    /// accepted by that name; `constant` when there is no warm-up).
    /// `min_lr_ratio` plays no part.
    #[serde(alias = "constant_with_warmup")]
    Constant,
}

impl LrSchedule {
    fn is_cosine(&self) -> bool {
        *self == LrSchedule::Cosine
    }
}

/// Optimiser and schedule settings (a recipe's `[stage.optim]` table).
///
/// The keys added after the first release (`lr_scheduler_type`,
/// `warmup_ratio`) are left out of the serialized form at their defaults,
/// so that a config which does not set them keeps its config hash (and
/// its checkpoints stay resumable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// The schedule after warm-up: `"cosine"` (default), `"linear"` or
    /// `"constant"` (TRL's `lr_scheduler_type`).
    #[serde(skip_serializing_if = "LrSchedule::is_cosine")]
    pub lr_scheduler_type: LrSchedule,
    /// Final learning rate as a fraction of `lr`, where the cosine and
    /// linear decays end (default 0.1; transformers' schedules decay to 0,
    /// which is `min_lr_ratio = 0`). Not used by `constant`.
    pub min_lr_ratio: f64,
    /// Warm-up steps (linear from `lr / warmup_steps` to `lr`).
    pub warmup_steps: u64,
    /// Warm-up as a fraction of the total steps (TRL's `warmup_ratio`):
    /// `ceil(warmup_ratio * total)` steps, as transformers computes them.
    /// Set this or `warmup_steps`, not both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f64,
    /// Optimiser-state sharding in a data-parallel run: `0` (default) keeps
    /// the whole AdamW state on every rank (DDP); `1` is ZeRO stage 1, as
    /// PyTorch's `ZeroRedundancyOptimizer`: each rank keeps the moments (and
    /// f32 masters) of its own share of the trained tensors ([`zero_partition`]),
    /// updates only those, and broadcasts them to the other ranks. The
    /// weights trained are the same; a no-op in one process. Left out of the
    /// serialized form at 0, and of the checkpoint hash (a run may resume
    /// with or without it).
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub zero: u32,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-4,
            lr_scheduler_type: LrSchedule::Cosine,
            min_lr_ratio: 0.1,
            warmup_steps: 0,
            warmup_ratio: None,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
            zero: 0,
        }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("optim.lr must be a positive number, got {}", self.lr);
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            bail!("optim.min_lr_ratio must be in [0, 1], got {}", self.min_lr_ratio);
        }
        if let Some(r) = self.warmup_ratio {
            if !(0.0..=1.0).contains(&r) {
                bail!("optim.warmup_ratio must be in [0, 1] (a fraction of the total steps), got {r}");
            }
            if self.warmup_steps > 0 {
                bail!(
                    "optim.warmup_steps = {} and optim.warmup_ratio = {r} are both set; set one of them",
                    self.warmup_steps
                );
            }
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            bail!("optim.beta1 and optim.beta2 must be in [0, 1)");
        }
        if self.weight_decay < 0.0 || self.grad_clip < 0.0 || self.eps <= 0.0 {
            bail!("optim.weight_decay and optim.grad_clip must be >= 0 and optim.eps > 0");
        }
        if self.zero > 1 {
            bail!(
                "optim.zero must be 0 (every rank keeps the whole optimiser state) or 1 (ZeRO-1: \
                 the state sharded over ranks), got {}",
                self.zero
            );
        }
        Ok(())
    }

    /// Warm-up steps of a run of `total` steps: `warmup_steps`, or
    /// `ceil(warmup_ratio * total)` (as transformers' `get_warmup_steps`).
    pub fn warmup(&self, total: u64) -> u64 {
        match self.warmup_ratio {
            Some(r) => (r * total as f64).ceil() as u64,
            None => self.warmup_steps,
        }
    }
}

/// Learning rate at optimiser step `step` (0-based) of `total`: linear
/// warm-up from `lr / warmup` to `lr` over [`OptimConfig::warmup`] steps,
/// then the schedule of `lr_scheduler_type`: cosine or linear decay to
/// `lr * min_lr_ratio` at step `total` (and that floor beyond it), or
/// constant `lr`.
pub fn lr_at(step: u64, total: u64, c: &OptimConfig) -> f64 {
    let warmup = c.warmup(total);
    if step < warmup {
        return c.lr * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    let factor = match c.lr_scheduler_type {
        LrSchedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        LrSchedule::Linear => 1.0 - progress,
        LrSchedule::Constant => return c.lr,
    };
    c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * factor)
}

/// Whether a parameter gets weight decay: not norms, not embeddings (nor
/// the tied head), as is usual for transformer training.
pub fn decays(name: &str) -> bool {
    !(name.contains("norm") || name.contains("embed_tokens"))
}

/// AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
/// ICLR 2019), computed exactly as `torch.optim.AdamW` does.
///
/// When a trained variable is not f32 (bf16 training), the optimiser keeps
/// an fp32 master copy of it and accumulates its gradient in f32: after
/// each micro-batch's backward, [`AdamW::accumulate`] adds the variable's
/// (bf16) gradient, cast to f32, into an f32 accumulator and zeroes the
/// variable's gradient, so the micro-batches' gradients are summed in f32,
/// not in bf16. Clipping and the update read the accumulator, the update
/// is applied to the master, and the variable receives the rounded result —
/// mixed-precision training as in Micikevicius et al., "Mixed Precision
/// Training", ICLR 2018. The optimiser state (moments, masters) is f32.
/// f32 variables are handled as plain AdamW: their `.grad()` already
/// accumulates in f32.
pub struct AdamW {
    params: Vec<Param>,
    /// Number of updates done.
    pub t: u64,
    pub cfg: OptimConfig,
    /// Updates with libtorch's fused kernel (`at::_fused_adamw_`, through
    /// align-native) on the f32 weights (the masters under bf16) and f32
    /// moments; `false`, or `ALIGN_ADAMW=reference` in the environment,
    /// takes the reference step below (equal within 1e-6: lm/tests/fused_adamw.rs).
    pub fused: bool,
    /// Under ZeRO-1 ([`AdamW::from_vars_sharded`]): the rank owning each
    /// tensor, in the optimiser's (name) order; `None` when this rank holds
    /// the whole state.
    owners: Option<Vec<usize>>,
}

/// One `at::_fused_adamw_` call's tensors: weights, gradients, first and
/// second moments.
type FusedGroup = (Vec<Tensor>, Vec<Tensor>, Vec<Tensor>, Vec<Tensor>);

struct Param {
    name: String,
    var: Tensor,
    /// fp32 master weights when `var` is not f32.
    master: Option<Tensor>,
    /// With a master: the f32 sum of the gradients moved out of `var`'s
    /// (low-precision) gradient by [`AdamW::accumulate`]; `None` when no
    /// gradient has been accumulated since [`AdamW::zero_grad`].
    acc: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
    /// `var` is not f32: its gradient accumulates in f32 (`acc`), and where
    /// this rank holds its state the update runs on the f32 `master`.
    mixed: bool,
    /// Whether this rank holds the tensor's optimiser state and updates it
    /// (always, unless the state is sharded: [`AdamW::from_vars_sharded`]).
    /// Without it the moments are empty and there is no master: the
    /// tensor's owner updates it and broadcasts it.
    owned: bool,
}

impl Param {
    /// The gradient the update uses: the f32 accumulator with a master,
    /// the variable's gradient otherwise; `None` when there is none.
    fn gradient(&self) -> Option<Tensor> {
        if self.mixed {
            self.acc.as_ref().map(Tensor::shallow_clone)
        } else {
            Some(self.var.grad()).filter(Tensor::defined)
        }
    }
}

impl AdamW {
    /// AdamW over the variables of `vs` that require gradients (a full
    /// fine-tune, or whatever `vs` leaves trainable).
    pub fn new(vs: &nn::VarStore, cfg: &OptimConfig) -> Self {
        let vars = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        Self::build(vars, cfg)
    }

    /// AdamW over exactly the tensors `vars` (`(name, tensor)`; e.g. LoRA
    /// adapters from one VarStore plus a reward head from another): only
    /// these get optimiser state and updates. The names key the optimiser
    /// state in checkpoints and decide weight decay ([`decays`]). Every
    /// tensor must require gradients, and names must be unique.
    pub fn from_vars(vars: Vec<(String, Tensor)>, cfg: &OptimConfig) -> Result<Self> {
        Self::from_vars_with(vars, cfg, |_| true)
    }

    /// [`AdamW::from_vars`] with the state sharded over the `world` ranks
    /// of a data-parallel run (ZeRO-1): rank `rank` keeps moments and
    /// masters only for the tensors [`zero_partition`] gives it, and
    /// updates only those; every tensor's gradient is still accumulated,
    /// summed and clipped as without sharding. After each update the owners
    /// broadcast their tensors ([`AdamW::broadcast_owned`]).
    pub fn from_vars_sharded(
        vars: Vec<(String, Tensor)>,
        cfg: &OptimConfig,
        rank: usize,
        world: usize,
    ) -> Result<Self> {
        if world == 0 || rank >= world {
            bail!("AdamW::from_vars_sharded: rank {rank} of {world}");
        }
        let mut vars = vars;
        // The order build_with keeps, so that index i is the same tensor.
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let sizes: Vec<(String, i64)> = vars.iter().map(|(n, t)| (n.clone(), t.numel() as i64)).collect();
        let owners = zero_partition(&sizes, world);
        let mut opt = Self::from_vars_with(vars, cfg, |i| owners[i] == rank)?;
        opt.owners = Some(owners);
        Ok(opt)
    }

    fn from_vars_with(
        vars: Vec<(String, Tensor)>,
        cfg: &OptimConfig,
        owned: impl Fn(usize) -> bool,
    ) -> Result<Self> {
        let mut seen = std::collections::BTreeSet::new();
        for (name, t) in &vars {
            if !t.requires_grad() {
                bail!("AdamW::from_vars: {name} does not require gradients, so it cannot be trained");
            }
            if !seen.insert(name.as_str()) {
                bail!("AdamW::from_vars: {name} is given twice");
            }
        }
        Ok(Self::build_with(vars, cfg, owned))
    }

    fn build(vars: Vec<(String, Tensor)>, cfg: &OptimConfig) -> Self {
        Self::build_with(vars, cfg, |_| true)
    }

    /// The optimiser over `vars` (sorted here by name), with state for the
    /// `i`-th (in that order) when `owned(i)`.
    fn build_with(mut vars: Vec<(String, Tensor)>, cfg: &OptimConfig, owned: impl Fn(usize) -> bool) -> Self {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .enumerate()
            .map(|(i, (name, var))| {
                let owned = owned(i);
                let mixed = var.kind() != Kind::Float;
                let master = (owned && mixed).then(|| var.detach().to_kind(Kind::Float));
                let (exp_avg, exp_avg_sq) = if owned {
                    (var.zeros_like().to_kind(Kind::Float), var.zeros_like().to_kind(Kind::Float))
                } else {
                    let empty = || Tensor::zeros([0], (Kind::Float, var.device()));
                    (empty(), empty())
                };
                let decay = decays(&name);
                Param { name, var, master, acc: None, exp_avg, exp_avg_sq, decay, mixed, owned }
            })
            .collect();
        let fused = std::env::var("ALIGN_ADAMW").map_or(true, |v| v.trim() != "reference");
        AdamW { params, t: 0, cfg: cfg.clone(), fused, owners: None }
    }

    /// Number of tensors with optimiser state.
    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    /// The names of the tensors with optimiser state, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.params.iter().map(|p| p.name.as_str()).collect()
    }

    /// Number of scalar values the optimiser trains.
    pub fn num_elements(&self) -> i64 {
        self.params.iter().map(|p| p.var.numel() as i64).sum()
    }

    /// Number of f32 values of optimiser state this rank holds: moments and
    /// masters (under ZeRO-1 only those of the tensors it owns).
    pub fn num_state_elements(&self) -> i64 {
        self.params
            .iter()
            .map(|p| {
                (p.exp_avg.numel() + p.exp_avg_sq.numel() + p.master.as_ref().map_or(0, Tensor::numel)) as i64
            })
            .sum()
    }

    /// Number of trained tensors whose state this rank holds (all of them
    /// unless the state is sharded).
    pub fn num_owned(&self) -> usize {
        self.params.iter().filter(|p| p.owned).count()
    }

    /// Whether the state is sharded over ranks (ZeRO-1).
    pub fn is_sharded(&self) -> bool {
        self.owners.is_some()
    }

    /// Replaces the fp32 masters with exact values (e.g. the f32 weights the
    /// model had before it was cast to bf16).
    pub fn set_masters(&mut self, mut exact: BTreeMap<String, Tensor>) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                if let (Some(m), Some(src)) = (p.master.as_mut(), exact.remove(&p.name)) {
                    m.f_copy_(&src)?;
                }
            }
            Ok(())
        })
    }

    /// Whether fp32 master weights are kept (the model is not f32).
    pub fn has_masters(&self) -> bool {
        self.params.iter().any(|p| p.mixed)
    }

    /// Clears the gradients: the variables' and the f32 accumulators.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.var.zero_grad();
            p.acc = None;
        }
    }

    /// To be called after each micro-batch's backward: for every variable
    /// with an fp32 master (a bf16 variable), adds its gradient, cast to
    /// f32, into the f32 accumulator and zeroes the variable's gradient, so
    /// that gradients are summed across micro-batches in f32. f32 variables
    /// are left alone (their gradient already accumulates in f32), so f32
    /// training is unchanged. Clipping and [`AdamW::step`] accumulate what
    /// is still pending themselves, so a last call is not needed.
    pub fn accumulate(&mut self) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                if !p.mixed {
                    continue;
                }
                let mut g = p.var.grad();
                if !g.defined() {
                    continue;
                }
                match p.acc.as_mut() {
                    Some(a) => {
                        let _ = a.f_add_(&g.f_to_kind(Kind::Float)?)?;
                    }
                    // A new tensor: the cast from a lower precision copies.
                    None => p.acc = Some(g.f_to_kind(Kind::Float)?),
                }
                let _ = g.f_zero_()?;
            }
            Ok(())
        })
    }

    /// The gradient of `name` the next update would use: the f32
    /// accumulator (with what is pending in the variable's gradient added)
    /// for a variable with a master, the variable's gradient otherwise.
    /// `None` for an unknown name or when there is no gradient.
    pub fn grad(&mut self, name: &str) -> Result<Option<Tensor>> {
        self.accumulate()?;
        let Some(p) = self.params.iter().find(|p| p.name == name) else { return Ok(None) };
        Ok(p.gradient())
    }

    /// The gradients the next update would use (what is pending
    /// accumulated first), in the optimiser's order, sharing storage with
    /// them: what a data-parallel run sums over ranks. Every trained tensor
    /// must have a gradient (ranks must pass the same list).
    pub fn gradients(&mut self) -> Result<Vec<Tensor>> {
        self.accumulate()?;
        self.params
            .iter()
            .map(|p| {
                p.gradient().filter(Tensor::defined).with_context(|| {
                    format!("{} has no gradient this step; data-parallel training needs one for every trained tensor", p.name)
                })
            })
            .collect()
    }

    /// Global L2 norm of all gradients; when `max_norm > 0` and the norm
    /// exceeds it, gradients are scaled by `max_norm / (norm + 1e-6)`.
    /// A non-finite norm (an inf or NaN gradient) is a [`NonFiniteGradient`]
    /// error and leaves the gradients as they are: scaling by
    /// `max_norm / inf = 0` would turn the inf entries into NaN.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        self.accumulate()?;
        let grads: Vec<Tensor> = self.params.iter().filter_map(Param::gradient).collect();
        if grads.is_empty() {
            return Ok(0.0);
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).norm()).collect();
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        if !total.is_finite() {
            return Err(NonFiniteGradient { norm: total }.into());
        }
        if max_norm > 0.0 && total > max_norm {
            let coef = max_norm / (total + 1e-6);
            tch::no_grad(|| {
                for mut g in grads {
                    let _ = g.f_mul_scalar_(coef);
                }
            });
        }
        Ok(total)
    }

    /// The guarded update every stage takes: the global gradient norm is
    /// checked to be finite, the gradients clipped to `max_norm`, then one
    /// step at `lr`. A non-finite norm stops before anything is updated,
    /// with an error naming the training `step` (1-based, the one that
    /// failed), the norm and the last good checkpoint under `root`, which
    /// is left intact. Returns the norm before clipping.
    pub fn clip_and_step(&mut self, max_norm: f64, lr: f64, step: u64, root: Option<&Path>) -> Result<f64> {
        let norm = match self.clip_grad_norm(max_norm) {
            Ok(n) => n,
            Err(e) => match e.downcast_ref::<NonFiniteGradient>() {
                Some(g) => return Err(non_finite_gradient(g.norm, step, root)),
                None => return Err(e),
            },
        };
        // clip_grad_norm accumulated what was pending.
        self.update(lr)?;
        Ok(norm)
    }

    /// One update with learning rate `lr`. The f32 accumulators of
    /// variables with masters are consumed (released) by the update.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.accumulate()?;
        self.update(lr)
    }

    /// [`AdamW::step`] once the gradients are accumulated: the fused
    /// kernel when [`AdamW::fused`] and every tensor suits it (f32 and
    /// contiguous), the reference step otherwise.
    fn update(&mut self, lr: f64) -> Result<()> {
        if self.fused && self.update_fused(lr)? {
            return Ok(());
        }
        self.update_reference(lr)
    }

    /// The update through `at::_fused_adamw_`: one call per weight-decay
    /// group over the f32 weights (the master when there is one), their
    /// f32 gradients (the accumulator under masters) and the moments; a
    /// variable with a master then receives it rounded. `false` (nothing
    /// done) when a tensor does not suit the kernel.
    fn update_fused(&mut self, lr: f64) -> Result<bool> {
        // Per weight-decay group (0: none, 1: decayed): weights, gradients, moments.
        let mut groups: [FusedGroup; 2] = Default::default();
        for p in &self.params {
            if !p.owned {
                continue;
            }
            let Some(g) = p.gradient() else { continue };
            let w = p.master.as_ref().unwrap_or(&p.var);
            let suits = |t: &Tensor| t.kind() == Kind::Float && t.is_contiguous() && t.device() == w.device();
            if !(suits(w) && suits(&g) && suits(&p.exp_avg) && suits(&p.exp_avg_sq)) {
                return Ok(false);
            }
            let grp = &mut groups[usize::from(p.decay)];
            grp.0.push(w.shallow_clone());
            grp.1.push(g);
            grp.2.push(p.exp_avg.shallow_clone());
            grp.3.push(p.exp_avg_sq.shallow_clone());
        }
        self.t += 1;
        let c = &self.cfg;
        tch::no_grad(|| -> Result<()> {
            for (decay, (w, g, m, v)) in groups.iter().enumerate() {
                let wd = if decay == 1 { c.weight_decay } else { 0.0 };
                align_native::fused_adamw_step(w, g, m, v, self.t, lr, c.beta1, c.beta2, wd, c.eps)?;
            }
            for p in &mut self.params {
                if p.gradient().is_none() {
                    continue;
                }
                p.acc = None;
                if !p.owned {
                    continue;
                }
                if let Some(m) = &p.master {
                    p.var.f_copy_(m)?;
                }
            }
            Ok(())
        })?;
        Ok(true)
    }

    /// The reference update (tensor by tensor, as `torch.optim.AdamW`'s
    /// single-tensor path).
    fn update_reference(&mut self, lr: f64) -> Result<()> {
        self.t += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - c.beta2.powi(self.t as i32)).sqrt();
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                let Some(g) = p.gradient() else { continue };
                if !p.owned {
                    p.acc = None;
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                p.acc = None;
                let w = p.master.as_mut().unwrap_or(&mut p.var);
                if p.decay && c.weight_decay > 0.0 {
                    let _ = w.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                }
                // In place where libtorch allows, as torch.optim.AdamW's
                // single-tensor path: two temporaries instead of six.
                let _ = p.exp_avg.f_lerp_(&g, 1.0 - c.beta1)?; // m ← β1·m + (1−β1)·g
                let _ = p.exp_avg_sq.f_mul_scalar_(c.beta2)?.f_addcmul_(&g, &(&g * (1.0 - c.beta2)))?;
                // w ← w − (lr/bc1)·m / (√v/√bc2 + ε), the step folded into the
                // denominator because addcdiv_ takes no scale here.
                if lr != 0.0 {
                    let mut denom = p.exp_avg_sq.f_sqrt()?;
                    let _ = denom.f_div_scalar_(bc2_sqrt)?.f_add_scalar_(c.eps)?.f_mul_scalar_(-bc1 / lr)?;
                    let _ =
                        w.f_addcdiv_(&p.exp_avg, &denom).with_context(|| format!("updating {}", p.name))?;
                }
                if let Some(m) = &p.master {
                    p.var.f_copy_(m)?;
                }
            }
            Ok(())
        })
    }

    /// The optimiser state as named tensors: `{name}.exp_avg`,
    /// `{name}.exp_avg_sq` and, with masters, `{name}.master` (under ZeRO-1
    /// only this rank's share: [`AdamW::gather_state`] has it all).
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for p in self.params.iter().filter(|p| p.owned) {
            out.insert(format!("{}.exp_avg", p.name), p.exp_avg.shallow_clone());
            out.insert(format!("{}.exp_avg_sq", p.name), p.exp_avg_sq.shallow_clone());
            if let Some(m) = &p.master {
                out.insert(format!("{}.master", p.name), m.shallow_clone());
            }
        }
        out
    }

    /// Restores the state saved by [`AdamW::state_tensors`] (the masters,
    /// when present, also overwrite the variables). Under ZeRO-1 only this
    /// rank's share is read; the rest is ignored.
    pub fn load_state(&mut self, mut t: BTreeMap<String, Tensor>, steps: u64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for p in self.params.iter_mut().filter(|p| p.owned) {
                let mut slots = vec![("exp_avg", &mut p.exp_avg), ("exp_avg_sq", &mut p.exp_avg_sq)];
                if let Some(m) = p.master.as_mut() {
                    slots.push(("master", m));
                }
                for (suffix, dst) in slots {
                    let key = format!("{}.{suffix}", p.name);
                    let src = t.remove(&key).with_context(|| format!("optimizer state lacks {key}"))?;
                    if src.size() != dst.size() {
                        bail!("optimizer state {key} has shape {:?}, expected {:?}", src.size(), dst.size());
                    }
                    dst.f_copy_(&src)?;
                }
                if let Some(m) = &p.master {
                    p.var.f_copy_(m)?;
                }
            }
            Ok(())
        })?;
        self.t = steps;
        Ok(())
    }

    /// [`AdamW::load_state`] streamed from the optimizer file `reader`:
    /// each moment (and master) is copied from the mapped file into its
    /// tensor, one at a time, so a resume holds no second copy of the state.
    /// Under ZeRO-1 each rank reads only the tensors it owns.
    pub fn load_state_from(&mut self, reader: &WeightReader, steps: u64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for p in self.params.iter_mut().filter(|p| p.owned) {
                let mut slots = vec![("exp_avg", &p.exp_avg), ("exp_avg_sq", &p.exp_avg_sq)];
                if let Some(m) = p.master.as_ref() {
                    slots.push(("master", m));
                }
                for (suffix, dst) in slots {
                    let key = format!("{}.{suffix}", p.name);
                    let (_, st) = reader.get(&key).with_context(|| format!("optimizer state lacks {key}"))?;
                    if st.shape != dst.size() {
                        bail!("optimizer state {key} has shape {:?}, expected {:?}", st.shape, dst.size());
                    }
                    reader.copy_into(&key, dst)?;
                }
                if let Some(m) = &p.master {
                    p.var.f_copy_(m)?;
                }
            }
            Ok(())
        })?;
        self.t = steps;
        Ok(())
    }
}

impl AdamW {
    /// The tensors rank `rank` owns (all of them unless sharded), in order.
    fn owned_by(&self, rank: usize) -> Vec<&Param> {
        match &self.owners {
            None => self.params.iter().collect(),
            Some(o) => self.params.iter().zip(o).filter(|(_, r)| **r == rank).map(|(p, _)| p).collect(),
        }
    }

    fn check_world(&self, dist: &Dist) -> Result<()> {
        if let Some(o) = &self.owners {
            if let Some(r) = o.iter().find(|r| **r >= dist.world) {
                bail!(
                    "the optimiser state is sharded for more ranks (rank {r}) than the run's {}",
                    dist.world
                );
            }
        }
        Ok(())
    }

    /// Under ZeRO-1, after an update: every tensor is broadcast from the
    /// rank that owns (and updated) it, in buckets, so every rank ends with
    /// the whole model. Nothing to do when the state is not sharded.
    pub fn broadcast_owned(&self, dist: &Dist) -> Result<()> {
        if self.owners.is_none() {
            return Ok(());
        }
        self.check_world(dist)?;
        for r in 0..dist.world {
            let ts: Vec<Tensor> = self.owned_by(r).iter().map(|p| p.var.shallow_clone()).collect();
            if !ts.is_empty() {
                dist.broadcast_bucketed(&ts, r)?;
            }
        }
        Ok(())
    }

    /// The whole optimiser state ([`AdamW::state_tensors`]'s names and
    /// values) on rank 0 for a checkpoint, `None` on the other ranks. Under
    /// ZeRO-1 every rank takes part: each owner broadcasts its share, in
    /// bounded buckets, and rank 0 keeps it (the caller drops it once
    /// written); other ranks hold at most a bucket at a time.
    pub fn gather_state(&self, dist: &Dist) -> Result<Option<BTreeMap<String, Tensor>>> {
        let Some(owners) = &self.owners else {
            return Ok(dist.is_main().then(|| self.state_tensors()));
        };
        self.check_world(dist)?;
        let mut out = BTreeMap::new();
        let mut pending: Vec<(String, Tensor)> = vec![];
        let mut pending_from = 0;
        let mut pending_bytes = 0;
        let flush = |pending: &mut Vec<(String, Tensor)>, from: usize, out: &mut BTreeMap<String, Tensor>| {
            if pending.is_empty() {
                return Ok::<(), anyhow::Error>(());
            }
            let ts: Vec<Tensor> = pending.iter().map(|(_, t)| t.shallow_clone()).collect();
            dist.broadcast_bucketed(&ts, from)?;
            for (k, t) in pending.drain(..) {
                if dist.is_main() {
                    out.insert(k, t);
                }
            }
            Ok(())
        };
        for (p, &o) in self.params.iter().zip(owners) {
            let mut slots =
                vec![("exp_avg", p.exp_avg.shallow_clone()), ("exp_avg_sq", p.exp_avg_sq.shallow_clone())];
            if p.mixed {
                slots.push(("master", p.master.as_ref().map_or_else(Tensor::new, Tensor::shallow_clone)));
            }
            for (suffix, t) in slots {
                let key = format!("{}.{suffix}", p.name);
                if o == 0 {
                    // Rank 0 has it.
                    if dist.is_main() {
                        out.insert(key, t);
                    }
                    continue;
                }
                if o != pending_from || pending_bytes >= crate::dist::BUCKET_BYTES {
                    flush(&mut pending, pending_from, &mut out)?;
                    (pending_from, pending_bytes) = (o, 0);
                }
                let t = if o == dist.rank {
                    t
                } else {
                    Tensor::f_zeros(p.var.size(), (Kind::Float, p.var.device()))?
                };
                pending_bytes += p.var.numel() * 4;
                pending.push((key, t));
            }
        }
        flush(&mut pending, pending_from, &mut out)?;
        Ok(dist.is_main().then_some(out))
    }
}

/// ZeRO-1's partition of the trained tensors over `world` ranks, as
/// PyTorch's `ZeroRedundancyOptimizer` makes it: whole tensors, largest
/// first (ties by name), each to the rank with the fewest elements so far
/// (ties to the lowest rank). `sizes` are `(name, elements)`; the result is
/// the owning rank of each, in `sizes`' order. A pure function of names
/// and sizes, so every rank computes the same partition.
pub fn zero_partition(sizes: &[(String, i64)], world: usize) -> Vec<usize> {
    let world = world.max(1);
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].1.cmp(&sizes[a].1).then_with(|| sizes[a].0.cmp(&sizes[b].0)));
    let mut load = vec![0i64; world];
    let mut owner = vec![0; sizes.len()];
    for i in order {
        let r = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        owner[i] = r;
        load[r] += sizes[i].1;
    }
    owner
}

/// What a training checkpoint records besides the weights and moments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimiser steps done.
    pub step: u64,
    pub total_steps: u64,
    /// Where the data iterator stands: epoch and batch index within it.
    pub epoch: u64,
    pub batch_in_epoch: u64,
    /// Word position of the stage's ChaCha RNG (rank 0's
    /// [`session::RankRng`]).
    pub rng_word_pos: String,
    /// Each rank's [`session::RankRng`] position, by rank (empty in
    /// checkpoints written before they were recorded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_rng: Vec<String>,
    /// Hash of the resolved stage config; resuming under another config is refused.
    pub config_hash: String,
    /// Any stage-specific values (a KL controller, best eval loss, …).
    #[serde(default)]
    pub extra: serde_json::Value,
}

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

pub(crate) fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// Training checkpoints under `root`, oldest first.
pub fn list_checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = vec![];
    if !root.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
            if e.path().join(STATE_FILE).exists() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Saves a training checkpoint atomically and keeps the newest `keep_last`.
/// `extra_files` (`(file name, contents)`, e.g. a reward model's
/// `reward_stats.json`) go into the checkpoint too, before the state file
/// that marks it complete.
#[allow(clippy::too_many_arguments)]
pub fn save_checkpoint(
    root: &Path,
    vs: &nn::VarStore,
    cfg: &GemmaConfig,
    tok: &Tokenizer,
    opt: &AdamW,
    state: &TrainerState,
    architecture: &str,
    keep_last: usize,
    extra_files: &[(&str, Vec<u8>)],
) -> Result<PathBuf> {
    if opt.is_sharded() {
        bail!(
            "save_checkpoint: the optimiser state is sharded (ZeRO-1); gather it first (AdamW::gather_state)"
        );
    }
    let opt_state = opt.state_tensors();
    save_checkpoint_state(root, vs, cfg, tok, &opt_state, state, architecture, keep_last, extra_files)
}

/// [`save_checkpoint`] with the optimiser state given as named tensors
/// (under ZeRO-1, the state [`AdamW::gather_state`] brought to rank 0).
#[allow(clippy::too_many_arguments)]
pub(crate) fn save_checkpoint_state(
    root: &Path,
    vs: &nn::VarStore,
    cfg: &GemmaConfig,
    tok: &Tokenizer,
    opt_state: &BTreeMap<String, Tensor>,
    state: &TrainerState,
    architecture: &str,
    keep_last: usize,
    extra_files: &[(&str, Vec<u8>)],
) -> Result<PathBuf> {
    if let Err(e) = check_finite_weights(vs) {
        bail!(
            "non-finite weights after step {}: {e:#}; stopped without saving. The last good checkpoint is {}. Lower optim.lr or keep optim.grad_clip > 0",
            state.step,
            last_checkpoint_name(root)
        );
    }
    let dir = step_dir(root, state.step);
    let opts = SaveOptions { architecture: architecture.to_string(), ..Default::default() };
    checkpoint::save(&dir, vs, cfg, tok, &opts)?;
    finish_checkpoint(root, &dir, opt_state, state, keep_last, extra_files)
}

/// Completes the checkpoint `dir` whose weights are written: the optimiser
/// state, `extra_files`, and last the trainer state that marks it complete;
/// then keeps the newest `keep_last` under `root`.
pub(crate) fn finish_checkpoint(
    root: &Path,
    dir: &Path,
    opt_state: &BTreeMap<String, Tensor>,
    state: &TrainerState,
    keep_last: usize,
    extra_files: &[(&str, Vec<u8>)],
) -> Result<PathBuf> {
    // Optimizer and state go in after the model; the state file is the
    // marker of a complete checkpoint, written last.
    checkpoint::write_tensors_file(&dir.join(OPTIMIZER_FILE), opt_state)?;
    for (name, bytes) in extra_files {
        fsio::write_atomic(&dir.join(name), bytes)?;
    }
    fsio::write_atomic(&dir.join(STATE_FILE), serde_json::to_string_pretty(state)?.as_bytes())?;
    let all = list_checkpoints(root)?;
    if all.len() > keep_last.max(1) {
        for (_, old) in &all[..all.len() - keep_last.max(1)] {
            std::fs::remove_dir_all(old)
                .with_context(|| format!("cannot remove old checkpoint {}", old.display()))?;
        }
    }
    Ok(dir.to_path_buf())
}

/// Checks every weight in `vs` is finite; the error names the tensors that
/// are not. Checkpoints are saved only after this holds, so the last
/// checkpoint is always a good one.
pub fn check_finite_weights(vs: &nn::VarStore) -> Result<()> {
    let mut bad: Vec<String> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.isfinite().all().int64_value(&[]) == 0)
        .map(|(name, _)| name)
        .collect();
    if !bad.is_empty() {
        bad.sort();
        let n = bad.len();
        bad.truncate(5);
        bail!(
            "{n} weight tensor(s) hold inf or NaN values ({}{}); the training diverged",
            bad.join(", "),
            if n > 5 { ", …" } else { "" }
        );
    }
    Ok(())
}

/// Reads the state and optimizer moments of a training checkpoint (all
/// moments at once, on the CPU: for tests and small models; a resume
/// streams them with [`AdamW::load_state_from`]).
pub fn read_checkpoint_state(dir: &Path) -> Result<(TrainerState, BTreeMap<String, Tensor>)> {
    let state = read_trainer_state(dir)?;
    let opt = checkpoint::read_tensors_file(&dir.join(OPTIMIZER_FILE))?;
    Ok((state, opt))
}

/// Reads `trainer_state.json` of a training checkpoint.
pub fn read_trainer_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a trainer state", p.display()))
}

/// The newest checkpoint under `root` with its trainer state, or None when
/// there is none. A checkpoint of another configuration (its `config_hash`
/// is not `hash`) is an error rather than something to mix in.
pub(crate) fn newest_checkpoint(root: &Path, hash: &str) -> Result<Option<(u64, PathBuf, TrainerState)>> {
    let Some((step, dir)) = list_checkpoints(root)?.pop() else {
        return Ok(None);
    };
    let st = read_trainer_state(&dir)?;
    if st.config_hash != hash {
        bail!(
            "{} holds a checkpoint of a different configuration (hash {} ≠ {hash}); use a new output_dir or delete it",
            root.display(),
            st.config_hash,
        );
    }
    Ok(Some((step, dir, st)))
}

/// Starts a run, or resumes it from the newest checkpoint under `root`:
/// loads the weights into `vs` and the moments into `opt`, and returns the
/// saved state with the step resumed from. A checkpoint of another
/// configuration (`config_hash` differs) is refused rather than mixed in.
pub fn resume_or_start(
    root: &Path,
    vs: &nn::VarStore,
    opt: &mut AdamW,
    fresh: TrainerState,
    ignore: &[&str],
) -> Result<(TrainerState, Option<u64>)> {
    let Some((step, dir, st)) = newest_checkpoint(root, &fresh.config_hash)? else {
        return Ok((fresh, None));
    };
    // Weights and moments stream from the mapped files into the existing
    // tensors, one at a time: no second copy of either in memory.
    let weights = WeightReader::open_dir(&dir)?;
    checkpoint::load_from(vs, &weights, ignore, &[], &dir)?;
    drop(weights);
    let opt_file = dir.join(OPTIMIZER_FILE);
    opt.load_state_from(&WeightReader::open_files(std::slice::from_ref(&opt_file), &opt_file)?, st.step)?;
    eprintln!("resuming from {} (step {step})", dir.display());
    Ok((st, Some(step)))
}

/// The error for a non-finite loss: names the step and the last good
/// checkpoint, which is left intact.
pub fn non_finite_loss(value: f64, step: u64, root: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "non-finite loss ({value}) at step {step}; stopped without saving. The last good checkpoint is {}. Lower optim.lr or check the data",
        last_checkpoint_name(root)
    )
}

/// The newest checkpoint under `root` for error messages, or a sentence
/// saying there is none.
fn last_checkpoint_name(root: &Path) -> String {
    list_checkpoints(root)
        .ok()
        .and_then(|mut v| v.pop())
        .map(|(_, d)| d.display().to_string())
        .unwrap_or_else(|| "none (no checkpoint was saved yet)".into())
}

/// The global gradient norm was inf or NaN (from
/// [`AdamW::clip_grad_norm`]); nothing was clipped or updated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFiniteGradient {
    pub norm: f64,
}

impl std::fmt::Display for NonFiniteGradient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the global gradient norm is {}; the gradients were left unclipped and no update was made",
            self.norm
        )
    }
}

impl std::error::Error for NonFiniteGradient {}

/// The error for a non-finite global gradient norm: names the step, the
/// norm and the last good checkpoint under `root`, which is left intact.
pub fn non_finite_gradient(norm: f64, step: u64, root: Option<&Path>) -> anyhow::Error {
    let last = match root {
        Some(r) => last_checkpoint_name(r),
        None => "none (no checkpoint was saved yet)".into(),
    };
    anyhow::anyhow!(
        "non-finite gradient norm ({norm}) at step {step}; stopped before the optimiser step, without saving. The last good checkpoint is {last}. Lower optim.lr, keep optim.grad_clip > 0, use f32 instead of bf16, or check the data for extreme rows"
    )
}

/// Serde defaults the stage configs share (`#[serde(default = "…")]`).
pub mod defaults {
    pub fn one() -> usize {
        1
    }
    pub fn one_u64() -> u64 {
        1
    }
    /// Training checkpoints kept.
    pub fn keep_last() -> usize {
        2
    }
    pub fn device() -> String {
        "auto".into()
    }
    pub fn dtype() -> String {
        "f32".into()
    }
}

/// A stable hash of a serialisable config (FNV-1a over its JSON).
pub fn config_hash<T: Serialize>(cfg: &T) -> Result<String> {
    let text = serde_json::to_string(cfg)?;
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    Ok(format!("{h:016x}"))
}

/// The hash that ties a stage's checkpoints to its config: [`config_hash`]
/// of `cfg` after `clear` has reset the settings that change what a run logs,
/// keeps or where it stops, not its weights (`eval_every`, `save_every`,
/// `keep_last`, `stop_after`), so that a resumed run may change them.
pub fn checkpoint_hash<T: Serialize + Clone>(cfg: &T, clear: impl FnOnce(&mut T)) -> Result<String> {
    let mut c = cfg.clone();
    clear(&mut c);
    config_hash(&c)
}

/// Metrics as JSON lines, one object per record, flushed as written.
pub struct MetricsLog {
    /// `None` on a rank other than 0 of a distributed run (rank 0 writes).
    file: Option<std::fs::File>,
    /// The rows kept from an earlier run (when resuming).
    kept: Vec<serde_json::Value>,
}

impl MetricsLog {
    /// Opens `path`; when resuming at `resume_step`, rows of later steps (from
    /// the interrupted run) are dropped first so the log has no duplicates.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let kept: Vec<String> = match (resume_step, std::fs::read_to_string(path)) {
            (Some(s), Ok(text)) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|st| st <= s)
                })
                .map(String::from)
                .collect(),
            _ => vec![],
        };
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        fsio::write_atomic(path, body.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let kept = body.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        Ok(MetricsLog { file: Some(file), kept })
    }

    /// The rows of `path` up to `resume_step` (what [`MetricsLog::open`]
    /// keeps), without touching the file: a log whose writes go nowhere,
    /// for the ranks other than 0 of a distributed run.
    pub fn read_only(path: &Path, resume_step: Option<u64>) -> Self {
        let kept = match (resume_step, std::fs::read_to_string(path)) {
            (Some(s), Ok(text)) => text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["step"].as_u64().is_some_and(|st| st <= s))
                .collect(),
            _ => vec![],
        };
        MetricsLog { file: None, kept }
    }

    /// The value of `key` in a row of `step` kept from the run resumed
    /// (so that a resumed run does not log again what was logged).
    pub fn kept_value(&self, step: u64, key: &str) -> Option<f64> {
        self.kept.iter().rev().filter(|r| r["step"].as_u64() == Some(step)).find_map(|r| r.get(key)?.as_f64())
    }

    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        if let Some(f) = self.file.as_mut() {
            writeln!(f, "{v}")?;
            f.flush()?;
        }
        Ok(())
    }
}

/// Reads a JSON-lines metrics file.
pub fn read_metrics(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))
        })
        .collect()
}

/// A progress bar for `total` steps on a terminal; when stderr is not a
/// terminal (a log file, CI), a progress line every [`LOG_EVERY_FRACTION`]
/// of the run or every [`LOG_INTERVAL`], whichever comes first, as TRL's
/// logging does (`ALIGN_PROGRESS=1` draws the bar anyway).
pub fn progress_bar(total: u64, start: u64) -> Progress {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if terminal || std::env::var("ALIGN_PROGRESS").is_ok() {
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_position(start);
        Progress { bar: Some(pb), lines: None }
    } else {
        let every_steps = total.div_ceil(LOG_EVERY_FRACTION).max(1);
        Progress::lines(total, start, every_steps, LOG_INTERVAL, Box::new(std::io::stderr()))
    }
}

/// Without a terminal, a progress line at least every `total / this` steps.
pub const LOG_EVERY_FRACTION: u64 = 20;
/// Without a terminal, a progress line at least this often.
pub const LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// A stage's progress: an `indicatif` bar, or progress lines written when
/// the message is set (step, the stage's message — loss, throughput — and
/// the ETA).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    lines: Option<std::sync::Mutex<ProgressLines>>,
}

struct ProgressLines {
    out: Box<dyn Write + Send>,
    prefix: String,
    total: u64,
    pos: u64,
    start: u64,
    started: std::time::Instant,
    every_steps: u64,
    every: std::time::Duration,
    last_pos: u64,
    last_time: std::time::Instant,
}

impl Progress {
    /// Progress lines to `out`: one when `every_steps` steps or `every` have
    /// passed since the last line, and one at the last step.
    pub fn lines(
        total: u64,
        start: u64,
        every_steps: u64,
        every: std::time::Duration,
        out: Box<dyn Write + Send>,
    ) -> Progress {
        let now = std::time::Instant::now();
        let lines = ProgressLines {
            out,
            prefix: String::new(),
            total,
            pos: start,
            start,
            started: now,
            every_steps: every_steps.max(1),
            every,
            last_pos: start,
            last_time: now,
        };
        Progress { bar: None, lines: Some(std::sync::Mutex::new(lines)) }
    }

    /// No bar and no lines (the ranks other than 0 of a distributed run).
    pub fn hidden() -> Progress {
        Progress { bar: None, lines: None }
    }

    fn with_lines(&self, f: impl FnOnce(&mut ProgressLines)) {
        if let Some(l) = &self.lines {
            if let Ok(mut l) = l.lock() {
                f(&mut l);
            }
        }
    }

    pub fn set_prefix(&self, prefix: impl Into<String>) {
        let prefix = prefix.into();
        if let Some(b) = &self.bar {
            b.set_prefix(prefix.clone());
        }
        self.with_lines(|l| l.prefix = prefix);
    }

    pub fn set_position(&self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
        self.with_lines(|l| l.pos = pos);
    }

    /// Sets the message (loss, throughput); without a terminal, writes a
    /// progress line when one is due.
    pub fn set_message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        if let Some(b) = &self.bar {
            b.set_message(msg.clone());
        }
        self.with_lines(|l| {
            let now = std::time::Instant::now();
            let due = l.pos >= l.last_pos + l.every_steps
                || now.duration_since(l.last_time) >= l.every
                || (l.pos == l.total && l.pos > l.last_pos);
            if !due {
                return;
            }
            let done = l.pos.saturating_sub(l.start);
            let eta = match done {
                0 => "?".to_string(),
                _ => {
                    let per_step = now.duration_since(l.started).as_secs_f64() / done as f64;
                    format_duration(per_step * l.total.saturating_sub(l.pos) as f64)
                }
            };
            // A failed write to stderr is not worth stopping training for.
            let _ = writeln!(l.out, "{} step {}/{} {msg} ETA {eta}", l.prefix, l.pos, l.total);
            let _ = l.out.flush();
            l.last_pos = l.pos;
            l.last_time = now;
        });
    }

    pub fn finish_and_clear(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// `1h02m03s`, `4m05s`, `6s`.
fn format_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` whose bytes a test can read back.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn progress_without_a_terminal_prints_a_line_every_n_steps_and_at_the_end() {
        let buf = Shared::default();
        let p = Progress::lines(12, 0, 5, std::time::Duration::from_secs(3600), Box::new(buf.clone()));
        p.set_prefix("sft");
        for step in 1..=12 {
            p.set_position(step);
            p.set_message(format!("loss {:.2} 100 tok/s", 1.0 / step as f64));
        }
        p.finish_and_clear();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("sft step 5/12 loss 0.20 100 tok/s ETA "), "{text}");
        assert!(lines[1].starts_with("sft step 10/12 "), "{text}");
        assert!(lines[2].starts_with("sft step 12/12 ") && lines[2].ends_with("ETA 0s"), "{text}");
    }

    #[test]
    fn progress_without_a_terminal_prints_a_line_when_the_interval_has_passed() {
        let buf = Shared::default();
        let p = Progress::lines(1000, 10, 1000, std::time::Duration::ZERO, Box::new(buf.clone()));
        p.set_position(11);
        p.set_message("loss 1.0");
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with(" step 11/1000 loss 1.0 ETA "), "{text}");
        assert_eq!(format_duration(3723.0), "1h02m03s");
        assert_eq!(format_duration(245.0), "4m05s");
    }

    #[test]
    fn lr_schedule_warms_up_linearly_then_decays_by_cosine() {
        let c = OptimConfig { lr: 1.0, warmup_steps: 4, min_lr_ratio: 0.1, ..Default::default() };
        assert_eq!(lr_at(0, 14, &c), 0.25);
        assert_eq!(lr_at(3, 14, &c), 1.0);
        assert!((lr_at(4, 14, &c) - 1.0).abs() < 1e-12);
        assert!((lr_at(9, 14, &c) - 0.55).abs() < 1e-12); // half way: 0.1 + 0.9 * 0.5
        assert!((lr_at(14, 14, &c) - 0.1).abs() < 1e-12);
        assert!((lr_at(100, 14, &c) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn no_weight_decay_on_norms_and_embeddings() {
        assert!(!decays("model.embed_tokens.weight"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
        assert!(decays("model.layers.0.mlp.up_proj.weight"));
    }

    #[test]
    fn adamw_matches_a_hand_computation() {
        // One scalar parameter, two steps, as torch.optim.AdamW computes them.
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let w = vs.root().sub("layer").var("weight", &[1], nn::Init::Const(1.0));
        let c = OptimConfig {
            lr: 0.1,
            weight_decay: 0.5,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            ..Default::default()
        };
        let mut opt = AdamW::new(&vs, &c);
        let (mut p, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for t in 1..=2 {
            opt.zero_grad();
            let loss = (&w * &w * 3.0).sum(Kind::Float); // grad = 6w
            loss.backward();
            opt.step(0.1).unwrap();
            let g = 6.0 * p;
            p *= 1.0 - 0.1 * 0.5;
            m = 0.9 * m + 0.1 * g;
            v = 0.99 * v + 0.01 * g * g;
            let bc1 = 1.0 - 0.9f64.powi(t);
            let bc2 = 1.0 - 0.99f64.powi(t);
            p -= 0.1 / bc1 * m / (v.sqrt() / bc2.sqrt() + 1e-8);
            assert!((w.double_value(&[0]) - p).abs() < 1e-6, "step {t}: {} vs {p}", w.double_value(&[0]));
        }
    }

    #[test]
    fn bf16_variables_are_updated_through_fp32_masters() {
        let mut vs = nn::VarStore::new(tch::Device::Cpu);
        let w = vs.root().sub("layer").var("weight", &[4], nn::Init::Const(1.0));
        vs.set_kind(Kind::BFloat16);
        let c = OptimConfig { lr: 1e-4, ..Default::default() };
        let mut opt = AdamW::new(&vs, &c);
        assert!(opt.has_masters());
        // Steps of 1e-4 are below bf16's resolution at 1.0 (2^-7): without
        // masters the weight would never move.
        for _ in 0..200 {
            opt.zero_grad();
            let w = vs.variables()["layer.weight"].shallow_clone();
            (w.to_kind(Kind::Float) * 1.0).sum(Kind::Float).backward();
            opt.step(1e-4).unwrap();
        }
        let master = opt.state_tensors()["layer.weight.master"].double_value(&[0]);
        assert!((master - (1.0 - 200.0 * 1e-4)).abs() < 1e-4, "master {master}");
        let _ = w;
        let v = vs.variables()["layer.weight"].to_kind(Kind::Float).double_value(&[0]);
        assert!((v - master).abs() < 1e-2 && v < 1.0, "bf16 weight {v}");
    }

    #[test]
    fn clipping_scales_the_global_norm() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let a = vs.root().var("a", &[2], nn::Init::Const(1.0));
        let mut opt = AdamW::new(&vs, &OptimConfig::default());
        (&a * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
        let n = opt.clip_grad_norm(1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        let g: Vec<f32> = Vec::try_from(a.grad()).unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5);
    }

    /// One parameter `a` of two values whose gradient is `g`.
    fn with_grad(g: [f32; 2]) -> (nn::VarStore, Tensor, AdamW) {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let a = vs.root().var("a", &[2], nn::Init::Const(1.0));
        let opt = AdamW::new(&vs, &OptimConfig::default());
        (&a * Tensor::from_slice(&g)).sum(Kind::Float).backward();
        (vs, a, opt)
    }

    #[test]
    fn an_infinite_gradient_stops_before_the_update_and_names_the_step() {
        let root = tempfile::tempdir().unwrap();
        // A checkpoint that counts as the last good one.
        let good = root.path().join("step-00000003");
        std::fs::create_dir_all(&good).unwrap();
        std::fs::write(good.join(STATE_FILE), "{}").unwrap();

        let (vs, a, mut opt) = with_grad([f32::INFINITY, 1.0]);
        let before = opt.state_tensors();
        let e = opt.clip_and_step(1.0, 0.1, 4, Some(root.path())).unwrap_err().to_string();
        assert!(e.contains("non-finite gradient norm (inf) at step 4"), "{e}");
        assert!(e.contains(&good.display().to_string()), "{e}");
        // Nothing moved: weights, moments, step count; the gradient was not
        // scaled by max_norm / inf = 0 into NaN.
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), vec![1.0, 1.0]);
        assert_eq!(opt.t, 0);
        for (k, v) in opt.state_tensors() {
            assert!(v.equal(&before[&k]), "{k} changed");
        }
        let g = Vec::<f32>::try_from(a.grad()).unwrap();
        assert_eq!(g, vec![f32::INFINITY, 1.0]);
        check_finite_weights(&vs).unwrap();

        // The bare clip reports the typed error; NaN gradients stop too.
        let (_vs, _a, mut opt) = with_grad([f32::NAN, 1.0]);
        let e = opt.clip_grad_norm(1.0).unwrap_err();
        assert!(e.downcast_ref::<NonFiniteGradient>().is_some_and(|g| g.norm.is_nan()), "{e}");
        let e = opt.clip_and_step(0.0, 0.1, 1, None).unwrap_err().to_string();
        assert!(e.contains("non-finite gradient norm (NaN) at step 1"), "{e}");
        assert!(e.contains("none (no checkpoint was saved yet)"), "{e}");
    }

    #[test]
    fn a_finite_gradient_is_clipped_then_stepped() {
        let (_vs, a, mut opt) = with_grad([3.0, 4.0]);
        let n = opt.clip_and_step(1.0, 0.1, 1, None).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        assert_eq!(opt.t, 1);
        // Adam's first step moves each weight by lr against its gradient's sign.
        let w = Vec::<f32>::try_from(&a).unwrap();
        assert!(w.iter().all(|&x| (x - 0.9).abs() < 1e-4), "{w:?}");
    }

    #[test]
    fn non_finite_weights_are_named_and_never_saved() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let a = vs.root().var("a", &[2], nn::Init::Const(1.0));
        let _b = vs.root().var("b", &[2], nn::Init::Const(1.0));
        check_finite_weights(&vs).unwrap();
        let _ = tch::no_grad(|| a.get(1).fill_(f64::NAN));
        let e = check_finite_weights(&vs).unwrap_err().to_string();
        assert!(e.contains("1 weight tensor(s) hold inf or NaN values (a)"), "{e}");
    }

    #[test]
    fn config_hash_is_stable_and_sensitive() {
        let a = OptimConfig::default();
        let mut b = a.clone();
        assert_eq!(config_hash(&a).unwrap(), config_hash(&b).unwrap());
        b.lr = 2e-4;
        assert_ne!(config_hash(&a).unwrap(), config_hash(&b).unwrap());
    }

    #[test]
    fn zero_partition_is_balanced_deterministic_and_owns_each_tensor_once() {
        let sizes: Vec<(String, i64)> =
            [("a", 100), ("b", 60), ("c", 50), ("d", 40), ("e", 10), ("f", 10), ("g", 0)]
                .iter()
                .map(|(n, s)| (n.to_string(), *s))
                .collect();
        let owners = zero_partition(&sizes, 2);
        assert_eq!(owners.len(), sizes.len());
        // Largest first to the least loaded rank: a→0 (100, 0), b→1 (100, 60),
        // c→1 (100, 110), d→0 (140, 110), e→1 (140, 120), f→1 (140, 130), g→1.
        assert_eq!(owners, vec![0, 1, 1, 0, 1, 1, 1]);
        // The same partition, name for name, whatever the input order.
        let mut rev = sizes.clone();
        rev.reverse();
        let owners_rev = zero_partition(&rev, 2);
        for (i, (n, _)) in rev.iter().enumerate() {
            let j = sizes.iter().position(|(m, _)| m == n).unwrap();
            assert_eq!(owners_rev[i], owners[j], "{n}");
        }
        for world in 1..=5 {
            let o = zero_partition(&sizes, world);
            assert!(o.iter().all(|r| *r < world));
            let mut load = vec![0i64; world];
            for (r, (_, s)) in o.iter().zip(&sizes) {
                load[*r] += s;
            }
            // Greedy balance: no two ranks differ by more than the largest tensor.
            let (lo, hi) = (load.iter().min().unwrap(), load.iter().max().unwrap());
            assert!(hi - lo <= 100, "world {world}: {load:?}");
            assert_eq!(load.iter().sum::<i64>(), 270);
        }
        assert_eq!(zero_partition(&sizes, 1), vec![0; sizes.len()]);
        // Many equal tensors spread evenly.
        let even: Vec<(String, i64)> = (0..8).map(|i| (format!("w{i}"), 16)).collect();
        let o = zero_partition(&even, 4);
        for r in 0..4 {
            assert_eq!(o.iter().filter(|x| **x == r).count(), 2);
        }
    }

    /// Three tensors initialised from `seed` in `kind`, requiring grad.
    fn zero_vars(kind: Kind) -> Vec<(String, Tensor)> {
        tch::manual_seed(3);
        [("embed_tokens.weight", vec![8, 4]), ("layer.weight", vec![4, 4]), ("norm.weight", vec![4])]
            .into_iter()
            .map(|(n, shape)| {
                (
                    n.to_string(),
                    Tensor::randn(shape, (Kind::Float, tch::Device::Cpu))
                        .to_kind(kind)
                        .set_requires_grad(true),
                )
            })
            .collect()
    }

    fn shallow(vars: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        vars.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    fn zero_loss(vars: &[(String, Tensor)], step: i64) -> Tensor {
        vars.iter()
            .map(|(_, v)| (v.to_kind(Kind::Float) * (step as f64 + 1.0)).sin().sum(Kind::Float))
            .fold(Tensor::from(0.0f32), |a, b| a + b)
    }

    #[test]
    fn sharded_adamw_updates_what_the_whole_one_does() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let c = OptimConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
            let full_vars = zero_vars(kind);
            let mut full = AdamW::from_vars(shallow(&full_vars), &c).unwrap();
            let ranks: Vec<Vec<(String, Tensor)>> = (0..2).map(|_| zero_vars(kind)).collect();
            let mut shards: Vec<AdamW> = ranks
                .iter()
                .enumerate()
                .map(|(r, v)| AdamW::from_vars_sharded(shallow(v), &c, r, 2).unwrap())
                .collect();
            // Every tensor's state lives on exactly one rank.
            assert_eq!(
                shards[0].num_state_elements() + shards[1].num_state_elements(),
                full.num_state_elements()
            );
            assert!(shards.iter().all(|s| s.num_owned() > 0 && s.is_sharded()));
            let owners = shards[0].owners.clone().unwrap();
            for step in 0..4 {
                full.zero_grad();
                zero_loss(&full_vars, step).backward();
                full.clip_and_step(0.5, 1e-2, step as u64 + 1, None).unwrap();
                for (opt, vars) in shards.iter_mut().zip(&ranks) {
                    opt.zero_grad();
                    zero_loss(vars, step).backward();
                    opt.clip_and_step(0.5, 1e-2, step as u64 + 1, None).unwrap();
                }
                // The owners' broadcast, by hand.
                tch::no_grad(|| {
                    for (i, o) in owners.iter().enumerate() {
                        let src = ranks[*o][i].1.copy();
                        ranks[1 - o][i].1.shallow_clone().copy_(&src);
                    }
                });
            }
            for r in &ranks {
                for ((n, a), (_, b)) in full_vars.iter().zip(r) {
                    assert!(a.equal(b), "{kind:?} {n}");
                }
            }
            // The shards' states are the whole state, split.
            let whole = full.state_tensors();
            let mut keys = 0;
            for s in &shards {
                for (k, v) in s.state_tensors() {
                    assert!(whole[&k].equal(&v), "{k}");
                    keys += 1;
                }
            }
            assert_eq!(keys, whole.len());
            // Loading the whole state keeps each rank's share.
            let mut again = AdamW::from_vars_sharded(zero_vars(kind), &c, 1, 2).unwrap();
            again.load_state(whole, full.t).unwrap();
            for (k, v) in again.state_tensors() {
                assert!(v.equal(&shards[1].state_tensors()[&k]), "{k}");
            }
        }
    }

    #[test]
    fn optim_zero_is_0_or_1_and_left_out_of_the_serialized_form_at_0() {
        let c: OptimConfig = toml::from_str("zero = 1").unwrap();
        assert_eq!(c.zero, 1);
        c.validate().unwrap();
        assert!(serde_json::to_string(&c).unwrap().contains("\"zero\":1"));
        assert!(!serde_json::to_string(&OptimConfig::default()).unwrap().contains("zero"));
        let e = OptimConfig { zero: 2, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("optim.zero must be 0") && e.contains("got 2"), "{e}");
        // One process: nothing to shard.
        assert!(!AdamW::from_vars(zero_vars(Kind::Float), &c).unwrap().is_sharded());
        assert!(AdamW::from_vars_sharded(zero_vars(Kind::Float), &c, 2, 2).is_err());
    }
}
