//! `rl`: the KL-regularised REINFORCE stage with a leave-one-out baseline.
//!
//! - [`loss`] — the pure pieces: k1/k3 KL estimators, sequence rewards with
//!   the end-of-turn penalty, leave-one-out advantages, whitening, the
//!   REINFORCE loss and its clipped importance-weighted variant.
pub mod loss;

pub use loss::{kl_per_token, reinforce_loss, rloo_advantages, sequence_rewards, whiten, KlEstimator};
