//! The RL defaults a user can trust: a response that never ends its turn is
//! penalised and advantages are whitened (the example file shows every key
//! with its default: `tests/example_configs.rs` in the root package).

use std::path::Path;

#[test]
fn rl_defaults_penalise_a_missing_end_of_turn_and_whiten() {
    let c = rl::RlConfig::with_defaults(
        Path::new("m"),
        Path::new("o"),
        rl::RewardConfig::Length { max_tokens: None, scale: 1.0 },
    )
    .unwrap();
    assert_eq!((c.missing_eot_penalty, c.whiten_advantages), (1.0, true));
}
