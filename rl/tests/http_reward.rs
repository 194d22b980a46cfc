//! The `http` reward against a fake verifier (axum on loopback) that fails
//! on purpose, counts requests in flight and checks the API key; and the
//! weighted `sum` of rewards.

use rl::{RewardConfig, Rollout};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the fake server saw.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    authorization: Mutex<Vec<Option<String>>>,
    bodies: Mutex<Vec<Value>>,
}

struct Fake {
    url: String,
    seen: Arc<Seen>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

#[derive(Clone)]
struct FakeState {
    seen: Arc<Seen>,
    failures: Arc<Vec<u16>>,
    delay: Duration,
    /// The reply body to a request body.
    answer: fn(&Value) -> String,
}

async fn fake_reward(
    axum::extract::State(st): axum::extract::State<FakeState>,
    headers: axum::http::HeaderMap,
    body: String,
) -> (axum::http::StatusCode, String) {
    let seen = &st.seen;
    let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let n = seen.requests.fetch_add(1, Ordering::SeqCst);
    let auth = headers.get("Authorization").map(|v| v.to_str().unwrap().to_string());
    seen.authorization.lock().unwrap().push(auth);
    tokio::time::sleep(st.delay).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    seen.bodies.lock().unwrap().push(v.clone());
    let (status, reply) = match st.failures.get(n) {
        Some(&s) => (s, json!({"error": format!("try again ({s})")}).to_string()),
        None => (200, (st.answer)(&v)),
    };
    seen.in_flight.fetch_sub(1, Ordering::SeqCst);
    (axum::http::StatusCode::from_u16(status).unwrap(), reply)
}

/// A fake verifier at `/reward`: the first `failures.len()` requests get
/// those statuses, later ones `answer(body)` after `delay`.
fn fake(failures: Vec<u16>, delay: Duration, answer: fn(&Value) -> String) -> Fake {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/reward", listener.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let state = FakeState { seen: seen.clone(), failures: Arc::new(failures), delay, answer };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app =
                axum::Router::new().route("/reward", axum::routing::post(fake_reward)).with_state(state);
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
    });
    Fake { url, seen, stop: Some(stop), thread: Some(thread) }
}

/// Reward = the response's length in characters.
fn length_of_response(v: &Value) -> String {
    json!({"reward": v["response"].as_str().unwrap().len() as f64}).to_string()
}

fn rollout(system: Option<&str>, question: &str, text: &str) -> Rollout {
    Rollout {
        group: 0,
        prompt: Arc::new(rl::Prompt {
            messages: lm::chat::single_turn(system, question),
            ids: vec![2],
            category: None,
        }),
        response_ids: vec![10, 5],
        sample_logprobs: vec![0.0, 0.0],
        text: text.into(),
        stop_reason: lm::StopReason::EndOfTurn,
    }
}

fn http_config(url: &str, extra: &str) -> RewardConfig {
    toml::from_str(&format!("kind = \"http\"\nurl = \"{url}\"\nbackoff_s = 0.01\n{extra}")).unwrap()
}

#[test]
fn http_rewards_are_parsed_retried_bounded_and_authorized() {
    // Two failures (429, 503) are retried; at most 3 requests at once.
    let f = fake(vec![429, 503], Duration::from_millis(30), length_of_response);
    std::env::set_var("RL_TEST_VERIFIER_KEY", "sekrit");
    let cfg = http_config(&f.url, "max_in_flight = 3\napi_key_env = \"RL_TEST_VERIFIER_KEY\"");
    cfg.validate().unwrap();
    let mut r = cfg.build(tch::Device::Cpu, tch::Kind::Float).unwrap();
    assert!(r.name().contains("http"), "{}", r.name());
    let batch: Vec<Rollout> = (0..8).map(|i| rollout(Some("Be brief."), "Say hi.", &"x".repeat(i))).collect();
    let got = r.score(&batch).unwrap();
    assert_eq!(got, (0..8).map(|i| i as f64).collect::<Vec<_>>());
    assert_eq!(f.seen.requests.load(Ordering::SeqCst), 10, "8 rollouts + 2 retries");
    let most = f.seen.max_in_flight.load(Ordering::SeqCst);
    assert!((1..=3).contains(&most), "{most} in flight");
    assert!(f.seen.authorization.lock().unwrap().iter().all(|a| a.as_deref() == Some("Bearer sekrit")));
    // The body: the last user message, the prompt's turns and the response.
    let bodies = f.seen.bodies.lock().unwrap();
    let b = bodies.iter().find(|b| b["response"] == "xxx").unwrap();
    assert_eq!(b["prompt"], "Say hi.");
    assert_eq!(b["messages"][0]["role"], "system");
    assert_eq!(b["messages"][1]["content"], "Say hi.");
    // An api_key_env naming an unset variable is refused when building.
    let cfg = http_config(&f.url, "api_key_env = \"RL_TEST_NO_SUCH_KEY_VAR\"");
    let e = cfg.build(tch::Device::Cpu, tch::Kind::Float).err().unwrap().to_string();
    assert!(e.contains("RL_TEST_NO_SUCH_KEY_VAR"), "{e}");
    assert!(toml::from_str::<RewardConfig>("kind = \"http\"\nurl = \"ftp://x\"")
        .unwrap()
        .validate()
        .is_err());
}

#[test]
fn an_unparseable_reward_or_a_failing_server_is_an_error_naming_the_rollout() {
    fn garbage(v: &Value) -> String {
        if v["response"] == "bad" {
            "not json".into()
        } else {
            json!({"reward": 1.0}).to_string()
        }
    }
    let f = fake(vec![], Duration::ZERO, garbage);
    let mut r = http_config(&f.url, "retries = 2").build(tch::Device::Cpu, tch::Kind::Float).unwrap();
    let batch = [rollout(None, "Add: 2 + 3", "5"), rollout(None, "Reverse: d o g", "bad")];
    let e = format!("{:#}", r.score(&batch).unwrap_err());
    assert!(e.contains("rollout 1") && e.contains("Reverse: d o g"), "{e}");
    assert!(e.contains("after 2 retries") && e.contains("not json"), "{e}");
    assert_eq!(f.seen.requests.load(Ordering::SeqCst), 1 + 3, "the bad one was tried 3 times");

    // 5xx until the retries run out: an error, never a silent 0.
    let f = fake(vec![500; 10], Duration::ZERO, length_of_response);
    let mut r = http_config(&f.url, "retries = 1").build(tch::Device::Cpu, tch::Kind::Float).unwrap();
    let e = format!("{:#}", r.score(&batch[..1]).unwrap_err());
    assert!(e.contains("rollout 0") && e.contains("HTTP 500"), "{e}");
    // A 4xx other than 429 is not retried.
    let f = fake(vec![400], Duration::ZERO, length_of_response);
    let mut r = http_config(&f.url, "retries = 3").build(tch::Device::Cpu, tch::Kind::Float).unwrap();
    let e = format!("{:#}", r.score(&batch[..1]).unwrap_err());
    assert!(e.contains("HTTP 400"), "{e}");
    assert_eq!(f.seen.requests.load(Ordering::SeqCst), 1);
}

#[test]
fn a_sum_reward_weights_its_parts() {
    let f = fake(vec![], Duration::ZERO, length_of_response);
    let text = format!(
        r#"
kind = "sum"
weights = [2.0, -0.5]
[[rewards]]
kind = "contains"
text = "yes"
[[rewards]]
kind = "http"
url = "{}"
"#,
        f.url
    );
    let cfg: RewardConfig = toml::from_str(&text).unwrap();
    cfg.validate().unwrap();
    let mut r = cfg.build(tch::Device::Cpu, tch::Kind::Float).unwrap();
    assert!(r.name().starts_with("sum(2 × contains"), "{}", r.name());
    let batch = [rollout(None, "q", "yes"), rollout(None, "q", "no!!")];
    assert_eq!(r.score(&batch).unwrap(), vec![2.0 - 0.5 * 3.0, -0.5 * 4.0]);
    // Unweighted: every weight 1. Relative model paths resolve inside.
    let mut c: RewardConfig = toml::from_str(
        "kind = \"sum\"\n[[rewards]]\nkind = \"length\"\n[[rewards]]\nkind = \"model\"\npath = \"rm\"",
    )
    .unwrap();
    c.resolve_paths(std::path::Path::new("/runs"));
    assert_eq!(c.model_paths(), vec![std::path::Path::new("/runs/rm")]);
    let bad: RewardConfig = toml::from_str(
        "kind = \"sum\"\nweights = [1.0]\n[[rewards]]\nkind = \"length\"\n[[rewards]]\nkind = \"oracle\"",
    )
    .unwrap();
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("weights has 1 entries for 2 rewards"), "{e}");
    let e = toml::from_str::<RewardConfig>("kind = \"sum\"\nrewards = []").unwrap().validate().unwrap_err();
    assert!(e.to_string().contains("at least one"), "{e}");
}
