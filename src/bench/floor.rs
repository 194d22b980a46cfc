//! The matrix multiplications alone of a generate call: the rate align's
//! generation is measured against.

use anyhow::Result;
use lm::GemmaConfig;
use std::time::Instant;

/// The matrix multiplications alone of one generate call of a
/// [`GenerateBench`]: the prefill's projections over batch × prompt rows and
/// the head over the last position, then `new_tokens − 1` decoding steps of
/// batch rows through every layer's projections and the head, with distinct
/// random weights of the model's shapes. No attention, norms or sampling:
/// what is left when all other work costs nothing, with libtorch's kernels.
pub struct MatmulFloor {
    layers: Vec<[tch::Tensor; 4]>,
    head: tch::Tensor,
    /// The projections' inputs (H, NH·D and I wide) for the prefill's rows,
    /// then for one decoding step's, made once so that timing covers only
    /// the matmuls.
    prefill: [tch::Tensor; 3],
    step: [tch::Tensor; 3],
    device: tch::Device,
    batch: i64,
    new_tokens: usize,
}

impl MatmulFloor {
    pub fn new(
        cfg: &GemmaConfig,
        batch: i64,
        prompt_len: i64,
        new_tokens: usize,
        device: tch::Device,
        kind: tch::Kind,
    ) -> Self {
        let o = (kind, device);
        let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                [
                    tch::Tensor::randn([h, (nh + 2 * nkv) * d], o), // q|k|v
                    tch::Tensor::randn([nh * d, h], o),             // o
                    tch::Tensor::randn([h, 2 * i], o),              // gate|up
                    tch::Tensor::randn([i, h], o),                  // down
                ]
            })
            .collect();
        let inputs = |rows: i64| {
            [
                tch::Tensor::randn([rows, h], o),
                tch::Tensor::randn([rows, nh * d], o),
                tch::Tensor::randn([rows, i], o),
            ]
        };
        MatmulFloor {
            layers,
            head: tch::Tensor::randn([h, cfg.vocab_size], o),
            prefill: inputs(batch * prompt_len),
            step: inputs(batch),
            device,
            batch,
            new_tokens,
        }
    }

    /// Every layer's projections on `inputs`' rows, then the head on batch rows.
    fn pass(&self, [x, a, m]: &[tch::Tensor; 3]) -> Result<()> {
        for [qkv, out, gate_up, down] in &self.layers {
            let _ = x.f_matmul(qkv)?;
            let _ = a.f_matmul(out)?;
            let _ = x.f_matmul(gate_up)?;
            let _ = m.f_matmul(down)?;
        }
        let _ = x.f_narrow(0, 0, self.batch)?.f_matmul(&self.head)?;
        Ok(())
    }

    /// Seconds for one generate call's matmuls.
    pub fn time(&self) -> Result<f64> {
        let _g = tch::no_grad_guard();
        let t0 = Instant::now();
        self.pass(&self.prefill)?;
        for _ in 1..self.new_tokens {
            self.pass(&self.step)?;
        }
        if let tch::Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
        Ok(t0.elapsed().as_secs_f64())
    }
}
