//! The adaptive KL controller against hand computations (Ziegler et al.,
//! 2019): β ← β·(1 + clip((KL − target)/target, −0.2, 0.2)·n/horizon).

use rl::KlController;

#[test]
fn adaptive_controller_follows_the_proportional_rule_with_clipping() {
    let mut c = KlController::adaptive(0.1, 6.0, 100.0).unwrap();
    // KL 6.6: error +0.1 → β·(1 + 0.1·16/100).
    let b = c.update(6.6, 16);
    assert!((b - 0.1 * (1.0 + 0.1 * 0.16)).abs() < 1e-15, "{b}");
    // KL 60: error clipped to +0.2.
    let before = c.beta;
    let b = c.update(60.0, 16);
    assert!((b - before * (1.0 + 0.2 * 0.16)).abs() < 1e-15);
    // KL 0: error −1 clipped to −0.2.
    let before = c.beta;
    let b = c.update(0.0, 50);
    assert!((b - before * (1.0 - 0.2 * 0.5)).abs() < 1e-15);
    // At the target β stays; a non-finite KL leaves it alone.
    let before = c.beta;
    assert_eq!(c.update(6.0, 16), before);
    assert_eq!(c.update(f64::NAN, 16), before);
}

#[test]
fn controller_converges_towards_the_target_on_a_simple_plant() {
    // A plant whose KL is inversely proportional to β (KL = 0.6 / β): the
    // controller drives the KL to the target.
    let mut c = KlController::adaptive(0.05, 6.0, 1000.0).unwrap();
    for _ in 0..2000 {
        let kl = 0.6 / c.beta;
        c.update(kl, 64);
    }
    assert!((0.6 / c.beta - 6.0).abs() < 0.1, "KL {} β {}", 0.6 / c.beta, c.beta);
}

#[test]
fn fixed_coefficient_never_moves_and_beta_round_trips_bit_for_bit() {
    let mut f = KlController::fixed(0.05);
    assert_eq!(f.update(100.0, 64), 0.05);
    let mut c = KlController::adaptive(0.1, 6.0, 100.0).unwrap();
    c.update(7.3, 13);
    let mut d = KlController::adaptive(0.1, 6.0, 100.0).unwrap();
    d.set_beta_bits(&c.beta_bits()).unwrap();
    assert_eq!(d.beta.to_bits(), c.beta.to_bits());
    assert!(d.set_beta_bits("zz").is_err());
    assert!(KlController::adaptive(0.1, 0.0, 100.0).is_err());
    assert!(KlController::adaptive(0.1, 6.0, -1.0).is_err());
}
