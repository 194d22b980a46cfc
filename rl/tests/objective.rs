//! The RL objective: log-probs of the sampling distribution at T ≠ 1 with
//! top-k, loss aggregations, advantages and truncated rollouts, end to end
//! on the fixture.

mod common;

use common::{config, trainer, write_prompts};

const T07: &str = "temperature = 0.7\ntop_k = 20";

#[test]
fn stored_logprobs_equal_teacher_forced_ones_at_temperature_0_7_with_top_k() {
    let d = tempfile::tempdir().unwrap();
    let prompts = write_prompts(d.path(), 8);
    let (t, p) = trainer(config(d.path(), &prompts, T07));
    let r = t.rollouts(0, &p).unwrap();
    let b = rl::rollout::TeacherBatch::new(&r, 0..r.len(), t.specials.pad, tch::Device::Cpu).unwrap();
    let (lp, _) = tch::no_grad(|| rl::rollout::response_logprobs(&t.policy, &b, false, 0.7).unwrap());
    let (lp1, _) = tch::no_grad(|| rl::rollout::response_logprobs(&t.policy, &b, false, 1.0).unwrap());
    let (mut n, mut max_diff, mut max_diff_t1) = (0, 0.0f64, 0.0f64);
    for (i, x) in r.iter().enumerate() {
        for (j, &s) in x.sample_logprobs.iter().enumerate() {
            let tf = lp.double_value(&[i as i64, j as i64]);
            max_diff = max_diff.max((tf - f64::from(s)).abs());
            max_diff_t1 = max_diff_t1.max((lp1.double_value(&[i as i64, j as i64]) - f64::from(s)).abs());
            n += 1;
        }
    }
    assert!(n > 16);
    // In f32 the KV-cached decoding and the full teacher-forced pass round
    // differently (about 1e-5); in f64 below they agree to 1e-6.
    assert!(max_diff < 5e-5, "stored vs teacher-forced log-probs at T = 0.7 differ by {max_diff}");
    assert!(max_diff_t1 > 1e-2, "the T = 1 log-probs should differ from the sampling ones ({max_diff_t1})");

    // The same in f64: the model in double precision, the log-probs of both
    // paths from the same f32 log_softmax(logits / T).
    let m = lm::checkpoint::load_causal_lm(&common::fixture(), tch::Device::Cpu, tch::Kind::Double).unwrap();
    let sampling = rl::rollout::Sampling {
        max_new_tokens: 12,
        temperature: 0.7,
        top_k: Some(20),
        top_p: None,
        batch_size: 0,
    };
    let r = rl::rollout::sample(&m.model, &p, 4, &sampling, t.specials, None, 7, 0, 1).unwrap();
    let b = rl::rollout::TeacherBatch::new(&r, 0..r.len(), t.specials.pad, tch::Device::Cpu).unwrap();
    let (lp, _) = tch::no_grad(|| rl::rollout::response_logprobs(&m.model, &b, false, 0.7).unwrap());
    let mut max_diff = 0.0f64;
    for (i, x) in r.iter().enumerate() {
        for (j, &s) in x.sample_logprobs.iter().enumerate() {
            max_diff = max_diff.max((lp.double_value(&[i as i64, j as i64]) - f64::from(s)).abs());
        }
    }
    assert!(max_diff < 1e-6, "f64: stored vs teacher-forced log-probs at T = 0.7 differ by {max_diff}");
}

#[test]
fn first_update_ratio_is_exactly_one_and_step_zero_kl_is_zero_at_temperature_0_7() {
    let d = tempfile::tempdir().unwrap();
    let prompts = write_prompts(d.path(), 8);
    let extra = format!("{T07}\nbeta = 0.1\nupdates_per_batch = 2\nkl_estimator = \"k3\"");
    let mut cfg = config(d.path(), &prompts, &extra);
    // A tiny step so that the second update's ratios stay in the clip range
    // too: the clip fraction is that of the first update.
    cfg.stage.optim.lr = 1e-9;
    let (mut t, p) = trainer(cfg);
    // The old log-probs (chunked, no graph) are those of the full logits
    // with a graph; the first update computes them as the old ones (the
    // same chunks over the same rows): its ratio is exactly 1, so it clips
    // nothing.
    let r = t.rollouts(0, &p).unwrap();
    let b = rl::rollout::TeacherBatch::new(&r, 0..r.len(), t.specials.pad, tch::Device::Cpu).unwrap();
    let (old, _) = tch::no_grad(|| rl::rollout::response_logprobs(&t.policy, &b, true, 0.7).unwrap());
    assert!(!old.requires_grad());
    let new = common::full_logprobs(&t.policy, &b, 0.7);
    assert!(new.requires_grad());
    let ratio = (&new - &old).exp().detach();
    let m = b.mask.to_kind(tch::Kind::Float);
    let dev = ((ratio - 1.0).abs() * &m).max().double_value(&[]);
    assert!(dev < 1e-5, "chunked and full log-probs differ: ratio off 1 by {dev}");
    let (st, _) = t.step(0, &p).unwrap();
    assert_eq!(st.clip_frac, 0.0);
    assert_eq!(st.kl, 0.0, "the policy is the reference before the first update");
    assert_eq!(st.kl_per_token, 0.0);
}

#[test]
fn greedy_decoding_is_refused_for_rl() {
    let d = tempfile::tempdir().unwrap();
    let prompts = write_prompts(d.path(), 8);
    let mut cfg = config(d.path(), &prompts, "");
    cfg.temperature = 0.0;
    let err = format!("{:#}", cfg.validate().unwrap_err());
    assert!(err.contains("temperature") && err.contains("greedy"), "{err}");
}

/// A randomly initialised reward model on the fixture's config and
/// tokenizer.
fn make_reward_model(dir: &std::path::Path) {
    use lm::reward_model::{self, RewardModel};
    let l = lm::checkpoint::load_causal_lm(&common::fixture(), tch::Device::Cpu, tch::Kind::Float).unwrap();
    tch::manual_seed(11);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let m = RewardModel::new(&vs.root(), &l.model.cfg, 0.5).unwrap();
    reward_model::save(dir, &vs, &m, &l.tokenizer, None).unwrap();
}

#[test]
fn truncated_rollouts_are_scored_without_end_of_turn_penalised_and_counted() {
    let d = tempfile::tempdir().unwrap();
    let rm_dir = d.path().join("rm");
    make_reward_model(&rm_dir);
    let rm = rl::RewardModelFn::load(&rm_dir, tch::Device::Cpu, tch::Kind::Float, 3, None).unwrap();
    let prompts = write_prompts(d.path(), 8);
    let (mut t, p) = trainer(config(d.path(), &prompts, "max_new_tokens = 3\nmissing_eot_penalty = 0.5"));
    let r = t.rollouts(0, &p).unwrap();
    let eot = rm.tokenizer.special.end_of_turn;
    let cut: Vec<&rl::Rollout> = r.iter().filter(|x| x.stop_reason == lm::StopReason::Length).collect();
    assert!(!cut.is_empty(), "3 new tokens cut some responses");
    for x in &cut {
        let mut m = x.prompt.messages.clone();
        m.push(lm::Message::model(&x.text));
        let closed = lm::chat::encode(&rm.tokenizer, &m, false).unwrap().ids;
        let got = rm.format(x).unwrap();
        let last = closed.iter().rposition(|&t| t == eot).unwrap();
        assert_eq!(got, closed[..last], "a cut response is scored as it is, without <end_of_turn>");
        // The same response, had it ended, is scored closed.
        let mut ended = (*x).clone();
        ended.stop_reason = lm::StopReason::EndOfTurn;
        assert_eq!(rm.format(&ended).unwrap(), closed);
    }
    let (st, rs) = t.step(0, &p).unwrap();
    let want = rs.iter().filter(|x| x.stop_reason == lm::StopReason::Length).count() as f64 / rs.len() as f64;
    assert_eq!(st.truncated_frac, want);
    assert!(st.truncated_frac > 0.0);
    // The missing end-of-turn penalty still applies (KL is 0 at step 0).
    let penalised = st.score_mean - 0.5 * (1.0 - st.ended_frac);
    assert!((st.total_reward_mean - penalised).abs() < 1e-6, "{} vs {penalised}", st.total_reward_mean);
}

#[test]
fn the_reward_model_cuts_a_long_prompt_from_the_left_and_refuses_a_response_too_long() {
    let d = tempfile::tempdir().unwrap();
    let rm_dir = d.path().join("rm");
    make_reward_model(&rm_dir);
    let prompts = write_prompts(d.path(), 8);
    let (t, p) = trainer(config(d.path(), &prompts, "max_new_tokens = 6"));
    let r = t.rollouts(0, &p).unwrap();
    let x = r.iter().max_by_key(|x| x.prompt.ids.len()).unwrap();
    let full = rl::RewardModelFn::load(&rm_dir, tch::Device::Cpu, tch::Kind::Float, 3, None).unwrap();
    let whole = full.format(x).unwrap();
    // The prompt turns alone: the model turn's header belongs to the response.
    let prompt_len = lm::chat::encode(&full.tokenizer, &x.prompt.messages, false).unwrap().ids.len();
    let resp = whole.len() - prompt_len;
    // Room for <bos>, two prompt tokens and the response.
    let max = resp + 3;
    let short = rl::RewardModelFn::load(&rm_dir, tch::Device::Cpu, tch::Kind::Float, 3, Some(max)).unwrap();
    let got = short.format(x).unwrap();
    assert_eq!(got.len(), max);
    assert_eq!(got[0], whole[0], "<bos> stays");
    assert_eq!(got[1..], whole[whole.len() - (max - 1)..], "the prompt loses its earliest tokens");
    assert_eq!(got[max - resp..], whole[prompt_len..], "the response is whole");
    let tiny = rl::RewardModelFn::load(&rm_dir, tch::Device::Cpu, tch::Kind::Float, 3, Some(resp)).unwrap();
    let err = format!("{:#}", tiny.format(x).unwrap_err());
    assert!(err.contains("response") && err.contains("max_seq_len"), "{err}");
}

#[test]
fn a_grpo_step_has_group_normalised_advantages() {
    let d = tempfile::tempdir().unwrap();
    let prompts = write_prompts(d.path(), 8);
    let extra = "baseline = \"group_mean\"\nscale = \"group_std\"\nloss_aggregation = \"sequence_sum\"\nwhiten_advantages = true";
    let cfg = config(d.path(), &prompts, extra);
    assert_eq!(
        cfg.advantage_scale(),
        rl::AdvantageScale::GroupStd,
        "an explicit scale wins over whiten_advantages"
    );
    assert_eq!(cfg.loss_aggregation, rl::LossAggregation::SequenceSum);
    let (mut t, p) = trainer(cfg);
    let (st, _) = t.step(0, &p).unwrap();
    // (R − mean) / std with the unbiased std of k = 4 samples: each group
    // sums to zero and |A| ≤ (k − 1)/√k = 1.5.
    assert!(st.adv_mean.abs() < 1e-6, "{}", st.adv_mean);
    assert!(st.adv_max <= 1.5 + 1e-6 && st.adv_min >= -1.5 - 1e-6, "{} {}", st.adv_min, st.adv_max);
    assert!(st.adv_std > 0.5 && st.loss.is_finite());
}
