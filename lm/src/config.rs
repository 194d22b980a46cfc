//! `GemmaConfig`: the model hyper-parameters, deserialised from a Hugging Face
//! `config.json` with the field names transformers uses, plus named presets.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `rope_parameters` block transformers 5 writes (`rope_theta` moved there).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// `linear` scaling: the inverse frequencies divided by `factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `proportional` (Gemma 4): the share of each head's dimensions rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// `rope_parameters` as a checkpoint writes it: one block (Gemma, Gemma 2),
/// or one per layer type (`sliding_attention`, `full_attention`: Gemma 3, 4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RopeConfig {
    PerLayerType(std::collections::BTreeMap<String, RopeParameters>),
    Single(RopeParameters),
}

/// The family member a `model_type` names; each has its own file under
/// [`crate::family`] saying how transformers computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `gemma`: Gemma 1.
    Gemma,
    /// `gemma2`: four norms per layer, soft-capping, alternating sliding windows.
    Gemma2,
    /// `gemma3_text`: q/k norms, RoPE per layer type, 5:1 sliding/full.
    Gemma3,
    /// `gemma4_text` (dense): per-layer inputs, shared KV, partial RoPE.
    Gemma4,
}

/// The `model_type`s align reads, with their family.
pub const MODEL_TYPES: &[(&str, Family)] = &[
    ("gemma", Family::Gemma),
    ("gemma2", Family::Gemma2),
    ("gemma3_text", Family::Gemma3),
    ("gemma4_text", Family::Gemma4),
];

/// The keys only Gemma 4 (`gemma4_text`) reads, with transformers'
/// `Gemma4TextConfig` names. They stay in [`GemmaConfig::extra`] (so a
/// config read and written again keeps them as they were) and are read from
/// there by [`GemmaConfig::gemma4_keys`]; absent or null keys are None (the
/// defaults are applied in [`crate::family::gemma4`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gemma4Keys {
    /// The width of each layer's per-layer input (absent: 256; 0 or null: none).
    pub hidden_size_per_layer_input: Option<i64>,
    /// Rows of `embed_tokens_per_layer`.
    pub vocab_size_per_layer_input: Option<i64>,
    /// Full-attention layers: values = the key projection, no `v_proj`.
    pub attention_k_eq_v: Option<bool>,
    /// The last layers reuse the keys/values of an earlier layer of their type.
    pub num_kv_shared_layers: Option<i64>,
    /// Mixture-of-Experts blocks: refused.
    pub enable_moe_block: Option<bool>,
    /// The KV-sharing layers' MLPs are twice `intermediate_size` wide.
    pub use_double_wide_mlp: Option<bool>,
    /// Overrides per layer index (`"2": {"head_dim": 512, "num_key_value_heads": 1}`).
    pub per_layer_config:
        Option<std::collections::BTreeMap<String, serde_json::Map<String, serde_json::Value>>>,
    /// Legacy form of `per_layer_config`: the full-attention layers' head_dim.
    pub global_head_dim: Option<i64>,
    /// Legacy form of `per_layer_config`: their KV heads (with `attention_k_eq_v`).
    pub num_global_key_value_heads: Option<i64>,
}

/// Hyper-parameters of a Gemma decoder, named as in transformers' `GemmaConfig`.
///
/// Fields align does not use are kept in `extra` so a config read and written
/// again loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GemmaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Legacy Gemma 1 field; when set it takes precedence over `hidden_act`
    /// for the MLP, as in transformers.
    #[serde(default)]
    pub hidden_activation: Option<String>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeConfig>,
    /// Gemma 3's legacy name for the sliding layers' `rope_theta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// The legacy name of the full-attention layers' scaling (Gemma 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    /// Gemma 2+: attention scale `query_pre_attn_scalar^-1/2` (else `head_dim^-1/2`).
    /// transformers declares it an int and its strict config refuses `256.0`:
    /// a whole value is written as an integer.
    #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "whole_as_int")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2+: the keys a sliding layer's query sees, itself included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<i64>,
    /// Gemma 2+: `sliding_attention` or `full_attention` per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3's legacy form of `layer_types`: every n-th layer is full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<i64>,
    /// Gemma 2+: `cap · tanh(logits / cap)` on the LM head's logits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 2: `cap · tanh(scores / cap)` on the attention scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// Bidirectional attention (embedding models): refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bidirectional_attention: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_tie")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// `num_labels` for `GemmaForSequenceClassification` (reward models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<i64>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Set when this is the text model of a multimodal checkpoint: what is
    /// written back around it.
    #[serde(skip)]
    pub wrapper: Option<Wrapper>,
}

/// The multimodal checkpoint (`gemma3`, `gemma4`: `*ForConditionalGeneration`)
/// a text config was read from. align fine-tunes the text model; a save
/// writes `config` (the wrapper's own `config.json`, its `text_config` as
/// read) and copies the other towers' tensors from `source` bit for bit.
#[derive(Debug, Clone, PartialEq)]
pub struct Wrapper {
    pub config: serde_json::Value,
    pub source: std::path::PathBuf,
}

/// `Gemma2Config`'s soft-caps for a `config.json` without the keys (a null
/// there means off).
pub const GEMMA2_DEFAULT_ATTN_SOFTCAP: f64 = 50.0;
pub const GEMMA2_DEFAULT_FINAL_SOFTCAP: f64 = 30.0;

/// The multimodal `model_type`s whose text model align reads.
pub const MULTIMODAL_TYPES: &[&str] = &["gemma3", "gemma4"];

/// Writes a whole number as an integer (`256`, not `256.0`).
fn whole_as_int<S: serde::Serializer>(v: &Option<f64>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => s.serialize_i64(*x as i64),
        Some(x) => s.serialize_f64(*x),
        None => s.serialize_none(),
    }
}

fn default_model_type() -> String {
    "gemma".into()
}
fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_max_pos() -> i64 {
    8192
}
fn default_eps() -> f64 {
    1e-6
}
fn default_tie() -> bool {
    true
}
fn default_init_range() -> f64 {
    0.02
}

/// The presets of published sizes: they keep their own `vocab_size` (a
/// tokenizer must fit in it); the others take the tokenizer's
/// ([`GemmaConfig::preset_for_tokenizer`]).
pub const PUBLISHED_PRESETS: &[&str] = &[
    "gemma-2b",
    "gemma-7b",
    "gemma2-9b",
    "gemma2-27b",
    "gemma3-270m",
    "gemma3-1b",
    "gemma3-4b",
    "gemma3-12b",
    "gemma3-27b",
    "gemma4-e2b",
    "gemma4-e4b",
    "gemma4-31b",
];

/// The presets of made-up sizes, for tests and benchmarks: they take the
/// tokenizer's `vocab_size`.
pub const TEST_PRESETS: &[&str] =
    &["tiny", "tiny-gemma2", "tiny-gemma3", "tiny-gemma4", "small-20m", "bench-50m", "test-mqa"];

/// Every preset [`GemmaConfig::preset`] knows: the published sizes, then
/// the test sizes.
pub fn preset_names() -> impl Iterator<Item = &'static str> {
    PUBLISHED_PRESETS.iter().chain(TEST_PRESETS).copied()
}

/// `n` layers, every `every`-th `full_attention`, the others
/// `sliding_attention`: the default `layer_types` of transformers'
/// Gemma 2 (`every` 2), Gemma 3 and Gemma 4 (6).
fn sliding_pattern(n: i64, every: i64) -> Vec<String> {
    (0..n)
        .map(|i| if (i + 1) % every == 0 { "full_attention" } else { "sliding_attention" }.to_string())
        .collect()
}

fn rope_block(rope_type: &str, theta: f64) -> RopeParameters {
    RopeParameters { rope_type: Some(rope_type.into()), rope_theta: Some(theta), ..Default::default() }
}

/// What a Gemma 4 preset sets beyond the sizes [`GemmaConfig::base`] takes.
struct Gemma4Shape {
    /// Every `full_every`-th layer full, the others sliding.
    full_every: i64,
    sliding_window: i64,
    /// `hidden_size_per_layer_input` (0: no per-layer inputs).
    per_layer_input: i64,
    num_kv_shared_layers: i64,
    use_double_wide_mlp: bool,
    /// The full-attention layers' head_dim (`global_head_dim`).
    global_head_dim: i64,
    /// `num_global_key_value_heads` with `attention_k_eq_v` (None: neither).
    global_kv_heads: Option<i64>,
}

impl GemmaConfig {
    /// The same configuration with a context of `n` positions.
    fn with_max_positions(mut self, n: i64) -> Self {
        self.max_position_embeddings = n;
        self
    }

    fn base(vocab: i64, hidden: i64, inter: i64, layers: i64, heads: i64, kv: i64, head_dim: i64) -> Self {
        GemmaConfig {
            model_type: "gemma".into(),
            architectures: Some(vec!["GemmaForCausalLM".into()]),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            head_dim: Some(head_dim),
            hidden_act: "gelu_pytorch_tanh".into(),
            hidden_activation: None,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-6,
            rope_theta: Some(10000.0),
            rope_parameters: None,
            rope_local_base_freq: None,
            rope_scaling: None,
            query_pre_attn_scalar: None,
            sliding_window: None,
            layer_types: None,
            sliding_window_pattern: None,
            final_logit_softcapping: None,
            attn_logit_softcapping: None,
            use_bidirectional_attention: None,
            attention_bias: false,
            tie_word_embeddings: true,
            pad_token_id: Some(0),
            bos_token_id: Some(2),
            eos_token_id: Some(serde_json::json!(1)),
            initializer_range: 0.02,
            num_labels: None,
            extra: Default::default(),
            wrapper: None,
        }
    }

    // The family presets' values are transformers' own. "cfg2/3/4:N" is line
    // N of transformers/models/gemma{2,3,4}/configuration_gemma{2,3,4}.py
    // (transformers 5.24, the venv's): the config class defaults. The sizes
    // come from the conversion scripts that made the published checkpoints,
    // in the transformers repository (not in the wheel): "conv2:N" is
    // src/transformers/models/gemma2/convert_gemma2_weights_to_hf.py at
    // 15ea02a2, "conv3:N" .../gemma3/convert_gemma3_weights.py at 0d7e95d9,
    // "conv4:N" .../gemma4/convert_gemma4_weights.py at 0f3f0632.

    /// `self` (from [`Self::base`]) as a Gemma 2 with attention scale
    /// `query_pre_attn_scalar^-1/2`; the rest at `Gemma2Config`'s defaults.
    fn gemma2(mut self, query_pre_attn_scalar: f64) -> Self {
        self.model_type = "gemma2".into();
        self.architectures = Some(vec!["Gemma2ForCausalLM".into()]);
        self.hidden_activation = Some("gelu_pytorch_tanh".into()); // cfg2:74
        self.max_position_embeddings = 8192; // cfg2:75

        // rms_norm_eps 1e-6, pad/eos/bos 0/1/2, tied embeddings, initializer
        // 0.02 as base(): cfg2:76-82.
        // rope_theta: transformers' default_theta (modeling_rope_utils.py:760).
        self.rope_theta = None;
        self.rope_parameters = Some(RopeConfig::Single(rope_block("default", 10_000.0)));
        self.query_pre_attn_scalar = Some(query_pre_attn_scalar);
        self.sliding_window = Some(4096); // cfg2:87
        self.layer_types = Some(sliding_pattern(self.num_hidden_layers, 2)); // cfg2:94-97
        self.final_logit_softcapping = Some(30.0); // cfg2:89
        self.attn_logit_softcapping = Some(50.0); // cfg2:90
        self
    }

    /// `self` (from [`Self::base`]) as a Gemma 3 text model: every 6th layer
    /// full, `sliding_window`, attention scale `query_pre_attn_scalar^-1/2`,
    /// RoPE θ 10 000 on sliding layers and 1 000 000 on full ones, those
    /// linearly scaled by `full_factor` when set; the rest at
    /// `Gemma3TextConfig`'s defaults.
    fn gemma3(mut self, sliding_window: i64, query_pre_attn_scalar: f64, full_factor: Option<f64>) -> Self {
        self.model_type = "gemma3_text".into();
        self.architectures = Some(vec!["Gemma3ForCausalLM".into()]);
        self.hidden_activation = Some("gelu_pytorch_tanh".into()); // cfg3:80
        self.max_position_embeddings = 131_072; // cfg3:81

        // rms_norm_eps, pad/eos/bos, tied embeddings, initializer as base(): cfg3:82-88.
        self.rope_theta = None;
        let full = match full_factor {
            Some(f) => RopeParameters { factor: Some(f), ..rope_block("linear", 1_000_000.0) },
            None => rope_block("default", 1_000_000.0),
        };
        // default_theta cfg3:98, filled in cfg3:137-155.
        self.rope_parameters = Some(RopeConfig::PerLayerType(
            [
                ("full_attention".to_string(), full),
                ("sliding_attention".into(), rope_block("default", 10_000.0)),
            ]
            .into(),
        ));
        self.query_pre_attn_scalar = Some(query_pre_attn_scalar);
        self.sliding_window = Some(sliding_window);
        self.layer_types = Some(sliding_pattern(self.num_hidden_layers, 6)); // cfg3:105-111
        self.final_logit_softcapping = None; // cfg3:95
        self.attn_logit_softcapping = None; // cfg3:96
        self.use_bidirectional_attention = Some(serde_json::Value::Bool(false)); // cfg3:97
        self
    }

    /// `self` (from [`Self::base`]) as a dense Gemma 4 text model shaped by
    /// `s`; the rest at `Gemma4TextConfig`'s defaults.
    fn gemma4(mut self, s: Gemma4Shape) -> Self {
        use serde_json::json;
        self.model_type = "gemma4_text".into();
        self.architectures = Some(vec!["Gemma4ForCausalLM".into()]);
        self.hidden_activation = Some("gelu_pytorch_tanh".into()); // cfg4:157
        self.max_position_embeddings = 131_072; // cfg4:158

        // initializer, rms_norm_eps, pad/eos/bos, tied embeddings as base(): cfg4:159-165.
        self.rope_theta = None;
        // conv4:164-174 (the same blocks as cfg4:201-204's defaults).
        let full =
            RopeParameters { partial_rotary_factor: Some(0.25), ..rope_block("proportional", 1_000_000.0) };
        self.rope_parameters = Some(RopeConfig::PerLayerType(
            [
                ("full_attention".to_string(), full),
                ("sliding_attention".into(), rope_block("default", 10_000.0)),
            ]
            .into(),
        ));
        self.sliding_window = Some(s.sliding_window);
        let types = sliding_pattern(self.num_hidden_layers, s.full_every);
        // per_layer_config as cfg4:208-221 builds it from global_head_dim
        // and num_global_key_value_heads: the full layers' overrides.
        let mut overrides = json!({ "head_dim": s.global_head_dim });
        if let Some(kv) = s.global_kv_heads {
            overrides["num_key_value_heads"] = json!(kv);
        }
        let per_layer: serde_json::Map<String, serde_json::Value> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| t.as_str() == "full_attention")
            .map(|(i, _)| (i.to_string(), overrides.clone()))
            .collect();
        self.layer_types = Some(types);
        self.final_logit_softcapping = Some(30.0); // conv4:195, 216, 237
        self.attn_logit_softcapping = None;
        for (key, value) in [
            ("vocab_size_per_layer_input", json!(self.vocab_size)), // cfg4:173 (= vocab_size, cfg4:150)
            ("hidden_size_per_layer_input", json!(s.per_layer_input)),
            ("attention_k_eq_v", json!(s.global_kv_heads.is_some())),
            ("num_kv_shared_layers", json!(s.num_kv_shared_layers)),
            ("enable_moe_block", json!(false)), // cfg4:177
            ("use_double_wide_mlp", json!(s.use_double_wide_mlp)),
            ("per_layer_config", serde_json::Value::Object(per_layer)),
        ] {
            self.extra.insert(key.into(), value);
        }
        self
    }

    /// [`Self::preset`] for a tokenizer of `tokenizer_vocab` tokens: a
    /// published size ([`PUBLISHED_PRESETS`]) keeps its `vocab_size`, which
    /// the tokenizer must fit in; the others take the tokenizer's, rounded up
    /// to a multiple of 64 (Gemma 4's per-layer embeddings too).
    pub fn preset_for_tokenizer(name: &str, tokenizer_vocab: i64) -> Result<Self> {
        let mut cfg = Self::preset(name)?;
        if PUBLISHED_PRESETS.contains(&name) {
            if tokenizer_vocab > cfg.vocab_size {
                bail!(
                    "the tokenizer has {tokenizer_vocab} tokens, more than {name}'s vocab_size {}",
                    cfg.vocab_size
                );
            }
        } else {
            cfg.vocab_size = (tokenizer_vocab + 63) / 64 * 64;
            if cfg.extra.contains_key("vocab_size_per_layer_input") {
                cfg.extra.insert("vocab_size_per_layer_input".into(), serde_json::json!(cfg.vocab_size));
            }
        }
        Ok(cfg)
    }

    /// A named preset. `vocab_size` of the small presets is a placeholder:
    /// `align init` sets it from the tokenizer ([`Self::preset_for_tokenizer`]).
    ///
    /// The family presets are the text models of the published checkpoints
    /// whose every value transformers' files hold (see the sources above).
    /// Not here: Gemma 2 2B (transformers has no config naming it;
    /// `Gemma2Config`'s defaults are 2B-like but its docstring calls them
    /// "gemma2-7b"), Gemma 4 26B-A4B (MoE).
    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "gemma-2b" => Self::base(256000, 2048, 16384, 18, 8, 1, 256),
            "gemma-7b" => Self::base(256000, 3072, 24576, 28, 16, 16, 256),
            // conv2:53-64 (gemma_9b_config); vocab_size cfg2:67.
            "gemma2-9b" => Self::base(256_000, 3584, 14336, 42, 16, 8, 256).gemma2(224.0),
            // conv2:66-77 (gemma_27b_config).
            "gemma2-27b" => Self::base(256_000, 4608, 36864, 46, 32, 16, 128).gemma2(144.0),
            // conv3:150-165 (_VARIANT_GEMMA_3_270M).
            "gemma3-270m" => Self::base(262_144, 640, 2048, 18, 4, 1, 256)
                .gemma3(512, 256.0, None)
                .with_max_positions(32_768),
            // conv3:166-183 (_VARIANT_GEMMA_3_1B).
            "gemma3-1b" => Self::base(262_144, 1152, 6 * 1152, 26, 4, 1, 256)
                .gemma3(512, 256.0, None)
                .with_max_positions(32_768),
            // conv3:184-204 (_VARIANT_GEMMA_3_4B; max_position_embeddings cfg3:81).
            "gemma3-4b" => {
                Self::base(262_144, 2560, 2560 * 8 / 2, 34, 8, 4, 256).gemma3(1024, 256.0, Some(8.0))
            }
            // conv3:205-225 (_VARIANT_GEMMA_3_12B).
            "gemma3-12b" => {
                Self::base(262_144, 30 * 128, 30 * 128 * 8 / 2, 48, 16, 8, 256).gemma3(1024, 256.0, Some(8.0))
            }
            // conv3:226-246 (_VARIANT_GEMMA_3_27B).
            "gemma3-27b" => Self::base(262_144, 42 * 128, 42 * 128 * 8 / 2, 62, 32, 16, 128).gemma3(
                1024,
                (42 * 128 / 32) as f64,
                Some(8.0),
            ),
            // conv4:181-201 (_VARIANT_GEMMA_4_E2B); vocab_size cfg4:150,
            // head_dim cfg4:156, sliding_window cfg4:169, global_head_dim
            // cfg4:208.
            "gemma4-e2b" => Self::base(262_144, 1536, 4 * 1536, 35, 8, 1, 256).gemma4(Gemma4Shape {
                full_every: 5, // conv4:177
                sliding_window: 512,
                per_layer_input: 256,
                num_kv_shared_layers: 20,
                use_double_wide_mlp: true,
                global_head_dim: 512,
                global_kv_heads: None,
            }),
            // conv4:202-222 (_VARIANT_GEMMA_4_E4B); use_double_wide_mlp cfg4:178.
            "gemma4-e4b" => Self::base(262_144, 2560, 4 * 2560, 42, 8, 2, 256).gemma4(Gemma4Shape {
                full_every: 6, // conv4:176
                sliding_window: 512,
                per_layer_input: 256,
                num_kv_shared_layers: 18,
                use_double_wide_mlp: false,
                global_head_dim: 512,
                global_kv_heads: None,
            }),
            // conv4:223-243 (_VARIANT_GEMMA_4_31B).
            "gemma4-31b" => {
                let mut c = Self::base(262_144, 5376, 4 * 5376, 60, 32, 16, 256)
                    .gemma4(Gemma4Shape {
                        full_every: 6,
                        sliding_window: 1024,
                        per_layer_input: 0,
                        num_kv_shared_layers: 0,
                        use_double_wide_mlp: false,
                        global_head_dim: 512,
                        global_kv_heads: Some(4),
                    })
                    .with_max_positions(262_144);
                c.use_bidirectional_attention = Some(serde_json::json!("vision"));
                c
            }
            // ~1M non-embedding parameters: the built-in demo.
            "tiny" => Self::base(1024, 128, 512, 4, 4, 1, 32).with_max_positions(1024),
            // Test models of each family (stage smoke tests): windows of 16
            // (shorter than the tests' sequences), soft-capping on.
            "tiny-gemma2" => {
                let mut c = Self::base(1024, 64, 128, 4, 4, 2, 16).gemma2(16.0).with_max_positions(1024);
                c.sliding_window = Some(16);
                c
            }
            "tiny-gemma3" => {
                let mut c = Self::base(1024, 64, 128, 6, 4, 2, 16)
                    .gemma3(16, 16.0, Some(8.0))
                    .with_max_positions(1024);
                c.final_logit_softcapping = Some(30.0);
                c
            }
            // Per-layer inputs, KV shared by the last two layers, k = v on the
            // full layers (their own head_dim and one KV head).
            "tiny-gemma4" => Self::base(1024, 64, 128, 6, 4, 2, 16)
                .gemma4(Gemma4Shape {
                    full_every: 3,
                    sliding_window: 16,
                    per_layer_input: 8,
                    num_kv_shared_layers: 2,
                    use_double_wide_mlp: true,
                    global_head_dim: 32,
                    global_kv_heads: Some(1),
                })
                .with_max_positions(1024),
            // ~20M parameters with a 8k vocabulary: the benchmarks.
            "small-20m" => Self::base(8192, 384, 1536, 8, 6, 2, 64).with_max_positions(2048),
            // ~53M parameters: the training benchmark.
            "bench-50m" => Self::base(8192, 576, 2304, 10, 9, 3, 64).with_max_positions(2048),
            // MQA with head_dim != hidden/heads: the parity fixtures.
            "test-mqa" => Self::base(512, 64, 128, 2, 4, 1, 32).with_max_positions(256),
            other => bail!(
                "unknown model preset {other:?}; known presets: {}",
                preset_names().collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let invalid = |e: serde_json::Error| {
            anyhow::anyhow!("{}:{}:{}: invalid model config: {e}", path.display(), e.line(), e.column())
        };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(invalid)?;
        let model_type = value.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
        let cfg = if MULTIMODAL_TYPES.contains(&model_type) {
            let text = value.get("text_config").with_context(|| {
                format!("{}: a multimodal {model_type:?} config without text_config", path.display())
            })?;
            let mut cfg: GemmaConfig = serde_json::from_value(text.clone())
                .map_err(|e| anyhow::anyhow!("{}: text_config: invalid model config: {e}", path.display()))?;
            if let Some(tie) = value.get("tie_word_embeddings").and_then(|t| t.as_bool()) {
                cfg.tie_word_embeddings = tie;
            }
            if model_type == "gemma3" {
                // transformers' Gemma3ForConditionalGeneration does not
                // soft-cap its logits (Gemma3ForCausalLM does); a save
                // writes the text_config as read.
                cfg.final_logit_softcapping = None;
            }
            let source = path.parent().map(Path::to_path_buf).unwrap_or_default();
            cfg.wrapper = Some(Wrapper { config: value.clone(), source });
            cfg
        } else {
            let mut cfg: GemmaConfig = serde_json::from_str(&text).map_err(invalid)?;
            // Gemma2Config's defaults for soft-capping keys a config leaves
            // out (a null in the file means off).
            if cfg.model_type == "gemma2" {
                if value.get("attn_logit_softcapping").is_none() {
                    cfg.attn_logit_softcapping = Some(GEMMA2_DEFAULT_ATTN_SOFTCAP);
                }
                if value.get("final_logit_softcapping").is_none() {
                    cfg.final_logit_softcapping = Some(GEMMA2_DEFAULT_FINAL_SOFTCAP);
                }
            }
            cfg
        };
        cfg.check_fields().with_context(|| format!("invalid model config {}", path.display()))?;
        Ok(cfg)
    }

    /// Checks each field on its own (sizes, activation, known `model_type`,
    /// soft-caps, …); [`GemmaConfig::validate`] (in [`crate::family`]) also
    /// checks that every layer's spec can be built.
    pub fn check_fields(&self) -> Result<()> {
        let family = self.family()?;
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v <= 0 {
                bail!("{name} must be positive, got {v}");
            }
        }
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_kv_heads()
            );
        }
        if self.head_dim() % 2 != 0 {
            bail!("head_dim must be even for rotary embeddings, got {}", self.head_dim());
        }
        if self.attention_bias {
            bail!("attention_bias = true is not supported (Gemma has no biases)");
        }
        let act = self.activation();
        if !matches!(act, "gelu_pytorch_tanh" | "gelu_new" | "gelu" | "gelu_fast") {
            bail!("hidden activation {act:?} is not supported; use \"gelu_pytorch_tanh\"");
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            bail!("rms_norm_eps must be positive, got {}", self.rms_norm_eps);
        }
        match &self.use_bidirectional_attention {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {}
            // Gemma 4: "vision" makes image tokens attend both ways in the
            // multimodal model; text (all align trains) stays causal.
            Some(serde_json::Value::String(s)) if s == "vision" && family == Family::Gemma4 => {}
            Some(v) => bail!(
                "use_bidirectional_attention = {v} is not supported: align trains causal language models"
            ),
        }
        for (name, v) in [
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if let Some(v) = v.filter(|v| v.is_nan() || *v <= 0.0) {
                bail!("{name} must be positive, got {v}");
            }
        }
        let _ = family;
        Ok(())
    }

    /// The family `model_type` names; an unknown one is an error listing
    /// those align reads.
    pub fn family(&self) -> Result<Family> {
        match MODEL_TYPES.iter().find(|(t, _)| *t == self.model_type) {
            Some((_, f)) => Ok(*f),
            None => {
                let known: Vec<String> = MODEL_TYPES.iter().map(|(t, _)| format!("{t:?}")).collect();
                bail!(
                    "model_type is {:?}; align reads the Gemma family: {} (the text model of a \
                     multimodal \"gemma3\"/\"gemma4\" checkpoint is read from its text_config)",
                    self.model_type,
                    known.join(", ")
                )
            }
        }
    }

    /// Gemma 4's own keys (see [`Gemma4Keys`]), read from `extra`; a key of
    /// the wrong type is an error naming it.
    pub fn gemma4_keys(&self) -> Result<Gemma4Keys> {
        fn key<T: serde::de::DeserializeOwned>(
            extra: &serde_json::Map<String, serde_json::Value>,
            name: &str,
        ) -> Result<Option<T>> {
            match extra.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => serde_json::from_value(v.clone())
                    .map(Some)
                    .map_err(|e| anyhow::anyhow!("{name}: {e} (got {v})")),
            }
        }
        let x = &self.extra;
        Ok(Gemma4Keys {
            // null (None in Python) means no per-layer inputs, as 0 does;
            // an absent key takes the default (256).
            hidden_size_per_layer_input: match x.get("hidden_size_per_layer_input") {
                Some(serde_json::Value::Null) => Some(0),
                _ => key(x, "hidden_size_per_layer_input")?,
            },
            vocab_size_per_layer_input: key(x, "vocab_size_per_layer_input")?,
            attention_k_eq_v: key(x, "attention_k_eq_v")?,
            num_kv_shared_layers: key(x, "num_kv_shared_layers")?,
            enable_moe_block: key(x, "enable_moe_block")?,
            use_double_wide_mlp: key(x, "use_double_wide_mlp")?,
            per_layer_config: key(x, "per_layer_config")?,
            global_head_dim: key(x, "global_head_dim")?,
            num_global_key_value_heads: key(x, "num_global_key_value_heads")?,
        })
    }

    pub fn num_kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The RoPE block of `layer_type` (None: the single block of Gemma 1/2).
    pub fn rope_block(&self, layer_type: Option<&str>) -> Option<&RopeParameters> {
        match (self.rope_parameters.as_ref()?, layer_type) {
            (RopeConfig::Single(r), _) => Some(r),
            (RopeConfig::PerLayerType(m), Some(t)) => m.get(t),
            (RopeConfig::PerLayerType(_), None) => None,
        }
    }

    /// `rope_theta` of Gemma 1/2 (one block or the top-level key).
    pub fn rope_theta(&self) -> f64 {
        self.rope_block(None).and_then(|r| r.rope_theta).or(self.rope_theta).unwrap_or(10000.0)
    }

    /// The MLP activation: `hidden_activation` (Gemma 1 legacy) wins over
    /// `hidden_act` when set.
    pub fn activation(&self) -> &str {
        self.hidden_activation.as_deref().unwrap_or(&self.hidden_act)
    }

    /// Writes the config as `config.json` text.
    pub fn to_json(&self) -> Result<String> {
        let mut v = serde_json::to_value(self)?;
        // Gemma 2 reads an absent soft-capping key as on (50, 30): an
        // unset one is written as null, which reads back as off.
        if let (Some(o), "gemma2") = (v.as_object_mut(), self.model_type.as_str()) {
            for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
                o.entry(key).or_insert(serde_json::Value::Null);
            }
        }
        Ok(serde_json::to_string_pretty(&v)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_7b_has_head_dim_256_and_16_heads() {
        let c = GemmaConfig::preset("gemma-7b").unwrap();
        assert_eq!(c.num_attention_heads * c.head_dim(), 4096);
        assert_eq!(c.hidden_size, 3072);
        // 8.54B parameters as published.
        assert_eq!(c.num_parameters(), 8_537_680_896);
    }

    #[test]
    fn gemma_2b_parameter_count() {
        let c = GemmaConfig::preset("gemma-2b").unwrap();
        assert_eq!(c.num_parameters(), 2_506_172_416);
    }

    #[test]
    fn hf_config_names_deserialise_and_unknown_fields_survive() {
        let text = r#"{"architectures":["GemmaForCausalLM"],"model_type":"gemma",
          "vocab_size":256000,"hidden_size":2048,"intermediate_size":16384,
          "num_hidden_layers":18,"num_attention_heads":8,"num_key_value_heads":1,
          "head_dim":256,"hidden_act":"gelu","hidden_activation":"gelu_pytorch_tanh",
          "rope_theta":10000.0,"torch_dtype":"bfloat16","eos_token_id":1}"#;
        let c: GemmaConfig = serde_json::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.activation(), "gelu_pytorch_tanh");
        assert_eq!(c.extra["torch_dtype"], "bfloat16");
        let again: GemmaConfig = serde_json::from_str(&c.to_json().unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn wrong_field_type_is_an_error_naming_it() {
        let text = r#"{"vocab_size":"many","hidden_size":8,"intermediate_size":8,
          "num_hidden_layers":1,"num_attention_heads":1}"#;
        let err = serde_json::from_str::<GemmaConfig>(text).unwrap_err().to_string();
        assert!(err.contains("invalid type"), "{err}");
    }

    #[test]
    fn heads_not_multiple_of_kv_heads_is_rejected() {
        let mut c = GemmaConfig::preset("tiny").unwrap();
        c.num_key_value_heads = Some(3);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("multiple of num_key_value_heads"), "{err}");
    }
}
