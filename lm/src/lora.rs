//! LoRA adapters (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
//! Models", ICLR 2022): `W x + (alpha / r) · B A x`, A (r, in) drawn
//! kaiming-uniform, B (out, r) zero, so that step 0 computes exactly the
//! base model; dropout on the adapter's input only. Saved and read in PEFT's
//! own format (`adapter_config.json`, `adapter_model.safetensors`).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::{Kind, Tensor};

/// The HF names of the projections every Gemma's decoder layers have
/// (Gemma 4 lacks k/v on some layers, but not in all).
pub const LINEAR_MODULES: [&str; 7] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Gemma 4's per-layer-input projections (models with
/// `hidden_size_per_layer_input`): `model.layers.{i}.per_layer_input_gate`,
/// `model.layers.{i}.per_layer_projection` and the model's
/// `model.per_layer_model_projection`. All `nn.Linear` in transformers, so
/// PEFT's `"all-linear"` adapts them too.
pub const PER_LAYER_INPUT_MODULES: [&str; 3] =
    ["per_layer_input_gate", "per_layer_projection", "per_layer_model_projection"];

/// Every module name an adapter may wrap: [`LINEAR_MODULES`] then
/// [`PER_LAYER_INPUT_MODULES`] (the order align lists them in).
pub const ALL_LINEAR_MODULES: [&str; 10] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "per_layer_input_gate",
    "per_layer_projection",
    "per_layer_model_projection",
];

/// Which projections get an adapter: `"all-linear"` (PEFT's name: every
/// linear module of the text model except the LM head, so on Gemma 4 with
/// per-layer inputs also [`PER_LAYER_INPUT_MODULES`]) or a list of HF names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// `"all-linear"`.
    Preset(String),
    List(Vec<String>),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::Preset("all-linear".into())
    }
}

impl TargetModules {
    /// Whether this is `"all-linear"`.
    pub fn is_all_linear(&self) -> bool {
        matches!(self, TargetModules::Preset(p) if p == "all-linear")
    }

    /// The names this selects without a model: a list's names (each one of
    /// [`ALL_LINEAR_MODULES`]), in [`ALL_LINEAR_MODULES`] order, or for
    /// `"all-linear"` the projections every Gemma has, [`LINEAR_MODULES`].
    /// What a given model adapts is [`TargetModules::resolve_for`] (on
    /// Gemma 4 with per-layer inputs, `"all-linear"` adds
    /// [`PER_LAYER_INPUT_MODULES`]).
    pub fn resolve(&self) -> Result<Vec<&'static str>> {
        match self {
            TargetModules::Preset(p) if p == "all-linear" => Ok(LINEAR_MODULES.to_vec()),
            TargetModules::Preset(p) => {
                bail!("lora.target_modules: {p:?} is not \"all-linear\" or a list of {ALL_LINEAR_MODULES:?}")
            }
            TargetModules::List(names) => {
                if names.is_empty() {
                    bail!("lora.target_modules is empty; name at least one of {ALL_LINEAR_MODULES:?} or use \"all-linear\"");
                }
                for n in names {
                    if !ALL_LINEAR_MODULES.contains(&n.as_str()) {
                        bail!("lora.target_modules: unknown module {n:?}; the projections are {ALL_LINEAR_MODULES:?}");
                    }
                }
                Ok(ALL_LINEAR_MODULES.iter().copied().filter(|m| names.iter().any(|n| n == m)).collect())
            }
        }
    }

    /// The names an adapter file with these target modules may hold
    /// tensors of, before it meets a model: a list's names, or for
    /// `"all-linear"` any of [`ALL_LINEAR_MODULES`].
    pub fn allowed(&self) -> Result<Vec<&'static str>> {
        if self.is_all_linear() {
            return Ok(ALL_LINEAR_MODULES.to_vec());
        }
        self.resolve()
    }

    /// The module names this selects on a model whose linear modules are
    /// `available` (module names, e.g. from `Gemma::lora_modules`), in
    /// [`ALL_LINEAR_MODULES`] order: `"all-linear"` takes all of them, as
    /// PEFT does; a list must name modules the model has (an error names
    /// those it lacks).
    pub fn resolve_for(&self, available: &[&str]) -> Result<Vec<&'static str>> {
        let names = self.allowed()?;
        if !self.is_all_linear() {
            let lacking: Vec<&str> = names.iter().copied().filter(|n| !available.contains(n)).collect();
            if !lacking.is_empty() {
                let why = if lacking.iter().any(|n| PER_LAYER_INPUT_MODULES.contains(n)) {
                    " (the per-layer-input projections exist on Gemma 4 models with hidden_size_per_layer_input only)"
                } else {
                    ""
                };
                bail!(
                    "lora.target_modules: the model has no {} module{}{why}; its linear modules are {available:?}",
                    lacking.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", "),
                    if lacking.len() == 1 { "" } else { "s" },
                );
            }
        }
        Ok(names.into_iter().filter(|n| available.contains(n)).collect())
    }
}

/// A stage's `[<stage>.lora]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// r: the adapters' rank.
    pub rank: i64,
    /// The adapter's output is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    pub target_modules: TargetModules,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { rank: 16, alpha: 32.0, dropout: 0.0, target_modules: TargetModules::default() }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.rank < 1 {
            bail!("lora.rank must be at least 1, got {}", self.rank);
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("lora.alpha must be a positive number, got {}", self.alpha);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("lora.dropout must be in [0, 1), got {}", self.dropout);
        }
        self.target_modules.resolve()?;
        Ok(())
    }

    /// `alpha / rank`, the factor on `B A x`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The switches shared by all adapters of one model (cheap to clone: two
/// shared flags). `enabled` off computes the base model (PEFT's
/// `disable_adapter()`); `training` on applies the adapters' dropout.
#[derive(Debug, Clone)]
pub struct AdapterSwitch {
    enabled: Arc<AtomicBool>,
    training: Arc<AtomicBool>,
}

impl Default for AdapterSwitch {
    /// Enabled, not training.
    fn default() -> Self {
        AdapterSwitch { enabled: Arc::new(AtomicBool::new(true)), training: Arc::new(AtomicBool::new(false)) }
    }
}

impl AdapterSwitch {
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Sets `enabled`; returns the previous value.
    pub fn set_enabled(&self, on: bool) -> bool {
        self.enabled.swap(on, Ordering::SeqCst)
    }

    pub fn training(&self) -> bool {
        self.training.load(Ordering::SeqCst)
    }

    /// Sets `training`; returns the previous value.
    pub fn set_training(&self, on: bool) -> bool {
        self.training.swap(on, Ordering::SeqCst)
    }

    /// Whether two handles are the same switch.
    pub fn same(&self, other: &AdapterSwitch) -> bool {
        Arc::ptr_eq(&self.enabled, &other.enabled)
    }
}

/// Switches adapters off until dropped, then restores the previous state
/// (from [`AdapterSwitch::disabled`]).
#[must_use = "the adapters are back on when the guard is dropped"]
pub struct AdaptersDisabled {
    switch: Option<(AdapterSwitch, bool)>,
}

impl AdapterSwitch {
    /// Adapters off until the guard is dropped.
    pub fn disabled(&self) -> AdaptersDisabled {
        let was = self.set_enabled(false);
        AdaptersDisabled { switch: Some((self.clone(), was)) }
    }
}

impl AdaptersDisabled {
    /// A guard that does nothing (a model without adapters).
    pub fn none() -> Self {
        AdaptersDisabled { switch: None }
    }
}

impl Drop for AdaptersDisabled {
    fn drop(&mut self) {
        if let Some((s, was)) = self.switch.take() {
            s.set_enabled(was);
        }
    }
}

/// One projection's adapter: `lora_a` (r, in), `lora_b` (out, r), f32,
/// shallow clones of the variables of the adapters' `VarStore`.
#[derive(Debug)]
pub struct LoraAdapter {
    pub lora_a: Tensor,
    pub lora_b: Tensor,
    /// `alpha / r`.
    pub scaling: f64,
    /// Dropout probability on the adapter's input (training only).
    pub dropout: f64,
    pub switch: AdapterSwitch,
}

impl LoraAdapter {
    /// `scaling · B(A(dropout(x)))` for `x` (…, in), in the adapter's dtype
    /// (`x` is cast to it first, as PEFT does). Dropout only while the
    /// switch says training, drawn from torch's generator.
    pub fn delta(&self, x: &Tensor) -> Tensor {
        let x = x.to_kind(self.lora_a.kind());
        let x = if self.dropout > 0.0 && self.switch.training() { x.dropout(self.dropout, true) } else { x };
        x.linear::<Tensor>(&self.lora_a, None).linear::<Tensor>(&self.lora_b, None) * self.scaling
    }

    /// `scaling · B A` (out, in) in f32, detached: what merging adds to W.
    pub fn delta_weight(&self) -> Tensor {
        let a = self.lora_a.detach().to_kind(Kind::Float);
        let b = self.lora_b.detach().to_kind(Kind::Float);
        b.matmul(&a) * self.scaling
    }
}
