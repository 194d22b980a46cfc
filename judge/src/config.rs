//! A judge run's settings as a serde config (a recipe's `judge` stage, a
//! sweep's judging): every `align judge` option but the two systems and the
//! output directory, which the caller gives to [`JudgeConfig::into_args`].
//! The defaults are those of the command line.

use crate::harness::JudgeArgs;
use crate::judges::LmMode;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The settings of a judge run; see [`JudgeArgs`] for each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    pub prompts: PathBuf,
    pub judge: String,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default = "default_lm_mode")]
    pub lm_mode: LmMode,
    #[serde(default = "default_judge_max_new_tokens")]
    pub judge_max_new_tokens: usize,
    #[serde(default)]
    pub tie_tolerance: f64,
    #[serde(default)]
    pub oracle: Option<String>,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_bootstrap")]
    pub bootstrap: usize,
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    #[serde(default = "default_http_model")]
    pub http_model: String,
    #[serde(default = "default_api_key_env")]
    pub api_key_env: String,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

/// The keys of a [`JudgeConfig`] table, in the order of `align judge`'s
/// options.
pub const FIELDS: [&str; 22] = [
    "prompts",
    "judge",
    "template",
    "lm_mode",
    "judge_max_new_tokens",
    "tie_tolerance",
    "oracle",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "batch_size",
    "bootstrap",
    "limit",
    "device",
    "dtype",
    "http_model",
    "api_key_env",
    "timeout_s",
    "retries",
    "max_in_flight",
];

fn default_lm_mode() -> LmMode {
    LmMode::Reason
}
fn default_judge_max_new_tokens() -> usize {
    512
}
fn default_max_new_tokens() -> usize {
    256
}
fn default_batch_size() -> usize {
    8
}
fn default_bootstrap() -> usize {
    2000
}
fn default_device() -> String {
    "auto".into()
}
fn default_dtype() -> String {
    "f32".into()
}
fn default_http_model() -> String {
    "default".into()
}
fn default_api_key_env() -> String {
    "OPENAI_API_KEY".into()
}
fn default_timeout_s() -> u64 {
    120
}
fn default_retries() -> u32 {
    3
}
fn default_max_in_flight() -> usize {
    4
}

impl JudgeConfig {
    /// The prompts and the judge spec, every other setting at its default.
    pub fn new(prompts: PathBuf, judge: String) -> JudgeConfig {
        JudgeConfig {
            prompts,
            judge,
            template: None,
            lm_mode: default_lm_mode(),
            judge_max_new_tokens: default_judge_max_new_tokens(),
            tie_tolerance: 0.0,
            oracle: None,
            max_new_tokens: default_max_new_tokens(),
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            batch_size: default_batch_size(),
            bootstrap: default_bootstrap(),
            limit: None,
            device: default_device(),
            dtype: default_dtype(),
            http_model: default_http_model(),
            api_key_env: default_api_key_env(),
            timeout_s: default_timeout_s(),
            retries: default_retries(),
            max_in_flight: default_max_in_flight(),
        }
    }

    /// What the harness takes: these settings, the candidate and baseline
    /// model directories and the output directory.
    pub fn into_args(self, candidate: PathBuf, baseline: PathBuf, out: PathBuf) -> JudgeArgs {
        JudgeArgs {
            candidate: Some(candidate),
            baseline: Some(baseline),
            candidate_answers: None,
            baseline_answers: None,
            prompts: self.prompts,
            judge: self.judge,
            out,
            template: self.template,
            lm_mode: self.lm_mode,
            judge_max_new_tokens: self.judge_max_new_tokens,
            tie_tolerance: self.tie_tolerance,
            oracle: self.oracle,
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            batch_size: self.batch_size,
            bootstrap: self.bootstrap,
            limit: self.limit,
            device: self.device,
            dtype: self.dtype,
            http_model: self.http_model,
            api_key_env: self.api_key_env,
            timeout_s: self.timeout_s,
            retries: self.retries,
            max_in_flight: self.max_in_flight,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: JudgeArgs,
    }

    #[test]
    fn defaults_are_those_of_the_command_line() {
        let argv = ["judge", "--candidate", "c", "--baseline", "b", "--prompts", "p", "--judge", "oracle:x"];
        let cli = Cli::parse_from(argv.iter().chain(&["--out", "o"]));
        let cfg = JudgeConfig::new("p".into(), "oracle:x".into());
        let args = cfg.into_args("c".into(), "b".into(), "o".into());
        assert_eq!(format!("{args:?}"), format!("{:?}", cli.args));
        // A table with only the required keys types to the same defaults.
        let t: JudgeConfig = serde_json::from_str(r#"{"prompts": "p", "judge": "oracle:x"}"#).unwrap();
        assert_eq!(t, JudgeConfig::new("p".into(), "oracle:x".into()));
    }

    #[test]
    fn fields_are_the_options_but_the_systems_and_the_output() {
        let runner = ["candidate", "baseline", "out", "candidate_answers", "baseline_answers", "help"];
        let options: Vec<String> = Cli::command()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .filter(|k| !runner.contains(&k.as_str()))
            .collect();
        assert_eq!(options, FIELDS);
        let e =
            serde_json::from_str::<JudgeConfig>(r#"{"prompts": "p", "judge": "j", "nope": 1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `nope`"), "{e}");
    }
}
