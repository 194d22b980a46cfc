//! Win rates with seeded bootstrap intervals.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The outcome of one pair for the candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Win,
    Loss,
    Tie,
}

impl Outcome {
    /// 1 for a win, 0.5 for a tie, 0 for a loss.
    pub fn value(self) -> f64 {
        match self {
            Outcome::Win => 1.0,
            Outcome::Tie => 0.5,
            Outcome::Loss => 0.0,
        }
    }
}

/// Win rate (wins + ties/2)/n with its interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WinRate {
    pub n: usize,
    pub wins: usize,
    pub losses: usize,
    pub ties: usize,
    /// NaN (null in JSON) when n = 0.
    pub win_rate: f64,
    /// Percentile bootstrap 95% interval; NaN when n = 0.
    pub lo: f64,
    pub hi: f64,
}

/// (wins + ties/2)/n; NaN for no outcomes.
pub fn win_rate(outcomes: &[Outcome]) -> f64 {
    if outcomes.is_empty() {
        return f64::NAN;
    }
    outcomes.iter().map(|o| o.value()).sum::<f64>() / outcomes.len() as f64
}

/// The `q` quantile (0..=1) of sorted values, linearly interpolated.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let i = pos.floor() as usize;
    let j = (i + 1).min(sorted.len() - 1);
    let f = pos - i as f64;
    sorted[i] * (1.0 - f) + sorted[j] * f
}

/// The percentile bootstrap interval at `level` (e.g. 0.95) of the win rate:
/// `resamples` resamples of the outcomes with replacement, drawn from a
/// ChaCha stream seeded with `seed`. (NaN, NaN) for no outcomes.
pub fn bootstrap_interval(outcomes: &[Outcome], resamples: usize, level: f64, seed: u64) -> (f64, f64) {
    let n = outcomes.len();
    if n == 0 || resamples == 0 {
        return (f64::NAN, f64::NAN);
    }
    let values: Vec<f64> = outcomes.iter().map(|o| o.value()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let alpha = (1.0 - level) / 2.0;
    (quantile(&means, alpha), quantile(&means, 1.0 - alpha))
}

/// Counts, win rate and a 95% bootstrap interval (`resamples` draws, `seed`).
pub fn summarize(outcomes: &[Outcome], resamples: usize, seed: u64) -> WinRate {
    let count = |o: Outcome| outcomes.iter().filter(|&&x| x == o).count();
    let (lo, hi) = bootstrap_interval(outcomes, resamples, 0.95, seed);
    WinRate {
        n: outcomes.len(),
        wins: count(Outcome::Win),
        losses: count(Outcome::Loss),
        ties: count(Outcome::Tie),
        win_rate: win_rate(outcomes),
        lo,
        hi,
    }
}
