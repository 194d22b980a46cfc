//! The KL coefficient: fixed, or adapted towards a target KL.
//!
//! The adaptive controller is that of Ziegler et al., "Fine-Tuning Language
//! Models from Human Preferences", 2019 (§2.2): after a batch of `n` samples
//! with observed KL `kl`,
//!
//! ```text
//! e = clip((kl − target) / target, −0.2, 0.2)
//! β ← β · (1 + e · n / horizon)
//! ```
//!
//! so β grows while the policy drifts further from the reference than the
//! target and shrinks while it stays closer, by at most 20 % of n/horizon per
//! batch. Its whole state is β, saved in training checkpoints bit for bit.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The KL coefficient and, when adaptive, its controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KlController {
    /// The current coefficient β.
    pub beta: f64,
    /// The target KL per sample (Σ over the response's tokens); `None`: β fixed.
    pub target: Option<f64>,
    /// Samples over which a full proportional correction is applied.
    pub horizon: f64,
}

impl KlController {
    /// A fixed coefficient.
    pub fn fixed(beta: f64) -> Self {
        KlController { beta, target: None, horizon: 1.0 }
    }

    /// The adaptive controller of Ziegler et al. (2019).
    pub fn adaptive(beta: f64, target: f64, horizon: f64) -> Result<Self> {
        if !(target.is_finite() && target > 0.0) {
            bail!("kl_target must be a positive number, got {target}");
        }
        if !(horizon.is_finite() && horizon > 0.0) {
            bail!("kl_horizon must be a positive number, got {horizon}");
        }
        Ok(KlController { beta, target: Some(target), horizon })
    }

    /// Updates β after a batch of `n` samples whose mean KL to the reference
    /// was `kl`; returns the new β. A fixed controller, or a non-finite `kl`,
    /// leaves β as it is.
    pub fn update(&mut self, kl: f64, n: usize) -> f64 {
        if let Some(target) = self.target {
            if kl.is_finite() {
                let e = ((kl - target) / target).clamp(-0.2, 0.2);
                self.beta *= 1.0 + e * n as f64 / self.horizon;
            }
        }
        self.beta
    }

    /// β as an exact hexadecimal bit pattern (JSON floats may not round-trip
    /// to the last bit; resumption must).
    pub fn beta_bits(&self) -> String {
        format!("{:016x}", self.beta.to_bits())
    }

    /// Restores β from [`KlController::beta_bits`].
    pub fn set_beta_bits(&mut self, bits: &str) -> Result<()> {
        match u64::from_str_radix(bits, 16) {
            Ok(b) => {
                self.beta = f64::from_bits(b);
                Ok(())
            }
            Err(e) => bail!(
                "invalid saved KL coefficient {bits:?} ({e}); the checkpoint's trainer_state.json is damaged"
            ),
        }
    }
}
