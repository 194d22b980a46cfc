//! c10d collectives over Gloo on loopback, between processes this test
//! spawns itself: the test binary re-executes its own `rank_process` test
//! with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
//! MASTER_PORT) and a role. (The same role runs under torchrun itself:
//! `ALIGN_NATIVE_TEST_ROLE=collectives ALIGN_NATIVE_TEST_TIMEOUT_MS=30000
//! torchrun --no-python --nproc-per-node 2 <this test binary> --exact
//! rank_process --nocapture`.) Skipped, saying why, when the bridge was built
//! without Gloo.
use align_native::{Backend, ProcessGroup, ReduceOp};
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const ROLE: &str = "ALIGN_NATIVE_TEST_ROLE";
const TIMEOUT_MS: &str = "ALIGN_NATIVE_TEST_TIMEOUT_MS";

fn gloo_or_skip(test: &str) -> bool {
    if align_native::backends().gloo {
        return true;
    }
    // Straight to stderr, past the test harness's capture: a skip must show.
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
    log: std::path::PathBuf,
}

fn spawn(dir: &Path, role: &str, rank: usize, world: usize, port: u16, timeout_ms: u64) -> Rank {
    let log = dir.join(format!("{role}-rank{rank}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "rank_process", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(TIMEOUT_MS, timeout_ms.to_string())
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("OMP_NUM_THREADS", "1")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Rank { child, log }
}

/// Waits for every rank; a rank still running after `deadline` is killed
/// and fails the test (a hang). Returns each rank's log and run time.
fn join(ranks: Vec<Rank>, deadline: Duration) -> Vec<(String, Duration)> {
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
        let log = std::fs::read_to_string(&r.log).unwrap_or_default();
        assert!(status.success(), "a rank failed ({status}):\n{log}");
        out.push((log, start.elapsed()));
    }
    out
}

fn run_ranks(role: &str, world: usize, timeout_ms: u64, deadline: Duration) -> Vec<(String, Duration)> {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let ranks = (0..world).map(|r| spawn(dir.path(), role, r, world, port, timeout_ms)).collect();
    join(ranks, deadline)
}

fn assert_close(t: &Tensor, expected: &[f32], what: &str) {
    let got: Vec<f32> = Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap();
    assert_eq!(got.len(), expected.len(), "{what}: {got:?} vs {expected:?}");
    for (g, e) in got.iter().zip(expected) {
        assert!((g - e).abs() <= 1e-6 * e.abs().max(1.0), "{what}: got {got:?}, expected {expected:?}");
    }
}

fn collectives(pg: &ProcessGroup) {
    let r = pg.rank() as f32;
    let w = pg.world_size() as f32;
    let f = |v: &[f32]| Tensor::from_slice(v);

    // all_reduce: rank r holds [r+1, 10(r+1)].
    let ranks_sum: f32 = (1..=pg.world_size()).map(|x| x as f32).sum();
    for (op, expected) in [
        (ReduceOp::Sum, [ranks_sum, 10.0 * ranks_sum]),
        (ReduceOp::Avg, [ranks_sum / w, 10.0 * ranks_sum / w]),
        (ReduceOp::Max, [w, 10.0 * w]),
        (ReduceOp::Min, [1.0, 10.0]),
    ] {
        let mut t = f(&[r + 1.0, 10.0 * (r + 1.0)]);
        pg.all_reduce(&mut t, op).unwrap();
        assert_close(&t, &expected, &format!("all_reduce {op:?}"));
    }
    // A large buffer, as a gradient bucket would be.
    let mut big = Tensor::full([1 << 20], (r + 1.0) as f64, (Kind::Float, Device::Cpu));
    pg.all_reduce(&mut big, ReduceOp::Sum).unwrap();
    assert_eq!(big.min().double_value(&[]), ranks_sum as f64);
    assert_eq!(big.max().double_value(&[]), ranks_sum as f64);

    // Gradients in buckets: 7 tensors of mixed shapes and two dtypes, 64-byte
    // buckets (several tensors per bucket, one tensor larger than a bucket).
    let shapes: [&[i64]; 7] = [&[3], &[2, 2], &[40], &[1], &[5], &[2, 3], &[7]];
    let grads: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let kind = if i == 5 { Kind::Double } else { Kind::Float };
            Tensor::ones(*s, (kind, Device::Cpu)) * ((r + 1.0) as f64 * (i + 1) as f64)
        })
        .collect();
    pg.all_reduce_bucketed(&grads, ReduceOp::Avg, 64).unwrap();
    for (i, g) in grads.iter().enumerate() {
        let e = (i + 1) as f64 * ranks_sum as f64 / w as f64;
        assert!((g - e).abs().max().double_value(&[]) < 1e-6, "bucketed all_reduce of tensor {i}: {g}");
    }

    // Weights in buckets from rank 0: rank r holds r+i in tensor i.
    let weights: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| Tensor::full(*s, (r + i as f32) as f64, (Kind::Float, Device::Cpu)))
        .collect();
    pg.broadcast_bucketed(&weights, 0, 64).unwrap();
    for (i, t) in weights.iter().enumerate() {
        assert!((t - i as f64).abs().max().double_value(&[]) == 0.0, "bucketed broadcast of tensor {i}: {t}");
    }

    // broadcast from the last rank.
    let root = pg.world_size() - 1;
    let mut t = Tensor::full([3], r as f64, (Kind::Float, Device::Cpu));
    pg.broadcast(&mut t, root).unwrap();
    assert_close(&t, &[root as f32; 3], "broadcast");

    // all_gather: rank r holds [100r, 100r+1, 100r+2, 100r+3].
    let t = Tensor::arange(4, (Kind::Float, Device::Cpu)) + 100.0 * r as f64;
    let all = pg.all_gather(&t).unwrap();
    assert_eq!(all.len(), pg.world_size());
    for (i, g) in all.iter().enumerate() {
        let b = 100.0 * i as f32;
        assert_close(g, &[b, b + 1.0, b + 2.0, b + 3.0], &format!("all_gather[{i}]"));
    }

    // reduce_scatter: rank r's inputs[j] is (r+1)(j+1) twice; rank j receives
    // the sum over ranks, (j+1)·Σ(r+1).
    for (op, scale) in [(ReduceOp::Sum, 1.0), (ReduceOp::Avg, 1.0 / w)] {
        let inputs: Vec<Tensor> =
            (0..pg.world_size()).map(|j| f(&[(r + 1.0) * (j as f32 + 1.0); 2])).collect();
        let out = pg.reduce_scatter(&inputs, op).unwrap();
        let e = (r + 1.0) * ranks_sum * scale;
        assert_close(&out, &[e, e], &format!("reduce_scatter {op:?}"));
    }

    // Errors are returned, not thrown: a CUDA-less, non-contiguous or
    // wrongly counted input is refused before it reaches c10d.
    let nc = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
    assert!(pg.all_gather(&nc).unwrap_err().to_string().contains("contiguous"));
    let too_many: Vec<Tensor> = (0..=pg.world_size()).map(|_| f(&[1.0])).collect();
    let e = pg.reduce_scatter(&too_many, ReduceOp::Sum).unwrap_err().to_string();
    assert!(e.contains(&format!("{} inputs for {} ranks", too_many.len(), pg.world_size())), "{e}");
    assert!(pg.broadcast(&mut f(&[1.0]), 9).is_err());

    pg.barrier().unwrap();
}

/// One rank of a multi-process test (does nothing unless spawned by one).
#[test]
fn rank_process() {
    let Ok(role) = std::env::var(ROLE) else { return };
    let timeout = Duration::from_millis(std::env::var(TIMEOUT_MS).unwrap().parse().unwrap());
    let env = align_native::DistEnv::from_env().unwrap().unwrap();
    let start = Instant::now();
    match role.as_str() {
        "collectives" => {
            let pg = ProcessGroup::new(&env, Backend::Gloo, timeout).unwrap();
            collectives(&pg);
            println!("rank {} of {}: collectives ok", env.rank, env.world_size);
        }
        "missing_peer" => {
            let e = ProcessGroup::new(&env, Backend::Gloo, timeout).err().expect("a group without its peer");
            println!("rank {} gave up after {:.1} s: {e:#}", env.rank, start.elapsed().as_secs_f64());
        }
        "dead_peer" => {
            let pg = ProcessGroup::new(&env, Backend::Gloo, timeout).unwrap();
            pg.barrier().unwrap();
            if env.rank == 1 {
                // Dies without a word, as a killed process would.
                std::process::exit(0);
            }
            let t0 = Instant::now();
            let mut t = Tensor::ones([16], (Kind::Float, Device::Cpu));
            let e = pg.all_reduce(&mut t, ReduceOp::Sum).expect_err("an all_reduce with a dead peer");
            println!("rank 0's all_reduce failed after {:.1} s: {e:#}", t0.elapsed().as_secs_f64());
            // After an error every later collective fails too, within the timeout.
            assert!(pg.barrier().is_err());
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn two_ranks_all_reduce_broadcast_all_gather_and_reduce_scatter_over_gloo() {
    if !gloo_or_skip("two_ranks_all_reduce_broadcast_all_gather_and_reduce_scatter_over_gloo") {
        return;
    }
    for (log, _) in run_ranks("collectives", 2, 30_000, Duration::from_secs(120)) {
        assert!(log.contains("collectives ok"), "{log}");
    }
}

#[test]
fn a_missing_peer_is_an_error_after_the_timeout() {
    if !gloo_or_skip("a_missing_peer_is_an_error_after_the_timeout") {
        return;
    }
    // WORLD_SIZE=2 with only rank 0: the rendezvous gives up after 3 s.
    let out = run_ranks_subset("missing_peer", &[0], 2, 3_000);
    let (log, took) = &out[0];
    assert!(log.contains("gave up after"), "{log}");
    assert!(log.contains("rendezvous") || log.contains("imed out") || log.contains("timeout"), "{log}");
    eprintln!("missing peer: rank 0 exited after {took:?}");
    // Rank 1 alone, nobody serving the store: a client's connect gives up too.
    let out = run_ranks_subset("missing_peer", &[1], 2, 3_000);
    assert!(out[0].0.contains("gave up after"), "{}", out[0].0);
}

#[test]
fn a_dead_peer_is_an_error_not_a_hang() {
    if !gloo_or_skip("a_dead_peer_is_an_error_not_a_hang") {
        return;
    }
    let out = run_ranks("dead_peer", 2, 3_000, Duration::from_secs(60));
    assert!(out[0].0.contains("all_reduce failed after"), "{}", out[0].0);
    assert!(out[0].0.contains("rank 0 of 2"), "{}", out[0].0);
}

fn run_ranks_subset(role: &str, ranks: &[usize], world: usize, timeout_ms: u64) -> Vec<(String, Duration)> {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let spawned = ranks.iter().map(|&r| spawn(dir.path(), role, r, world, port, timeout_ms)).collect();
    join(spawned, Duration::from_secs(60))
}
