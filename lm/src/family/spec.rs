//! The description of one layer every family member fills in, and the
//! config readers the members share.

use crate::config::{GemmaConfig, RopeParameters};
use anyhow::{bail, Result};

/// How far back a layer's queries see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// Every earlier position (`full_attention`).
    Full,
    /// The last `window` positions, the query's own included
    /// (`sliding_attention`: key j is seen from query i when `i − window < j ≤ i`).
    Sliding(i64),
}

/// The rotary embedding of one layer: `inv_freq[i] = 1 / (θ^(2i/dim) · factor)`
/// for the first `rotated` of the `dim / 2` frequency pairs, 0 for the
/// rest (those dimensions are not rotated: cos 1, sin 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    /// `linear` scaling (1 when there is none).
    pub factor: f64,
    /// The head dimension the frequencies are computed for.
    pub dim: i64,
    /// The frequency pairs that rotate: `dim / 2`, or fewer with Gemma 4's
    /// `proportional` RoPE (`int(partial_rotary_factor · dim // 2)`).
    pub rotated: i64,
}

/// How a layer's RMSNorms scale the normalised input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormStyle {
    /// `x̂ · (1 + w)`, weights initialised to 0 (Gemma 1, 2, 3).
    OnePlus,
    /// `x̂ · w`, weights initialised to 1 (Gemma 4, as Gemma 3n).
    Plain,
}

/// Where a layer's keys and values come from (Gemma 4's `kv_sharing_modes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSharing {
    /// Its own projections; nobody reads them.
    Own,
    /// Its own projections, and later layers of its type reuse what it
    /// attended over (`"store"`).
    Store,
    /// No key/value projections: the keys, values and mask layer `src`
    /// attended over in the same forward pass (`"reuse"`).
    Reuse(usize),
}

/// What only Gemma 4 layers have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemma4Layer {
    /// Full-attention layers with `attention_k_eq_v`: no `v_proj`, the
    /// values are the key projection (before `k_norm` and RoPE).
    pub k_eq_v: bool,
    pub kv: KvSharing,
    /// `hidden_size_per_layer_input` when the model has per-layer inputs:
    /// the layer's `per_layer_input_gate`, `per_layer_projection` and
    /// `post_per_layer_input_norm`.
    pub per_layer_input: Option<i64>,
}

/// What one decoder layer computes, beyond what every Gemma layer shares.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    pub span: Span,
    pub head_dim: i64,
    pub num_kv_heads: i64,
    /// The factor on `q·k` before the soft-cap and the softmax.
    pub scaling: f64,
    /// `cap · tanh(s / cap)` on the attention scores.
    pub attn_softcap: Option<f64>,
    /// RMSNorm over each query and key head before RoPE (Gemma 3).
    pub qk_norm: bool,
    /// Gemma 2's four norms: the attention and MLP outputs are normed
    /// before their residual adds (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`), the MLP input by `pre_feedforward_layernorm`.
    pub sandwich_norms: bool,
    pub rope: RopeSpec,
    /// The MLP's hidden size (Gemma 4's KV-sharing layers may be double wide).
    pub intermediate_size: i64,
    pub norm: NormStyle,
    /// Gemma 4: `v_norm`, plain norms, attention scale 1, `layer_scalar`, …
    pub gemma4: Option<Gemma4Layer>,
}

/// `layer_types` read as spans: `sliding_attention` or `full_attention`,
/// one per layer, or `default(i)` for each layer when the key is absent.
pub(crate) fn spans(cfg: &GemmaConfig, window: i64, default: impl Fn(i64) -> bool) -> Result<Vec<Span>> {
    let n = cfg.num_hidden_layers;
    if window <= 0 {
        bail!("sliding_window must be positive, got {window}");
    }
    let span = |sliding: bool| if sliding { Span::Sliding(window) } else { Span::Full };
    match &cfg.layer_types {
        None => Ok((0..n).map(|i| span(default(i))).collect()),
        Some(types) => {
            if types.len() as i64 != n {
                bail!("layer_types has {} entries; num_hidden_layers is {n}", types.len());
            }
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    "sliding_attention" => Ok(span(true)),
                    "full_attention" => Ok(span(false)),
                    other => bail!(
                        "layer_types[{i}] is {other:?}; align knows \"sliding_attention\" and \"full_attention\""
                    ),
                })
                .collect()
        }
    }
}

/// A RoPE block's frequencies: rope_type `default`, or `linear` with its
/// `factor`; `field` names the block in errors.
pub(crate) fn rope_spec(
    block: Option<&RopeParameters>,
    theta: f64,
    dim: i64,
    field: &str,
) -> Result<RopeSpec> {
    let theta = block.and_then(|b| b.rope_theta).unwrap_or(theta);
    let factor = match block.and_then(|b| b.rope_type.as_deref()).unwrap_or("default") {
        "default" => 1.0,
        "linear" => match block.and_then(|b| b.factor) {
            Some(f) if f > 0.0 => f,
            other => bail!("{field}.factor must be a positive number for linear RoPE scaling, got {other:?}"),
        },
        other => {
            bail!("{field}.rope_type {other:?} is not supported; align computes \"default\" and \"linear\"")
        }
    };
    if theta.is_nan() || theta <= 0.0 {
        bail!("{field}.rope_theta must be positive, got {theta}");
    }
    Ok(RopeSpec { theta, factor, dim, rotated: dim / 2 })
}
