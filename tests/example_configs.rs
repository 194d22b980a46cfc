//! `recipes/examples/{reward,rl}.toml` show every key of their stage's table
//! with the code's default, so that the examples and the defaults cannot
//! drift apart: a key an example sets to another value is one of its
//! `chosen` keys and its comment names the default.

use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use std::path::Path;

/// `key` → value, with the `optim` table's keys as `optim.key`.
fn flat(v: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (k, v) in v.as_object().unwrap() {
        match (k.as_str(), v) {
            ("optim", Value::Object(o)) => {
                out.extend(o.iter().map(|(k2, v2)| (format!("optim.{k2}"), v2.clone())))
            }
            _ => out.push((k.clone(), v.clone())),
        }
    }
    out
}

/// The example `recipes/examples/{stage}.toml`: every key of `T` is shown;
/// a key not in `chosen` has the code's default; a chosen key that is not
/// `required` names its default in its comment. `skip`: keys not to show.
fn check_example<T: DeserializeOwned + Serialize>(
    stage: &str,
    chosen: &[&str],
    required: &[&str],
    skip: &[&str],
) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("recipes/examples/{stage}.toml"));
    let text = std::fs::read_to_string(&path).unwrap();
    let example: T = lm::stage_settings::read_stage_config(&path, stage).unwrap();
    let table: toml::Value = toml::from_str(&text).unwrap();
    let mut minimal = toml::map::Map::new();
    for k in required {
        minimal.insert(k.to_string(), table[stage][k].clone());
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(format!("{stage}.toml"));
    std::fs::write(&p, toml::to_string(&toml::Value::Table(minimal)).unwrap()).unwrap();
    let defaults: T = lm::stage_settings::read_stage_config(&p, stage).unwrap();
    let (e, d) =
        (flat(&serde_json::to_value(&example).unwrap()), flat(&serde_json::to_value(&defaults).unwrap()));
    assert_eq!(e.len(), d.len());
    let line_of = |leaf: &str| {
        text.lines().map(str::trim_start).find(|l| {
            let l = l.strip_prefix("# ").unwrap_or(l);
            l.starts_with(&format!("{leaf} =")) || l.starts_with(&format!("[{stage}.{leaf}]"))
        })
    };
    for ((key, ev), (_, dv)) in e.iter().zip(&d) {
        if skip.contains(&key.as_str()) {
            continue;
        }
        let leaf = key.rsplit('.').next().unwrap();
        let line = line_of(leaf).unwrap_or_else(|| panic!("{stage}.toml does not show `{key}`"));
        if !chosen.contains(&key.as_str()) {
            assert_eq!(ev, dv, "{stage}.toml: `{key}`: the example shows {ev}, the code's default is {dv}");
        } else if !required.contains(&key.as_str()) {
            assert!(
                line.contains("default:"),
                "{stage}.toml: `{key}` is the example's choice; its comment must name the default: {line}"
            );
        }
    }
}

#[test]
fn the_example_reward_config_shows_every_key_with_its_default() {
    check_example::<reward::RewardConfig>(
        "reward",
        &[
            "model",
            "output_dir",
            "data",
            "max_seq_len",
            "epochs",
            "center_rewards_coefficient",
            "eval_every",
            "save_every",
            "optim.lr",
            "optim.warmup_steps",
        ],
        &["model", "output_dir", "data"],
        // A testing switch (stop as if killed), not a setting to show.
        &["stop_after"],
    );
}

#[test]
fn the_example_rl_config_shows_every_key_with_its_default() {
    check_example::<rl::RlConfig>(
        "rl",
        &[
            "model",
            "output_dir",
            "reward",
            "data",
            "steps",
            "max_new_tokens",
            "max_prompt_len",
            "normalize_reward",
            "reward_clip",
            "eval_every",
            "save_every",
            "optim.lr",
            "optim.warmup_steps",
        ],
        &["model", "output_dir", "reward", "data"],
        &[],
    );
}
