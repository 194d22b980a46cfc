//! LoRA on the Gemma model, in PEFT's own terms: attaching adapters
//! ([`Gemma::attach_lora`]), switching them off (the RL reference) or into
//! training mode (dropout), a second model over the same base weights
//! ([`Gemma::share_base`] in `model.rs`), PEFT's adapter directories
//! ([`save_adapter`], [`load_adapter`]) and merging an adapter into a full
//! checkpoint ([`MergedWeights`], [`merge_dirs`]).
//!
//! The adapters (`lora_A` (r, in), `lora_B` (out, r), f32) live in their own
//! `VarStore`, normally separate from the base's, under the key paths of the
//! weights they adapt: `model.layers.{i}.self_attn.q_proj.lora_A.weight`.
//! PEFT's file prefixes those keys with `base_model.model.`.
//!
//! (The maths and the switches are in [`crate::lora`]; this module is apart
//! from it because it needs the model and the checkpoint code, which use
//! `lora` themselves.)

use crate::checkpoint::{self, SaveOptions, TensorEntry, TensorSource};
use crate::config::GemmaConfig;
use crate::fsio;
use crate::init::seeded_uniform;
use crate::lora::{
    AdapterSwitch, AdaptersDisabled, LoraAdapter, LoraConfig, TargetModules, ALL_LINEAR_MODULES,
    PER_LAYER_INPUT_MODULES,
};
use crate::model::{Gemma, Linear, WeightInit};
use crate::reward_model::{self, RewardModel};
use crate::safetensors_io::WeightReader;
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// PEFT's adapter config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// What PEFT puts before a model's own key names in its adapter files.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Where transformers 5 puts a multimodal Gemma's text model among its
/// modules (`Gemma3ForConditionalGeneration`, `Gemma4ForConditionalGeneration`).
pub const MULTIMODAL_TEXT: &str = "model.language_model.";

/// `exclude_modules` of an adapter over a multimodal model's text model: the
/// other towers' modules, whose names (`q_proj`, …) a list of target
/// modules would otherwise match too in peft (Gemma 4's vision tower).
pub const MULTIMODAL_EXCLUDE: &str =
    r".*\.(vision_tower|audio_tower|embed_vision|embed_audio|multi_modal_projector)\..*";

/// The PEFT release whose `adapter_config.json` fields align writes.
pub const PEFT_VERSION: &str = "0.21.2";
/// A sequence classifier's head, saved with a `SEQ_CLS` adapter.
pub const SCORE_WEIGHT: &str = reward_model::SCORE_WEIGHT;

/// PEFT's `task_type`: which model class the adapter goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskType {
    /// `CAUSAL_LM`: `GemmaForCausalLM` (SFT, the RL policy).
    CausalLm,
    /// `SEQ_CLS`: `GemmaForSequenceClassification` (a reward model); the
    /// adapter file also holds the `score` head.
    SeqCls,
}

impl TaskType {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::SeqCls => "SEQ_CLS",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "CAUSAL_LM" => Ok(TaskType::CausalLm),
            "SEQ_CLS" => Ok(TaskType::SeqCls),
            other => {
                bail!("task_type {other:?} is not supported; align reads CAUSAL_LM and SEQ_CLS adapters")
            }
        }
    }
}

/// A `nn::Path` at the dotted `name` under `p`.
fn path_at<'a>(p: &nn::Path<'a>, name: &str) -> nn::Path<'a> {
    let mut segs = name.split('.');
    let first = segs.next().unwrap_or(name);
    segs.fold(p.sub(first), |q, s| q.sub(s))
}

impl Gemma {
    /// The names of the linear modules LoRA may adapt on this model
    /// ([`Gemma::linears`]' last segments, once each), in
    /// [`ALL_LINEAR_MODULES`] order: the seven projections, plus on Gemma 4
    /// with per-layer inputs `per_layer_input_gate`, `per_layer_projection`
    /// and `per_layer_model_projection`.
    pub fn lora_modules(&self) -> Vec<&'static str> {
        let names: BTreeSet<String> = self
            .linears()
            .into_iter()
            .map(|(n, _)| n.rsplit('.').next().unwrap_or_default().to_string())
            .collect();
        ALL_LINEAR_MODULES.iter().copied().filter(|m| names.contains(*m)).collect()
    }

    /// The module names `targets` selects on this model
    /// ([`TargetModules::resolve_for`] over [`Gemma::lora_modules`]):
    /// `"all-linear"` is every linear module but the head, as in PEFT.
    pub fn lora_targets(&self, targets: &TargetModules) -> Result<Vec<&'static str>> {
        targets.resolve_for(&self.lora_modules())
    }

    /// Attaches LoRA adapters to the linear modules `cfg` targets
    /// ([`Gemma::lora_targets`]), in every decoder layer (and Gemma 4's
    /// `model.per_layer_model_projection`): variables `{proj}.lora_A.weight` (r, in), drawn
    /// uniform(±1/√in) (PEFT's kaiming-uniform with a = √5) from a stream
    /// keyed by `seed` and the name, and `{proj}.lora_B.weight` (out, r),
    /// zero — so the model computes exactly the base until B moves. Both f32
    /// whatever the base's dtype, created under `p` (normally the root of a
    /// second `VarStore`) at the base weights' key paths, trainable. Every
    /// base tensor is frozen (`requires_grad` off): only the adapters learn.
    /// All adapters share one [`AdapterSwitch`], enabled, not training.
    pub fn attach_lora(&mut self, p: &nn::Path, cfg: &LoraConfig, seed: u64) -> Result<()> {
        cfg.validate()?;
        if self.linears().iter().any(|(_, l)| l.lora.is_some()) {
            bail!("the model already has LoRA adapters; attach them once (or to a model from share_base)");
        }
        if p.device() != self.device() {
            bail!("the adapters' VarStore is on {:?}, the model on {:?}", p.device(), self.device());
        }
        let targets = self.lora_targets(&cfg.target_modules)?;
        let switch = AdapterSwitch::default();
        let (r, device) = (cfg.rank, p.device());
        for (name, lin) in self.linears_mut() {
            let module = name.rsplit('.').next().unwrap_or_default();
            if !targets.contains(&module) {
                continue;
            }
            let (out_dim, in_dim) = lin.weight.size2()?;
            let (pa, pb) = (path_at(p, &format!("{name}.lora_A")), path_at(p, &format!("{name}.lora_B")));
            if pa.get("weight").is_some() || pb.get("weight").is_some() {
                bail!("the adapters' VarStore already has {name}.lora_A/lora_B; give an empty one");
            }
            let a = seeded_uniform(
                &[r, in_dim],
                1.0 / (in_dim as f64).sqrt(),
                seed,
                &format!("{name}.lora_A.weight"),
            )
            .to_device(device);
            let b = Tensor::zeros([out_dim, r], (Kind::Float, device));
            let lora_a = pa.add("weight", a, true);
            let lora_b = pb.add("weight", b, true);
            lin.lora = Some(LoraAdapter {
                lora_a,
                lora_b,
                scaling: cfg.scaling(),
                dropout: cfg.dropout,
                switch: switch.clone(),
            });
        }
        for (_, t) in self.base_tensors() {
            let _ = t.set_requires_grad(false);
        }
        Ok(())
    }

    /// The switch the model's adapters share; None without adapters.
    pub fn adapter_switch(&self) -> Option<AdapterSwitch> {
        self.linears().into_iter().find_map(|(_, l)| l.lora.as_ref().map(|a| a.switch.clone()))
    }

    /// Adapters on (LoRA model) or off (the base model). No-op without adapters.
    pub fn set_adapters_enabled(&self, on: bool) {
        for (_, l) in self.linears() {
            if let Some(a) = &l.lora {
                a.switch.set_enabled(on);
            }
        }
    }

    /// Adapters off until the guard is dropped (PEFT's `disable_adapter()`):
    /// the RL reference is the base with the policy's adapters off.
    pub fn adapters_disabled(&self) -> AdaptersDisabled {
        match self.adapter_switch() {
            Some(s) => s.disabled(),
            None => AdaptersDisabled::none(),
        }
    }

    /// Training mode for the adapters: dropout on their input. No-op without adapters.
    pub fn set_training(&self, on: bool) {
        for (_, l) in self.linears() {
            if let Some(a) = &l.lora {
                a.switch.set_training(on);
            }
        }
    }

    /// The adapters' tensors by their key names
    /// (`model.layers.0.self_attn.q_proj.lora_A.weight`, …), shallow clones.
    pub fn adapter_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (name, l) in self.linears() {
            if let Some(a) = &l.lora {
                out.insert(format!("{name}.lora_A.weight"), a.lora_a.shallow_clone());
                out.insert(format!("{name}.lora_B.weight"), a.lora_b.shallow_clone());
            }
        }
        out
    }

    /// The base model's tensors by checkpoint name (embeddings, norms,
    /// projections, an untied `lm_head.weight`), shallow clones; no adapters.
    pub fn base_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        out.insert("model.embed_tokens.weight".to_string(), self.model.embed_tokens.shallow_clone());
        for (i, l) in self.model.layers.iter().enumerate() {
            for (n, norm) in l.norms() {
                out.insert(format!("model.layers.{i}.{n}.weight"), norm.weight.shallow_clone());
            }
        }
        // Gemma 4's per-layer-input tensors and layer_scalars.
        out.extend(self.other_tensors());
        for (name, l) in self.linears() {
            out.insert(format!("{name}.weight"), l.weight.shallow_clone());
        }
        out.insert("model.norm.weight".to_string(), self.model.norm.weight.shallow_clone());
        if let Some(h) = &self.lm_head {
            out.insert("lm_head.weight".to_string(), h.weight.shallow_clone());
        }
        out
    }

    /// Copies `tensors` (key names as [`Gemma::adapter_tensors`], e.g. from
    /// [`load_adapter`]) into the attached adapters, checking names and
    /// shapes; `origin` names their source in errors.
    pub fn load_adapter_tensors(&self, tensors: &BTreeMap<String, Tensor>, origin: &Path) -> Result<()> {
        let vars = self.adapter_tensors();
        if vars.is_empty() {
            bail!("the model has no adapters: attach_lora first");
        }
        let missing: Vec<&str> =
            vars.keys().filter(|k| !tensors.contains_key(*k)).map(|k| k.as_str()).collect();
        let unexpected: Vec<&str> =
            tensors.keys().filter(|k| !vars.contains_key(*k)).map(|k| k.as_str()).collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            let mut msg = format!("adapter {} does not match the model's adapters:", origin.display());
            if !missing.is_empty() {
                msg.push_str(&format!("\n  missing tensors: {}", missing.join(", ")));
            }
            if !unexpected.is_empty() {
                msg.push_str(&format!("\n  unexpected tensors: {}", unexpected.join(", ")));
            }
            msg.push_str(
                "\n  align adapts the target modules in every decoder layer (\"all-linear\": every linear module \
                 but the head, on Gemma 4 with per-layer inputs also per_layer_input_gate, per_layer_projection \
                 and per_layer_model_projection); check the adapter's target_modules and that it was made for \
                 this base model",
            );
            bail!(msg);
        }
        tch::no_grad(|| -> Result<()> {
            for (name, var) in &vars {
                let src = &tensors[name];
                if var.size() != src.size() {
                    bail!(
                        "adapter {}: tensor {name} has shape {:?}, the model expects {:?} (an adapter for another model size or rank?)",
                        origin.display(),
                        src.size(),
                        var.size()
                    );
                }
                var.shallow_clone().f_copy_(src).with_context(|| format!("copying adapter tensor {name}"))?;
            }
            Ok(())
        })
    }
}

/// A PEFT LoRA adapter directory, read.
#[derive(Debug)]
pub struct AdapterFile {
    pub config: LoraConfig,
    pub task_type: TaskType,
    /// `base_model_name_or_path`, when set.
    pub base_model: Option<String>,
    /// The `lora_A` / `lora_B` tensors by align's key names (PEFT's
    /// `base_model.model.` removed), on the CPU.
    pub tensors: BTreeMap<String, Tensor>,
    /// A `SEQ_CLS` adapter's `score.weight` (PEFT's `modules_to_save`), if saved.
    pub score: Option<Tensor>,
}

/// A JSON number as f64, naming the field in errors.
fn num(v: &serde_json::Value, field: &str) -> Result<f64> {
    v.as_f64().ok_or_else(|| anyhow!("{field} must be a number, got {v}"))
}

/// Whether an optional PEFT field is unset: absent, null, false, an empty
/// list or object.
fn unset(v: Option<&serde_json::Value>) -> bool {
    match v {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => true,
        Some(serde_json::Value::Array(a)) => a.is_empty(),
        Some(serde_json::Value::Object(o)) => o.is_empty(),
        _ => false,
    }
}

/// The linear module a PEFT `target_modules` entry names: a bare name
/// (`q_proj`) or a module path (`model.layers.3.self_attn.q_proj`, as peft
/// writes for `"all-linear"` on a sequence classifier;
/// `model.layers.3.per_layer_input_gate`, `model.per_layer_model_projection`
/// for Gemma 4's per-layer-input projections).
fn target_name(entry: &str) -> Result<&'static str> {
    let last = entry.rsplit('.').next().unwrap_or(entry);
    let Some(m) = ALL_LINEAR_MODULES.iter().find(|m| **m == last) else {
        bail!(
            "target module {entry:?} is not one of Gemma's linear modules {ALL_LINEAR_MODULES:?} \
             (an adapter for another architecture, or one that adapts the head or embeddings?)"
        );
    };
    if entry != last {
        let parts: Vec<&str> = entry.split('.').collect();
        let layer = |n: usize| {
            parts.len() == n
                && parts[0] == "model"
                && parts[1] == "layers"
                && parts[2].parse::<usize>().is_ok()
        };
        let (ok, path) = if *m == "per_layer_model_projection" {
            (parts == ["model", *m], format!("model.{m}"))
        } else if PER_LAYER_INPUT_MODULES.contains(m) {
            (layer(4), format!("model.layers.N.{m}"))
        } else {
            let group = if ["gate_proj", "up_proj", "down_proj"].contains(m) { "mlp" } else { "self_attn" };
            (layer(5) && parts[3] == group, format!("model.layers.N.{group}.{m}"))
        };
        if !ok {
            bail!("target module {entry:?} is not a Gemma module path ({path})");
        }
    }
    Ok(m)
}

/// Reads `adapter_config.json` into a [`LoraConfig`], the task type and the
/// base model's name, refusing what align does not compute.
fn read_adapter_config(dir: &Path) -> Result<(LoraConfig, TaskType, Option<String>)> {
    let path = dir.join(ADAPTER_CONFIG);
    if !dir.is_dir() {
        bail!("adapter directory {} does not exist", dir.display());
    }
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("cannot read {}; is {} a PEFT adapter directory?", path.display(), dir.display())
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let o = v.as_object().ok_or_else(|| anyhow!("{} is not a JSON object", path.display()))?;
    let at = || format!("{}", path.display());
    let peft_type = o.get("peft_type").and_then(|t| t.as_str()).unwrap_or("");
    if peft_type != "LORA" {
        bail!("{}: peft_type is {:?}; align reads LORA adapters only", at(), o.get("peft_type"));
    }
    let bias = o.get("bias").and_then(|b| b.as_str()).unwrap_or("none");
    if bias != "none" {
        bail!(
            "{}: bias = {bias:?} is not supported (align's adapters train no biases; use bias \"none\")",
            at()
        );
    }
    // Options that change what the adapter computes: refused, not ignored.
    for key in [
        "use_dora",
        "use_rslora",
        "use_qalora",
        "use_bdlora",
        "lora_bias",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layer_replication",
        "exclude_modules",
        "target_parameters",
        "trainable_token_indices",
        "alora_invocation_tokens",
        "arrow_config",
        "monteclora_config",
        "kasa_config",
        "velora_config",
        "megatron_config",
    ] {
        // The other towers excluded (what align writes for a multimodal
        // base) change nothing on the text model align adapts.
        let towers =
            key == "exclude_modules" && o.get(key).and_then(|v| v.as_str()) == Some(MULTIMODAL_EXCLUDE);
        if !unset(o.get(key)) && !towers {
            bail!("{}: {key} = {} is not supported by align's LoRA", at(), o[key]);
        }
    }
    let task_type = match o.get("task_type") {
        None | Some(serde_json::Value::Null) => TaskType::CausalLm,
        Some(t) => {
            TaskType::parse(t.as_str().ok_or_else(|| anyhow!("{}: task_type must be a string", at()))?)
                .with_context(at)?
        }
    };
    if let Some(serde_json::Value::Array(mods)) = o.get("modules_to_save") {
        for m in mods {
            let name = m.as_str().unwrap_or_default();
            if !(task_type == TaskType::SeqCls && (name == "score" || name == "classifier")) {
                bail!(
                    "{}: modules_to_save {m} is not supported (a {} adapter may save the score head only)",
                    at(),
                    task_type.as_str()
                );
            }
        }
    } else if !unset(o.get("modules_to_save")) {
        bail!("{}: modules_to_save must be a list", at());
    }
    let rank = match o.get("r") {
        None => 8,
        Some(r) => r
            .as_i64()
            .filter(|&r| r >= 1)
            .ok_or_else(|| anyhow!("{}: r must be a positive integer, got {r}", at()))?,
    };
    let alpha =
        o.get("lora_alpha").map(|a| num(a, "lora_alpha")).transpose().with_context(at)?.unwrap_or(8.0);
    let dropout = match o.get("lora_dropout") {
        None | Some(serde_json::Value::Null) => 0.0,
        Some(d) => num(d, "lora_dropout").with_context(at)?,
    };
    let target_modules = match o.get("target_modules") {
        Some(serde_json::Value::String(s)) if s == "all-linear" => TargetModules::Preset(s.clone()),
        Some(serde_json::Value::String(s)) => bail!(
            "{}: target_modules {s:?} is a regular expression; align reads a list of module names or \"all-linear\"",
            at()
        ),
        Some(serde_json::Value::Array(list)) => {
            let mut names = BTreeSet::new();
            for e in list {
                let e = e.as_str().ok_or_else(|| anyhow!("{}: target_modules entries must be strings", at()))?;
                names.insert(target_name(e).with_context(at)?);
            }
            TargetModules::List(
                ALL_LINEAR_MODULES.iter().filter(|m| names.contains(*m)).map(|m| m.to_string()).collect(),
            )
        }
        other => bail!("{}: target_modules must be a list of names or \"all-linear\", got {other:?}", at()),
    };
    let config = LoraConfig { rank, alpha, dropout, target_modules };
    config.validate().with_context(at)?;
    let base = o.get("base_model_name_or_path").and_then(|b| b.as_str()).map(String::from);
    Ok((config, task_type, base))
}

/// Reads a PEFT LoRA adapter directory (`adapter_config.json`,
/// `adapter_model.safetensors`) made by peft or by [`save_adapter`].
/// Refuses options align does not compute (DoRA, rsLoRA, biases, rank or
/// alpha patterns, layer subsets, …) and keys of another architecture.
pub fn load_adapter(dir: &Path) -> Result<AdapterFile> {
    let (config, task_type, base_model) = read_adapter_config(dir)?;
    let wpath = dir.join(ADAPTER_WEIGHTS);
    if !wpath.exists() {
        bail!(
            "{} has no {ADAPTER_WEIGHTS}{}",
            dir.display(),
            if dir.join("adapter_model.bin").exists() {
                " (only adapter_model.bin: save it with safe_serialization=True)"
            } else {
                ""
            }
        );
    }
    let raw = checkpoint::read_tensors_file(&wpath)?;
    // Which modules the model has is checked when the tensors meet it
    // (`Gemma::load_adapter_tensors`).
    let targets = config.target_modules.allowed()?;
    let (mut tensors, mut score, mut unknown) = (BTreeMap::new(), None, vec![]);
    for (key, t) in raw {
        let Some(name) = key.strip_prefix(PEFT_PREFIX) else {
            unknown.push(key);
            continue;
        };
        // An adapter of a multimodal model names the text model's modules
        // `model.language_model.…`; align's are `model.…`.
        let text_name = name.strip_prefix(MULTIMODAL_TEXT).map(|rest| format!("model.{rest}"));
        let name = text_name.as_deref().unwrap_or(name);
        if name == SCORE_WEIGHT && task_type == TaskType::SeqCls {
            score = Some(t);
            continue;
        }
        let module = name.strip_suffix(".lora_A.weight").or_else(|| name.strip_suffix(".lora_B.weight"));
        let known = module
            .and_then(|m| target_name(m).ok().filter(|_| m.contains('.')))
            .filter(|m| targets.contains(m));
        match known {
            Some(_) => {
                tensors.insert(name.to_string(), t.to_kind(Kind::Float));
            }
            None => unknown.push(key),
        }
    }
    if !unknown.is_empty() {
        bail!(
            "{}: tensors align does not know: {} (align reads LoRA A/B of Gemma's linear modules {:?} named in target_modules{}; is it an adapter for another architecture?)",
            wpath.display(),
            unknown.join(", "),
            targets,
            if task_type == TaskType::SeqCls { ", and base_model.model.score.weight" } else { "" }
        );
    }
    if tensors.is_empty() {
        bail!("{} holds no LoRA tensors", wpath.display());
    }
    Ok(AdapterFile { config, task_type, base_model, tensors, score })
}

/// `adapter_config.json` as peft writes it (every field of peft
/// [`PEFT_VERSION`]), for `cfg`; `target_modules` lists
/// [`TargetModules::resolve`]'s names ([`save_adapter`] writes the modules
/// the model adapted instead, as peft does for `"all-linear"`).
pub fn adapter_config_json(
    cfg: &LoraConfig,
    base_model: &str,
    task_type: TaskType,
) -> Result<serde_json::Value> {
    let targets = cfg.target_modules.resolve()?;
    let alpha = if cfg.alpha.fract() == 0.0 && cfg.alpha.abs() < 1e15 {
        serde_json::json!(cfg.alpha as i64)
    } else {
        serde_json::json!(cfg.alpha)
    };
    let modules_to_save = match task_type {
        TaskType::SeqCls => serde_json::json!(["classifier", "score"]),
        TaskType::CausalLm => serde_json::Value::Null,
    };
    Ok(serde_json::json!({
        "alora_invocation_tokens": null,
        "alpha_pattern": {},
        "arrow_config": null,
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "corda_config": null,
        "ensure_weight_tying": false,
        "eva_config": null,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "kasa_config": null,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": false,
        "lora_dropout": cfg.dropout,
        "lora_ga_config": null,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": modules_to_save,
        "monteclora_config": null,
        "peft_type": "LORA",
        "peft_version": PEFT_VERSION,
        "qalora_group_size": 16,
        "r": cfg.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "target_parameters": null,
        "task_type": task_type.as_str(),
        "trainable_token_indices": null,
        "use_bdlora": null,
        "use_dora": false,
        "use_qalora": false,
        "use_rslora": false,
        "velora_config": null,
    }))
}

/// Writes a PEFT adapter directory at `dir`, atomically (built beside it
/// and swapped in): `adapter_config.json` ([`adapter_config_json`]) and
/// `adapter_model.safetensors` with every variable of `adapter_vs` (the
/// adapters' own `VarStore`, f32; for `SEQ_CLS` it may also hold the
/// `score.weight` head) and the `extra` tensors (a `SEQ_CLS` adapter's
/// `score.weight` kept elsewhere), each under PEFT's name: `base_model.model.` +
/// align's key. `peft.PeftModel.from_pretrained` loads it unchanged.
pub fn save_adapter(
    dir: &Path,
    adapter_vs: &nn::VarStore,
    cfg: &LoraConfig,
    base_model: &str,
    task_type: TaskType,
    extra: &[(&str, &Tensor)],
) -> Result<()> {
    cfg.validate()?;
    // Over the text model of a multimodal base (`*ForConditionalGeneration`),
    // PEFT names the modules `model.language_model.…`.
    let multimodal = task_type == TaskType::CausalLm
        && checkpoint::read_config(Path::new(base_model)).is_ok_and(|c| c.wrapper.is_some());
    let mut tensors = BTreeMap::new();
    for (name, t) in adapter_vs.variables() {
        let head = task_type == TaskType::SeqCls && name == SCORE_WEIGHT;
        if !(head || name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")) {
            bail!("{name} in the adapters' VarStore is not a LoRA tensor (…lora_A.weight / …lora_B.weight)");
        }
        let name = match name.strip_prefix("model.") {
            Some(rest) if multimodal => format!("{MULTIMODAL_TEXT}{rest}"),
            _ => name,
        };
        tensors.insert(format!("{PEFT_PREFIX}{name}"), t.detach());
    }
    if tensors.is_empty() {
        bail!("the adapters' VarStore is empty: nothing to save");
    }
    for (name, t) in extra {
        if task_type != TaskType::SeqCls || *name != SCORE_WEIGHT {
            bail!(
                "extra tensor {name}: only a SEQ_CLS adapter's {SCORE_WEIGHT} is saved beside the adapters"
            );
        }
        if tensors.insert(format!("{PEFT_PREFIX}{name}"), t.detach()).is_some() {
            bail!("{name} is both in the adapters' VarStore and in the extra tensors");
        }
    }
    let mut config = adapter_config_json(cfg, base_model, task_type)?;
    // The modules adapted, as peft writes `"all-linear"` resolved on the
    // model (on Gemma 4 with per-layer inputs it adds the per-layer-input
    // projections to the seven).
    let adapted: BTreeSet<&str> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_A.weight").or_else(|| k.strip_suffix(".lora_B.weight")))
        .filter_map(|m| m.rsplit('.').next())
        .collect();
    let unknown: Vec<&&str> = adapted.iter().filter(|m| !ALL_LINEAR_MODULES.contains(*m)).collect();
    if !unknown.is_empty() {
        bail!("the adapters' VarStore adapts {unknown:?}, not Gemma linear modules {ALL_LINEAR_MODULES:?}");
    }
    config["target_modules"] =
        serde_json::json!(ALL_LINEAR_MODULES.iter().filter(|m| adapted.contains(*m)).collect::<Vec<_>>());
    if multimodal {
        config["exclude_modules"] = serde_json::json!(MULTIMODAL_EXCLUDE);
    }
    fsio::write_dir_atomic(dir, |tmp| {
        checkpoint::write_tensors_file(&tmp.join(ADAPTER_WEIGHTS), &tensors)?;
        fsio::write_atomic(&tmp.join(ADAPTER_CONFIG), serde_json::to_string_pretty(&config)?.as_bytes())
    })
    .with_context(|| format!("saving adapter to {}", dir.display()))
}

/// The base weights with the adapters merged in, `W + scaling · B A` for
/// each adapted projection (computed in f32, one tensor at a time, when
/// asked for), under the names of a full HF checkpoint (no LoRA keys): a
/// [`TensorSource`] for saving the merged model.
pub struct MergedWeights {
    base: BTreeMap<String, Tensor>,
    /// Weight name → (A, B, scaling), shallow clones.
    adapters: HashMap<String, (Tensor, Tensor, f64)>,
    kind: Kind,
}

impl MergedWeights {
    /// `base`: the base model's variables (the `VarStore` `model` was built
    /// over); `model`: that model with adapters attached (merged whether
    /// switched on or not); `kind`: the dtype the weights are produced in.
    pub fn new(base: &nn::VarStore, model: &Gemma, kind: Kind) -> Result<Self> {
        let base: BTreeMap<String, Tensor> = base.variables().into_iter().collect();
        Self::from_tensors(base, model, kind)
    }

    /// [`MergedWeights::new`] over named tensors instead of a `VarStore`.
    pub fn from_tensors(base: BTreeMap<String, Tensor>, model: &Gemma, kind: Kind) -> Result<Self> {
        let mut adapters = HashMap::new();
        for (name, l) in model.linears() {
            let Some(a) = &l.lora else { continue };
            let wname = format!("{name}.weight");
            let Some(w) = base.get(&wname) else {
                bail!("merging: the base weights have no {wname}");
            };
            if w.data_ptr() != l.weight.data_ptr() {
                bail!("merging: {wname} of the base is not the tensor the adapter's model was built on");
            }
            adapters.insert(wname, (a.lora_a.shallow_clone(), a.lora_b.shallow_clone(), a.scaling));
        }
        if adapters.is_empty() {
            bail!("merging: the model has no adapters");
        }
        Ok(MergedWeights { base, adapters, kind })
    }

    /// Replaces (or adds) the tensor `name`: a `SEQ_CLS` adapter's score head.
    pub fn set(&mut self, name: &str, t: Tensor) {
        self.base.insert(name.to_string(), t);
    }

    fn out_kind(&self, t: &Tensor) -> Kind {
        if t.is_floating_point() {
            self.kind
        } else {
            t.kind()
        }
    }
}

impl TensorSource for MergedWeights {
    fn entries(&self) -> Result<Vec<TensorEntry>> {
        Ok(self
            .base
            .iter()
            .map(|(n, t)| TensorEntry { name: n.clone(), kind: self.out_kind(t), shape: t.size() })
            .collect())
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let w = self.base.get(name).ok_or_else(|| anyhow!("no tensor {name}"))?;
        let _guard = tch::no_grad_guard();
        let kind = self.out_kind(w);
        Ok(match self.adapters.get(name) {
            Some((a, b, s)) => {
                let delta = b.to_kind(Kind::Float).matmul(&a.to_kind(Kind::Float)) * *s;
                (w.to_kind(Kind::Float) + delta.to_device(w.device())).to_kind(kind)
            }
            None => w.detach().to_kind(kind),
        })
    }
}

/// What [`merge_dirs`] did.
#[derive(Debug)]
pub struct MergeReport {
    pub task_type: TaskType,
    /// Number of projections merged.
    pub merged: usize,
    pub kind: Kind,
}

/// The dtype a checkpoint's config declares (`torch_dtype` or `dtype`):
/// bf16 for `"bfloat16"`, else f32.
pub fn declared_kind(cfg: &GemmaConfig) -> Kind {
    let d = cfg.extra.get("torch_dtype").or_else(|| cfg.extra.get("dtype")).and_then(|v| v.as_str());
    if d == Some("bfloat16") {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}

/// `align merge`: the base checkpoint `base` (a causal LM, or for a
/// `SEQ_CLS` adapter a reward model or a causal LM whose backbone is used)
/// with the PEFT adapter `adapter` merged in, written to `out` as a full HF
/// checkpoint with the base's tokenizer files, weights in `kind` (default:
/// the dtype the base declares). Merging is computed in f32 on the CPU.
pub fn merge_dirs(base: &Path, adapter: &Path, out: &Path, kind: Option<Kind>) -> Result<MergeReport> {
    let file = load_adapter(adapter)?;
    let cfg = checkpoint::read_config(base)?;
    let kind = kind.unwrap_or_else(|| declared_kind(&cfg));
    let adapters = nn::VarStore::new(Device::Cpu);
    match file.task_type {
        TaskType::CausalLm => {
            let mut l = checkpoint::load_causal_lm(base, Device::Cpu, Kind::Float)?;
            l.model.attach_lora(&adapters.root(), &file.config, 0)?;
            l.model.load_adapter_tensors(&file.tensors, adapter)?;
            let merged = MergedWeights::new(&l.vs, &l.model, kind)?;
            let n = merged.adapters.len();
            checkpoint::save_source(out, &merged, &l.model.cfg, &l.tokenizer, &SaveOptions::default())?;
            Ok(MergeReport { task_type: file.task_type, merged: n, kind })
        }
        TaskType::SeqCls => {
            let tokenizer = Tokenizer::from_file(&base.join(checkpoint::TOKENIZER))?;
            let vs = nn::VarStore::new(Device::Cpu);
            let rcfg = reward_model::reward_config(&cfg)?;
            let mut backbone_cfg = rcfg.clone();
            backbone_cfg.tie_word_embeddings = true;
            let root = vs.root();
            let backbone = Gemma::with_init(&root, &backbone_cfg, WeightInit::Zeros)?;
            let score = Linear::with_init(&root / "score", rcfg.hidden_size, 1, nn::Init::Const(0.0));
            let mut rm = RewardModel::from_backbone(backbone, score, &rcfg)?;
            let reader = WeightReader::open_dir(base)?;
            if file.score.is_none() && !reader.contains(SCORE_WEIGHT) {
                bail!(
                    "{}: the SEQ_CLS adapter has no score head (base_model.model.score.weight) and the base {} is not a reward model",
                    adapter.display(),
                    base.display()
                );
            }
            // The adapter's head, when it has one, replaces the base's.
            let skip: &[&str] = if file.score.is_some() { &[SCORE_WEIGHT] } else { &[] };
            checkpoint::load_from(&vs, &reader, &["lm_head.weight"], skip, base)?;
            if let Some(s) = &file.score {
                if s.size() != rm.score.weight.size() {
                    bail!(
                        "{}: the score head has shape {:?}, the model expects {:?}",
                        adapter.display(),
                        s.size(),
                        rm.score.weight.size()
                    );
                }
                tch::no_grad(|| rm.score.weight.f_copy_(s))?;
            }
            rm.backbone.attach_lora(&adapters.root(), &file.config, 0)?;
            rm.backbone.load_adapter_tensors(&file.tensors, adapter)?;
            let merged = MergedWeights::new(&vs, &rm.backbone, kind)?;
            let n = merged.adapters.len();
            let opts = SaveOptions { architecture: reward_model::ARCHITECTURE.into(), ..Default::default() };
            checkpoint::save_source(out, &merged, &rm.cfg, &tokenizer, &opts)?;
            Ok(MergeReport { task_type: file.task_type, merged: n, kind })
        }
    }
}
