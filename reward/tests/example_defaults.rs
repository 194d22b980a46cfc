//! `recipes/examples/reward.toml` shows every key of the `[reward]` table with the
//! code's default, so that the example and the defaults cannot drift apart:
//! a key the example sets to another value is one of [`CHOSEN`] and its
//! comment names the default.

use serde_json::Value;
use std::path::Path;

/// Keys without a default, and keys whose value is this example's choice
/// (its comment says `default: ...`).
const CHOSEN: &[&str] = &[
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
];
const REQUIRED: &[&str] = &["model", "output_dir", "data"];

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

#[test]
fn the_example_reward_config_shows_every_key_with_its_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/examples/reward.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let example: reward::RewardConfig = lm::stage_settings::read_stage_config(&path, "reward").unwrap();
    let table: toml::Value = toml::from_str(&text).unwrap();
    let mut minimal = toml::map::Map::new();
    for k in REQUIRED {
        minimal.insert(k.to_string(), table["reward"][k].clone());
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("reward.toml");
    std::fs::write(&p, toml::to_string(&toml::Value::Table(minimal)).unwrap()).unwrap();
    let defaults: reward::RewardConfig = lm::stage_settings::read_stage_config(&p, "reward").unwrap();
    let (e, d) =
        (flat(&serde_json::to_value(&example).unwrap()), flat(&serde_json::to_value(&defaults).unwrap()));
    assert_eq!(e.len(), d.len());
    let line_of = |leaf: &str| {
        text.lines().map(str::trim_start).find(|l| {
            let l = l.strip_prefix("# ").unwrap_or(l);
            l.starts_with(&format!("{leaf} =")) || l.starts_with(&format!("[reward.{leaf}]"))
        })
    };
    for ((key, ev), (_, dv)) in e.iter().zip(&d) {
        if key == "stop_after" {
            // A testing switch (stop as if killed), not a setting to show.
            continue;
        }
        let leaf = key.rsplit('.').next().unwrap();
        let line = line_of(leaf).unwrap_or_else(|| panic!("the example does not show `{key}`"));
        if !CHOSEN.contains(&key.as_str()) {
            assert_eq!(ev, dv, "`{key}`: the example shows {ev}, the code's default is {dv}");
        } else if !REQUIRED.contains(&key.as_str()) {
            assert!(
                line.contains("default:"),
                "`{key}` is the example's choice; its comment must name the default: {line}"
            );
        }
    }
}
