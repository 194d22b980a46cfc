//! The Gemma decoder, exact to transformers' `GemmaForCausalLM`,
//! `Gemma2ForCausalLM` and `Gemma3ForCausalLM`: what differs between the
//! family members is read once into a [`LayerSpec`] per layer
//! ([`crate::family`], one file per member).
//!
//! Struct fields and `nn::Path` segments equal the checkpoint keys
//! (`model.layers.{i}.self_attn.q_proj.weight`, …) so loading needs no rename
//! table. Every component is `new(p, cfg)` + `forward`.
//!
//! Numerics follow transformers exactly:
//! - embeddings × sqrt(hidden_size), the scale rounded to the activation dtype;
//! - RMSNorm in fp32: `x * rsqrt(mean(x²) + eps) * (1 + w)`, cast back;
//! - rotate-half RoPE with `inv_freq = 1/θ^(2i/head_dim)` computed in fp32;
//! - MLP `down(gelu_tanh(gate(x)) * up(x))`;
//! - attention scale 1/sqrt(head_dim), softmax in fp32 (SDPA), MQA/GQA/MHA;
//! - LM head tied to the embedding matrix;
//! - Gemma 2/3: four norms per layer, `query_pre_attn_scalar`, q/k norms,
//!   soft-capped attention scores and logits, sliding-window layers (masks
//!   and a KV cache bounded by the window), RoPE per layer type;
//! - Gemma 4: norms scaled by `w` (not `1 + w`), `v_norm`, per-layer
//!   head shapes, keys = values, partial RoPE, per-layer inputs, layers
//!   reusing an earlier layer's keys and values ([`SharedKv`]), `layer_scalar`
//!   ([`crate::family::gemma4`]).

use crate::config::{Family, GemmaConfig};
use crate::family::{KvSharing, LayerSpec, NormStyle, RopeSpec, Span};
use crate::lora::LoraAdapter;
use anyhow::{ensure, Context, Result};
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// `Linear` without bias; weight [out, in] named `weight`, and optionally a
/// LoRA adapter ([`crate::lora::LoraAdapter`]) beside it.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    /// A LoRA adapter: when present and enabled, `forward` adds
    /// `scaling · B A x` (see [`crate::lora`]).
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// A weight drawn from normal(0, `std`).
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64, std: f64) -> Self {
        Self::with_init(p, in_dim, out_dim, nn::Init::Randn { mean: 0.0, stdev: std })
    }

    pub fn with_init(p: nn::Path, in_dim: i64, out_dim: i64, init: nn::Init) -> Self {
        let weight = p.var("weight", &[out_dim, in_dim], init);
        Linear { weight, lora: None }
    }

    /// The adapter, when there is one and it is enabled.
    pub fn active_lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref().filter(|a| a.switch.enabled())
    }

    /// The weight this layer computes with, detached: `W`, or with an
    /// enabled adapter `W + scaling · B A` (computed in f32, cast to W's
    /// dtype), as PEFT's `merge` computes it.
    pub fn merged_weight(&self) -> Tensor {
        let w = self.weight.detach();
        match self.active_lora() {
            Some(a) => (w.to_kind(Kind::Float) + a.delta_weight()).to_kind(w.kind()),
            None => w,
        }
    }

    /// The same base weight (a shallow clone: one storage), no adapter.
    fn share(&self) -> Linear {
        Linear { weight: self.weight.shallow_clone(), lora: None }
    }
}

/// How a new model's weights are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightInit {
    /// transformers' initialisation: normal(0, `initializer_range`), norms 0.
    Random,
    /// Zeros and no random draw: for weights about to be overwritten by a
    /// checkpoint (loading allocates each tensor once, in its final dtype).
    Zeros,
}

impl WeightInit {
    /// The `nn::Init` of a weight drawn from normal(0, `std`).
    fn normal(self, std: f64) -> nn::Init {
        match self {
            WeightInit::Random => nn::Init::Randn { mean: 0.0, stdev: std },
            WeightInit::Zeros => nn::Init::Const(0.0),
        }
    }
}

impl Module for Linear {
    /// `x Wᵀ`, plus `scaling · B(A(dropout(x)))` with an enabled adapter:
    /// computed in the adapter's dtype (f32) and added back in the base's,
    /// as PEFT does for a bf16 base with f32 adapters.
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear::<Tensor>(&self.weight, None);
        match self.active_lora() {
            Some(a) => {
                let kind = y.kind();
                (y + a.delta(x)).to_kind(kind)
            }
            None => y,
        }
    }
}

/// The weights laid out for inference (generation) on the CPU: every
/// projection transposed to [in, out] and made contiguous, q|k|v and
/// gate|up each joined into one matrix, and the RMSNorm scales `1 + w`
/// precomputed (f32 models only).
///
/// With a few rows per matmul, as in decoding, libtorch's CPU kernels are
/// faster on `x @ Wᵀ` stored contiguously than on `linear(x, W)` with
/// W [out, in]: 2–3× for one matrix that stays in cache (measured here with
/// torch 2.11: batch 8, 384 → 1536, 87 µs against 224 µs; the tied head
/// 384 → 8192, 548 µs against 1472 µs), 5–30% for a whole small-20m
/// decoding step, whose weights stream from L3. Each libtorch call saved
/// (the joins, the fused norms) is also a few microseconds per layer and
/// token. [`crate::generate::generate`] makes the copies on every call, so
/// weights the optimiser has just changed (RL) are always current; callers
/// whose model is frozen make them once and pass them to
/// [`crate::generate::generate_using`]. They cost one more copy of the
/// weights in memory while generating. GPUs gain nothing from them.
pub struct InferenceWeights {
    layers: Vec<LayerWeights>,
    /// The head (tied embeddings or `lm_head`), (H, V).
    head: Tensor,
    /// `1 + model.norm.weight` in f32, for f32 models.
    final_norm: Option<Tensor>,
}

/// One decoder layer's weights in the inference layout.
pub struct LayerWeights {
    /// (H, (NH + 2·KVH)·D): q, k and v side by side.
    qkv: Tensor,
    /// (NH·D, H).
    o: Tensor,
    /// (H, 2·I): gate and up side by side.
    gate_up: Tensor,
    /// (I, H).
    down: Tensor,
    /// `1 + w` of the norms in f32, for f32 models.
    input_norm: Option<Tensor>,
    post_norm: Option<Tensor>,
    pre_ff_norm: Option<Tensor>,
    post_ff_norm: Option<Tensor>,
}

impl InferenceWeights {
    /// Models whose weights take more bytes than this generate with the
    /// training layout: the inference copy would double their memory (a
    /// gemma-2b in f32 would need 10 GB more).
    pub const MAX_BYTES: i64 = 1 << 30;

    /// The inference layout of `model`'s current weights, or None where it
    /// does not pay: not on the CPU, or weights over [`Self::MAX_BYTES`].
    pub fn for_model(model: &Gemma) -> Option<Self> {
        // Gemma 4 generates with the training layout: its layers differ too
        // much (no k/v projections on KV-sharing layers, keys = values,
        // `w`-scaled norms, per-layer inputs) for the joined copies to pay.
        if model.family == Family::Gemma4 {
            return None;
        }
        let bytes = model.cfg.num_parameters() * model.kind().elt_size_in_bytes() as i64;
        if model.device != Device::Cpu || bytes > Self::MAX_BYTES {
            return None;
        }
        // Enabled LoRA adapters are merged into the copies (`W + s·B A`),
        // in f32 only: merged into bf16 weights they would be rounded away.
        if model.kind() != Kind::Float && model.has_active_adapters() {
            return None;
        }
        let _guard = tch::no_grad_guard();
        let t = |l: &Linear| l.merged_weight().tr();
        let f32_model = model.kind() == Kind::Float;
        let scale = |n: &RmsNorm| f32_model.then(|| n.weight.detach() + 1.0);
        let scale_opt = |n: &Option<RmsNorm>| n.as_ref().and_then(scale);
        let layers = model
            .model
            .layers
            .iter()
            .map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                let (k, v) = (a.k_proj.as_ref()?, a.v_proj.as_ref()?);
                Some(LayerWeights {
                    qkv: Tensor::cat(&[t(&a.q_proj), t(k), t(v)], 1),
                    o: t(&a.o_proj).contiguous(),
                    gate_up: Tensor::cat(&[t(&m.gate_proj), t(&m.up_proj)], 1),
                    down: t(&m.down_proj).contiguous(),
                    input_norm: scale(&l.input_layernorm),
                    post_norm: scale(&l.post_attention_layernorm),
                    pre_ff_norm: scale_opt(&l.pre_feedforward_layernorm),
                    post_ff_norm: scale_opt(&l.post_feedforward_layernorm),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let head = match &model.lm_head {
            Some(h) => t(h).contiguous(),
            None => model.model.embed_tokens.detach().tr().contiguous(),
        };
        Some(InferenceWeights { layers, head, final_norm: scale(&model.model.norm) })
    }
}

/// The dtype norms and softmaxes compute in: f32, as transformers upcasts
/// to, or f64 for f64 models (the gradient checks), which f32 would round.
pub fn at_least_f32(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Gemma's RMSNorm: computed in fp32, scaled by `(1 + weight)` (Gemma 1–3)
/// or by `weight` (Gemma 4: `Gemma4RMSNorm`, `x · (mean x² + eps)^-1/2 · w`).
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
    style: NormStyle,
}

impl RmsNorm {
    /// A `1 + w` norm, its weight 0.
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        Self::with_style(p, dim, eps, NormStyle::OnePlus)
    }

    /// A norm of `style`, its weight the identity (0 for `1 + w`, 1 for `w`).
    pub fn with_style(p: nn::Path, dim: i64, eps: f64, style: NormStyle) -> Self {
        let weight = match style {
            NormStyle::OnePlus => p.zeros("weight", &[dim]),
            NormStyle::Plain => p.var("weight", &[dim], nn::Init::Const(1.0)),
        };
        RmsNorm { weight, eps, style }
    }

    /// The same weight (a shallow clone: one storage).
    fn share(&self) -> RmsNorm {
        RmsNorm { weight: self.weight.shallow_clone(), eps: self.eps, style: self.style }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let f = at_least_f32(kind);
        let xf = x.to_kind(f);
        let out = match self.style {
            NormStyle::OnePlus => {
                let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, f);
                let normed = xf * (var + self.eps).rsqrt();
                normed * (self.weight.to_kind(f) + 1.0)
            }
            NormStyle::Plain => rms_normalise(&xf, self.eps) * self.weight.to_kind(f),
        };
        out.to_kind(kind)
    }
}

/// `x · (mean x² + eps)^-1/2` over the last dimension, as `Gemma4RMSNorm`
/// computes it (`torch.pow(·, -0.5)`); `xf` already f32 (or f64).
fn rms_normalise(xf: &Tensor, eps: f64) -> Tensor {
    let mean_squared = xf.pow_tensor_scalar(2).mean_dim(-1, true, xf.kind()) + eps;
    xf * mean_squared.pow_tensor_scalar(-0.5)
}

/// Gemma 4's `v_norm` (`Gemma4RMSNorm(with_scale=False)`): normalised in
/// f32 (f64 for f64 models), no weight, cast back.
fn rms_unscaled(x: &Tensor, eps: f64) -> Tensor {
    rms_normalise(&x.to_kind(at_least_f32(x.kind())), eps).to_kind(x.kind())
}

impl RmsNorm {
    /// `forward` through libtorch's fused `rms_norm` when `scale` (`1 + w`
    /// in f32, from [`InferenceWeights`]) is given: the same f32 result
    /// in one call instead of eight.
    fn forward_scaled(&self, x: &Tensor, scale: Option<&Tensor>) -> Tensor {
        match scale {
            Some(w1) if x.kind() == Kind::Float => x.rms_norm(w1.size(), Some(w1), self.eps),
            _ => self.forward(x),
        }
    }
}

/// Rotary position embedding tables for given positions.
pub struct Rope {
    inv_freq: Tensor, // (D/2,) f32
}

impl Rope {
    /// `inv_freq = 1 / θ^(2i/d)`, divided by the linear scaling factor when
    /// there is one, in f32 as transformers computes it.
    ///
    /// With fewer `rotated` pairs than `dim / 2` (Gemma 4's `proportional`
    /// RoPE), the exponents stay `2i/dim` and the other frequencies are 0.
    pub fn new(spec: &RopeSpec, device: Device) -> Self {
        let dim = spec.dim;
        let rotated = spec.rotated.clamp(0, dim / 2);
        let exponent = Tensor::arange_start_step(0, 2 * rotated, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / dim as f64;
        let inv_freq = Tensor::pow_scalar(spec.theta, &exponent).reciprocal();
        let inv_freq = if rotated < dim / 2 {
            Tensor::cat(&[inv_freq, Tensor::zeros([dim / 2 - rotated], (Kind::Float, device))], 0)
        } else {
            inv_freq
        };
        let inv_freq = if spec.factor == 1.0 { inv_freq } else { inv_freq / spec.factor };
        Rope { inv_freq }
    }

    /// cos and signed sin for `positions` (B, T), each (B, 1, T, D) in
    /// `kind`. The sin table has its first half negated, so that
    /// transformers' `rotate_half(x) · sin` is `roll(x, D/2) · sin_signed`:
    /// one op instead of four, and the same bits (negation is exact).
    pub fn tables(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let pos = positions.to_kind(Kind::Float).unsqueeze(-1); // (B, T, 1)
        let freqs = pos * self.inv_freq.view([1, 1, -1]); // (B, T, D/2)
        let emb = Tensor::cat(&[&freqs, &freqs], -1); // (B, T, D)
        let cos = emb.cos().to_kind(kind).unsqueeze(1); // (B, 1, T, D)
        let sin = emb.sin(); // (B, T, D)
        let half = sin.size()[2] / 2;
        let sin_signed = Tensor::cat(&[&sin.narrow(-1, 0, half).neg(), &sin.narrow(-1, half, half)], -1);
        let sin_signed = sin_signed.to_kind(kind).unsqueeze(1); // (B, 1, T, D)
        (cos, sin_signed)
    }
}

/// The RoPE tables of one forward pass: (cos, signed sin) per distinct RoPE
/// of the model (Gemma 3 has one for sliding and one for full layers),
/// each (B, 1, T, D); a layer reads its own by index.
pub struct RopeTables(pub Vec<(Tensor, Tensor)>);

/// `x · cos + rotate_half(x) · sin`, with rotate_half(x) = cat(−x₂, x₁)
/// written as `roll(x, D/2) · sin_signed` (see [`Rope::tables`]).
fn apply_rope(x: &Tensor, cos: &Tensor, sin_signed: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    x * cos + x.roll([half], [-1]) * sin_signed
}

/// Per-layer key/value cache, preallocated to `capacity` positions.
///
/// A sliding layer keeps only its last `window` positions, in a ring:
/// position `p` lives in slot `p mod window`. Attention does not depend on
/// the order of its keys, so the ring is read as it is, each slot's mask
/// taken from the position it holds ([`ring_positions`]). Long rollouts
/// thus hold `window` positions per sliding layer, not the whole sequence.
pub struct KvCache {
    /// (k, v) per layer, each (B, KVH, slots, D): `capacity` slots for full
    /// layers, `min(window, capacity)` for sliding ones.
    layers: Vec<(Tensor, Tensor)>,
    /// Number of positions filled.
    pub len: i64,
    pub capacity: i64,
}

impl KvCache {
    pub fn new(cfg: &GemmaConfig, batch: i64, capacity: i64, kind: Kind, device: Device) -> Result<Self> {
        let specs = crate::family::layer_specs(cfg, cfg.family()?)?;
        let layers = specs
            .iter()
            .map(|s| {
                let slots = match s.span {
                    Span::Full => capacity,
                    Span::Sliding(w) => w.min(capacity),
                };
                // A layer reusing an earlier layer's keys and values keeps none.
                let slots =
                    if s.gemma4.is_some_and(|g| matches!(g.kv, KvSharing::Reuse(_))) { 0 } else { slots };
                let shape = [batch, s.num_kv_heads, slots, s.head_dim];
                (Tensor::zeros(shape, (kind, device)), Tensor::zeros(shape, (kind, device)))
            })
            .collect();
        Ok(KvCache { layers, len: 0, capacity })
    }

    /// Bytes the cache holds (keys and values of every layer).
    pub fn bytes(&self) -> i64 {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as i64;
        self.layers.iter().map(|(k, v)| bytes(k) + bytes(v)).sum()
    }
}

/// The positions a ring of `slots` slots holds once `len` positions were
/// written: slot j holds the latest p < len with p mod slots = j, or −1.
fn ring_positions(len: i64, slots: i64) -> Vec<i64> {
    (0..slots).map(|j| if j < len { len - 1 - (len - 1 - j).rem_euclid(slots) } else { -1 }).collect()
}

/// The keys and values one layer attended over in a forward pass, with the
/// mask it used: what a Gemma 4 layer that reuses them sees.
#[derive(Debug)]
pub struct SharedEntry {
    /// (B, KVH, S, D) each, before the heads are repeated.
    pub k: Tensor,
    pub v: Tensor,
    /// (B or 1, 1, T, S) bool, or None for plain causal attention.
    pub mask: Option<Tensor>,
}

/// What the storing layers of a forward pass leave for the layers that
/// reuse their keys and values (Gemma 4's `num_kv_shared_layers`), by the
/// storing layer's index. A reusing layer sees exactly the keys its source
/// attended over in the same pass: with a cache, the cached positions and
/// the new ones (for a sliding layer, its ring and the new positions).
#[derive(Debug, Default)]
pub struct SharedKv(pub std::collections::BTreeMap<usize, SharedEntry>);

/// What one forward pass hands every decoder layer besides its input.
pub struct Pass<'a> {
    /// From [`Gemma::rope_tables`].
    pub rope: &'a RopeTables,
    /// (B, 1, T, S) bool over all S = cached + T positions, true = may
    /// attend, or None for plain causal attention.
    pub mask: Option<&'a Tensor>,
    pub shared: SharedKv,
    /// What every layer of one kind would build the same: made once per pass.
    memo: PassMemo,
}

impl<'a> Pass<'a> {
    pub fn new(rope: &'a RopeTables, mask: Option<&'a Tensor>) -> Self {
        Pass { rope, mask, shared: SharedKv::default(), memo: PassMemo::default() }
    }
}

/// The masks and ring indices of one forward pass, by layer kind. Every
/// sliding layer with the same window (and ring size) attends with the same
/// mask, and every full layer with the same one, so a pass (a decoding step
/// included) builds each once instead of once per layer.
#[derive(Default)]
struct PassMemo {
    /// By (window, or 0 for a full layer; ring slots, or −1 without a cache).
    masks: std::collections::BTreeMap<(i64, i64), Option<Tensor>>,
    /// The ring slots the new positions go to, by ring size.
    ring_idx: std::collections::BTreeMap<i64, Tensor>,
}

impl PassMemo {
    fn mask(&mut self, key: (i64, i64), make: impl FnOnce() -> Option<Tensor>) -> Option<Tensor> {
        self.masks.entry(key).or_insert_with(make).as_ref().map(Tensor::shallow_clone)
    }
}

#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    /// None on a Gemma 4 layer that reuses an earlier layer's keys/values.
    pub k_proj: Option<Linear>,
    /// None there too, and on Gemma 4's full layers with `attention_k_eq_v`.
    pub v_proj: Option<Linear>,
    pub o_proj: Linear,
    /// Gemma 3+: RMSNorm over each query / key head before RoPE.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    /// Gemma 4: the unscaled RMSNorm over each value head (its eps).
    v_norm: Option<f64>,
    n_heads: i64,
    n_kv: i64,
    head_dim: i64,
    /// The factor on q·k (`head_dim^-1/2`, `query_pre_attn_scalar^-1/2`, or 1).
    scaling: f64,
    /// `cap · tanh(s / cap)` on the scores (Gemma 2).
    softcap: Option<f64>,
    span: Span,
    /// Which of the model's RoPE tables this layer reads.
    rope_id: usize,
    /// The layer's index, and where its keys and values come from / go.
    index: usize,
    kv: KvSharing,
}

impl Attention {
    pub fn new(
        p: nn::Path,
        cfg: &GemmaConfig,
        spec: &LayerSpec,
        (index, rope_id): (usize, usize),
        init: WeightInit,
    ) -> Self {
        let h = cfg.hidden_size;
        let (nh, nkv, d) = (cfg.num_attention_heads, spec.num_kv_heads, spec.head_dim);
        let w = init.normal(cfg.initializer_range);
        let g4 = spec.gemma4;
        let kv = g4.map_or(KvSharing::Own, |g| g.kv);
        let own_kv = !matches!(kv, KvSharing::Reuse(_));
        let k_eq_v = g4.is_some_and(|g| g.k_eq_v);
        let norm = |name: &str| RmsNorm::with_style(&p / name, d, cfg.rms_norm_eps, spec.norm);
        Attention {
            q_proj: Linear::with_init(&p / "q_proj", h, nh * d, w),
            k_proj: own_kv.then(|| Linear::with_init(&p / "k_proj", h, nkv * d, w)),
            v_proj: (own_kv && !k_eq_v).then(|| Linear::with_init(&p / "v_proj", h, nkv * d, w)),
            o_proj: Linear::with_init(&p / "o_proj", nh * d, h, w),
            q_norm: spec.qk_norm.then(|| norm("q_norm")),
            k_norm: (spec.qk_norm && own_kv).then(|| norm("k_norm")),
            v_norm: (g4.is_some() && own_kv).then_some(cfg.rms_norm_eps),
            n_heads: nh,
            n_kv: nkv,
            head_dim: d,
            scaling: spec.scaling,
            softcap: spec.attn_softcap,
            span: spec.span,
            rope_id,
            index,
            kv,
        }
    }

    /// The layer whose keys and values this one reuses (Gemma 4), if any.
    pub fn reuses(&self) -> Option<usize> {
        match self.kv {
            KvSharing::Reuse(src) => Some(src),
            _ => None,
        }
    }

    /// The same base weights (shallow clones), no adapters.
    fn share(&self) -> Attention {
        Attention {
            q_proj: self.q_proj.share(),
            k_proj: self.k_proj.as_ref().map(Linear::share),
            v_proj: self.v_proj.as_ref().map(Linear::share),
            o_proj: self.o_proj.share(),
            q_norm: self.q_norm.as_ref().map(RmsNorm::share),
            k_norm: self.k_norm.as_ref().map(RmsNorm::share),
            v_norm: self.v_norm,
            n_heads: self.n_heads,
            n_kv: self.n_kv,
            head_dim: self.head_dim,
            scaling: self.scaling,
            softcap: self.softcap,
            span: self.span,
            rope_id: self.rope_id,
            index: self.index,
            kv: self.kv,
        }
    }

    /// `x` (B, T, H); `pass` the RoPE tables, the mask (B, 1, T, S) bool
    /// over all S = cached + T positions, true = may attend, or None for
    /// plain causal attention (over the cached positions too, with a
    /// cache), and the keys/values shared between layers. A sliding layer
    /// narrows either mask to its window. A badly shaped input is an error
    /// naming the shapes, never a panic (the checks read sizes only).
    pub fn forward(
        &self,
        x: &Tensor,
        pass: &mut Pass<'_>,
        cache: Option<(&mut (Tensor, Tensor), i64)>,
        wt: Option<&LayerWeights>,
    ) -> Result<Tensor> {
        let (b, t, h) = x.size3().map_err(|_| {
            anyhow::anyhow!("attention input must be (batch, time, hidden), got shape {:?}", x.size())
        })?;
        let hidden = self.q_proj.weight.size()[1];
        ensure!(
            h == hidden,
            "attention input has hidden size {h}, the layer expects {hidden} (input shape {:?})",
            x.size()
        );
        let mask = pass.mask;
        let (cos, sin_signed) = pass.rope.0.get(self.rope_id).context("no RoPE table for this layer")?;
        let d = self.head_dim;
        let (nh, nkv) = (self.n_heads, self.n_kv);
        let norm = |n: &Option<RmsNorm>, y: Tensor| match n {
            Some(n) => n.forward(&y),
            None => y,
        };
        let (q, new_kv) = match (wt, self.kv) {
            (_, KvSharing::Reuse(_)) => {
                let q = norm(&self.q_norm, self.q_proj.forward(x).f_view([b, t, nh, d])?).transpose(1, 2); // (B, NH, T, D)
                (apply_rope(&q, cos, sin_signed), None)
            }
            (Some(w), _) if self.q_norm.is_none() => {
                // One projection, and RoPE once over the q|k heads side by side.
                let qkv = x.f_matmul(&w.qkv)?.f_view([b, t, nh + 2 * nkv, d])?; // (B, T, NH+2·KVH, D)
                let qk = qkv.f_narrow(2, 0, nh + nkv)?.transpose(1, 2); // (B, NH+KVH, T, D)
                let qk = apply_rope(&qk, cos, sin_signed);
                let v = qkv.f_narrow(2, nh + nkv, nkv)?.transpose(1, 2); // (B, KVH, T, D)
                (qk.f_narrow(1, 0, nh)?, Some((qk.f_narrow(1, nh, nkv)?, v)))
            }
            (Some(w), _) => {
                let qkv = x.f_matmul(&w.qkv)?.f_view([b, t, nh + 2 * nkv, d])?; // (B, T, NH+2·KVH, D)
                let q = norm(&self.q_norm, qkv.f_narrow(2, 0, nh)?).transpose(1, 2); // (B, NH, T, D)
                let k = norm(&self.k_norm, qkv.f_narrow(2, nh, nkv)?).transpose(1, 2); // (B, KVH, T, D)
                let v = qkv.f_narrow(2, nh + nkv, nkv)?.transpose(1, 2); // (B, KVH, T, D)
                (apply_rope(&q, cos, sin_signed), Some((apply_rope(&k, cos, sin_signed), v)))
            }
            (None, _) => {
                let k_proj = self.k_proj.as_ref().context("the layer has no k_proj")?;
                let q = norm(&self.q_norm, self.q_proj.forward(x).f_view([b, t, nh, d])?).transpose(1, 2); // (B, NH, T, D)
                let k_raw = k_proj.forward(x).f_view([b, t, nkv, d])?; // (B, T, KVH, D)
                                                                       // Gemma 4's attention_k_eq_v: the values are the key projection.
                let v_raw = match &self.v_proj {
                    Some(v_proj) => v_proj.forward(x).f_view([b, t, nkv, d])?,
                    None => k_raw.shallow_clone(),
                };
                let k = norm(&self.k_norm, k_raw).transpose(1, 2); // (B, KVH, T, D)
                let v = match self.v_norm {
                    Some(eps) => rms_unscaled(&v_raw, eps),
                    None => v_raw,
                }
                .transpose(1, 2); // (B, KVH, T, D)
                (apply_rope(&q, cos, sin_signed), Some((apply_rope(&k, cos, sin_signed), v)))
            }
        };
        let start = cache.as_ref().map_or(0, |c| c.1);
        let s_all = start + t; // every position so far: the caller's mask covers them
        if let Some(m) = mask {
            let ms = m.size();
            let fits = |got: i64, want: i64| got == want || got == 1;
            ensure!(
                ms.len() == 4
                    && fits(ms[0], b)
                    && fits(ms[1], self.n_heads)
                    && fits(ms[2], t)
                    && ms[3] == s_all,
                "attention mask must be (B, 1, T, S) = ({b}, 1, {t}, {s_all}) or broadcast to it, got {ms:?}"
            );
        }
        let (k, v, mask) = match new_kv {
            None => {
                let KvSharing::Reuse(src) = self.kv else {
                    anyhow::bail!("no keys or values for this layer")
                };
                let e = pass.shared.0.get(&src).with_context(|| {
                    format!("layer {} reuses the keys and values of layer {src}, which left none", self.index)
                })?;
                (e.k.shallow_clone(), e.v.shallow_clone(), e.mask.as_ref().map(Tensor::shallow_clone))
            }
            Some((k, v)) => self.keys_and_mask(x.device(), k, v, mask, cache, t, &mut pass.memo)?,
        };
        if self.kv == KvSharing::Store {
            let entry = SharedEntry {
                k: k.shallow_clone(),
                v: v.shallow_clone(),
                mask: mask.as_ref().map(Tensor::shallow_clone),
            };
            pass.shared.0.insert(self.index, entry);
        }
        let mask = mask.as_ref();
        let s = k.size()[2];
        let rep = self.n_heads / self.n_kv;
        let scale = self.scaling;
        if let Some(w) = wt.filter(|_| t == 1 && rep > 1 && self.softcap.is_none()) {
            // Decoding with shared key/value heads: the query heads of one
            // key/value head become that head's rows, so no copy of the
            // cache is made per head (query head h = kv·rep + r, as below).
            let q = q.f_reshape([b, self.n_kv, rep, d])?; // (B, KVH, rep, D)
            let y = Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, scale, false)?; // (B, KVH, rep, D)
            let y = y.f_reshape([b, 1, self.n_heads * d])?; // (B, 1, NH*D)
            return Ok(y.f_matmul(&w.o)?);
        }
        let (k, v) = if rep == 1 {
            (k, v)
        } else if self.n_kv == 1 {
            (k.expand([b, self.n_heads, s, d], false), v.expand([b, self.n_heads, s, d], false))
        } else {
            let k = k.unsqueeze(2).expand([b, self.n_kv, rep, s, d], false).reshape([b, self.n_heads, s, d]);
            let v = v.unsqueeze(2).expand([b, self.n_kv, rep, s, d], false).reshape([b, self.n_heads, s, d]);
            (k, v)
        };
        let y = match (self.softcap, mask) {
            (Some(cap), _) => softcapped_attention(&q, &k, &v, mask, scale, cap)?,
            (None, Some(m)) => {
                Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, scale, false)?
            }
            (None, None) => {
                Tensor::f_scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, t > 1, scale, false)?
            }
        }; // (B, NH, T, D)
        let y = y.transpose(1, 2).reshape([b, t, self.n_heads * d]); // (B, T, NH*D)
        Ok(match wt {
            Some(w) => y.f_matmul(&w.o)?,
            None => self.o_proj.forward(&y),
        })
    }

    /// This layer's new keys and values `k`, `v` (B, KVH, T, D) written to
    /// its cache entry, and the keys, values and mask its queries attend
    /// over: with a cache, the cached positions and the new ones (a sliding
    /// layer's ring read as it is, each slot masked by the position it
    /// holds), `mask` narrowed to the window on a sliding layer. The mask
    /// and ring indices come from `memo` when a layer of the same kind made
    /// them earlier in the pass.
    #[allow(clippy::too_many_arguments)]
    fn keys_and_mask(
        &self,
        device: Device,
        k: Tensor,
        v: Tensor,
        mask: Option<&Tensor>,
        cache: Option<(&mut (Tensor, Tensor), i64)>,
        t: i64,
        memo: &mut PassMemo,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let start = cache.as_ref().map_or(0, |c| c.1);
        let s_all = start + t;
        Ok(match self.span {
            Span::Full => {
                let (k, v) = match cache {
                    Some((kv, start)) => {
                        kv.0.f_narrow(2, start, t)?.f_copy_(&k)?;
                        kv.1.f_narrow(2, start, t)?.f_copy_(&v)?;
                        (kv.0.f_narrow(2, 0, start + t)?, kv.1.f_narrow(2, 0, start + t)?)
                        // (B, KVH, S, D)
                    }
                    None => (k, v),
                };
                // Several new queries over a cache holding earlier positions: SDPA's
                // `is_causal` aligns its mask top-left (query i sees keys 0..=i), so
                // the mask is made here, aligned bottom-right (query i sees the
                // cached keys and the new ones up to its own: 0..=S−T+i).
                let mask = match mask {
                    Some(m) => Some(m.shallow_clone()),
                    None if t > 1 && s_all > t => {
                        memo.mask((0, -1), || Some(band_mask(start, t, (0..s_all).collect(), None, device)))
                    }
                    None => None,
                };
                (k, v, mask)
            }
            Span::Sliding(window) => {
                // The keys: what the ring holds (positions before `start`
                // still in the window) and the new ones, with their positions.
                // Slots 0..filled hold positions (all of them once the ring
                // has wrapped): empty ones are left out.
                let slots = cache.as_ref().map_or(-1, |(kv, _)| kv.0.size()[2]);
                let filled = start.min(slots).max(0);
                let (k_all, v_all) = match &cache {
                    Some((kv, _)) => (
                        Tensor::f_cat(&[&kv.0.f_narrow(2, 0, filled)?, &k], 2)?, // (B, KVH, filled + T, D)
                        Tensor::f_cat(&[&kv.1.f_narrow(2, 0, filled)?, &v], 2)?,
                    ),
                    None => (k.shallow_clone(), v.shallow_clone()),
                };
                let key_pos = || {
                    let mut held = if slots < 0 { vec![] } else { ring_positions(start, slots) };
                    held.truncate(filled as usize);
                    held.into_iter().chain(start..start + t).collect::<Vec<i64>>()
                };
                // No earlier keys and the window covers every query: plain causal.
                let plain_causal = mask.is_none() && start == 0 && t <= window;
                let m = memo.mask((window, slots), || {
                    (!plain_causal).then(|| band_mask(start, t, key_pos(), Some((window, mask)), device))
                });
                if let Some((kv, start)) = cache {
                    // Keep the last `slots` new positions: position p in slot p mod slots.
                    let keep = t.min(slots);
                    let first = start + t - keep;
                    let idx = memo.ring_idx.entry(slots).or_insert_with(|| {
                        Tensor::from_slice(&(first..start + t).map(|p| p % slots).collect::<Vec<_>>())
                            .to_device(device)
                    });
                    let _ = kv.0.f_index_copy_(2, idx, &k.f_narrow(2, t - keep, keep)?)?;
                    let _ = kv.1.f_index_copy_(2, idx, &v.f_narrow(2, t - keep, keep)?)?;
                }
                (k_all, v_all, m)
            }
        })
    }
}

/// The (B or 1, 1, T, K) bool mask of T queries at positions
/// `start..start+T` over keys at `key_pos` (−1: an empty ring slot, never
/// seen): causal, and with `Some((window, caller_mask))` also within the
/// window (`q − window < k`) and allowed by the caller's mask (B, 1, T, S)
/// over all positions, read at each key's position.
fn band_mask(
    start: i64,
    t: i64,
    key_pos: Vec<i64>,
    window: Option<(i64, Option<&Tensor>)>,
    device: Device,
) -> Tensor {
    let n = key_pos.len() as i64;
    let kp = Tensor::from_slice(&key_pos).to_device(device).view([1, n]); // (1, K)
    let qp = Tensor::arange_start(start, start + t, (Kind::Int64, device)).view([t, 1]); // (T, 1)
    let mut m = kp.le_tensor(&qp).logical_and(&kp.ge(0)); // (T, K)
    let mut m4 = None;
    if let Some((w, caller)) = window {
        m = m.logical_and(&kp.gt_tensor(&(&qp - w)));
        if let Some(c) = caller {
            let idx = kp.clamp_min(0).view([n]);
            m4 = Some(c.index_select(3, &idx).logical_and(&m.view([1, 1, t, n])));
            // (B, 1, T, K)
        }
    }
    m4.unwrap_or_else(|| m.view([1, 1, t, n]))
}

/// Attention with soft-capped scores, the way transformers' eager kernel
/// computes it (Gemma 2): `s = q·kᵀ · scale`, `s = cap · tanh(s / cap)`,
/// masked, softmax in f32 cast back, `· v`. `q` (B, NH, T, D), `k`/`v`
/// (B, NH, S, D), `mask` (B, 1, T, S) bool or None for causal (aligned
/// bottom-right).
fn softcapped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    cap: f64,
) -> Result<Tensor> {
    let (t, s) = (q.size()[2], k.size()[2]);
    let scores = q.f_matmul(&k.transpose(2, 3))? * scale; // (B, NH, T, S)
    let scores = (scores / cap).tanh() * cap;
    let allowed = match mask {
        Some(m) => m.shallow_clone(),
        None => band_mask(s - t, t, (0..s).collect(), None, q.device()),
    };
    let scores = scores.f_masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)?;
    let probs = scores.f_softmax(-1, at_least_f32(q.kind()))?.f_to_kind(q.kind())?;
    Ok(probs.f_matmul(v)?) // (B, NH, T, D)
}

#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// An MLP of hidden size `i` (`intermediate_size`, or twice that on
    /// Gemma 4's double-wide KV-sharing layers).
    pub fn new(p: nn::Path, cfg: &GemmaConfig, i: i64, init: WeightInit) -> Self {
        let h = cfg.hidden_size;
        let w = init.normal(cfg.initializer_range);
        Mlp {
            gate_proj: Linear::with_init(&p / "gate_proj", h, i, w),
            up_proj: Linear::with_init(&p / "up_proj", h, i, w),
            down_proj: Linear::with_init(&p / "down_proj", i, h, w),
        }
    }

    fn share(&self) -> Mlp {
        Mlp {
            gate_proj: self.gate_proj.share(),
            up_proj: self.up_proj.share(),
            down_proj: self.down_proj.share(),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let gate = self.gate_proj.forward(x).gelu("tanh");
        self.down_proj.forward(&(gate * self.up_proj.forward(x)))
    }
}

impl Mlp {
    /// `forward`, with the weights of [`InferenceWeights`] if given.
    fn forward_with(&self, x: &Tensor, wt: Option<&LayerWeights>) -> Result<Tensor> {
        let Some(w) = wt else { return Ok(self.forward(x)) };
        let i = w.down.size()[0];
        let gu = x.f_matmul(&w.gate_up)?; // (B, T, 2I)
        let gate = gu.f_narrow(-1, 0, i)?.gelu("tanh"); // (B, T, I)
        Ok((gate * gu.f_narrow(-1, i, i)?).f_matmul(&w.down)?)
    }
}

#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    /// Gemma 1: the MLP's input norm. Gemma 2+: the attention output's norm.
    pub post_attention_layernorm: RmsNorm,
    /// Gemma 2+: the MLP's input norm.
    pub pre_feedforward_layernorm: Option<RmsNorm>,
    /// Gemma 2+: the MLP output's norm.
    pub post_feedforward_layernorm: Option<RmsNorm>,
    pub mlp: Mlp,
    /// Gemma 4 with per-layer inputs: `h + post_per_layer_input_norm(
    /// per_layer_projection(gelu(per_layer_input_gate(h)) · input))` after the MLP.
    pub per_layer_input_gate: Option<Linear>,
    pub per_layer_projection: Option<Linear>,
    pub post_per_layer_input_norm: Option<RmsNorm>,
    /// Gemma 4: the factor (1,) on the layer's output (a buffer transformers
    /// saves in checkpoints; not trained).
    pub layer_scalar: Option<Tensor>,
}

impl DecoderLayer {
    pub fn new(
        p: nn::Path,
        cfg: &GemmaConfig,
        spec: &LayerSpec,
        (index, rope_id): (usize, usize),
        init: WeightInit,
    ) -> Self {
        let h = cfg.hidden_size;
        let norm = |name: &str| RmsNorm::with_style(&p / name, h, cfg.rms_norm_eps, spec.norm);
        let per_layer = spec.gemma4.and_then(|g| g.per_layer_input);
        let w = init.normal(cfg.initializer_range);
        DecoderLayer {
            input_layernorm: norm("input_layernorm"),
            self_attn: Attention::new(&p / "self_attn", cfg, spec, (index, rope_id), init),
            post_attention_layernorm: norm("post_attention_layernorm"),
            pre_feedforward_layernorm: spec.sandwich_norms.then(|| norm("pre_feedforward_layernorm")),
            post_feedforward_layernorm: spec.sandwich_norms.then(|| norm("post_feedforward_layernorm")),
            mlp: Mlp::new(&p / "mlp", cfg, spec.intermediate_size, init),
            per_layer_input_gate: per_layer.map(|d| Linear::with_init(&p / "per_layer_input_gate", h, d, w)),
            per_layer_projection: per_layer.map(|d| Linear::with_init(&p / "per_layer_projection", d, h, w)),
            post_per_layer_input_norm: per_layer.map(|_| norm("post_per_layer_input_norm")),
            layer_scalar: spec
                .gemma4
                .map(|_| p.add("layer_scalar", Tensor::ones([1], (p.kind(), p.device())), false)),
        }
    }

    /// The same base weights (shallow clones), no adapters.
    fn share(&self) -> DecoderLayer {
        DecoderLayer {
            input_layernorm: self.input_layernorm.share(),
            self_attn: self.self_attn.share(),
            post_attention_layernorm: self.post_attention_layernorm.share(),
            pre_feedforward_layernorm: self.pre_feedforward_layernorm.as_ref().map(RmsNorm::share),
            post_feedforward_layernorm: self.post_feedforward_layernorm.as_ref().map(RmsNorm::share),
            mlp: self.mlp.share(),
            per_layer_input_gate: self.per_layer_input_gate.as_ref().map(Linear::share),
            per_layer_projection: self.per_layer_projection.as_ref().map(Linear::share),
            post_per_layer_input_norm: self.post_per_layer_input_norm.as_ref().map(RmsNorm::share),
            layer_scalar: self.layer_scalar.as_ref().map(Tensor::shallow_clone),
        }
    }

    /// One decoder layer: `x` (B, T, H) → (B, T, H). `per_layer_input`
    /// (B, T, P): this layer's slice of [`Gemma::per_layer_inputs`] (Gemma 4
    /// with per-layer inputs, else None); `pass` the RoPE tables, the mask
    /// and the shared keys/values of this forward pass; `cache` and `wt` as
    /// in [`Gemma::forward_hidden_with`] (the cache entry of this layer and
    /// the position its new keys start at).
    pub fn forward(
        &self,
        x: &Tensor,
        per_layer_input: Option<&Tensor>,
        pass: &mut Pass<'_>,
        cache: Option<(&mut (Tensor, Tensor), i64)>,
        wt: Option<&LayerWeights>,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward_scaled(x, wt.and_then(|w| w.input_norm.as_ref()));
        let h = self.self_attn.forward(&h, pass, cache, wt)?;
        let post_norm = wt.and_then(|w| w.post_norm.as_ref());
        let x = match (&self.pre_feedforward_layernorm, &self.post_feedforward_layernorm) {
            (Some(pre), Some(post)) => {
                let h = self.post_attention_layernorm.forward_scaled(&h, post_norm);
                let x = x.f_add(&h)?; // residual (not in place: autograd keeps x)
                let h = pre.forward_scaled(&x, wt.and_then(|w| w.pre_ff_norm.as_ref()));
                let h = self.mlp.forward_with(&h, wt)?;
                let h = post.forward_scaled(&h, wt.and_then(|w| w.post_ff_norm.as_ref()));
                x.f_add(&h)? // residual
            }
            _ => {
                let x = x.f_add(&h)?; // residual (not in place: autograd keeps x)
                let h = self.post_attention_layernorm.forward_scaled(&x, post_norm);
                let h = self.mlp.forward_with(&h, wt)?;
                x.f_add(&h)? // residual
            }
        };
        let x =
            match (&self.per_layer_input_gate, &self.per_layer_projection, &self.post_per_layer_input_norm) {
                (Some(gate), Some(proj), Some(norm)) => {
                    let input = per_layer_input.context("this layer needs its per-layer input")?;
                    let h = gate.forward(&x).gelu("tanh").f_mul(input)?; // (B, T, P)
                    let h = norm.forward(&proj.forward(&h)); // (B, T, H)
                    x.f_add(&h)? // residual
                }
                _ => x,
            };
        Ok(match &self.layer_scalar {
            Some(s) => x.f_mul(s)?,
            None => x,
        })
    }

    /// The layer's tensors besides its norms ([`DecoderLayer::norms`]) and
    /// the linear modules LoRA may adapt ([`Gemma::linears`], Gemma 4's
    /// per-layer-input projections included), with their names under the
    /// layer: Gemma 4's `layer_scalar`.
    pub fn other_tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = vec![];
        if let Some(t) = &self.layer_scalar {
            out.push(("layer_scalar", t));
        }
        out
    }

    /// The layer's norms with their names under the layer
    /// (`input_layernorm`, …, `self_attn.q_norm`), in checkpoint order.
    pub fn norms(&self) -> Vec<(&'static str, &RmsNorm)> {
        let mut out = vec![("input_layernorm", &self.input_layernorm)];
        out.push(("post_attention_layernorm", &self.post_attention_layernorm));
        if let Some(n) = &self.pre_feedforward_layernorm {
            out.push(("pre_feedforward_layernorm", n));
        }
        if let Some(n) = &self.post_feedforward_layernorm {
            out.push(("post_feedforward_layernorm", n));
        }
        if let Some(n) = &self.self_attn.q_norm {
            out.push(("self_attn.q_norm", n));
        }
        if let Some(n) = &self.self_attn.k_norm {
            out.push(("self_attn.k_norm", n));
        }
        if let Some(n) = &self.post_per_layer_input_norm {
            out.push(("post_per_layer_input_norm", n));
        }
        out
    }
}

/// The backbone (`model.*` in checkpoints).
#[derive(Debug)]
pub struct GemmaModel {
    pub embed_tokens: Tensor, // (V, H), `model.embed_tokens.weight`
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// Gemma 4's per-layer inputs ([`Gemma::per_layer_inputs`]): (V', L·P)
    /// `model.embed_tokens_per_layer.weight`, …
    pub embed_tokens_per_layer: Option<Tensor>,
    pub per_layer_model_projection: Option<Linear>,
    pub per_layer_projection_norm: Option<RmsNorm>,
}

/// `GemmaForCausalLM`: the backbone and a head tied to the embeddings.
pub struct Gemma {
    pub model: GemmaModel,
    /// Present only when `tie_word_embeddings` is false.
    pub lm_head: Option<Linear>,
    pub cfg: GemmaConfig,
    /// One per distinct RoPE of the layers; each layer knows its index.
    ropes: Vec<Rope>,
    device: Device,
    family: Family,
}

impl Gemma {
    /// Builds the model under `p` (the root of a `VarStore`), randomly
    /// initialised as transformers does (normal(0, initializer_range), norms 0).
    pub fn new(p: &nn::Path, cfg: &GemmaConfig) -> Result<Self> {
        Self::with_init(p, cfg, WeightInit::Random)
    }

    /// Builds the model under `p` with its weights filled as `init` says, in
    /// the `VarStore`'s kind (`vs.set_kind` on the empty store first makes
    /// the variables bf16 from the start).
    pub fn with_init(p: &nn::Path, cfg: &GemmaConfig, init: WeightInit) -> Result<Self> {
        cfg.validate()?;
        let m = p / "model";
        let embed_tokens = (&m / "embed_tokens").var(
            "weight",
            &[cfg.vocab_size, cfg.hidden_size],
            init.normal(cfg.initializer_range),
        );
        if let Some(pad) = cfg.pad_token_id.filter(|&id| id >= 0 && id < cfg.vocab_size) {
            tch::no_grad(|| {
                let _ = embed_tokens.get(pad).zero_();
            });
        }
        let family = cfg.family()?;
        let specs = crate::family::layer_specs(cfg, family)?;
        // Gemma 4's per-layer inputs.
        let per_layer = crate::family::gemma4::per_layer_embedding(cfg)?;
        let embed_tokens_per_layer = per_layer.map(|(vocab, d)| {
            let e = (&m / "embed_tokens_per_layer").var(
                "weight",
                &[vocab, cfg.num_hidden_layers * d],
                init.normal(cfg.initializer_range),
            );
            if let Some(pad) = cfg.pad_token_id.filter(|&id| id >= 0 && id < vocab) {
                tch::no_grad(|| {
                    let _ = e.get(pad).zero_();
                });
            }
            e
        });
        let per_layer_model_projection = per_layer.map(|(_, d)| {
            let w = init.normal(cfg.initializer_range);
            Linear::with_init(
                &m / "per_layer_model_projection",
                cfg.hidden_size,
                cfg.num_hidden_layers * d,
                w,
            )
        });
        let per_layer_projection_norm = per_layer.map(|(_, d)| {
            RmsNorm::with_style(&m / "per_layer_projection_norm", d, cfg.rms_norm_eps, NormStyle::Plain)
        });
        // The distinct RoPEs, and each layer's index among them.
        let mut rope_specs: Vec<RopeSpec> = Vec::new();
        let mut layers = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let id = match rope_specs.iter().position(|r| *r == spec.rope) {
                Some(id) => id,
                None => {
                    rope_specs.push(spec.rope);
                    rope_specs.len() - 1
                }
            };
            layers.push(DecoderLayer::new(&m / "layers" / i, cfg, spec, (i, id), init));
        }
        let style = specs.first().map_or(NormStyle::OnePlus, |s| s.norm);
        let norm = RmsNorm::with_style(&m / "norm", cfg.hidden_size, cfg.rms_norm_eps, style);
        let lm_head = (!cfg.tie_word_embeddings).then(|| {
            Linear::with_init(
                p / "lm_head",
                cfg.hidden_size,
                cfg.vocab_size,
                init.normal(cfg.initializer_range),
            )
        });
        Ok(Gemma {
            model: GemmaModel {
                embed_tokens,
                layers,
                norm,
                embed_tokens_per_layer,
                per_layer_model_projection,
                per_layer_projection_norm,
            },
            lm_head,
            cfg: cfg.clone(),
            ropes: rope_specs.iter().map(|r| Rope::new(r, p.device())).collect(),
            device: p.device(),
            family,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The activation dtype (that of the embedding matrix).
    pub fn kind(&self) -> Kind {
        self.model.embed_tokens.kind()
    }

    /// Final hidden states (B, T, H) after the last norm.
    ///
    /// `input_ids` (B, T) int64; `positions` (B, T) int64; `mask` (B, 1, T, S)
    /// bool (true = may attend) or None for causal attention (over the
    /// cached positions and `input_ids`); `cache` receives the new keys/values at positions
    /// `cache.len .. cache.len + T` and `cache.len` advances.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.forward_hidden_with(input_ids, positions, mask, cache, None)
    }

    /// [`Gemma::forward_hidden`] computing the projections with the
    /// transposed weights of [`InferenceWeights`] when given (inference only:
    /// no gradient reaches the weights through them).
    pub fn forward_hidden_with(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        wt: Option<&InferenceWeights>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.size2()?;
        ensure!(
            positions.size() == [b, t],
            "positions must be (B, T) = ({b}, {t}), got {:?}",
            positions.size()
        );
        let start = cache.as_ref().map_or(0, |c| c.len);
        if let Some(c) = cache.as_ref() {
            ensure!(start + t <= c.capacity, "KV cache full: {} + {t} > capacity {}", start, c.capacity);
        }
        let mut x = self.embed(input_ids)?; // (B, T, H)
        let per_layer = self.per_layer_inputs(input_ids, &x)?; // (B, T, L, P)
        let rope = self.rope_tables(positions);
        let mut pass = Pass::new(&rope, mask);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let lw = wt.and_then(|w| w.layers.get(i));
            let kv = cache.as_mut().map(|c| (&mut c.layers[i], start));
            let input = per_layer.as_ref().map(|p| p.select(2, i as i64));
            x = layer.forward(&x, input.as_ref(), &mut pass, kv, lw).with_context(|| format!("layer {i}"))?;
        }
        if let Some(c) = cache {
            c.len = start + t;
        }
        Ok(self.model.norm.forward_scaled(&x, wt.and_then(|w| w.final_norm.as_ref())))
    }

    /// The scaled embeddings (B, T, H) of `input_ids` (B, T): the first
    /// decoder layer's input.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let x = Tensor::f_embedding(&self.model.embed_tokens, input_ids, -1, false, false)?; // (B, T, H)
        Ok(x * self.embed_scale(self.cfg.hidden_size))
    }

    /// `sqrt(dim)` in the activation dtype: rounded from f64 directly as
    /// Gemma 1–3 compute it, through an f32 buffer as Gemma 4's
    /// `Gemma4TextScaledWordEmbedding` does (the same in f32).
    fn embed_scale(&self, dim: i64) -> Tensor {
        let scale = Tensor::from((dim as f64).sqrt());
        let scale = if self.family == Family::Gemma4 { scale.to_kind(Kind::Float) } else { scale };
        scale.to_kind(self.kind()).to_device(self.device)
    }

    /// Gemma 4's per-layer inputs (B, T, L, P) of `input_ids` (B, T) whose
    /// scaled embeddings are `embeds` (B, T, H), as `get_per_layer_inputs`
    /// and `project_per_layer_inputs` compute them:
    /// `(norm(per_layer_model_projection(embeds) · H^-1/2) + embed_tokens_per_layer[ids] · √P) · 2^-1/2`,
    /// the norm per layer over P. None for a model without them.
    pub fn per_layer_inputs(&self, input_ids: &Tensor, embeds: &Tensor) -> Result<Option<Tensor>> {
        let m = &self.model;
        let (Some(table), Some(proj), Some(norm)) =
            (&m.embed_tokens_per_layer, &m.per_layer_model_projection, &m.per_layer_projection_norm)
        else {
            return Ok(None);
        };
        let (b, t) = input_ids.size2()?;
        let l = self.cfg.num_hidden_layers;
        let p = table.size()[1] / l.max(1);
        let rows = table.size()[0];
        if input_ids.numel() > 0 {
            let (lo, hi) = (input_ids.f_min()?.int64_value(&[]), input_ids.f_max()?.int64_value(&[]));
            ensure!(
                lo >= 0 && hi < rows,
                "token ids {lo}..={hi} are outside embed_tokens_per_layer's {rows} rows (vocab_size_per_layer_input)"
            );
        }
        let tokens = Tensor::f_embedding(table, input_ids, -1, false, false)? * self.embed_scale(p); // (B, T, L·P)
        let tokens = tokens.f_reshape([b, t, l, p])?;
        let context = proj.forward(embeds) * (self.cfg.hidden_size as f64).powf(-0.5); // (B, T, L·P)
        let context = norm.forward(&context.f_reshape([b, t, l, p])?);
        Ok(Some((context + tokens) * 2f64.powf(-0.5)))
    }

    /// RoPE tables (cos, signed sin) for `positions` (B, T), each
    /// (B, 1, T, D) in the activation dtype, one pair per distinct RoPE.
    pub fn rope_tables(&self, positions: &Tensor) -> RopeTables {
        RopeTables(self.ropes.iter().map(|r| r.tables(positions, self.kind())).collect())
    }

    /// The final norm, applied to the last decoder layer's output.
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        self.model.norm.forward(x)
    }

    /// Logits (…, V) from final hidden states (…, H), soft-capped
    /// (`cap · tanh(logits / cap)`) when `final_logit_softcapping` is set.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.matmul(&self.model.embed_tokens.tr()),
        };
        self.softcap_logits(logits)
    }

    /// [`Gemma::logits`] with the transposed head of [`InferenceWeights`] if given.
    pub fn logits_with(&self, hidden: &Tensor, wt: Option<&InferenceWeights>) -> Tensor {
        match wt {
            Some(w) => self.softcap_logits(hidden.matmul(&w.head)),
            None => self.logits(hidden),
        }
    }

    fn softcap_logits(&self, logits: Tensor) -> Tensor {
        match self.cfg.final_logit_softcapping {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// Logits (B, T, V) for a batch without padding (causal attention).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.size2().map_err(|_| {
            anyhow::anyhow!("input ids must be (batch, time), got shape {:?}", input_ids.size())
        })?;
        let positions = Tensor::arange(t, (Kind::Int64, self.device)).unsqueeze(0).expand([b, t], true);
        let hidden = self.forward_hidden(input_ids, &positions, None, None)?;
        Ok(self.logits(&hidden))
    }
}

/// LoRA's view of the model: its projections by name, and a second model
/// over the same base weights (the adapters themselves are in [`crate::lora`]).
impl Gemma {
    /// Every linear module LoRA may adapt (PEFT's `"all-linear"`: all but
    /// the head) with its checkpoint name without `.weight`
    /// (`model.layers.{i}.self_attn.q_proj`, …), in layer order and, within
    /// a layer, in [`crate::lora::ALL_LINEAR_MODULES`] order; Gemma 4's
    /// `model.per_layer_model_projection` last.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::with_capacity(self.model.layers.len() * 9 + 1);
        for (i, l) in self.model.layers.iter().enumerate() {
            let (a, m) = (&l.self_attn, &l.mlp);
            // Gemma 4: no k_proj / v_proj on KV-sharing layers, no v_proj with k = v.
            let attn = [
                ("q_proj", Some(&a.q_proj)),
                ("k_proj", a.k_proj.as_ref()),
                ("v_proj", a.v_proj.as_ref()),
                ("o_proj", Some(&a.o_proj)),
            ];
            let attn = attn.into_iter().filter_map(|(n, p)| Some((n, p?)));
            let mlp = [("gate_proj", &m.gate_proj), ("up_proj", &m.up_proj), ("down_proj", &m.down_proj)];
            out.extend(attn.map(|(n, p)| (format!("model.layers.{i}.self_attn.{n}"), p)));
            out.extend(mlp.into_iter().map(|(n, p)| (format!("model.layers.{i}.mlp.{n}"), p)));
            // Gemma 4's per-layer-input projections.
            let ple = [
                ("per_layer_input_gate", &l.per_layer_input_gate),
                ("per_layer_projection", &l.per_layer_projection),
            ];
            out.extend(
                ple.into_iter().filter_map(|(n, p)| Some((format!("model.layers.{i}.{n}"), p.as_ref()?))),
            );
        }
        if let Some(p) = &self.model.per_layer_model_projection {
            out.push(("model.per_layer_model_projection".to_string(), p));
        }
        out
    }

    /// [`Gemma::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(self.model.layers.len() * 9 + 1);
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            let attn = [
                ("q_proj", Some(&mut a.q_proj)),
                ("k_proj", a.k_proj.as_mut()),
                ("v_proj", a.v_proj.as_mut()),
                ("o_proj", Some(&mut a.o_proj)),
            ];
            let attn = attn.into_iter().filter_map(|(n, p)| Some((n, p?)));
            let mlp = [
                ("gate_proj", &mut m.gate_proj),
                ("up_proj", &mut m.up_proj),
                ("down_proj", &mut m.down_proj),
            ];
            out.extend(attn.map(|(n, p)| (format!("model.layers.{i}.self_attn.{n}"), p)));
            out.extend(mlp.into_iter().map(|(n, p)| (format!("model.layers.{i}.mlp.{n}"), p)));
            let ple = [
                ("per_layer_input_gate", &mut l.per_layer_input_gate),
                ("per_layer_projection", &mut l.per_layer_projection),
            ];
            out.extend(
                ple.into_iter().filter_map(|(n, p)| Some((format!("model.layers.{i}.{n}"), p.as_mut()?))),
            );
        }
        if let Some(p) = &mut self.model.per_layer_model_projection {
            out.push(("model.per_layer_model_projection".to_string(), p));
        }
        out
    }

    /// Whether some projection has an enabled LoRA adapter.
    pub fn has_active_adapters(&self) -> bool {
        self.linears().iter().any(|(_, l)| l.active_lora().is_some())
    }

    /// A second model over the SAME base tensors (shallow clones: one
    /// storage, equal data pointers; the same `requires_grad`), without
    /// adapters: a policy and a reward model each attach their own adapters
    /// over one copy of the base weights.
    pub fn share_base(&self) -> Gemma {
        let m = &self.model;
        Gemma {
            model: GemmaModel {
                embed_tokens: m.embed_tokens.shallow_clone(),
                layers: m.layers.iter().map(DecoderLayer::share).collect(),
                norm: m.norm.share(),
                embed_tokens_per_layer: m.embed_tokens_per_layer.as_ref().map(Tensor::shallow_clone),
                per_layer_model_projection: m.per_layer_model_projection.as_ref().map(Linear::share),
                per_layer_projection_norm: m.per_layer_projection_norm.as_ref().map(RmsNorm::share),
            },
            lm_head: self.lm_head.as_ref().map(Linear::share),
            cfg: self.cfg.clone(),
            ropes: self.ropes.iter().map(|r| Rope { inv_freq: r.inv_freq.shallow_clone() }).collect(),
            device: self.device,
            family: self.family,
        }
    }

    /// The model's tensors besides the embeddings, the norms
    /// ([`DecoderLayer::norms`], `model.norm`), the linear modules LoRA may
    /// adapt ([`Gemma::linears`], Gemma 4's per-layer-input projections
    /// included) and the head, by checkpoint name: Gemma 4's
    /// `embed_tokens_per_layer`, `per_layer_projection_norm` and
    /// `layer_scalar`s. Shallow clones.
    pub fn other_tensors(&self) -> Vec<(String, Tensor)> {
        let m = &self.model;
        let mut out = vec![];
        if let Some(t) = &m.embed_tokens_per_layer {
            out.push(("model.embed_tokens_per_layer.weight".to_string(), t.shallow_clone()));
        }
        if let Some(n) = &m.per_layer_projection_norm {
            out.push(("model.per_layer_projection_norm.weight".to_string(), n.weight.shallow_clone()));
        }
        for (i, l) in m.layers.iter().enumerate() {
            for (n, t) in l.other_tensors() {
                out.push((format!("model.layers.{i}.{n}"), t.shallow_clone()));
            }
        }
        out
    }
}

/// The attention mask for a left-padded batch: `valid` (B, S) bool marks real
/// tokens among all S key positions; the T queries sit at the last T key
/// positions. Returns (B, 1, T, S) bool: causal, real keys only, and each
/// query may always see itself (so a padding query's softmax is defined).
pub fn padded_causal_mask(valid: &Tensor, t: i64) -> Result<Tensor> {
    let (b, s) = valid.size2()?;
    let dev = valid.device();
    let q_pos = Tensor::arange_start(s - t, s, (Kind::Int64, dev)).view([t, 1]); // (T, 1)
    let k_pos = Tensor::arange(s, (Kind::Int64, dev)).view([1, s]); // (1, S)
    let causal = k_pos.le_tensor(&q_pos); // (T, S)
    let diag = k_pos.eq_tensor(&q_pos); // (T, S)
    let keys = valid.to_kind(Kind::Bool).view([b, 1, 1, s]); // (B, 1, 1, S)
    let m = causal.view([1, 1, t, s]).logical_and(&keys).logical_or(&diag.view([1, 1, t, s])); // (B, 1, T, S)
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The roll form of RoPE gives transformers' `x·cos + rotate_half(x)·sin`
    /// bit for bit, in f32 and bf16.
    #[test]
    fn rope_roll_form_equals_rotate_half_bit_for_bit() {
        let cfg = GemmaConfig::preset("test-mqa").unwrap();
        let spec = crate::family::layer_specs(&cfg, cfg.family().unwrap()).unwrap()[0].rope;
        let rope = Rope::new(&spec, Device::Cpu);
        let d = cfg.head_dim();
        let positions = Tensor::from_slice(&[0i64, 1, 7, 300, 0, 0, 5, 1999]).view([2, 4]);
        for kind in [Kind::Float, Kind::BFloat16] {
            let x = Tensor::randn([2, 3, 4, d], (Kind::Float, Device::Cpu)).to_kind(kind); // (B, NH, T, D)
            let (cos, sin_signed) = rope.tables(&positions, kind);
            // transformers' tables and rotate_half, spelled out.
            let pos = positions.to_kind(Kind::Float).unsqueeze(-1);
            let freqs = pos * rope.inv_freq.view([1, 1, -1]);
            let emb = Tensor::cat(&[&freqs, &freqs], -1);
            let sin = emb.sin().to_kind(kind).unsqueeze(1);
            let (x1, x2) = (x.narrow(-1, 0, d / 2), x.narrow(-1, d / 2, d / 2));
            let want = &x * &cos + Tensor::cat(&[&x2.neg(), &x1], -1) * &sin;
            assert!(apply_rope(&x, &cos, &sin_signed).equal(&want), "{kind:?}");
        }
    }

    /// The inference layout (joined, transposed weights; fused norms;
    /// grouped decoding attention) computes what the training layout does,
    /// for MHA, GQA and MQA, with and without padding, prefill and decode.
    #[test]
    fn inference_layout_matches_the_training_forward() {
        for kv in [4, 2, 1] {
            let mut cfg = GemmaConfig::preset("test-mqa").unwrap();
            cfg.num_key_value_heads = Some(kv);
            let vs = nn::VarStore::new(Device::Cpu);
            let model = Gemma::new(&vs.root(), &cfg).unwrap();
            tch::no_grad(|| {
                for mut p in vs.trainable_variables() {
                    // Norm weights start at zero: give them values too.
                    let _ = p.g_add_(&(Tensor::randn_like(&p) * 0.1));
                }
            });
            let wt = InferenceWeights::for_model(&model).unwrap();
            let (b, t) = (2, 5);
            let ids = Tensor::from_slice(&[0i64, 0, 7, 8, 9, 3, 4, 5, 6, 11]).view([b, t]);
            let valid = ids.ne(0); // row 0 is left-padded by two
            let positions = (valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1).clamp_min(0);
            let mask = padded_causal_mask(&valid, t).unwrap();
            let mut c1 = KvCache::new(&cfg, b, t + 1, Kind::Float, Device::Cpu).unwrap();
            let mut c2 = KvCache::new(&cfg, b, t + 1, Kind::Float, Device::Cpu).unwrap();
            let _g = tch::no_grad_guard();
            let a = model.forward_hidden(&ids, &positions, Some(&mask), Some(&mut c1)).unwrap();
            let bb =
                model.forward_hidden_with(&ids, &positions, Some(&mask), Some(&mut c2), Some(&wt)).unwrap();
            let diff = (model.logits(&a) - model.logits_with(&bb, Some(&wt))).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "kv heads {kv}: prefill logits differ by {diff}");
            // One decoding step over the cache.
            let x = Tensor::from_slice(&[12i64, 13]).view([b, 1]);
            let pos = positions.narrow(1, t - 1, 1) + 1;
            let step_mask = Tensor::cat(&[valid, Tensor::ones([b, 1], (Kind::Bool, Device::Cpu))], 1).view([
                b,
                1,
                1,
                t + 1,
            ]);
            let a = model.forward_hidden(&x, &pos, Some(&step_mask), Some(&mut c1)).unwrap();
            let bb = model.forward_hidden_with(&x, &pos, Some(&step_mask), Some(&mut c2), Some(&wt)).unwrap();
            let diff = (model.logits(&a) - model.logits_with(&bb, Some(&wt))).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "kv heads {kv}: decoding logits differ by {diff}");
        }
    }

    #[test]
    fn badly_shaped_inputs_are_errors_not_panics() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Gemma::new(&vs.root(), &GemmaConfig::preset("test-mqa").unwrap()).unwrap();
        let ids = Tensor::from_slice(&[5i64, 6, 7, 8, 9, 10]).view([2, 3]);
        let positions = Tensor::arange(3, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([2, 3], true);
        let h = model.forward_hidden(&ids, &positions, None, None).unwrap();
        assert_eq!(h.size(), [2, 3, 64]);

        let attn = &model.model.layers[0].self_attn;
        let rope = model.rope_tables(&positions);
        let flat = Tensor::zeros([6, 64], (Kind::Float, Device::Cpu));
        let e = attn.forward(&flat, &mut Pass::new(&rope, None), None, None).unwrap_err().to_string();
        assert!(e.contains("attention input must be (batch, time, hidden), got shape [6, 64]"), "{e}");
        let narrow = Tensor::zeros([2, 3, 48], (Kind::Float, Device::Cpu));
        let e = attn.forward(&narrow, &mut Pass::new(&rope, None), None, None).unwrap_err().to_string();
        assert!(e.contains("hidden size 48, the layer expects 64"), "{e}");

        let bad_mask = Tensor::ones([2, 3, 3], (Kind::Bool, Device::Cpu));
        let e = format!("{:#}", model.forward_hidden(&ids, &positions, Some(&bad_mask), None).unwrap_err());
        assert!(e.contains("layer 0") && e.contains("attention mask must be (B, 1, T, S)"), "{e}");
        let e = model.forward(&Tensor::from_slice(&[1i64, 2, 3])).unwrap_err().to_string();
        assert!(e.contains("input ids must be (batch, time), got shape [3]"), "{e}");
    }
}
