//! Gemma 3 (text), as transformers' `modeling_gemma3.py` computes it. Over
//! Gemma 2:
//!
//! - RMSNorm (`1 + w`) over each query and key head before RoPE
//!   (`self_attn.q_norm`, `self_attn.k_norm`);
//! - RoPE per layer type: `rope_parameters.sliding_attention` (θ 10 000 by
//!   default, or the legacy `rope_local_base_freq`) and
//!   `rope_parameters.full_attention` (θ 1 000 000 by default, or the legacy
//!   `rope_theta`; linear scaling from `factor` or the legacy `rope_scaling`);
//! - every `sliding_window_pattern`-th layer full (5:1 by default), the rest
//!   sliding, unless `layer_types` says otherwise;
//! - no attention soft-capping: transformers' Gemma 3 attention does not
//!   pass `attn_logit_softcapping` to its kernel, so a value in the config
//!   changes nothing, here as there; final-logit soft-capping when set.

use super::spec::{rope_spec, spans, LayerSpec, NormStyle, Span};
use crate::config::{GemmaConfig, RopeParameters};
use anyhow::Result;

pub const DEFAULT_QUERY_PRE_ATTN_SCALAR: f64 = 256.0;
pub const DEFAULT_SLIDING_WINDOW: i64 = 4096;
pub const DEFAULT_SLIDING_WINDOW_PATTERN: i64 = 6;
pub const DEFAULT_THETA_FULL: f64 = 1_000_000.0;
pub const DEFAULT_THETA_SLIDING: f64 = 10_000.0;

pub fn layer_specs(cfg: &GemmaConfig) -> Result<Vec<LayerSpec>> {
    let d = cfg.head_dim();
    let scalar = cfg.query_pre_attn_scalar.unwrap_or(DEFAULT_QUERY_PRE_ATTN_SCALAR);
    let window = cfg.sliding_window.unwrap_or(DEFAULT_SLIDING_WINDOW);
    let pattern = cfg.sliding_window_pattern.unwrap_or(DEFAULT_SLIDING_WINDOW_PATTERN).max(1);
    let spans = spans(cfg, window, |i| (i + 1) % pattern != 0)?;
    // The full-attention block: per layer type, else the legacy keys.
    let legacy_full = RopeParameters {
        rope_theta: Some(cfg.rope_theta.unwrap_or(DEFAULT_THETA_FULL)),
        ..cfg.rope_scaling.clone().unwrap_or_default()
    };
    let full_block = cfg.rope_block(Some("full_attention")).cloned().unwrap_or(legacy_full);
    let full = rope_spec(Some(&full_block), DEFAULT_THETA_FULL, d, "rope_parameters.full_attention")?;
    let local_theta = cfg.rope_local_base_freq.unwrap_or(DEFAULT_THETA_SLIDING);
    let sliding = rope_spec(
        cfg.rope_block(Some("sliding_attention")),
        local_theta,
        d,
        "rope_parameters.sliding_attention",
    )?;
    Ok(spans
        .into_iter()
        .map(|span| LayerSpec {
            span,
            head_dim: d,
            num_kv_heads: cfg.num_kv_heads(),
            scaling: scalar.powf(-0.5),
            attn_softcap: None,
            qk_norm: true,
            sandwich_norms: true,
            rope: if span == Span::Full { full } else { sliding },
            intermediate_size: cfg.intermediate_size,
            norm: NormStyle::OnePlus,
            gemma4: None,
        })
        .collect())
}
