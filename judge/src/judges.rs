//! The judges a `--judge SPEC` names: `oracle:NAME`, `reward:DIR`,
//! `lm:DIR` and `http:URL`.

use crate::oracle::{get_oracle, Oracle};
use crate::pairwise::{Judge, RawVerdict, Shown};
use crate::template::{Fields, Template};
use crate::verdict::{parse_verdict, Verdict};
use anyhow::{bail, Context, Result};
use lm::checkpoint::Loaded;
use lm::reward_score::{Conversation, RewardScorer};
use lm::{GenerationConfig, Message};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// A parsed `--judge` spec.
#[derive(Debug, Clone, PartialEq)]
pub enum JudgeSpec {
    Lm(PathBuf),
    Http(String),
    Reward(PathBuf),
    Oracle(String),
}

impl JudgeSpec {
    pub fn parse(s: &str) -> Result<JudgeSpec> {
        let Some((kind, rest)) = s.split_once(':') else {
            bail!("judge spec {s:?} has no kind; write lm:DIR, http:URL, reward:DIR or oracle:NAME")
        };
        if rest.is_empty() {
            bail!("judge spec {s:?}: nothing after `{kind}:`");
        }
        Ok(match kind {
            "lm" => JudgeSpec::Lm(rest.into()),
            "http" => JudgeSpec::Http(rest.into()),
            "reward" => JudgeSpec::Reward(rest.into()),
            "oracle" => JudgeSpec::Oracle(rest.into()),
            other => bail!("judge spec {s:?}: unknown kind {other:?}; use lm:, http:, reward: or oracle:"),
        })
    }
}

/// A verdict from two scores: higher wins, within `tol` a tie.
pub fn verdict_from_scores(a: f64, b: f64, tol: f64) -> Verdict {
    if (a - b).abs() <= tol {
        Verdict::Tie
    } else if a > b {
        Verdict::A
    } else {
        Verdict::B
    }
}

/// `oracle:NAME`: scores both answers with a registered [`Oracle`].
pub struct OracleJudge {
    pub name: String,
    pub oracle: Arc<dyn Oracle>,
}

impl OracleJudge {
    pub fn new(name: &str) -> Result<Self> {
        Ok(OracleJudge { name: name.to_string(), oracle: get_oracle(name)? })
    }
}

impl Judge for OracleJudge {
    fn name(&self) -> String {
        format!("oracle:{}", self.name)
    }
    fn judge(&self, items: &[Shown], _attempt: u32) -> Result<Vec<RawVerdict>> {
        items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let a = self
                    .oracle
                    .score(s.question, s.answer_a, s.reference)
                    .with_context(|| format!("item {i}"))?;
                let b = self
                    .oracle
                    .score(s.question, s.answer_b, s.reference)
                    .with_context(|| format!("item {i}"))?;
                Ok(RawVerdict::new(Some(verdict_from_scores(a, b, 0.0)), format!("score_a={a} score_b={b}")))
            })
            .collect()
    }
}

/// Right-pads sequences into (B, T) ids and a (B, T) validity mask.
fn pad_right(seqs: &[&[i64]], pad: i64, device: Device) -> Result<(Tensor, Tensor)> {
    let b = seqs.len() as i64;
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0) as i64;
    if t == 0 {
        bail!("cannot batch empty sequences");
    }
    let mut ids = vec![pad; (b * t) as usize];
    let mut valid = vec![false; (b * t) as usize];
    for (r, s) in seqs.iter().enumerate() {
        let off = r * t as usize;
        ids[off..off + s.len()].copy_from_slice(s);
        valid[off..off + s.len()].iter_mut().for_each(|v| *v = true);
    }
    Ok((
        Tensor::from_slice(&ids).view([b, t]).to_device(device),
        Tensor::from_slice(&valid).view([b, t]).to_device(device),
    ))
}

/// `reward:DIR`: the answer with the higher reward wins; rewards within
/// `tolerance` are a tie. Scores through the one scoring path `align score`
/// and the RL reward share ([`lm::reward_score`]): a prompt too long for the
/// model loses its earliest tokens, never the answer's.
pub struct RewardJudge {
    pub dir: PathBuf,
    pub scorer: RewardScorer,
    pub tolerance: f64,
}

impl RewardJudge {
    pub fn load(dir: &Path, device: Device, kind: Kind, tolerance: f64, batch_size: usize) -> Result<Self> {
        if !(tolerance >= 0.0 && tolerance.is_finite()) {
            bail!("the reward tie tolerance must be a finite number >= 0, got {tolerance}");
        }
        let scorer = RewardScorer::load(dir, device, kind, batch_size, None)?;
        Ok(RewardJudge { dir: dir.to_path_buf(), scorer, tolerance })
    }

    /// Rewards of (prompt, answer) rows.
    pub fn rewards(&self, rows: &[(&[Message], &str)]) -> Result<Vec<f64>> {
        let seqs: Vec<Vec<i64>> = rows
            .iter()
            .enumerate()
            .map(|(i, (p, a))| self.encode(p, a).with_context(|| format!("row {i}")))
            .collect::<Result<_>>()?;
        self.scorer.score_ids(&seqs.iter().map(Vec::as_slice).collect::<Vec<_>>())
    }

    /// The ids the reward model scores for `prompt` answered by `answer`.
    fn encode(&self, prompt: &[Message], answer: &str) -> Result<Vec<i64>> {
        Ok(self.scorer.encode(&Conversation::new(prompt, answer))?.ids)
    }
}

impl Judge for RewardJudge {
    fn name(&self) -> String {
        format!("reward:{}", self.dir.display())
    }
    fn judge(&self, items: &[Shown], _attempt: u32) -> Result<Vec<RawVerdict>> {
        // Each answer is scored once even though it is shown in both orders:
        // keyed by the whole rendered conversation (system turns and all),
        // so two prompts that differ anywhere never share a score.
        let mut index: HashMap<Vec<i64>, usize> = HashMap::new();
        let mut seqs: Vec<Vec<i64>> = vec![];
        let mut slots = Vec::with_capacity(items.len());
        for (i, s) in items.iter().enumerate() {
            let mut slot = [0; 2];
            for (k, a) in [s.answer_a, s.answer_b].into_iter().enumerate() {
                let ids = self.encode(s.prompt, a).with_context(|| format!("item {i}"))?;
                slot[k] = *index.entry(ids.clone()).or_insert_with(|| {
                    seqs.push(ids);
                    seqs.len() - 1
                });
            }
            slots.push(slot);
        }
        let r = self.scorer.score_ids(&seqs.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
        Ok(slots
            .into_iter()
            .map(|[ia, ib]| {
                let (a, b) = (r[ia], r[ib]);
                RawVerdict::new(
                    Some(verdict_from_scores(a, b, self.tolerance)),
                    format!("reward_a={a:.6} reward_b={b:.6}"),
                )
            })
            .collect())
    }
}

/// How an LM judge decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LmMode {
    /// Compare the log-probabilities of the tokens "A" and "B" as the first
    /// token of the judge's reply (no reasoning). Use the `choice` template.
    Logprob,
    /// Let the judge reason and parse the final `[[A]]`/`[[B]]`/`[[C]]`.
    Reason,
}

/// `lm:DIR`: a local causal LM with a template.
pub struct LmJudge {
    pub dir: PathBuf,
    pub loaded: Loaded,
    pub template: Template,
    pub mode: LmMode,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub seed: u64,
}

impl LmJudge {
    pub fn load(dir: &Path, device: Device, kind: Kind, template: Template, mode: LmMode) -> Result<Self> {
        let loaded = lm::checkpoint::load_causal_lm(dir, device, kind)?;
        Ok(LmJudge {
            dir: dir.to_path_buf(),
            loaded,
            template,
            mode,
            max_new_tokens: 512,
            batch_size: 8,
            seed: 0,
        })
    }

    fn prompt(&self, s: &Shown) -> Result<Vec<i64>> {
        let text = self.template.render(&Fields {
            question: s.question,
            answer_a: s.answer_a,
            answer_b: s.answer_b,
            reference: s.reference,
        })?;
        lm::chat::prompt_ids(&self.loaded.tokenizer, &[Message::user(&text)])
    }

    /// The single token id of `letter`, as the reply's first token.
    fn letter_id(&self, letter: &str) -> Result<i64> {
        let ids = self.loaded.tokenizer.encode(letter)?;
        match ids.as_slice() {
            [id] => Ok(*id),
            _ => bail!(
                "judge {}: {letter:?} is not one token in its tokenizer ({ids:?}); use --lm-mode reason",
                self.dir.display()
            ),
        }
    }

    fn judge_logprob(&self, items: &[Shown]) -> Result<Vec<RawVerdict>> {
        let _g = tch::no_grad_guard();
        let (ia, ib) = (self.letter_id("A")?, self.letter_id("B")?);
        let max_len = self.loaded.model.cfg.max_position_embeddings as usize;
        let prompts: Vec<Vec<i64>> = items.iter().map(|s| self.prompt(s)).collect::<Result<_>>()?;
        if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.len() > max_len) {
            bail!("judge prompt {i} is {} tokens, more than the judge's {max_len}", p.len());
        }
        let mut out = vec![];
        let dev = self.loaded.model.device();
        for chunk in prompts.chunks(self.batch_size.max(1)) {
            let refs: Vec<&[i64]> = chunk.iter().map(Vec::as_slice).collect();
            // Right padding: causal attention keeps the real tokens unaffected.
            let (ids, _) = pad_right(&refs, self.loaded.tokenizer.special.pad, dev)?;
            let (b, t) = ids.size2()?;
            let positions = Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(0).expand([b, t], true);
            let model = &self.loaded.model;
            // The head only at each row's last real position: (B, V), never (B, T, V).
            let hidden = model.forward_hidden(&ids, &positions, None, None)?; // (B, T, H)
            let last: Vec<i64> = chunk.iter().map(|p| p.len() as i64 - 1).collect();
            let h = hidden.size()[2];
            let idx = Tensor::from_slice(&last).to_device(dev).view([b, 1, 1]).expand([b, 1, h], false);
            let picked = hidden.f_gather(1, &idx, false)?.squeeze_dim(1); // (B, H)
            drop(hidden);
            let lp = model.logits(&picked).to_kind(Kind::Float).log_softmax(-1, Kind::Float); // (B, V)
            let pick = Tensor::from_slice(&[ia, ib]).to_device(dev);
            let ab: Vec<f32> = Vec::try_from(lp.index_select(1, &pick).reshape([-1]).to_device(Device::Cpu))?;
            for r in 0..chunk.len() {
                let (a, b) = (f64::from(ab[2 * r]), f64::from(ab[2 * r + 1]));
                out.push(RawVerdict::new(
                    Some(verdict_from_scores(a, b, 0.0)),
                    format!("logp(A)={a:.6} logp(B)={b:.6}"),
                ));
            }
        }
        Ok(out)
    }

    fn judge_reason(&self, items: &[Shown], attempt: u32) -> Result<Vec<RawVerdict>> {
        let sp = self.loaded.tokenizer.special;
        // Greedy first; the retry of an unparseable verdict samples.
        let cfg = GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: if attempt == 0 { 0.0 } else { 0.7 },
            top_k: None,
            top_p: None,
            seed: self.seed.wrapping_add(u64::from(attempt)),
            eos_id: sp.eos,
            end_of_turn_id: Some(sp.end_of_turn),
            pad_id: sp.pad,
        };
        let prompts: Vec<Vec<i64>> = items.iter().map(|s| self.prompt(s)).collect::<Result<_>>()?;
        let mut out = vec![];
        let wt = lm::InferenceWeights::for_model(&self.loaded.model); // once for all chunks
        for chunk in prompts.chunks(self.batch_size.max(1)) {
            for g in lm::generate::generate_using(&self.loaded.model, wt.as_ref(), chunk, &cfg, |_, _| true)?
            {
                let text = self.loaded.tokenizer.decode(g.content(), true)?;
                out.push(RawVerdict::new(parse_verdict(&text), text));
            }
        }
        Ok(out)
    }
}

impl Judge for LmJudge {
    fn name(&self) -> String {
        format!("lm:{}", self.dir.display())
    }
    fn judge(&self, items: &[Shown], attempt: u32) -> Result<Vec<RawVerdict>> {
        match self.mode {
            LmMode::Logprob => self.judge_logprob(items),
            LmMode::Reason => self.judge_reason(items, attempt),
        }
    }
    /// Four batches: the same batches as one call over all items.
    fn chunk_items(&self) -> Option<usize> {
        Some(4 * self.batch_size.max(1))
    }
}
