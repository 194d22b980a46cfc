//! Reward functions: the [`RewardFn`] trait the stage scores rollouts
//! through, a trained reward model ([`RewardModelFn`]), the oracle of the
//! built-in tasks, the rule rewards (for tests, smoke runs and toy
//! problems), and their config section.

use crate::rollout::Rollout;
use anyhow::{bail, Context, Result};
use lm::http::{post_json, Reply, Retries};
use lm::peft::TaskType;
use lm::reward_model::{RewardModel, RewardStats};
pub use lm::reward_score::cut_prompt_from_left;
use lm::reward_score::{Conversation, RewardScorer};
use lm::Gemma;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tch::{nn, Device, Kind};

/// Scores a batch of rollouts: one reward per rollout, in order. A reward
/// function is frozen: it must not keep a gradient graph.
pub trait RewardFn {
    /// A short description for logs and the summary.
    fn name(&self) -> String;

    /// The reward of each rollout of `batch` (same length, same order).
    fn score(&mut self, batch: &[Rollout]) -> Result<Vec<f64>>;

    /// Stored statistics `(mean, std)` of this reward (a reward model's
    /// `reward_stats.json`), used by `normalize_reward` when the config gives
    /// none.
    fn stats(&self) -> Option<(f64, f64)> {
        None
    }

    /// The reward model behind this reward, when it is one (tests check
    /// which weights it holds).
    fn reward_model(&self) -> Option<&lm::reward_model::RewardModel> {
        None
    }
}

/// The RL policy's base weights, which a LoRA reward model over the same
/// base is built on (see [`RewardConfig::build_over`]).
pub struct SharedBase<'a> {
    /// The policy, with LoRA adapters: its base tensors are shared, its
    /// adapters are not.
    pub policy: &'a Gemma,
    /// The directory the policy was loaded from (the RL stage's `model`).
    pub dir: &'a Path,
}

/// The `[rl.reward]` section: which reward the stage optimises.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RewardConfig {
    /// The number of response tokens (the stop token not counted), capped at
    /// `max_tokens` when given, times `scale`.
    Length {
        #[serde(default)]
        max_tokens: Option<usize>,
        #[serde(default = "one")]
        scale: f64,
    },
    /// 1 when the decoded response contains `text` (ASCII case-insensitive
    /// unless `case_sensitive`), else 0.
    Contains {
        text: String,
        #[serde(default)]
        case_sensitive: bool,
    },
    /// 1 when the response is the correct answer to a built-in task prompt
    /// (`builtin:rl?…` data, checked by `datasets::tasks::check`), else 0.
    Oracle,
    /// A trained reward model directory (`GemmaForSequenceClassification`
    /// with `score.weight`, as `align reward` writes it).
    Model {
        path: PathBuf,
        /// Sequences per forward pass.
        #[serde(default = "default_rm_batch")]
        batch_size: usize,
        /// Longest scored sequence; longer ones lose their earliest prompt
        /// tokens. Default: the model's `max_position_embeddings`.
        #[serde(default)]
        max_seq_len: Option<usize>,
    },
    /// An external verifier (a code sandbox, a math checker) over HTTP: one
    /// `POST url` per rollout with the JSON body `{"prompt": the last user
    /// message, "messages": the prompt's turns, "response": the response
    /// text}`, answered `{"reward": x}` (a finite number). Transport errors,
    /// 429, 5xx and an unparseable reply are retried with exponential
    /// backoff; another status, or no reward after the retries, fails the
    /// step naming the rollout. Never a silent 0.
    Http {
        url: String,
        /// The environment variable holding the key sent as
        /// `Authorization: Bearer KEY` (none sent when left out; an error
        /// when it names an unset variable).
        #[serde(default)]
        api_key_env: Option<String>,
        /// Seconds each request may take.
        #[serde(default = "default_http_timeout")]
        timeout_s: f64,
        /// Retries after the first attempt.
        #[serde(default = "default_http_retries")]
        retries: u32,
        /// Seconds before the first retry; doubled each time.
        #[serde(default = "default_http_backoff")]
        backoff_s: f64,
        /// Requests at once.
        #[serde(default = "default_http_in_flight")]
        max_in_flight: usize,
    },
    /// A weighted sum of rewards, e.g. a reward model plus a format check:
    /// `sum_i weights[i] · rewards[i]` (every weight 1 when left out).
    Sum {
        rewards: Vec<RewardConfig>,
        #[serde(default)]
        weights: Option<Vec<f64>>,
    },
}

fn one() -> f64 {
    1.0
}
fn default_rm_batch() -> usize {
    16
}
fn default_http_timeout() -> f64 {
    60.0
}
fn default_http_retries() -> u32 {
    3
}
fn default_http_backoff() -> f64 {
    0.5
}
fn default_http_in_flight() -> usize {
    8
}

impl RewardConfig {
    pub fn validate(&self) -> Result<()> {
        match self {
            RewardConfig::Length { max_tokens, scale } => {
                if *max_tokens == Some(0) {
                    bail!("reward.max_tokens must be at least 1 (or left out for no cap)");
                }
                if !scale.is_finite() {
                    bail!("reward.scale must be a finite number, got {scale}");
                }
            }
            RewardConfig::Contains { text, .. } => {
                if text.is_empty() {
                    bail!("reward.text is empty; give the text a rewarded response contains");
                }
            }
            RewardConfig::Oracle => {}
            RewardConfig::Model { batch_size, max_seq_len, .. } => {
                if *batch_size == 0 || *max_seq_len == Some(0) {
                    bail!("reward.batch_size and reward.max_seq_len must be at least 1");
                }
            }
            RewardConfig::Http { url, timeout_s, backoff_s, max_in_flight, .. } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    bail!("reward.url {url:?} must start with http:// or https://");
                }
                if !(timeout_s.is_finite() && *timeout_s > 0.0) {
                    bail!("reward.timeout_s must be a positive number of seconds, got {timeout_s}");
                }
                if !(backoff_s.is_finite() && *backoff_s >= 0.0) {
                    bail!("reward.backoff_s must be a number of seconds >= 0, got {backoff_s}");
                }
                if *max_in_flight == 0 {
                    bail!("reward.max_in_flight must be at least 1");
                }
            }
            RewardConfig::Sum { rewards, weights } => {
                if rewards.is_empty() {
                    bail!("reward.rewards is empty; a sum needs at least one reward");
                }
                if let Some(w) = weights {
                    if w.len() != rewards.len() {
                        bail!("reward.weights has {} entries for {} rewards", w.len(), rewards.len());
                    }
                    if let Some(x) = w.iter().find(|x| !x.is_finite()) {
                        bail!("reward.weights must be finite numbers, got {x}");
                    }
                }
                for (i, r) in rewards.iter().enumerate() {
                    r.validate().with_context(|| format!("reward.rewards[{i}]"))?;
                }
            }
        }
        Ok(())
    }

    /// The reward model directories this reward reads (inputs of the stage).
    pub fn model_paths(&self) -> Vec<&Path> {
        match self {
            RewardConfig::Model { path, .. } => vec![path.as_path()],
            RewardConfig::Sum { rewards, .. } => rewards.iter().flat_map(|r| r.model_paths()).collect(),
            _ => vec![],
        }
    }

    /// Resolves relative paths against `base` (the reward model's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        match self {
            RewardConfig::Model { path, .. } if path.is_relative() => *path = base.join(&*path),
            RewardConfig::Sum { rewards, .. } => rewards.iter_mut().for_each(|r| r.resolve_paths(base)),
            _ => {}
        }
    }

    /// Builds the reward function; a reward model is loaded on `device` in
    /// `kind`, frozen.
    pub fn build(&self, device: Device, kind: Kind) -> Result<Box<dyn RewardFn>> {
        self.build_over(device, kind, None)
    }

    /// [`RewardConfig::build`], with a reward model that is a LoRA reward
    /// stage's output over the policy's own base ([`shared_adapter`]) built
    /// over `shared`'s base tensors instead of loaded: policy, reference and
    /// reward model then hold one copy of the base weights. Says on stderr
    /// which way each reward model was built.
    pub fn build_over(
        &self,
        device: Device,
        kind: Kind,
        shared: Option<&SharedBase>,
    ) -> Result<Box<dyn RewardFn>> {
        self.validate()?;
        Ok(match self {
            RewardConfig::Length { max_tokens, scale } => {
                Box::new(LengthReward { max_tokens: *max_tokens, scale: *scale })
            }
            RewardConfig::Contains { text, case_sensitive } => {
                Box::new(ContainsReward { text: text.clone(), case_sensitive: *case_sensitive })
            }
            RewardConfig::Oracle => Box::new(OracleReward),
            RewardConfig::Model { path, batch_size, max_seq_len } => {
                let adapter = match shared {
                    Some(s) => shared_adapter(path, s.dir)?,
                    None => None,
                };
                match (shared, adapter) {
                    (Some(s), Some(adapter)) => {
                        eprintln!(
                            "rl: reward model {}: its LoRA adapter {} over the policy's base weights (one copy of the base for policy, reference and reward model)",
                            path.display(),
                            adapter.display()
                        );
                        Box::new(RewardModelFn::over_base(
                            path,
                            &adapter,
                            s.policy,
                            *batch_size,
                            *max_seq_len,
                        )?)
                    }
                    _ => {
                        eprintln!(
                            "rl: reward model {}: loaded on its own ({})",
                            path.display(),
                            if shared.is_some() {
                                "not a LoRA reward model over the policy's base"
                            } else {
                                "the policy is not trained with LoRA"
                            }
                        );
                        Box::new(RewardModelFn::load(path, device, kind, *batch_size, *max_seq_len)?)
                    }
                }
            }
            RewardConfig::Http { url, api_key_env, timeout_s, retries, backoff_s, max_in_flight } => {
                Box::new(HttpReward::new(
                    url,
                    api_key_env.as_deref(),
                    Duration::from_secs_f64(*timeout_s),
                    *retries,
                    Duration::from_secs_f64(*backoff_s),
                    *max_in_flight,
                )?)
            }
            RewardConfig::Sum { rewards, weights } => {
                let parts = rewards
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let w = weights.as_ref().map_or(1.0, |w| w[i]);
                        let part = r.build_over(device, kind, shared);
                        Ok((w, part.with_context(|| format!("reward.rewards[{i}]"))?))
                    })
                    .collect::<Result<_>>()?;
                Box::new(SumReward { parts })
            }
        })
    }
}

/// The adapter of a LoRA reward model over the base `policy_dir`: when the
/// reward model `model_dir` is a reward stage's `X/model` whose sibling
/// `X/adapter` is a `SEQ_CLS` PEFT adapter with `base_model_name_or_path`
/// the same directory as `policy_dir` (canonicalized), that adapter
/// directory; else None.
pub fn shared_adapter(model_dir: &Path, policy_dir: &Path) -> Result<Option<PathBuf>> {
    let Some(adapter) = model_dir.parent().map(|x| x.join("adapter")) else {
        return Ok(None);
    };
    let cfg_path = adapter.join(lm::peft::ADAPTER_CONFIG);
    if !cfg_path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    if v.get("task_type").and_then(|t| t.as_str()) != Some(TaskType::SeqCls.as_str()) {
        return Ok(None);
    }
    let Some(base) = v.get("base_model_name_or_path").and_then(|b| b.as_str()) else {
        return Ok(None);
    };
    let same = match (std::fs::canonicalize(base), std::fs::canonicalize(policy_dir)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    Ok(same.then_some(adapter))
}

/// An external verifier over HTTP (see [`RewardConfig::Http`]).
pub struct HttpReward {
    pub url: String,
    pub retries: u32,
    pub backoff: Duration,
    pub max_in_flight: usize,
    agent: ureq::Agent,
    api_key: Option<String>,
}

impl HttpReward {
    /// A client for `url`; the key is read from the variable `api_key_env`
    /// names (an error when it is unset or empty).
    pub fn new(
        url: &str,
        api_key_env: Option<&str>,
        timeout: Duration,
        retries: u32,
        backoff: Duration,
        max_in_flight: usize,
    ) -> Result<Self> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("reward.url {url:?} must start with http:// or https://");
        }
        let api_key = match api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.is_empty() => Some(k),
                _ => bail!("reward.api_key_env names {var}, which is not set (or empty)"),
            },
        };
        let config =
            ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build();
        Ok(HttpReward {
            url: url.to_string(),
            retries,
            backoff,
            max_in_flight: max_in_flight.max(1),
            agent: config.into(),
            api_key,
        })
    }

    /// The request body for `r`.
    pub fn body(r: &Rollout) -> String {
        serde_json::json!({
            "prompt": last_user_text(r).unwrap_or(""),
            "messages": r.prompt.messages,
            "response": r.text,
        })
        .to_string()
    }

    /// One reward, with retries.
    fn one(&self, body: &str) -> Result<f64> {
        let tries = Retries { retries: self.retries, backoff: self.backoff };
        post_json(&self.agent, &self.url, self.api_key.as_deref(), body, tries, "reward", |text| {
            let reward = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v.get("reward").and_then(serde_json::Value::as_f64))
                .filter(|x| x.is_finite());
            Ok(match reward {
                Some(x) => Reply::Done(x),
                None => Reply::Retry(format!("the reply is not {{\"reward\": <finite number>}}: {text}")),
            })
        })
    }
}

impl RewardFn for HttpReward {
    fn name(&self) -> String {
        format!("http {}", self.url)
    }

    fn score(&mut self, batch: &[Rollout]) -> Result<Vec<f64>> {
        let bodies: Vec<String> = batch.iter().map(HttpReward::body).collect();
        let results: Mutex<Vec<Option<Result<f64>>>> = Mutex::new((0..batch.len()).map(|_| None).collect());
        let next = AtomicUsize::new(0);
        let this = &*self;
        std::thread::scope(|s| {
            for _ in 0..this.max_in_flight.clamp(1, batch.len().max(1)) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= bodies.len() {
                        break;
                    }
                    let r = this.one(&bodies[i]);
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                });
            }
        });
        let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let at = || {
                    let mut q: String = last_user_text(&batch[i]).unwrap_or("").chars().take(60).collect();
                    if q.len() < last_user_text(&batch[i]).unwrap_or("").len() {
                        q.push('…');
                    }
                    format!("http reward: rollout {i} (prompt {q:?})")
                };
                r.ok_or_else(|| anyhow::anyhow!("rollout {i} was not scored"))
                    .and_then(|x| x)
                    .with_context(at)
            })
            .collect()
    }
}

/// A weighted sum of rewards (see [`RewardConfig::Sum`]).
pub struct SumReward {
    pub parts: Vec<(f64, Box<dyn RewardFn>)>,
}

impl RewardFn for SumReward {
    fn name(&self) -> String {
        let terms: Vec<String> = self.parts.iter().map(|(w, r)| format!("{w} × {}", r.name())).collect();
        format!("sum({})", terms.join(" + "))
    }

    fn score(&mut self, batch: &[Rollout]) -> Result<Vec<f64>> {
        let mut total = vec![0.0; batch.len()];
        for (k, (w, r)) in self.parts.iter_mut().enumerate() {
            let part = r.score(batch).with_context(|| format!("reward.rewards[{k}] ({})", r.name()))?;
            if part.len() != batch.len() {
                bail!("reward.rewards[{k}] gave {} rewards for {} rollouts", part.len(), batch.len());
            }
            total.iter_mut().zip(part).for_each(|(t, x)| *t += *w * x);
        }
        Ok(total)
    }
}

/// The content of the prompt's last user message (where a built-in task's
/// question is).
pub fn last_user_text(r: &Rollout) -> Option<&str> {
    r.prompt.messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.as_str())
}

/// The oracle of a rollout: `Some(correct)` when its prompt is a built-in
/// task, `None` otherwise.
pub fn oracle(r: &Rollout) -> Option<bool> {
    datasets::tasks::check(last_user_text(r)?, &r.text)
}

/// Reward = 1 for a correct answer to a built-in task, else 0; an error for
/// a prompt that is not a built-in task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OracleReward;

impl RewardFn for OracleReward {
    fn name(&self) -> String {
        "oracle (built-in tasks)".into()
    }

    fn score(&mut self, batch: &[Rollout]) -> Result<Vec<f64>> {
        batch
            .iter()
            .map(|r| match oracle(r) {
                Some(ok) => Ok(f64::from(u8::from(ok))),
                None => bail!(
                    "the oracle reward needs built-in task prompts (builtin:rl data); {:?} is not one",
                    last_user_text(r).unwrap_or("")
                ),
            })
            .collect()
    }
}

/// A trained reward model, frozen, scoring through the one scoring path
/// `align score` and the reward judge share ([`lm::reward_score`]): each
/// rollout is formatted as the dialogue prompt + model turn (the response
/// text, closed by `<end_of_turn>` when the response ended with it), exactly
/// as the reward model was trained, and scored at its last token. A response
/// that never emitted `<end_of_turn>` (cut at `max_new_tokens`, or ended by
/// `<eos>`) is scored as it is, without a closing `<end_of_turn>` it never
/// generated. Prompts without messages (raw ids, benchmarks) are scored on
/// prompt ids followed by the response ids as generated, which assumes the
/// reward model shares the policy's tokenizer. A sequence longer than
/// `max_seq_len` loses its earliest prompt tokens (after `<bos>`), never
/// response tokens; a response too long to fit alone is an error.
pub struct RewardModelFn {
    /// The model, its tokenizer and statistics, and the shared scoring
    /// (reached through `Deref`).
    pub scorer: RewardScorer,
    pub dir: PathBuf,
}

impl std::ops::Deref for RewardModelFn {
    type Target = RewardScorer;
    fn deref(&self) -> &RewardScorer {
        &self.scorer
    }
}

impl RewardModelFn {
    /// Loads a reward model directory (one with `score.weight`; a causal LM
    /// is refused: its head would be untrained).
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        batch_size: usize,
        max_seq_len: Option<usize>,
    ) -> Result<Self> {
        Ok(RewardModelFn {
            scorer: RewardScorer::load(dir, device, kind, batch_size, max_seq_len)?,
            dir: dir.to_path_buf(),
        })
    }

    /// The reward model of the LoRA reward stage whose outputs are
    /// `model_dir` (the merged model: tokenizer, config, statistics) and
    /// `adapter_dir` (its `SEQ_CLS` adapter and score head), built over the
    /// base tensors of `policy` ([`Gemma::share_base`]: no copy) with the
    /// adapter and head in a frozen `VarStore` of their own, in the base's
    /// dtype and device.
    pub fn over_base(
        model_dir: &Path,
        adapter_dir: &Path,
        policy: &Gemma,
        batch_size: usize,
        max_seq_len: Option<usize>,
    ) -> Result<Self> {
        let file = lm::peft::load_adapter(adapter_dir)?;
        if file.task_type != TaskType::SeqCls {
            bail!(
                "{} is a {} adapter, not a reward model's (SEQ_CLS)",
                adapter_dir.display(),
                file.task_type.as_str()
            );
        }
        let score = file.score.as_ref().with_context(|| {
            format!(
                "the SEQ_CLS adapter {} has no score head (base_model.model.score.weight)",
                adapter_dir.display()
            )
        })?;
        let cfg = lm::checkpoint::read_config(model_dir)?;
        let pc = &policy.cfg;
        if (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers)
            != (pc.vocab_size, pc.hidden_size, pc.num_hidden_layers)
        {
            bail!(
                "the reward model {} is not of the policy's shape (vocab, hidden, layers) {:?}",
                model_dir.display(),
                (pc.vocab_size, pc.hidden_size, pc.num_hidden_layers)
            );
        }
        let (device, kind) = (policy.device(), policy.kind());
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let head = (&root / "score").add("weight", score.to_kind(kind).to_device(device), false);
        let score = lm::model::Linear { weight: head, lora: None };
        let mut rm = RewardModel::from_backbone(policy.share_base(), score, &cfg)?;
        rm.backbone.attach_lora(&root, &file.config, 0)?;
        rm.backbone.load_adapter_tensors(&file.tensors, adapter_dir)?;
        let tokenizer = lm::Tokenizer::from_file(&model_dir.join(lm::checkpoint::TOKENIZER))?;
        let stats = RewardStats::read(model_dir)?;
        Ok(RewardModelFn {
            scorer: RewardScorer::from_model(vs, rm, tokenizer, stats, batch_size, max_seq_len)?,
            dir: model_dir.to_path_buf(),
        })
    }

    /// The token ids the reward model scores for `r`: see
    /// [`RewardModelFn`] for the formatting and [`cut_prompt_from_left`] for
    /// the truncation to `max_seq_len`.
    pub fn format(&self, r: &Rollout) -> Result<Vec<i64>> {
        let e = if r.prompt.messages.is_empty() {
            let mut v = r.prompt.ids.clone();
            v.extend_from_slice(&r.response_ids);
            self.scorer.fit(v, r.prompt.ids.len())?
        } else {
            self.scorer.encode(&Conversation {
                prompt: &r.prompt.messages,
                response: vec![lm::Message::model(&r.text)],
                closed: r.ended(),
            })?
        };
        Ok(e.ids)
    }
}

impl RewardFn for RewardModelFn {
    fn name(&self) -> String {
        format!("reward model {}", self.dir.display())
    }

    fn score(&mut self, batch: &[Rollout]) -> Result<Vec<f64>> {
        let seqs: Vec<Vec<i64>> = batch
            .iter()
            .enumerate()
            .map(|(i, r)| {
                self.format(r).with_context(|| {
                    format!(
                        "formatting rollout {i} for the reward model (reward.max_seq_len = {}; raise it or lower max_new_tokens)",
                        self.scorer.max_seq_len
                    )
                })
            })
            .collect::<Result<_>>()?;
        self.scorer.score_ids(&seqs.iter().map(Vec::as_slice).collect::<Vec<_>>())
    }

    fn stats(&self) -> Option<(f64, f64)> {
        self.scorer.stats.as_ref().map(|s| (s.mean, s.std))
    }

    fn reward_model(&self) -> Option<&RewardModel> {
        Some(&self.scorer.model)
    }
}

/// Reward = min(response tokens, `max_tokens`) · `scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct LengthReward {
    pub max_tokens: Option<usize>,
    pub scale: f64,
}

impl RewardFn for LengthReward {
    fn name(&self) -> String {
        match self.max_tokens {
            Some(m) => format!("length (cap {m}, scale {})", self.scale),
            None => format!("length (scale {})", self.scale),
        }
    }

    fn score(&mut self, batch: &[Rollout]) -> Result<Vec<f64>> {
        Ok(batch
            .iter()
            .map(|r| {
                let n = r.content().len();
                self.max_tokens.map_or(n, |m| n.min(m)) as f64 * self.scale
            })
            .collect())
    }
}

/// Reward = 1 when the response text contains `text`, else 0.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainsReward {
    pub text: String,
    pub case_sensitive: bool,
}

impl RewardFn for ContainsReward {
    fn name(&self) -> String {
        format!("contains {:?}", self.text)
    }

    fn score(&mut self, batch: &[Rollout]) -> Result<Vec<f64>> {
        Ok(batch
            .iter()
            .map(|r| {
                let hit = if self.case_sensitive {
                    r.text.contains(&self.text)
                } else {
                    r.text.to_ascii_lowercase().contains(&self.text.to_ascii_lowercase())
                };
                f64::from(u8::from(hit))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Prompt;
    use lm::StopReason;
    use std::sync::Arc;

    fn rollout(ids: Vec<i64>, text: &str, stop: StopReason) -> Rollout {
        Rollout {
            group: 0,
            prompt: Arc::new(Prompt::from_ids(vec![2])),
            sample_logprobs: vec![0.0; ids.len()],
            response_ids: ids,
            text: text.into(),
            stop_reason: stop,
        }
    }

    #[test]
    fn length_reward_counts_content_tokens_with_a_cap() {
        let b = [
            rollout(vec![10, 11, 12, 5], "abc", StopReason::EndOfTurn),
            rollout(vec![10, 11, 12, 13, 14], "abcde", StopReason::Length),
        ];
        let mut r = LengthReward { max_tokens: Some(4), scale: 0.5 };
        assert_eq!(r.score(&b).unwrap(), vec![1.5, 2.0]);
    }

    #[test]
    fn contains_reward_matches_text() {
        let b = [
            rollout(vec![10], "Hello World", StopReason::Length),
            rollout(vec![10], "bye", StopReason::Length),
        ];
        let mut r = ContainsReward { text: "world".into(), case_sensitive: false };
        assert_eq!(r.score(&b).unwrap(), vec![1.0, 0.0]);
        let mut r = ContainsReward { text: "world".into(), case_sensitive: true };
        assert_eq!(r.score(&b).unwrap(), vec![0.0, 0.0]);
    }

    #[test]
    fn reward_config_is_a_tagged_table_and_rejects_unknown_fields() {
        let c: RewardConfig = toml::from_str("kind = \"length\"\nmax_tokens = 8").unwrap();
        assert_eq!(c, RewardConfig::Length { max_tokens: Some(8), scale: 1.0 });
        let err = toml::from_str::<RewardConfig>("kind = \"length\"\nmax_token = 8").unwrap_err().to_string();
        assert!(err.contains("max_token"), "{err}");
        let err = toml::from_str::<RewardConfig>("kind = \"bogus\"").unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        assert_eq!(toml::from_str::<RewardConfig>("kind = \"oracle\"").unwrap(), RewardConfig::Oracle);
        let mut m: RewardConfig = toml::from_str("kind = \"model\"\npath = \"rm\"").unwrap();
        m.resolve_paths(Path::new("/runs"));
        assert_eq!(m, RewardConfig::Model { path: "/runs/rm".into(), batch_size: 16, max_seq_len: None });
    }
}
