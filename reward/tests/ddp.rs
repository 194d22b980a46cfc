//! Data-parallel reward training over Gloo on loopback (the test binary
//! re-executes its own `rank_process` test as each rank, with torchrun's
//! variables). Skipped, saying why, when the bridge was built without Gloo.
//!
//! - 2 ranks × grad_accum 2 end with the weights of 1 process × grad_accum 4;
//! - a 2-rank run stopped half-way (stop_after) and resumed ends
//!   bit-identical to an uninterrupted 2-rank run.

mod common;

use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;

const ROLE: &str = "ALIGN_DDP_TEST_ROLE";
const CONFIG: &str = "ALIGN_DDP_TEST_CONFIG";

fn gloo_or_skip(test: &str) -> bool {
    if lm::dist::backends().gloo {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: align-native was built without Gloo (libgloo-dev's headers were missing at build time; \
         `make test` installs them)"
    );
    false
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Rank {
    child: Child,
    log: PathBuf,
}

fn spawn(
    dir: &Path,
    role: &str,
    config: &Path,
    rank: usize,
    world: usize,
    port: u16,
    env: &[(&str, &str)],
) -> Rank {
    let log = dir.join(format!("{role}-rank{rank}-{port}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "rank_process", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(CONFIG, config)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("OMP_NUM_THREADS", "1")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Rank { child: cmd.spawn().unwrap(), log }
}

/// Waits for every rank (killing all after `deadline`): each rank's exit
/// success, log and time.
fn join(ranks: Vec<Rank>, deadline: Duration) -> Vec<(bool, String, Duration)> {
    let start = Instant::now();
    let mut out = vec![];
    for mut r in ranks {
        let status = loop {
            if let Some(s) = r.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > deadline {
                let _ = r.child.kill();
                let _ = r.child.wait();
                panic!(
                    "a rank hung for {deadline:?}:\n{}",
                    std::fs::read_to_string(&r.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        out.push((status.success(), std::fs::read_to_string(&r.log).unwrap_or_default(), start.elapsed()));
    }
    out
}

fn run_ranks(dir: &Path, config: &Path, world: usize) {
    let port = free_port();
    let ranks = (0..world).map(|r| spawn(dir, "reward", config, r, world, port, &[])).collect();
    for (ok, log, _) in join(ranks, Duration::from_secs(300)) {
        assert!(ok, "a rank failed:\n{log}");
    }
}

/// A run directory `dir/name` (model, pairs and config).
fn setup(dir: &Path, name: &str, grad_accum: usize, extra: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    write_lm(&d.join("init"), 3, true);
    write_jsonl(&d.join("pairs.jsonl"), &synthetic_rows(60, 1));
    write_config(&d, &format!("batch_size = 2\ngrad_accum = {grad_accum}\nmax_steps = 4\n{extra}"))
}

fn weights(config: &Path) -> Vec<(String, Tensor)> {
    let out = config.parent().unwrap().join("out/model/model.safetensors");
    let mut w = Tensor::read_safetensors(out).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// One rank of a test run (a no-op when the harness runs it directly).
#[test]
fn rank_process() {
    let Ok(_role) = std::env::var(ROLE) else { return };
    let path = PathBuf::from(std::env::var(CONFIG).unwrap());
    let cfg = load_config(&path);
    if let Err(e) = reward::run(&cfg, path.parent().unwrap()) {
        eprintln!("rank error: {e:#}");
        std::process::exit(1);
    }
}

#[test]
fn two_ranks_train_a_reward_model_as_one_process() {
    if !gloo_or_skip("two_ranks_train_a_reward_model_as_one_process") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let one = setup(dir.path(), "one", 4, "");
    let single = reward::run(&load_config(&one), one.parent().unwrap()).unwrap();
    let two = setup(dir.path(), "two", 2, "");
    run_ranks(dir.path(), &two, 2);
    let d = max_diff(&weights(&one), &weights(&two));
    assert!(d < 1e-5, "2 ranks differ from 1 process by {d}");
    let rows = lm::train::read_metrics(&two.parent().unwrap().join("out/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = rows.iter().filter_map(|r| r.get("loss")?.as_f64()).collect();
    assert_eq!(losses.len(), 4);
    for (x, y) in losses.iter().zip(&single.first_losses) {
        assert!((x - y).abs() < 1e-5, "losses {losses:?} vs {:?}", single.first_losses);
    }

    // Stopped after 2 steps, then resumed: as the uninterrupted run.
    let cut = setup(dir.path(), "cut", 2, "stop_after = 2");
    run_ranks(dir.path(), &cut, 2);
    assert!(!cut.parent().unwrap().join("out/model").exists());
    write_config(cut.parent().unwrap(), "batch_size = 2\ngrad_accum = 2\nmax_steps = 4");
    run_ranks(dir.path(), &cut, 2);
    let d = max_diff(&weights(&two), &weights(&cut));
    assert_eq!(d, 0.0, "the resumed 2-rank run differs from the uninterrupted one by {d}");
}
