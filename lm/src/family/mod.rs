//! The Gemma family: what each `model_type` computes, layer by layer.
//!
//! One decoder ([`crate::model::Gemma`]) runs every member; what differs
//! between them is read from `config.json` once, here, into a
//! [`LayerSpec`] per layer: the attention span (full or a sliding window),
//! the heads, the attention scale and soft-cap, the extra norms and the
//! RoPE frequencies. Each member has its own file saying how transformers
//! computes it and how its config maps onto the specs:
//!
//! - [`gemma`] — Gemma 1 (`modeling_gemma.py`);
//! - [`gemma2`] — Gemma 2 (`modeling_gemma2.py`);
//! - [`gemma3`] — Gemma 3 text (`modeling_gemma3.py`);
//! - [`gemma4`] — Gemma 4 text, dense (`modeling_gemma4.py`).

pub mod gemma;
pub mod gemma2;
pub mod gemma3;
pub mod gemma4;

use crate::config::{Family, GemmaConfig};
use anyhow::Result;

mod spec;

pub use spec::{Gemma4Layer, KvSharing, LayerSpec, NormStyle, RopeSpec, Span};

/// The specs of `cfg`'s layers, in order; a config the family cannot run is
/// an error naming the field.
pub fn layer_specs(cfg: &GemmaConfig, family: Family) -> Result<Vec<LayerSpec>> {
    match family {
        Family::Gemma => gemma::layer_specs(cfg),
        Family::Gemma2 => gemma2::layer_specs(cfg),
        Family::Gemma3 => gemma3::layer_specs(cfg),
        Family::Gemma4 => gemma4::layer_specs(cfg),
    }
}

/// What needs the layers' specs to be known about a config.
impl GemmaConfig {
    /// Checks the values make a model align can build: each field
    /// ([`GemmaConfig::check_fields`]) and every layer's spec, an error
    /// naming the field otherwise.
    pub fn validate(&self) -> Result<()> {
        self.check_fields()?;
        layer_specs(self, self.family()?).map(|_| ())
    }

    /// Number of parameters (tied head counted once; buffers such as Gemma
    /// 4's `layer_scalar` not counted), as transformers' `num_parameters()`.
    pub fn num_parameters(&self) -> i64 {
        let h = self.hidden_size;
        let specs = self.family().and_then(|f| layer_specs(self, f)).unwrap_or_default();
        let layers: i64 = specs
            .iter()
            .map(|s| {
                let q = self.num_attention_heads * s.head_dim;
                let kv = s.num_kv_heads * s.head_dim;
                let norms = if s.sandwich_norms { 4 * h } else { 2 * h };
                let qk_norms = if s.qk_norm { 2 * s.head_dim } else { 0 };
                let Some(g) = s.gemma4 else {
                    return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + norms + qk_norms;
                };
                // Gemma 4: no k/v projections (nor k_norm) on reusing layers,
                // no v_proj with k = v; per-layer inputs. `layer_scalar` is a
                // buffer, not a parameter, as transformers counts.
                let reuse = matches!(g.kv, KvSharing::Reuse(_));
                let kv_mats = if reuse {
                    0
                } else if g.k_eq_v {
                    1
                } else {
                    2
                };
                let qk_norms = if reuse { s.head_dim } else { 2 * s.head_dim };
                let per_layer = g.per_layer_input.map_or(0, |p| 2 * h * p + h);
                h * q + kv_mats * h * kv + q * h + 3 * h * s.intermediate_size + norms + qk_norms + per_layer
            })
            .sum();
        let per_layer_model = match gemma4::per_layer_embedding(self).ok().flatten() {
            Some((vocab, p)) => {
                let lp = self.num_hidden_layers * p;
                vocab * lp + h * lp + p
            }
            None => 0,
        };
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + layers + h + head + per_layer_model
    }
}
