//! `rl`: the KL-regularised REINFORCE stage with a leave-one-out baseline.
//!
//! Not built yet: rollouts from the policy, scoring by the reward model,
//! per-token KL to the frozen SFT reference, leave-one-out advantages.
