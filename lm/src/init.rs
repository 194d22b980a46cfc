//! Seeded weight initialisation that does not touch torch's global generator.
//!
//! `tch::manual_seed` + `nn::Init::Randn` draws from one process-wide
//! generator: two threads (two tests in one binary, or a server handling two
//! requests) that seed and draw at the same time interleave their draws, and
//! the "seeded" weights come out different. Every tensor here is drawn from
//! its own ChaCha8 stream, keyed by the seed and the tensor's name, so the
//! result depends on nothing but `(seed, name, shape, std)` — not on the
//! order of variables, other threads, or the device.

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{nn, Tensor};

/// FNV-1a of the name, mixed with the seed: the stream key of one tensor.
fn stream_key(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// normal(0, `std`) draws, Box–Muller over a ChaCha8 stream keyed by
/// `seed` and `name`, in order (each pair of uniforms gives two draws).
struct NormalStream {
    rng: ChaCha8Rng,
    std: f64,
    spare: Option<f32>,
}

impl NormalStream {
    fn new(std: f64, seed: u64, name: &str) -> Self {
        NormalStream { rng: ChaCha8Rng::seed_from_u64(stream_key(seed, name)), std, spare: None }
    }

    /// The next `n` draws, in `out` (cleared first).
    fn fill(&mut self, out: &mut Vec<f32>, n: usize) {
        out.clear();
        out.reserve(n);
        while out.len() < n {
            if let Some(s) = self.spare.take() {
                out.push(s);
                continue;
            }
            // u1 in (0, 1] so that ln(u1) is finite.
            let u1 = 1.0 - self.rng.random::<f64>();
            let u2 = self.rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt() * self.std;
            let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
            out.push((r * c) as f32);
            self.spare = Some((r * s) as f32);
        }
    }
}

/// A CPU f32 tensor of `shape` drawn from normal(0, `std`) (Box–Muller over
/// a ChaCha8 stream keyed by `seed` and `name`).
pub fn seeded_normal(shape: &[i64], std: f64, seed: u64, name: &str) -> Tensor {
    let n: i64 = shape.iter().product();
    let mut out = Vec::new();
    NormalStream::new(std, seed, name).fill(&mut out, n as usize);
    Tensor::from_slice(&out).reshape(shape)
}

/// Elements drawn at a time by [`init_seeded`] (64 MiB of f32): a tensor is
/// filled chunk by chunk, so initialising needs the weights' memory and
/// little more (a 256k × 2k embedding drawn whole would add two f32 copies).
const INIT_CHUNK: i64 = 16 << 20;

/// A CPU f32 tensor of `shape` drawn from uniform(−`bound`, `bound`) over a
/// ChaCha8 stream keyed by `seed` and `name` (LoRA's A: PEFT's
/// kaiming-uniform with a = √5 is uniform(±1/√fan_in)).
pub fn seeded_uniform(shape: &[i64], bound: f64, seed: u64, name: &str) -> Tensor {
    let n: i64 = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(stream_key(seed, name));
    let out: Vec<f32> = (0..n).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect();
    Tensor::from_slice(&out).reshape(shape)
}

/// Whether a Gemma variable is an RMSNorm scale (initialised to the norm's
/// identity: 0 for Gemma 1–3's `1 + weight`, 1 for Gemma 4's `weight`).
fn is_norm(name: &str) -> bool {
    name.ends_with("norm.weight")
}

/// Re-initialises the variables of a freshly built model `vs` from `seed`:
/// every tensor (embeddings, projections, heads) from normal(0, `std`) but
/// the RMSNorm scales and the buffers (Gemma 4's `layer_scalar`, not
/// trained), which keep the identity the model's constructor gave them (0
/// for `1 + w` norms; 1 for Gemma 4's `w` norms and layer scalars, as
/// transformers initialises them) — what [`crate::Gemma::new`] does, made
/// reproducible.
pub fn init_seeded(vs: &nn::VarStore, std: f64, seed: u64) -> Result<()> {
    let vars = vs.variables();
    let _guard = tch::no_grad_guard();
    for (name, var) in vars {
        if is_norm(&name) || !var.requires_grad() {
            continue;
        }
        fill_normal(&var, std, seed, &name, INIT_CHUNK)?;
    }
    Ok(())
}

/// Writes the draws of `seeded_normal(var's shape, std, seed, name)` into
/// `var`, `chunk` elements at a time (converted to its kind and device).
fn fill_normal(var: &Tensor, std: f64, seed: u64, name: &str, chunk: i64) -> Result<()> {
    let n = var.numel() as i64;
    let flat = var.f_view([n]).with_context(|| format!("initialising {name}"))?;
    let mut stream = NormalStream::new(std, seed, name);
    let mut buf = Vec::new();
    let mut off = 0;
    while off < n {
        let len = chunk.min(n - off);
        stream.fill(&mut buf, len as usize);
        let fresh = Tensor::from_slice(&buf).to_device(var.device()).to_kind(var.kind());
        let mut part = flat.narrow(0, off, len);
        part.f_copy_(&fresh).with_context(|| format!("initialising {name}"))?;
        off += len;
    }
    Ok(())
}

/// [`seeded_normal`] in the kind and on the device of `like`.
pub fn seeded_normal_like(like: &Tensor, std: f64, seed: u64, name: &str) -> Tensor {
    seeded_normal(&like.size(), std, seed, name).to_device(like.device()).to_kind(like.kind())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn draws_depend_on_seed_and_name_only() {
        let a = seeded_normal(&[3, 5], 0.5, 7, "x.weight");
        let b = seeded_normal(&[3, 5], 0.5, 7, "x.weight");
        assert!(a.equal(&b));
        assert!(!a.equal(&seeded_normal(&[3, 5], 0.5, 8, "x.weight")));
        assert!(!a.equal(&seeded_normal(&[3, 5], 0.5, 7, "y.weight")));
        assert_eq!(a.size(), vec![3, 5]);
    }

    #[test]
    fn draws_have_the_requested_moments() {
        let t = seeded_normal(&[200_000], 0.02, 1, "w");
        let mean = t.mean(Kind::Double).double_value(&[]);
        let std = t.std(true).double_value(&[]);
        assert!(mean.abs() < 2e-4, "mean {mean}");
        assert!((std - 0.02).abs() < 2e-4, "std {std}");
    }

    #[test]
    fn init_zeroes_norms_and_ignores_the_global_generator() {
        let cfg = crate::GemmaConfig::preset("tiny").unwrap();
        let build = |global: i64| {
            tch::manual_seed(global);
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let _m = crate::Gemma::new(&vs.root(), &cfg).unwrap();
            init_seeded(&vs, cfg.initializer_range, 3).unwrap();
            vs
        };
        let (a, b) = (build(1), build(2));
        for (name, t) in a.variables() {
            assert!(t.equal(&b.variables()[&name]), "{name}");
            if is_norm(&name) {
                assert_eq!(t.abs().sum(Kind::Float).double_value(&[]), 0.0, "{name}");
            }
        }
    }

    #[test]
    fn chunked_fills_draw_what_seeded_normal_draws() {
        for (shape, chunk) in [([5i64, 9i64], 7i64), ([4, 4], 16), ([3, 1], 1), ([2, 5], 3)] {
            let var = Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu));
            fill_normal(&var, 0.5, 11, "x.weight", chunk).unwrap();
            assert!(var.equal(&seeded_normal(&shape, 0.5, 11, "x.weight")), "{shape:?} by {chunk}");
        }
    }

    #[test]
    fn gemma4_norms_and_layer_scalars_start_at_one() {
        // transformers: Gemma 4's norms multiply by w, initialised to 1, and
        // layer_scalar is a buffer of ones (modeling_gemma4.py's _init_weights).
        let cfg = crate::GemmaConfig::preset("tiny-gemma4").unwrap();
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _m = crate::Gemma::new(&vs.root(), &cfg).unwrap();
        init_seeded(&vs, cfg.initializer_range, 3).unwrap();
        let vars = vs.variables();
        let (mut norms, mut scalars) = (0, 0);
        for (name, t) in &vars {
            if is_norm(name) || name.ends_with("layer_scalar") {
                assert!(t.eq(1.0).all().int64_value(&[]) == 1, "{name}");
                norms += is_norm(name) as usize;
                scalars += name.ends_with("layer_scalar") as usize;
            }
        }
        assert!(norms > 0 && scalars == 6, "{norms} norms, {scalars} layer scalars");
        let emb = &vars["model.embed_tokens.weight"];
        assert!((emb.std(true).double_value(&[]) - 0.02).abs() < 2e-3);
    }
}
