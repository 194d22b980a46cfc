//! Gemma 4 (text, dense), as transformers' `modeling_gemma4.py` computes it
//! (`Gemma4ForCausalLM`, `Gemma4TextModel`). Over Gemma 3:
//!
//! - RMSNorm `x · (mean x² + eps)^-1/2 · w` in f32 (no `1 + w`; weights
//!   start at 1), and `self_attn.v_norm` over each value head without a
//!   weight (`with_scale=False`); q/k norms as Gemma 3's; attention scale 1;
//! - full-attention layers with their own head_dim and KV heads: the
//!   sparse `per_layer_config` (`{"5": {"head_dim": 512, "num_key_value_heads": 1}}`),
//!   or, when a config has none, the legacy `global_head_dim` (512 by
//!   default) and `num_global_key_value_heads` (with `attention_k_eq_v`);
//! - `attention_k_eq_v`: full-attention layers have no `v_proj`; the values
//!   are the key projection, normed by `v_norm` (not `k_norm`, no RoPE);
//! - RoPE per layer type, computed for that type's head_dim: `default`,
//!   `linear`, or `proportional` (full layers by default, with
//!   `partial_rotary_factor` 0.25): the first `int(p · head_dim // 2)`
//!   frequencies `1/θ^(2i/head_dim)`, the other `head_dim/2 − that` zero, so
//!   those dimensions are not rotated (`_compute_proportional_rope_parameters`);
//! - per-layer inputs (`hidden_size_per_layer_input` P > 0): the token's row
//!   of `embed_tokens_per_layer` (L·P wide, × √P) and the context's
//!   `per_layer_model_projection(embeds) · H^-1/2`, normed per layer by
//!   `per_layer_projection_norm`, summed and × 2^-1/2; after its MLP, each
//!   layer adds `post_per_layer_input_norm(per_layer_projection(gelu(per_layer_input_gate(h)) · input_i))`;
//! - `layer_scalar` (a persistent buffer, saved in checkpoints): each
//!   layer's output is multiplied by it;
//! - KV sharing (`num_kv_shared_layers` n): the last n layers have no k/v
//!   projections and reuse the keys and values (and mask) of the last
//!   earlier layer of their type (`kv_sharing_modes`: "store" / "reuse"),
//!   as it attended over them in the same forward pass; their MLPs are
//!   twice as wide with `use_double_wide_mlp`;
//! - final-logit soft-capping; the last layer is always full attention
//!   (transformers forces it); no attention soft-capping.
//!
//! MoE blocks (`enable_moe_block`) are refused.

use super::spec::{spans, Gemma4Layer, KvSharing, LayerSpec, NormStyle, RopeSpec, Span};
use crate::config::{Family, GemmaConfig, RopeConfig, RopeParameters};
use anyhow::{bail, ensure, Result};

/// transformers' `Gemma4TextConfig` defaults for keys a config leaves out.
pub const DEFAULT_SLIDING_WINDOW: i64 = 512;
pub const DEFAULT_SLIDING_WINDOW_PATTERN: i64 = 6;
pub const DEFAULT_GLOBAL_HEAD_DIM: i64 = 512;
pub const DEFAULT_HIDDEN_SIZE_PER_LAYER_INPUT: i64 = 256;
pub const DEFAULT_VOCAB_SIZE_PER_LAYER_INPUT: i64 = 262_144;
pub const DEFAULT_THETA_FULL: f64 = 1_000_000.0;
pub const DEFAULT_THETA_SLIDING: f64 = 10_000.0;
pub const DEFAULT_PARTIAL_ROTARY_FACTOR: f64 = 0.25;

/// The per-layer input embedding of a Gemma 4 config: (rows of
/// `embed_tokens_per_layer`, `hidden_size_per_layer_input`), or None when
/// the model has none (or is not Gemma 4).
pub fn per_layer_embedding(cfg: &GemmaConfig) -> Result<Option<(i64, i64)>> {
    if cfg.family()? != Family::Gemma4 {
        return Ok(None);
    }
    let keys = cfg.gemma4_keys()?;
    let p = keys.hidden_size_per_layer_input.unwrap_or(DEFAULT_HIDDEN_SIZE_PER_LAYER_INPUT);
    ensure!(p >= 0, "hidden_size_per_layer_input must not be negative, got {p}");
    if p == 0 {
        return Ok(None);
    }
    let vocab = keys.vocab_size_per_layer_input.unwrap_or(DEFAULT_VOCAB_SIZE_PER_LAYER_INPUT);
    ensure!(vocab > 0, "vocab_size_per_layer_input must be positive, got {vocab}");
    Ok(Some((vocab, p)))
}

/// One layer's overrides from `per_layer_config`: head_dim and KV heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    head_dim: i64,
    kv_heads: i64,
}

pub fn layer_specs(cfg: &GemmaConfig) -> Result<Vec<LayerSpec>> {
    let keys = cfg.gemma4_keys()?;
    if keys.enable_moe_block == Some(true) {
        bail!(
            "enable_moe_block = true: Gemma 4's Mixture-of-Experts blocks are not supported yet \
             (align runs dense Gemma 4)"
        );
    }
    let n = cfg.num_hidden_layers;
    let window = cfg.sliding_window.unwrap_or(DEFAULT_SLIDING_WINDOW);
    let pattern = DEFAULT_SLIDING_WINDOW_PATTERN;
    let mut spans = spans(cfg, window, |i| (i + 1) % pattern != 0)?;
    // transformers forces the last layer to full attention.
    if let Some(last) = spans.last_mut() {
        *last = Span::Full;
    }
    let k_eq_v = keys.attention_k_eq_v.unwrap_or(false);

    // Head shapes per layer: the global ones, overridden per layer.
    let global = Shape { head_dim: cfg.head_dim(), kv_heads: cfg.num_kv_heads() };
    let mut shapes = vec![global; n as usize];
    match &keys.per_layer_config {
        Some(overrides) => {
            for (idx, o) in overrides {
                let i: usize = idx
                    .trim()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("per_layer_config: key {idx:?} is not a layer index"))?;
                ensure!(
                    (i as i64) < n,
                    "per_layer_config: layer {i} is out of range (num_hidden_layers is {n})"
                );
                for (k, v) in o {
                    let field = format!("per_layer_config.{idx}.{k}");
                    let int = || -> Result<i64> {
                        v.as_i64()
                            .filter(|x| *x > 0)
                            .ok_or_else(|| anyhow::anyhow!("{field} must be a positive integer, got {v}"))
                    };
                    match k.as_str() {
                        "head_dim" => shapes[i].head_dim = int()?,
                        "num_key_value_heads" => shapes[i].kv_heads = int()?,
                        _ => bail!(
                            "{field} is not supported: align reads head_dim and num_key_value_heads \
                             overrides in Gemma 4's per_layer_config"
                        ),
                    }
                }
            }
        }
        None => {
            // transformers' legacy keys, as Gemma4TextConfig converts them.
            let head_dim = keys.global_head_dim.unwrap_or(DEFAULT_GLOBAL_HEAD_DIM);
            let kv = keys.num_global_key_value_heads.filter(|_| k_eq_v);
            for (i, s) in spans.iter().enumerate() {
                if *s == Span::Full {
                    shapes[i].head_dim = head_dim;
                    if let Some(kv) = kv {
                        shapes[i].kv_heads = kv;
                    }
                }
            }
        }
    }
    for (i, s) in shapes.iter().enumerate() {
        ensure!(
            s.head_dim > 0 && s.head_dim % 2 == 0,
            "layer {i}: head_dim must be positive and even, got {}",
            s.head_dim
        );
        ensure!(s.kv_heads > 0, "layer {i}: num_key_value_heads must be positive, got {}", s.kv_heads);
        ensure!(
            cfg.num_attention_heads % s.kv_heads == 0,
            "layer {i}: num_attention_heads ({}) must be a multiple of its num_key_value_heads ({})",
            cfg.num_attention_heads,
            s.kv_heads
        );
    }
    // One shape per layer type (transformers computes each type's RoPE from it).
    let type_shape = |full: bool| -> Result<Option<Shape>> {
        let mut found: Option<Shape> = None;
        for (i, (sp, sh)) in spans.iter().zip(&shapes).enumerate() {
            if (*sp == Span::Full) != full {
                continue;
            }
            match found {
                None => found = Some(*sh),
                Some(f) if f != *sh => bail!(
                    "per_layer_config: layer {i} has head_dim {} and {} KV heads, other {} layers {} and {}: \
                     layers of one type must agree (transformers computes one RoPE per type)",
                    sh.head_dim,
                    sh.kv_heads,
                    if full { "full-attention" } else { "sliding" },
                    f.head_dim,
                    f.kv_heads
                ),
                _ => {}
            }
        }
        Ok(found)
    };
    let full_shape = type_shape(true)?;
    let sliding_shape = type_shape(false)?;
    let rope_full = match full_shape {
        Some(s) => Some(rope(cfg, "full_attention", s.head_dim)?),
        None => None,
    };
    let rope_sliding = match sliding_shape {
        Some(s) => Some(rope(cfg, "sliding_attention", s.head_dim)?),
        None => None,
    };

    let modes = kv_sharing(cfg, &spans, keys.num_kv_shared_layers.unwrap_or(0))?;
    let per_layer = per_layer_embedding(cfg)?.map(|(_, p)| p);
    let double_wide = keys.use_double_wide_mlp.unwrap_or(false);
    let mut specs = Vec::with_capacity(n as usize);
    for (i, ((span, shape), kv)) in spans.iter().zip(&shapes).zip(&modes).enumerate() {
        let full = *span == Span::Full;
        if let KvSharing::Reuse(src) = kv {
            ensure!(
                shapes[*src] == *shape,
                "layer {i} reuses the keys and values of layer {src}, but their head_dim / KV heads differ \
                 ({} × {} against {} × {})",
                shape.kv_heads,
                shape.head_dim,
                shapes[*src].kv_heads,
                shapes[*src].head_dim
            );
        }
        let reuse = matches!(kv, KvSharing::Reuse(_));
        let rope = if full { rope_full } else { rope_sliding };
        specs.push(LayerSpec {
            span: *span,
            head_dim: shape.head_dim,
            num_kv_heads: shape.kv_heads,
            scaling: 1.0,
            attn_softcap: None,
            qk_norm: true,
            sandwich_norms: true,
            rope: rope.expect("a RoPE for each type present"),
            intermediate_size: cfg.intermediate_size * if double_wide && reuse { 2 } else { 1 },
            norm: NormStyle::Plain,
            gemma4: Some(Gemma4Layer { k_eq_v: k_eq_v && full, kv: *kv, per_layer_input: per_layer }),
        });
    }
    Ok(specs)
}

/// transformers' `kv_sharing_modes`: the last `shared` layers reuse; the
/// last earlier layer of each type stores.
fn kv_sharing(cfg: &GemmaConfig, spans: &[Span], shared: i64) -> Result<Vec<KvSharing>> {
    let n = spans.len() as i64;
    ensure!(
        (0..n).contains(&shared),
        "num_kv_shared_layers must be in 0..num_hidden_layers ({n}), got {shared}: the shared layers \
         reuse the keys and values of an earlier layer"
    );
    let first_shared = (n - shared) as usize;
    let mut modes = vec![KvSharing::Own; spans.len()];
    if shared == 0 {
        return Ok(modes);
    }
    let kind = |s: &Span| *s == Span::Full;
    for i in first_shared..spans.len() {
        let src = (0..first_shared).rev().find(|&j| kind(&spans[j]) == kind(&spans[i]));
        match src {
            Some(j) => {
                modes[j] = KvSharing::Store;
                modes[i] = KvSharing::Reuse(j);
            }
            None => bail!(
                "num_kv_shared_layers = {shared}: layer {i} ({}) has no earlier {} layer to reuse the keys and \
                 values of (layer_types {:?})",
                if kind(&spans[i]) { "full_attention" } else { "sliding_attention" },
                if kind(&spans[i]) { "full_attention" } else { "sliding_attention" },
                cfg.layer_types
            ),
        }
    }
    // transformers marks the last layer of each type before the shared ones
    // "store" even when nobody reuses it; nothing differs for the model.
    Ok(modes)
}

/// The RoPE of a layer type: `rope_parameters[layer_type]` (or Gemma 4's
/// defaults when the config has no `rope_parameters`), for `head_dim`.
fn rope(cfg: &GemmaConfig, layer_type: &str, head_dim: i64) -> Result<RopeSpec> {
    let field = format!("rope_parameters.{layer_type}");
    let default = |full: bool| RopeParameters {
        rope_type: Some(if full { "proportional" } else { "default" }.into()),
        rope_theta: Some(if full { DEFAULT_THETA_FULL } else { DEFAULT_THETA_SLIDING }),
        partial_rotary_factor: full.then_some(DEFAULT_PARTIAL_ROTARY_FACTOR),
        ..Default::default()
    };
    let full = layer_type == "full_attention";
    let block = match &cfg.rope_parameters {
        None => default(full),
        Some(RopeConfig::PerLayerType(m)) => match m.get(layer_type) {
            Some(b) => b.clone(),
            None => bail!("{field} is missing: Gemma 4 reads one RoPE block per layer type"),
        },
        Some(RopeConfig::Single(_)) => {
            bail!("rope_parameters must have one block per layer type (sliding_attention, full_attention) for Gemma 4")
        }
    };
    let theta = block.rope_theta.unwrap_or(if full { DEFAULT_THETA_FULL } else { DEFAULT_THETA_SLIDING });
    ensure!(theta.is_finite() && theta > 0.0, "{field}.rope_theta must be positive, got {theta}");
    let factor = block.factor.unwrap_or(1.0);
    let rope_type = block.rope_type.as_deref().unwrap_or("default");
    match rope_type {
        "default" => Ok(RopeSpec { theta, factor: 1.0, dim: head_dim, rotated: head_dim / 2 }),
        "linear" => {
            ensure!(factor > 0.0, "{field}.factor must be positive for linear RoPE scaling, got {factor}");
            Ok(RopeSpec { theta, factor, dim: head_dim, rotated: head_dim / 2 })
        }
        "proportional" => {
            ensure!(factor > 0.0, "{field}.factor must be positive, got {factor}");
            let p = block.partial_rotary_factor.unwrap_or(1.0);
            ensure!(
                (0.0..=1.0).contains(&p),
                "{field}.partial_rotary_factor must be in [0, 1], got {p}"
            );
            // Python: int(rope_proportion * head_dim // 2), a float floor division.
            let rotated = ((p * head_dim as f64) / 2.0).floor() as i64;
            Ok(RopeSpec { theta, factor, dim: head_dim, rotated: rotated.min(head_dim / 2) })
        }
        other => bail!(
            "{field}.rope_type {other:?} is not supported; align computes \"default\", \"linear\" and \"proportional\""
        ),
    }
}
