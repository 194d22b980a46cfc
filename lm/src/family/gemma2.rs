//! Gemma 2, as transformers' `modeling_gemma2.py` computes it. Over Gemma 1:
//!
//! - four norms per layer: `input_layernorm` → attention →
//!   `post_attention_layernorm` → residual; `pre_feedforward_layernorm` →
//!   MLP → `post_feedforward_layernorm` → residual;
//! - attention scale `query_pre_attn_scalar^-1/2`;
//! - attention-logit soft-capping: scores `cap · tanh(s / cap)` before the
//!   mask and the f32 softmax (`attn_logit_softcapping`), so attention runs
//!   the eager way, not through a fused kernel;
//! - sliding-window attention on the layers `layer_types` marks
//!   `sliding_attention` (by default the even ones: 0, 2, …), `sliding_window`
//!   keys wide counted in sequence positions, the query's own included;
//! - final-logit soft-capping on the LM head (`final_logit_softcapping`).

use super::spec::{rope_spec, spans, LayerSpec, NormStyle};
use crate::config::GemmaConfig;
use anyhow::Result;

/// transformers' `Gemma2Config` defaults for keys a config leaves out (the
/// soft-caps' are applied as the config is read:
/// [`crate::config::GEMMA2_DEFAULT_ATTN_SOFTCAP`],
/// [`crate::config::GEMMA2_DEFAULT_FINAL_SOFTCAP`]).
pub const DEFAULT_QUERY_PRE_ATTN_SCALAR: f64 = 256.0;
pub const DEFAULT_SLIDING_WINDOW: i64 = 4096;

pub fn layer_specs(cfg: &GemmaConfig) -> Result<Vec<LayerSpec>> {
    let d = cfg.head_dim();
    let rope = rope_spec(cfg.rope_block(None), cfg.rope_theta(), d, "rope_parameters")?;
    let scalar = cfg.query_pre_attn_scalar.unwrap_or(DEFAULT_QUERY_PRE_ATTN_SCALAR);
    let window = cfg.sliding_window.unwrap_or(DEFAULT_SLIDING_WINDOW);
    let spans = spans(cfg, window, |i| (i + 1) % 2 != 0)?;
    Ok(spans
        .into_iter()
        .map(|span| LayerSpec {
            span,
            head_dim: d,
            num_kv_heads: cfg.num_kv_heads(),
            scaling: scalar.powf(-0.5),
            attn_softcap: cfg.attn_logit_softcapping,
            qk_norm: false,
            sandwich_norms: true,
            rope,
            intermediate_size: cfg.intermediate_size,
            norm: NormStyle::OnePlus,
            gemma4: None,
        })
        .collect())
}
