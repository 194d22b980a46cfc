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
//! LoRA dropout (the only randomness in the forward pass) must draw the same
//! masks when a layer is recomputed; torch's generator state cannot be saved
//! through tch, so while some adapter applies dropout the generator is
//! reseeded before each layer, with a seed drawn once per call from it (the
//! same in both modes, so checkpointing changes nothing).

use crate::model::Gemma;
use anyhow::{ensure, Context, Result};
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
        for (i, layer) in self.model.layers.iter().enumerate() {
            reseed(seed, i);
            x = layer.forward(&x, &rope, mask, None, None).with_context(|| format!("layer {i}"))?;
        }
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
        // Forward without a graph, keeping each layer's input.
        let mut inputs = Vec::with_capacity(layers.len());
        let mut x = tch::no_grad(|| self.embed(ids))?; // (B, T, H)
        for (i, layer) in layers.iter().enumerate() {
            reseed(seed, i);
            let y = tch::no_grad(|| layer.forward(&x, &rope, mask, None, None))
                .with_context(|| format!("layer {i}"))?;
            inputs.push(std::mem::replace(&mut x, y));
        }
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
        // The layers, last first: recompute with a graph, backpropagate g.
        for (i, layer) in layers.iter().enumerate().rev() {
            let saved = inputs.pop().context("a layer input was not kept")?;
            let xi = saved.detach().set_requires_grad(true);
            drop(saved);
            reseed(seed, i);
            let y = layer.forward(&xi, &rope, mask, None, None).with_context(|| format!("layer {i}"))?;
            push_gradient(&y, &g)?;
            drop(y);
            g = xi.grad();
            ensure!(g.defined(), "layer {i}: no gradient reached its input");
        }
        // The embedding, recomputed with a graph.
        let e = self.embed(ids)?;
        if e.requires_grad() {
            push_gradient(&e, &g)?;
        }
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
