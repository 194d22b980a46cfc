//! A whole RL run: the loop over steps with metrics, evaluation, sample
//! files, checkpoints and bit-identical resumption, the final model, the
//! plot and the summary; [`cli_train`] for `align rl --config`.

use crate::config::RlConfig;
use crate::prompts::{load_prompts, Prompts};
use crate::reward::{RewardFn, SharedBase};
use crate::rollout::{Rollout, Specials};
use crate::trainer::{EvalReport, StepStats, Trainer};
use anyhow::{Context, Result};
use lm::checkpoint;
use lm::fsio;
use lm::train::session::{Precision, Session, SessionSpec};
use lm::train::{self, Progress};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Kind;

/// What a finished run reports (also written as `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RlSummary {
    pub steps: u64,
    pub resumed_from: Option<u64>,
    /// True when `stop_after` ended the run early (no final model).
    pub stopped_early: bool,
    pub reward: String,
    /// Mean reward of the first (up to 5) steps of this run.
    pub first_rewards: Vec<f64>,
    /// Mean reward of the last (up to 5) steps.
    pub last_rewards: Vec<f64>,
    pub final_kl: f64,
    pub final_beta: f64,
    pub eval: Vec<EvalReport>,
    pub train_prompts: usize,
    pub eval_prompts: usize,
    pub skipped_prompts: usize,
    /// Seconds spent in this run, by phase.
    pub time_generate: f64,
    pub time_score: f64,
    pub time_update: f64,
    /// Of `time_update`, the gradients' all-reduce (0 in one process).
    #[serde(default)]
    pub time_allreduce: f64,
    pub rollout_tokens_per_s: f64,
    pub model_dir: Option<PathBuf>,
    pub plot: Option<PathBuf>,
}

const ARCH: &str = "GemmaForCausalLM";

/// Runs the stage with the reward the config names.
pub fn run(cfg: &RlConfig, base: &Path) -> Result<RlSummary> {
    let claim = match claim_output(cfg, base)? {
        Claimed::Finished(s) => return Ok(*s),
        Claimed::Run(c) => c,
    };
    run_claimed(cfg, base, None, claim)
}

/// What claiming the output directory found.
enum Claimed {
    /// A finished run of this config: its summary, as written.
    Finished(Box<RlSummary>),
    /// The directory, locked for this run.
    Run(lm::output_dir::Claim),
}

/// Claims `output_dir` ([`lm::output_dir::claim`]: locked for this run,
/// refused when it is an input or holds someone else's files, crash debris
/// removed), or finds the run there finished.
fn claim_output(cfg: &RlConfig, base: &Path) -> Result<Claimed> {
    cfg.validate()?;
    let sources: Vec<PathBuf> = cfg.data.sources.iter().map(|s| base.join(&s.path)).collect();
    let mut inputs: Vec<(&str, &Path)> = vec![("model", cfg.stage.model.as_path())];
    if let Some(r) = &cfg.reference {
        inputs.push(("reference", r.as_path()));
    }
    inputs.extend(cfg.reward.model_paths().into_iter().map(|p| ("reward.path", p)));
    inputs.extend(sources.iter().map(|p| ("data source", p.as_path())));
    let claim = lm::output_dir::claim(&cfg.stage.output_dir, "rl", &inputs)?;
    if let Some(done) = lm::output_dir::finished::<RlSummary>(&cfg.stage.output_dir, &cfg.hash()?) {
        eprintln!(
            "rl: {} holds a finished run ({} steps); nothing to do (summary.json left as it is)",
            cfg.stage.output_dir.display(),
            done.steps
        );
        return Ok(Claimed::Finished(Box::new(done)));
    }
    Ok(Claimed::Run(claim))
}

fn write_samples(dir: &Path, step: u64, samples: &[(Rollout, f64)], n: usize) -> Result<()> {
    let mut text = String::new();
    for (r, reward) in samples.iter().take(n) {
        let v = serde_json::json!({
            "step": step,
            "prompt": r.prompt.messages,
            "response": r.text,
            "reward": reward,
            "stop_reason": r.stop_reason,
            "tokens": r.response_ids.len(),
            "category": r.prompt.category,
        });
        text.push_str(&v.to_string());
        text.push('\n');
    }
    fsio::write_atomic(&dir.join(format!("samples-step-{step}.jsonl")), text.as_bytes())
}

fn eval_row(e: &EvalReport) -> serde_json::Value {
    serde_json::json!({
        "step": e.step, "eval_reward": e.reward_mean, "eval_reward_std": e.reward_std,
        "eval_ended_frac": e.ended_frac, "eval_response_len": e.response_len,
        "eval_per_category": e.per_category, "eval_oracle_accuracy": e.oracle_accuracy,
    })
}

/// Draws `rl.png` from `metrics.jsonl`: the mean reward per step (and
/// the evaluation reward), the oracle's accuracy on the evaluation prompts
/// (on its own 0–1 axis, when there is one) and the KL to the reference.
pub fn plot_metrics(metrics: &Path, out: &Path) -> Result<()> {
    use lm::plot::{line_charts, Panel, Series, SeriesStyle};
    let rows = train::read_metrics(metrics)?;
    let pts = |key: &str| -> Vec<(f64, f64)> {
        rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r.get(key)?.as_f64()?))).collect()
    };
    let mut panels = vec![Panel {
        title: "reward".into(),
        y_label: "mean reward".into(),
        series: vec![Series::line("train", pts("reward_mean")), Series::points("eval", pts("eval_reward"))],
        ..Default::default()
    }];
    let oracle = pts("eval_oracle_accuracy");
    if !oracle.is_empty() {
        panels.push(Panel {
            title: "oracle accuracy on the evaluation prompts".into(),
            y_label: "accuracy".into(),
            series: vec![Series { style: SeriesStyle::LinePoints, ..Series::line("eval", oracle) }],
            y_range: Some((0.0, 1.0)),
        });
    }
    panels.push(Panel {
        title: "KL to the reference".into(),
        y_label: "KL per sample".into(),
        series: vec![Series::line("KL", pts("kl"))],
        ..Default::default()
    });
    line_charts(out, "RL: reward and KL", "step", &panels)
}

/// Runs the stage with the reward function `reward` (the config's `reward`
/// section is then only recorded). Resumes from the newest checkpoint in
/// `output_dir/checkpoints` when its config hash matches.
pub fn run_with_reward(cfg: &RlConfig, base: &Path, reward: Box<dyn RewardFn>) -> Result<RlSummary> {
    match claim_output(cfg, base)? {
        Claimed::Finished(s) => Ok(*s),
        Claimed::Run(claim) => run_claimed(cfg, base, Some(reward), claim),
    }
}

/// The run, in the output directory `_claim` holds; `reward` None: the
/// config's.
fn run_claimed(
    cfg: &RlConfig,
    base: &Path,
    reward: Option<Box<dyn RewardFn>>,
    _claim: lm::output_dir::Claim,
) -> Result<RlSummary> {
    let (mut tr, prompts) = load_trainer(cfg, base, reward)?;
    let spec = SessionSpec {
        name: "rl",
        settings: &cfg.stage,
        total_steps: cfg.steps,
        config_hash: cfg.hash()?,
        extra: kl_state(&tr),
        architecture: ARCH,
        ignore: &["lm_head.weight"],
    };
    let session = Session::start(spec, &tr.policy_weights, &tr.policy, &mut tr.updater)?;
    let resumed_from = session.resumed_from;
    // One optimiser update per update of each batch.
    tr.updater.opt.t = session.state.step * cfg.updates_per_batch as u64;
    if resumed_from.is_some() {
        let bits = session.state.extra["beta_bits"]
            .as_str()
            .context("the checkpoint's trainer_state.json has no extra.beta_bits (KL coefficient)")?;
        tr.kl.set_beta_bits(bits)?;
    }
    let metrics_path = cfg.stage.output_dir.join("metrics.jsonl");
    let mut run = Run { cfg, prompts, s: session, evals: vec![] };
    if cfg.stage.eval_every > 0 && run.prompts.eval.is_empty() {
        eprintln!("warning: eval_every is set but the mixture has no held-out prompts (data.held_out); no evaluation");
    }
    if cfg.stage.eval_every > 0 && resumed_from.is_none() {
        run.evaluate(&mut tr, 0)?;
    }
    let done = run.steps(&mut tr, |pb, step, st| {
        pb.set_position(step);
        pb.set_message(format!(
            "reward {:.3} kl {:.3} β {:.3} len {:.0} (gen {:.1}s score {:.1}s update {:.1}s)",
            st.reward_mean, st.kl, st.beta, st.response_len, st.time_generate, st.time_score, st.time_update
        ));
    })?;
    run.s.progress.finish_and_clear();
    let (model_dir, plot) = match done.stopped_early {
        true => (None, None),
        false => run.finish(&mut tr, &metrics_path)?,
    };
    let main = run.s.dist.is_main();
    let summary = run.summary(&tr, resumed_from, done, model_dir, plot);
    if !summary.stopped_early && main {
        fsio::write_atomic(
            &cfg.stage.output_dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
    }
    Ok(summary)
}

/// Loads the policy (in [`Precision::load_kind`]), the reference and the
/// prompts, builds the reward (`reward` None: the config's) and sets up the
/// trainer. The reference is the `reference` directory when the config
/// names one; else, with LoRA, the policy with its adapters off (no second
/// model), and without, a second copy of `model`. A reward model that is a
/// LoRA reward stage's output over the same base as the policy is built
/// over the policy's base weights ([`RewardConfig::build_over`]).
///
/// [`RewardConfig::build_over`]: crate::reward::RewardConfig::build_over
pub fn load_trainer(
    cfg: &RlConfig,
    base: &Path,
    reward: Option<Box<dyn RewardFn>>,
) -> Result<(Trainer, Prompts)> {
    let device = lm::device::parse_device(&cfg.stage.device)?;
    let precision = Precision::of(&cfg.stage)?;
    let lora = cfg.stage.uses_lora();
    let loaded = checkpoint::load_causal_lm(&cfg.stage.model, device, precision.load_kind(lora))
        .with_context(|| format!("loading the policy from {}", cfg.stage.model.display()))?;
    let reference = match (&cfg.reference, lora) {
        (None, true) => {
            eprintln!("rl: the reference is the policy with its LoRA adapters off (no second model)");
            None
        }
        (r, _) => {
            let dir = r.clone().unwrap_or_else(|| cfg.stage.model.clone());
            let m = checkpoint::load_causal_lm(&dir, device, Kind::Float)
                .with_context(|| format!("loading the reference from {}", dir.display()))?;
            Some((m.vs, m.model))
        }
    };
    let reward = match reward {
        Some(r) => r,
        None => {
            let shared = SharedBase { policy: &loaded.model, dir: &cfg.stage.model };
            cfg.reward.build_over(device, precision.compute, lora.then_some(&shared))?
        }
    };
    let tok = loaded.tokenizer;
    let prompts = load_prompts(cfg, &tok, base)?;
    let specials = Specials::of(&tok);
    let tr = Trainer::new(cfg.clone(), (loaded.vs, loaded.model), reference, Some(tok), specials, reward)?;
    Ok((tr, prompts))
}

/// The KL coefficient as checkpoints record it (`extra` of the trainer
/// state): its value, and its exact bits for resumption.
fn kl_state(tr: &Trainer) -> serde_json::Value {
    serde_json::json!({"beta": tr.kl.beta, "beta_bits": tr.kl.beta_bits()})
}

/// A run in progress: what its steps, evaluations and saves share.
struct Run<'a> {
    cfg: &'a RlConfig,
    prompts: Prompts,
    /// The trainer state, metrics log, progress bar and checkpoints.
    s: Session,
    evals: Vec<EvalReport>,
}

/// What the loop over steps left.
struct Done {
    /// This run's steps' metrics.
    history: Vec<StepStats>,
    /// True when `stop_after` ended the loop.
    stopped_early: bool,
}

impl Run<'_> {
    /// The steps from `state` to `steps` (or `stop_after`), each logged and
    /// reported to `progress` with the step count; evaluates and saves
    /// checkpoints at their intervals (the last step's are left to
    /// [`Run::finish`]).
    fn steps(&mut self, tr: &mut Trainer, progress: impl Fn(&Progress, u64, &StepStats)) -> Result<Done> {
        let cfg = self.cfg;
        let mut history: Vec<StepStats> = vec![];
        let mut stopped_early = false;
        while self.s.state.step < cfg.steps {
            if cfg.stop_after.is_some_and(|s| self.s.state.step >= s) {
                stopped_early = true;
                break;
            }
            // The step's global batch, in one process's order: `batch_size`
            // prompts per rank, rank r taking the r-th share (its samples
            // seeded by their global indices, see Trainer::rollouts).
            let (rank, world) = (self.s.dist.rank, self.s.dist.world);
            let batch = self.prompts.next_batch(&mut self.s.state, cfg.batch_size * world)?;
            let mine = &batch[rank * cfg.batch_size..(rank + 1) * cfg.batch_size];
            let (st, _) = tr.step(self.s.state.step, mine)?;
            self.s.state.step += 1;
            let mut row = serde_json::to_value(&st)?;
            row["epoch"] = serde_json::json!(self.s.state.epoch);
            self.s.log.write(&row)?;
            progress(&self.s.progress, self.s.state.step, &st);
            history.push(st);
            if self.s.due(cfg.stage.eval_every) {
                self.evaluate(tr, self.s.state.step)?;
            }
            if self.s.due(cfg.stage.save_every) {
                self.save(tr)?;
            }
        }
        Ok(Done { history, stopped_early })
    }

    /// Evaluates on the held-out prompts (when there are any): the samples
    /// file and a metrics row.
    fn evaluate(&mut self, tr: &mut Trainer, step: u64) -> Result<()> {
        if self.prompts.eval.is_empty() {
            return Ok(());
        }
        let (rep, samples) = tr.evaluate(step, &self.prompts.eval)?;
        if self.s.dist.is_main() {
            write_samples(&self.cfg.stage.output_dir, step, &samples, self.cfg.eval_samples)?;
        }
        // Logged once: not again when a run resumed at its last step redoes it.
        if self.s.log.kept_value(step, "eval_reward").is_none() {
            self.s.log.write(&eval_row(&rep))?;
        }
        self.evals.push(rep);
        Ok(())
    }

    /// Saves a resumable checkpoint of the current step, with the KL
    /// coefficient in its trainer state.
    fn save(&mut self, tr: &Trainer) -> Result<PathBuf> {
        self.s.state.extra = kl_state(tr);
        let tok = tr.tokenizer.as_ref().context("the trainer has no tokenizer to save")?;
        self.s.save(&tr.policy_weights, &tr.updater, &tr.policy.cfg, tok, &[])
    }

    /// After the last step: the final evaluation and checkpoint, the model
    /// in `output_dir/model` and the plot. Returns the model's directory and
    /// the plot's path (none when it could not be drawn).
    fn finish(
        &mut self,
        tr: &mut Trainer,
        metrics_path: &Path,
    ) -> Result<(Option<PathBuf>, Option<PathBuf>)> {
        if self.cfg.stage.eval_every > 0 {
            self.evaluate(tr, self.s.state.step)?;
        }
        self.save(tr)?;
        let dir = self.cfg.stage.output_dir.join("model");
        let tok = tr.tokenizer.as_ref().context("the trainer has no tokenizer to save")?;
        let adapter_dir = self.cfg.stage.output_dir.join("adapter");
        self.s.write_model(&tr.policy_weights, &tr.policy, &dir, &adapter_dir, &tr.policy.cfg, tok)?;
        if !self.s.dist.is_main() {
            return Ok((Some(dir), None));
        }
        let png = self.cfg.stage.output_dir.join("rl.png");
        let plot = match plot_metrics(metrics_path, &png) {
            Ok(()) => Some(png),
            Err(e) => {
                eprintln!("warning: could not draw {}: {e:#}", png.display());
                None
            }
        };
        Ok((Some(dir), plot))
    }

    /// The run's summary.
    fn summary(
        self,
        tr: &Trainer,
        resumed_from: Option<u64>,
        done: Done,
        model_dir: Option<PathBuf>,
        plot: Option<PathBuf>,
    ) -> RlSummary {
        let history = &done.history;
        let means: Vec<f64> = history.iter().map(|s| s.reward_mean).collect();
        let total = |f: fn(&StepStats) -> f64| history.iter().fold(0.0, |t, s| t + f(s));
        let tg = total(|s| s.time_generate);
        let gen_tokens: usize = history.iter().map(|s| s.rollout_tokens).sum();
        RlSummary {
            steps: self.s.state.step,
            resumed_from,
            stopped_early: done.stopped_early,
            reward: tr.reward.name(),
            first_rewards: means.iter().take(5).copied().collect(),
            last_rewards: means[means.len().saturating_sub(5)..].to_vec(),
            final_kl: history.last().map_or(f64::NAN, |s| s.kl),
            final_beta: tr.kl.beta,
            eval: self.evals,
            train_prompts: self.prompts.train.len(),
            eval_prompts: self.prompts.eval.len(),
            skipped_prompts: self.prompts.skipped,
            time_generate: tg,
            time_score: total(|s| s.time_score),
            time_update: total(|s| s.time_update),
            time_allreduce: total(|s| s.time_allreduce),
            rollout_tokens_per_s: gen_tokens as f64 / tg.max(1e-9),
            model_dir,
            plot,
        }
    }
}

/// `align rl --config FILE`: reads the config (paths relative to its
/// directory), runs the stage and prints the summary as JSON.
pub fn cli_train(config: &Path) -> Result<()> {
    let mut cfg = RlConfig::from_toml_file(config)?;
    let base = config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    cfg.resolve_paths(&base);
    let s = run(&cfg, &base)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}
