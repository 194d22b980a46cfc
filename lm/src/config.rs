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
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

/// Names of the presets `GemmaConfig::preset` knows.
pub const PRESETS: &[&str] = &["gemma-2b", "gemma-7b", "tiny", "small-20m", "bench-50m", "test-mqa"];

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
        }
    }

    /// A named preset. `vocab_size` of the small presets is a placeholder:
    /// `align init` sets it from the tokenizer.
    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "gemma-2b" => Self::base(256000, 2048, 16384, 18, 8, 1, 256),
            "gemma-7b" => Self::base(256000, 3072, 24576, 28, 16, 16, 256),
            // ~1M non-embedding parameters: the built-in demo.
            "tiny" => Self::base(1024, 128, 512, 4, 4, 1, 32).with_max_positions(1024),
            // ~20M parameters with a 8k vocabulary: the benchmarks.
            "small-20m" => Self::base(8192, 384, 1536, 8, 6, 2, 64).with_max_positions(2048),
            // ~53M parameters: the training benchmark.
            "bench-50m" => Self::base(8192, 576, 2304, 10, 9, 3, 64).with_max_positions(2048),
            // MQA with head_dim != hidden/heads: the parity fixtures.
            "test-mqa" => Self::base(512, 64, 128, 2, 4, 1, 32).with_max_positions(256),
            other => bail!("unknown model preset {other:?}; known presets: {}", PRESETS.join(", ")),
        })
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let cfg: GemmaConfig = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}:{}:{}: invalid model config: {e}", path.display(), e.line(), e.column())
        })?;
        cfg.validate().with_context(|| format!("invalid model config {}", path.display()))?;
        Ok(cfg)
    }

    /// Checks the values make a model align can build.
    pub fn validate(&self) -> Result<()> {
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
        crate::family::layer_specs(self, family).map(|_| ())
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

    /// Number of parameters (tied head counted once).
    pub fn num_parameters(&self) -> i64 {
        let h = self.hidden_size;
        let specs = self.family().and_then(|f| crate::family::layer_specs(self, f)).unwrap_or_default();
        let layers: i64 = specs
            .iter()
            .map(|s| {
                let q = self.num_attention_heads * s.head_dim;
                let kv = s.num_kv_heads * s.head_dim;
                let norms = if s.sandwich_norms { 4 * h } else { 2 * h };
                let qk_norms = if s.qk_norm { 2 * s.head_dim } else { 0 };
                h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + norms + qk_norms
            })
            .sum();
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + layers + h + head
    }

    /// Writes the config as `config.json` text.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
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
