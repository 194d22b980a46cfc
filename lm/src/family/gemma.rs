//! Gemma 1, as transformers' `modeling_gemma.py` computes it.
//!
//! - embeddings × sqrt(hidden_size), the scale rounded to the activation dtype;
//! - RMSNorm in f32 scaled by `1 + w`: before attention (`input_layernorm`)
//!   and before the MLP (`post_attention_layernorm`);
//! - full causal attention, scale `head_dim^-1/2`, one RoPE (`rope_theta`);
//! - MLP `down(gelu_tanh(gate(x)) · up(x))`; the head tied to the embeddings.

use super::spec::{rope_spec, LayerSpec, NormStyle, Span};
use crate::config::GemmaConfig;
use anyhow::Result;

pub fn layer_specs(cfg: &GemmaConfig) -> Result<Vec<LayerSpec>> {
    let d = cfg.head_dim();
    let rope = rope_spec(cfg.rope_block(None), cfg.rope_theta(), d, "rope_parameters")?;
    let layer = LayerSpec {
        span: Span::Full,
        head_dim: d,
        num_kv_heads: cfg.num_kv_heads(),
        scaling: 1.0 / (d as f64).sqrt(),
        attn_softcap: None,
        qk_norm: false,
        sandwich_norms: false,
        rope,
        intermediate_size: cfg.intermediate_size,
        norm: NormStyle::OnePlus,
        gemma4: None,
    };
    Ok(vec![layer; cfg.num_hidden_layers.max(0) as usize])
}
