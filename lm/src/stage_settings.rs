//! What every training stage's config shares ([`StageSettings`], embedded
//! with `#[serde(flatten)]` so that its keys sit beside the stage's own),
//! and the one strict reader of stage configs ([`typed_toml`],
//! [`read_stage_config`]).
//!
//! serde cannot combine `flatten` with `deny_unknown_fields` on the
//! embedded struct, and a flattened field's errors lose their key path. So a
//! stage config denies unknown fields itself (serde then rejects the keys
//! neither it nor the settings take), and [`typed_toml`] gives back what
//! serde drops: the key path of an error in a shared setting
//! (`optim.lr: invalid type …`) and the list of accepted keys after
//! `unknown field …`.

use crate::lora::LoraConfig;
use crate::train::{defaults, OptimConfig};
use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The settings every training stage (SFT, reward, RL) has, with the same
/// keys in each stage's table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSettings {
    /// The checkpoint the stage starts from (a Hugging Face directory).
    pub model: PathBuf,
    /// Where checkpoints, metrics, the summary and the final `model/` go.
    pub output_dir: PathBuf,
    #[serde(default)]
    pub optim: OptimConfig,
    /// Evaluate on the held-out split every N steps (0: only at the end; RL:
    /// never, and with N > 0 also before the first step).
    #[serde(default)]
    pub eval_every: u64,
    /// Save a resumable checkpoint every N steps (0: only at the end).
    #[serde(default)]
    pub save_every: u64,
    /// Training checkpoints kept.
    #[serde(default = "defaults::keep_last")]
    pub keep_last: usize,
    /// Seeds initialisation, data order and sampling.
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "defaults::device")]
    pub device: String,
    /// f32, or bf16: bf16 weights and activations with fp32 master weights
    /// in the optimiser (CUDA, and CPUs with AVX512-BF16).
    #[serde(default = "defaults::dtype")]
    pub dtype: String,
    /// LoRA adapters (`[<stage>.lora]`); absent: every weight is trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// Start the LoRA adapters from this PEFT adapter directory (made by
    /// peft's `save_pretrained` or an earlier stage's `adapter/`) instead of
    /// fresh ones; `model` is its base. Without a `[lora]` table the
    /// adapter's own config (rank, alpha, target modules) is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
    /// With LoRA, the dtype the frozen base is stored and computed in
    /// ("f32" or "bf16"; default: `dtype`). The adapters stay f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_dtype: Option<String>,
    /// Recompute each decoder layer in the backward pass instead of keeping
    /// its activations (activation checkpointing).
    #[serde(default, skip_serializing_if = "is_false")]
    pub gradient_checkpointing: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl StageSettings {
    /// The keys of a stage table that belong to these settings.
    pub const KEYS: [&'static str; 13] = [
        "model",
        "output_dir",
        "optim",
        "eval_every",
        "save_every",
        "keep_last",
        "seed",
        "device",
        "dtype",
        "lora",
        "adapter",
        "base_dtype",
        "gradient_checkpointing",
    ];

    /// Resets the settings that change what a run logs or keeps, not its
    /// weights (`eval_every`, `save_every`, `keep_last`): what a
    /// checkpoint's config hash leaves out, so that a resumed run may
    /// change them.
    pub fn clear_run_only(&mut self) {
        (self.eval_every, self.save_every, self.keep_last) = (0, 0, 0);
        // ZeRO-1 shards the optimiser state, not the weights trained: a run
        // resumes with or without it.
        self.optim.zero = 0;
    }

    /// Whether the stage trains LoRA adapters (a `[lora]` table, or an
    /// `adapter` to start from).
    pub fn uses_lora(&self) -> bool {
        self.lora.is_some() || self.adapter.is_some()
    }

    /// Checks what can be checked before a run claims its output
    /// directory: the optimiser, the dtypes, the LoRA table and the adapter
    /// directory.
    pub fn validate(&self) -> Result<()> {
        self.optim.validate()?;
        crate::device::parse_dtype(&self.dtype)?;
        if let Some(b) = &self.base_dtype {
            crate::device::parse_dtype(b)?;
            if !self.uses_lora() {
                anyhow::bail!(
                    "base_dtype = {b:?} is for LoRA (the frozen base's dtype); without a [lora] table or an adapter set dtype instead"
                );
            }
        }
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        if let Some(dir) = &self.adapter {
            if !dir.join("adapter_config.json").is_file() {
                anyhow::bail!(
                    "adapter = {}: no adapter_config.json there; give a PEFT adapter directory (peft's save_pretrained, or a stage's adapter/)",
                    dir.display()
                );
            }
        }
        Ok(())
    }

    /// Resolves `model` and `output_dir` against `base` when relative.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.model, &mut self.output_dir].into_iter().chain(self.adapter.as_mut()) {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

/// A key path as errors print it: `optim.lr`, `data.sources[0].path`
/// (keys with dots, spaces or quotes quoted); empty at the top.
pub fn path_text(p: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in p.iter() {
        let part = match seg {
            Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
                continue;
            }
            Segment::Map { key } if key.contains(['.', ' ', '"']) => format!("{key:?}"),
            Segment::Map { key } => key.clone(),
            Segment::Enum { variant } => variant.clone(),
            Segment::Unknown => "?".to_string(),
        };
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(&part);
    }
    out
}

/// Types a TOML value with serde; an error gives the key path where it
/// happened (empty at the top) and serde's message, an unknown key's with a
/// "did you mean" ([`with_suggestion`]).
pub fn typed_path<T: DeserializeOwned>(v: toml::Value) -> std::result::Result<T, (String, String)> {
    typed_path_plain(v).map_err(|(p, m)| (p, with_suggestion(&m)))
}

/// [`typed_path`] without the suggestion.
fn typed_path_plain<T: DeserializeOwned>(v: toml::Value) -> std::result::Result<T, (String, String)> {
    serde_path_to_error::deserialize(v)
        .map_err(|e| (path_text(e.path()), e.inner().message().trim().to_string()))
}

/// TRL's names (and other common ones) of our settings: the name a user
/// coming from TRL or transformers writes, and ours (a key path from the
/// stage's config table).
pub const TRL_NAMES: [(&str, &str); 26] = [
    ("kl_coef", "beta"),
    ("init_kl_coef", "beta"),
    ("learning_rate", "optim.lr"),
    ("lr", "optim.lr"),
    ("num_generations", "num_samples"),
    ("rloo_k", "num_samples"),
    ("per_device_train_batch_size", "batch_size"),
    ("train_batch_size", "batch_size"),
    ("gradient_accumulation_steps", "grad_accum"),
    ("max_length", "max_seq_len"),
    ("max_seq_length", "max_seq_len"),
    ("num_train_epochs", "epochs"),
    ("warmup_steps", "optim.warmup_steps"),
    ("warmup_ratio", "optim.warmup_ratio"),
    ("lr_scheduler_type", "optim.lr_scheduler_type"),
    ("weight_decay", "optim.weight_decay"),
    ("max_grad_norm", "optim.grad_clip"),
    ("adam_beta1", "optim.beta1"),
    ("adam_beta2", "optim.beta2"),
    ("adam_epsilon", "optim.eps"),
    ("max_completion_length", "max_new_tokens"),
    ("max_prompt_length", "max_prompt_len"),
    ("eval_steps", "eval_every"),
    ("save_steps", "save_every"),
    ("save_total_limit", "keep_last"),
    ("bf16", "dtype"),
];

/// Levenshtein distance between two keys.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The key a user probably meant by the unknown `key`, of the `expected`
/// keys of its table: ours for a TRL name (`kl_coef` → `beta`, at the top
/// `learning_rate` → `optim.lr`, inside `optim` → `lr`), else the nearest
/// by edit distance (at most 2, and less than the key's length). The
/// second value says when it is TRL's name.
pub fn did_you_mean(key: &str, expected: &[&str]) -> Option<(String, bool)> {
    if let Some((_, ours)) = TRL_NAMES.iter().find(|(trl, _)| *trl == key) {
        let first = ours.split('.').next().unwrap_or(ours);
        let last = ours.rsplit('.').next().unwrap_or(ours);
        if expected.contains(&first) {
            return Some((ours.to_string(), true));
        }
        if expected.contains(&last) {
            return Some((last.to_string(), true));
        }
    }
    let near = expected.iter().filter(|c| **c != key).min_by_key(|c| edit_distance(c, key))?;
    let d = edit_distance(near, key);
    (d <= 2 && d < key.chars().count()).then(|| (near.to_string(), false))
}

/// serde's ``unknown field `k`, expected one of `a`, `b` `` with what the
/// user probably meant appended (`…; did you mean `beta`? (TRL's
/// `kl_coef`)`); other messages as they are.
pub fn with_suggestion(msg: &str) -> String {
    let Some(key) = unknown_key(msg) else { return msg.to_string() };
    if msg.contains("did you mean") {
        return msg.to_string();
    }
    let expected: Vec<&str> = match msg.split_once(", expected ") {
        Some((_, list)) => list.split('`').skip(1).step_by(2).collect(),
        None => vec![],
    };
    match did_you_mean(&key, &expected) {
        Some((ours, true)) => format!("{msg}; did you mean `{ours}`? (TRL's `{key}` is `{ours}` here)"),
        Some((ours, false)) => format!("{msg}; did you mean `{ours}`?"),
        None => msg.to_string(),
    }
}

/// Types a stage config (a struct that embeds [`StageSettings`] with
/// `flatten` and denies unknown fields) strictly. An error gives the key
/// path (empty at the top) and the message, as a struct without `flatten`
/// would: `optim.lr` and `invalid type: …` for a shared setting,
/// ``unknown field `frm`, expected one of `model`, …`` for an unknown key.
pub fn typed_toml<T: DeserializeOwned + Serialize>(
    v: toml::Value,
) -> std::result::Result<T, (String, String)> {
    typed_toml_plain(v).map_err(|(p, m)| (p, with_suggestion(&m)))
}

/// [`typed_toml`] without the suggestion.
fn typed_toml_plain<T: DeserializeOwned + Serialize>(
    v: toml::Value,
) -> std::result::Result<T, (String, String)> {
    let (path, msg) = match typed_path_plain::<T>(v.clone()) {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    if !path.is_empty() {
        return Err((path, msg));
    }
    let Some(table) = v.as_table() else { return Err((path, msg)) };
    // An error inside a shared setting surfaces at the top, without its
    // path: type the shared keys alone to find it.
    let shared: toml::Table = table
        .iter()
        .filter(|(k, _)| StageSettings::KEYS.contains(&k.as_str()))
        .map(|(k, x)| (k.clone(), x.clone()))
        .collect();
    if let Err((p, m)) = typed_path_plain::<StageSettings>(toml::Value::Table(shared)) {
        if !m.starts_with("missing field") {
            return Err((p, m));
        }
    }
    match unknown_key(&msg) {
        Some(key) if table.contains_key(&key) && !msg.contains(", expected") => {
            Err((path, format!("{msg}, {}", expected_keys::<T>(table.clone()).unwrap_or_default())))
        }
        _ => Err((path, msg)),
    }
}

/// `k` of serde's ``unknown field `k`…``.
fn unknown_key(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// serde's list of the keys a struct takes (``expected one of `a`, `b` ``),
/// for `T` typed from `table` less its unknown keys: the keys of `T`
/// serialised, in declaration order. None when `T` cannot be typed.
fn expected_keys<T: DeserializeOwned + Serialize>(mut table: toml::Table) -> Option<String> {
    let t = loop {
        match typed_path_plain::<T>(toml::Value::Table(table.clone())) {
            Ok(t) => break t,
            Err((p, m)) if p.is_empty() => {
                table.remove(&unknown_key(&m)?)?;
            }
            Err(_) => return None,
        }
    };
    let keys = top_level_keys(&serde_json::to_string(&t).ok()?)?;
    let quoted: Vec<String> = keys.iter().map(|k| format!("`{k}`")).collect();
    Some(match quoted.as_slice() {
        [] => "there are no fields".to_string(),
        [one] => format!("expected {one}"),
        [a, b] => format!("expected {a} or {b}"),
        _ => format!("expected one of {}", quoted.join(", ")),
    })
}

/// The keys of a JSON object, in the order they are written.
fn top_level_keys(json: &str) -> Option<Vec<String>> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Vec<String>, A::Error> {
            let mut keys = vec![];
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                keys.push(k);
            }
            Ok(keys)
        }
    }
    let mut de = serde_json::Deserializer::from_str(json);
    serde::Deserializer::deserialize_map(&mut de, Keys).ok()
}

/// Types a stage config with [`typed_toml`]; errors read
/// `{place}.{key path}: {message}` (`{place}: {message}` at the top).
pub fn from_toml_strict<T: DeserializeOwned + Serialize>(v: toml::Value, place: &str) -> Result<T> {
    typed_toml(v).map_err(|(p, m)| match (place.is_empty(), p.is_empty()) {
        (_, true) => anyhow::anyhow!("{place}: {m}"),
        (true, false) => anyhow::anyhow!("{p}: {m}"),
        (false, false) if p.starts_with('[') => anyhow::anyhow!("{place}{p}: {m}"),
        (false, false) => anyhow::anyhow!("{place}.{p}: {m}"),
    })
}

/// Reads a stage's TOML config: the `[table]` section when the file has one,
/// else the whole file. Errors read `{file}: {key path}: {message}`.
pub fn read_stage_config<T: DeserializeOwned + Serialize>(path: &Path, table: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: toml::Value =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let section = match value.get(table) {
        Some(t) => t.clone(),
        None => value,
    };
    typed_toml(section).map_err(|(p, m)| match p.is_empty() {
        true => anyhow::anyhow!("{}: {m}", path.display()),
        false => anyhow::anyhow!("{}: {p}: {m}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Stage {
        #[serde(flatten)]
        stage: StageSettings,
        #[serde(default)]
        max_steps: u64,
        #[serde(default, skip_serializing)]
        stop_after: Option<u64>,
    }

    fn typed(text: &str) -> std::result::Result<Stage, (String, String)> {
        typed_toml(toml::from_str(text).unwrap())
    }

    #[test]
    fn shared_and_own_keys_sit_side_by_side_with_their_defaults() {
        let s = typed("model = 'm'\noutput_dir = 'o'\nmax_steps = 3\noptim.lr = 0.5").unwrap();
        assert_eq!((s.stage.model.to_str(), s.max_steps, s.stage.optim.lr), (Some("m"), 3, 0.5));
        assert_eq!((s.stage.keep_last, s.stage.device.as_str(), s.stage.dtype.as_str()), (2, "auto", "f32"));
        assert_eq!(s.stop_after, None);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["model"], "m", "flattened: the keys serialise at the top");
    }

    #[test]
    fn errors_name_the_key_path_as_without_flatten() {
        let e = |t: &str| typed(&format!("model = 'm'\noutput_dir = 'o'\n{t}")).unwrap_err();
        let (p, m) = e("optim.lr = 'slow'");
        assert_eq!(p, "optim.lr");
        assert!(m.starts_with("invalid type: string \"slow\""), "{m}");
        let (p, m) = e("optim.lrr = 1.0");
        assert_eq!(p, "optim.lrr");
        assert!(m.starts_with("unknown field `lrr`, expected one of `lr`"), "{m}");
        assert_eq!(e("seed = -1").0, "seed");
        assert_eq!(e("max_steps = 'x'").0, "max_steps");
        let (p, m) = e("frm = 1");
        assert_eq!(p, "");
        assert_eq!(
            m,
            "unknown field `frm`, expected one of `model`, `output_dir`, `optim`, `eval_every`, \
             `save_every`, `keep_last`, `seed`, `device`, `dtype`, `max_steps`"
        );
        let (p, m) = typed("output_dir = 'o'").unwrap_err();
        assert_eq!((p.as_str(), m.as_str()), ("", "missing field `model`"));
    }

    #[test]
    fn unknown_keys_suggest_ours_for_trl_names_and_near_misses() {
        let e = |t: &str| typed(&format!("model = 'm'\noutput_dir = 'o'\n{t}")).unwrap_err().1;
        let m = e("learning_rate = 1e-5");
        assert!(m.starts_with("unknown field `learning_rate`, expected one of `model`"), "{m}");
        assert!(m.ends_with("; did you mean `optim.lr`? (TRL's `learning_rate` is `optim.lr` here)"), "{m}");
        let m = e("optim.learning_rate = 1e-5");
        assert!(m.ends_with("; did you mean `lr`? (TRL's `learning_rate` is `lr` here)"), "{m}");
        assert!(e("max_stepz = 3").ends_with("; did you mean `max_steps`?"));
        assert!(e("warmup_steps = 3").ends_with(
            "did you mean `optim.warmup_steps`? (TRL's `warmup_steps` is `optim.warmup_steps` here)"
        ));
        assert!(!e("frm = 1").contains("did you mean"));
        assert_eq!(did_you_mean("kl_coef", &["beta", "steps"]), Some(("beta".into(), true)));
        assert_eq!(did_you_mean("num_generations", &["num_samples"]), Some(("num_samples".into(), true)));
        assert_eq!(did_you_mean("zzz", &["beta"]), None);
    }

    #[test]
    fn every_trl_name_points_at_a_real_key() {
        // The keys left out at their defaults set, so that every key shows.
        let every = OptimConfig {
            lr_scheduler_type: crate::train::LrSchedule::Linear,
            warmup_ratio: Some(0.1),
            ..Default::default()
        };
        let optim = top_level_keys(&serde_json::to_string(&every).unwrap()).unwrap();
        for (trl, ours) in TRL_NAMES {
            if let Some(k) = ours.strip_prefix("optim.") {
                assert!(optim.iter().any(|o| o == k), "{trl} → {ours}");
            }
        }
    }

    #[test]
    fn keys_list_every_field_of_the_settings() {
        // Every optional setting set, so that each is serialised.
        let s = typed(
            "model = 'm'\noutput_dir = 'o'\nadapter = 'a'\nbase_dtype = 'bf16'\ngradient_checkpointing = true\n[lora]",
        )
        .unwrap();
        let keys = top_level_keys(&serde_json::to_string(&s.stage).unwrap()).unwrap();
        assert_eq!(keys, StageSettings::KEYS);
    }
}
