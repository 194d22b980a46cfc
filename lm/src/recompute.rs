//! One forward and backward pass through the decoder, with or without
//! activation checkpointing: [`Gemma::forward_backward`].
//!
//! Activation checkpointing (Chen et al. 2016, "Training Deep Nets with
//! Sublinear Memory Cost"; `gradient_checkpointing` in transformers) keeps
//! only each decoder layer's input during the forward pass and recomputes the
//! layer during the backward pass: the activations alive at once are one
//! layer's, plus one (B, T, H) tensor per layer, instead of every layer's.
//!
//! tch has no custom autograd `Function`, so the backward pass is driven
//! explicitly: the layers run forward under `no_grad`, keeping their inputs;
//! then, from the last layer down, each layer is recomputed with gradients
//! from its saved input (detached, requiring grad) and the incoming gradient
//! `g` is backpropagated into it through `(out ⊙ g).sum().backward()` (the
//! gradient of `sum(out ⊙ g)` with respect to `out` is exactly `g`). The
//! input's gradient is the next layer's `g`; parameter gradients accumulate
//! as in any `backward()`. The head (loss) sees the final hidden states as a
//! detached leaf, so a caller may compute its loss over chunks of positions
//! ([`crate::chunked`]) with one backward each.
//!
//! Two things cross layers besides the hidden states, both Gemma 4's: the
//! per-layer inputs (computed once from the embeddings, one slice per
//! layer) and the keys and values a storing layer leaves for the layers
//! that reuse them. While recomputing, each layer reads them as leaves that
//! require grad; their gradients are gathered and pushed, with the
//! incoming `g`, into the layer that made them (the storing layer's keys
//! and values when it is recomputed; the per-layer inputs with the
//! embeddings at the end).
//!
//! LoRA dropout (the only randomness in the forward pass) must draw the same
//! masks when a layer is recomputed; torch's generator state cannot be saved
//! through tch, so while some adapter applies dropout the generator is
//! reseeded before each layer, with a seed drawn once per call from it (the
//! same in both modes, so checkpointing changes nothing).

use crate::model::{Gemma, Pass, SharedEntry};
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

impl Gemma {
    /// Runs the model on `ids` (B, T) at `positions` (B, T) with `mask`
    /// (B, 1, T, T) bool or None (causal), hands the final hidden states
    /// (B, T, H) (after the final norm) to `head` as a detached leaf that
    /// requires grad, and backpropagates the gradient `head` leaves on it
    /// through the model: every parameter's `.grad()` accumulates what
    /// `loss.backward()` through the whole model would give.
    ///
    /// `head` computes its loss and calls `backward()` itself (once or once
    /// per chunk); when it leaves no gradient on the leaf, nothing more is
    /// done. Frozen parameters (`requires_grad` false) get no gradient. With
    /// `checkpointing` the layers are recomputed in the backward pass (see
    /// the module doc). Runs with gradients enabled even under a caller's
    /// `no_grad`.
    pub fn forward_backward<R>(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        checkpointing: bool,
        head: impl FnOnce(&Tensor) -> Result<R>,
    ) -> Result<R> {
        let (b, t) = ids
            .size2()
            .map_err(|_| anyhow::anyhow!("input ids must be (batch, time), got shape {:?}", ids.size()))?;
        ensure!(
            positions.size() == [b, t],
            "positions must be (B, T) = ({b}, {t}), got {:?}",
            positions.size()
        );
        tch::with_grad(|| {
            if checkpointing {
                self.forward_backward_checkpointed(ids, positions, mask, head)
            } else {
                self.forward_backward_plain(ids, positions, mask, head)
            }
        })
    }

    fn forward_backward_plain<R>(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        head: impl FnOnce(&Tensor) -> Result<R>,
    ) -> Result<R> {
        let seed = self.dropout_seed()?;
        let rope = tch::no_grad(|| self.rope_tables(positions));
        let mut x = self.embed(ids)?; // (B, T, H)
        reseed(seed, self.model.layers.len()); // an adapter on per_layer_model_projection
        let per_layer = self.per_layer_inputs(ids, &x)?; // (B, T, L, P)
        let mut pass = Pass::new(&rope, mask);
        for (i, layer) in self.model.layers.iter().enumerate() {
            reseed(seed, i);
            let input = per_layer.as_ref().map(|p| p.select(2, i as i64));
            x = layer
                .forward(&x, input.as_ref(), &mut pass, None, None)
                .with_context(|| format!("layer {i}"))?;
        }
        drop((pass, per_layer));
        let h = self.final_norm(&x); // (B, T, H)
        drop(x);
        let leaf = h.detach().set_requires_grad(true);
        let out = head(&leaf)?;
        let g = leaf.grad();
        if g.defined() && h.requires_grad() {
            push_gradient(&h, &g)?;
        }
        Ok(out)
    }

    fn forward_backward_checkpointed<R>(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        head: impl FnOnce(&Tensor) -> Result<R>,
    ) -> Result<R> {
        let seed = self.dropout_seed()?;
        let rope = tch::no_grad(|| self.rope_tables(positions));
        let layers = &self.model.layers;
        // Forward without a graph, keeping each layer's input (and the
        // per-layer inputs and shared keys/values, Gemma 4).
        let mut inputs = Vec::with_capacity(layers.len());
        let (mut x, per_layer) = tch::no_grad(|| -> Result<_> {
            let e = self.embed(ids)?; // (B, T, H)
            reseed(seed, layers.len()); // an adapter on per_layer_model_projection
            let p = self.per_layer_inputs(ids, &e)?; // (B, T, L, P)
            Ok((e, p))
        })?;
        let mut pass = Pass::new(&rope, mask);
        for (i, layer) in layers.iter().enumerate() {
            reseed(seed, i);
            let input = per_layer.as_ref().map(|p| p.select(2, i as i64));
            let y = tch::no_grad(|| layer.forward(&x, input.as_ref(), &mut pass, None, None))
                .with_context(|| format!("layer {i}"))?;
            inputs.push(std::mem::replace(&mut x, y));
        }
        let stored = std::mem::take(&mut pass.shared.0);
        drop(pass);
        // The final norm with a graph, from the last layer's output.
        let last = x.detach().set_requires_grad(true);
        drop(x);
        let h = self.final_norm(&last);
        let leaf = h.detach().set_requires_grad(true);
        let out = head(&leaf)?;
        let g = leaf.grad();
        if !g.defined() {
            return Ok(out);
        }
        drop(leaf);
        push_gradient(&h, &g)?;
        drop(h);
        let mut g = last.grad();
        drop(last);
        // The layers, last first: recompute with a graph, backpropagate g
        // (and the gradients later layers left on the keys and values this
        // one stored).
        let mut kv_grads: BTreeMap<usize, (Tensor, Tensor)> = BTreeMap::new();
        let mut per_layer_grads: Vec<Option<Tensor>> = (0..layers.len()).map(|_| None).collect();
        for (i, layer) in layers.iter().enumerate().rev() {
            let saved = inputs.pop().context("a layer input was not kept")?;
            let xi = saved.detach().set_requires_grad(true);
            drop(saved);
            reseed(seed, i);
            let input = per_layer.as_ref().map(|p| p.select(2, i as i64).detach().set_requires_grad(true));
            let mut pass = Pass::new(&rope, mask);
            // A reusing layer reads its source's keys and values as leaves.
            let leaves = match layer.self_attn.reuses() {
                Some(src) => {
                    let e =
                        stored.get(&src).with_context(|| format!("layer {i}: layer {src} stored no keys"))?;
                    let (k, v) = (e.k.detach().set_requires_grad(true), e.v.detach().set_requires_grad(true));
                    let mask = e.mask.as_ref().map(Tensor::shallow_clone);
                    pass.shared
                        .0
                        .insert(src, SharedEntry { k: k.shallow_clone(), v: v.shallow_clone(), mask });
                    Some((src, k, v))
                }
                None => None,
            };
            let y = layer
                .forward(&xi, input.as_ref(), &mut pass, None, None)
                .with_context(|| format!("layer {i}"))?;
            let mut outs = vec![(y, g)];
            if let Some((gk, gv)) = kv_grads.remove(&i) {
                let e = pass.shared.0.remove(&i).with_context(|| format!("layer {i} stored no keys"))?;
                outs.push((e.k, gk));
                outs.push((e.v, gv));
            }
            drop(pass);
            push_gradients(&outs)?;
            drop(outs);
            g = xi.grad();
            ensure!(g.defined(), "layer {i}: no gradient reached its input");
            if let Some((src, k, v)) = leaves {
                let (gk, gv) = (k.grad(), v.grad());
                if gk.defined() && gv.defined() {
                    let acc = match kv_grads.remove(&src) {
                        Some((ak, av)) => (ak + gk, av + gv),
                        None => (gk, gv),
                    };
                    kv_grads.insert(src, acc);
                }
            }
            per_layer_grads[i] = input.map(|t| t.grad()).filter(Tensor::defined);
        }
        // The embedding (and the per-layer inputs made from it), recomputed with a graph.
        let e = self.embed(ids)?;
        reseed(seed, layers.len()); // the same dropout as in the forward
        let per_layer = self.per_layer_inputs(ids, &e)?;
        let mut outs = vec![];
        if let Some(p) = per_layer.filter(Tensor::requires_grad) {
            let grads = per_layer_grads
                .into_iter()
                .map(|gi| gi.unwrap_or_else(|| p.select(2, 0).zeros_like()))
                .collect::<Vec<_>>();
            outs.push((p, Tensor::f_stack(&grads, 2)?));
        }
        if e.requires_grad() {
            outs.push((e, g));
        }
        push_gradients(&outs)?;
        Ok(out)
    }

    /// A seed for per-layer reseeding when some enabled adapter applies
    /// dropout (drawn from torch's generator), else None.
    fn dropout_seed(&self) -> Result<Option<i64>> {
        let dropout = self
            .linears()
            .iter()
            .any(|(_, l)| l.active_lora().is_some_and(|a| a.dropout > 0.0 && a.switch.training()));
        if !dropout {
            return Ok(None);
        }
        let s = Tensor::f_randint_low(0, 1 << 62, [1], (Kind::Int64, Device::Cpu))?;
        Ok(Some(s.f_int64_value(&[0])?))
    }
}

/// Reseeds torch's generator for layer `i` (dropout only).
fn reseed(seed: Option<i64>, i: usize) {
    if let Some(s) = seed {
        tch::manual_seed(s.wrapping_add(i as i64));
    }
}

/// Backpropagates each gradient `g` (shaped as its `out`) from `out` into
/// their graph at once: `Σ (out ⊙ g).sum()` backward. Nothing to do for none.
pub fn push_gradients(pairs: &[(Tensor, Tensor)]) -> Result<()> {
    if let [(out, g)] = pairs {
        return push_gradient(out, g);
    }
    let mut total: Option<Tensor> = None;
    for (out, g) in pairs {
        ensure!(
            out.size() == g.size(),
            "gradient of shape {:?} for a tensor of shape {:?}",
            g.size(),
            out.size()
        );
        let s = out.f_mul(&g.f_to_kind(out.kind())?)?.f_sum(Kind::Float)?;
        total = Some(match total {
            Some(t) => t.f_add(&s)?,
            None => s,
        });
    }
    if let Some(t) = total {
        t.f_backward()?;
    }
    Ok(())
}

/// Backpropagates the gradient `g` (shaped as `out`) from `out` into its
/// graph: `(out ⊙ g).sum().backward()`.
pub fn push_gradient(out: &Tensor, g: &Tensor) -> Result<()> {
    ensure!(
        out.size() == g.size(),
        "gradient of shape {:?} for a tensor of shape {:?}",
        g.size(),
        out.size()
    );
    out.f_mul(&g.f_to_kind(out.kind())?)?.f_sum(Kind::Float)?.f_backward()?;
    Ok(())
}
