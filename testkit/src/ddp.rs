//! Launching ranks of a data-parallel test and comparing their weights.
//!
//! A test file using this declares its own `rank_process` test, which reads
//! [`role`] (a no-op when `None`: the harness ran it directly), dies after
//! joining the group for [`DIE`] ([`die_after_joining`]) and otherwise runs
//! its stage on the config at [`config_path`]. The tests then start ranks of
//! it with [`Group::spawn`] and wait with [`join`], or do both with
//! [`run_ranks`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;

/// The variable telling a re-executed test binary which role its
/// `rank_process` test plays (a stage name, or [`DIE`]).
pub const ROLE: &str = "ALIGN_DDP_TEST_ROLE";
/// The variable holding the path of the config a rank runs.
pub const CONFIG: &str = "ALIGN_DDP_TEST_CONFIG";
/// The role of a rank that joins the group, then dies before the first
/// collective ([`die_after_joining`]).
pub const DIE: &str = "die";

/// How long [`run_ranks`] waits for all ranks before killing them.
pub const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// Whether the bridge has Gloo; if not, says on stderr that `test` was
/// skipped and why.
pub fn gloo_or_skip(test: &str) -> bool {
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

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// In a `rank_process` test: the role this process plays, `None` when the
/// harness runs the test itself (not as a rank).
pub fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// In a `rank_process` test: the config this rank runs.
pub fn config_path() -> PathBuf {
    PathBuf::from(std::env::var(CONFIG).unwrap())
}

/// The [`DIE`] role: joins the process group, then exits with status 3
/// before the first collective.
pub fn die_after_joining() -> ! {
    lm::dist::init(tch::Device::Cpu).unwrap();
    std::process::exit(3);
}

/// A running rank: the child process and the file its stdout and stderr go
/// to.
pub struct Rank {
    pub child: Child,
    pub log: PathBuf,
}

/// What the ranks of one run share: where their logs go, the config they
/// run, the world size and the rendezvous port.
pub struct Group<'a> {
    pub dir: &'a Path,
    pub config: &'a Path,
    pub world: usize,
    pub port: u16,
}

impl<'a> Group<'a> {
    /// A group of `world` ranks running `config`, logging into `dir`, on a
    /// fresh [`free_port`].
    pub fn new(dir: &'a Path, config: &'a Path, world: usize) -> Self {
        Group { dir, config, world, port: free_port() }
    }

    /// Starts rank `rank` as `role`: the current test binary running only
    /// `rank_process`, with torchrun's variables, OMP_NUM_THREADS=1 and then
    /// `env` (which may override any of them), its output in
    /// `dir/{role}-rank{rank}-{port}.log`.
    pub fn spawn(&self, role: &str, rank: usize, env: &[(&str, &str)]) -> Rank {
        let log = self.dir.join(format!("{role}-rank{rank}-{}.log", self.port));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "rank_process", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env(CONFIG, self.config)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", self.world.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", self.port.to_string())
            .env("OMP_NUM_THREADS", "1")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Rank { child: cmd.spawn().unwrap(), log }
    }
}

/// Waits for every rank in order (killing the waited one and panicking
/// with its log after `deadline`): each rank's exit success, log and time
/// since the call.
pub fn join(ranks: Vec<Rank>, deadline: Duration) -> Vec<(bool, String, Duration)> {
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

/// Runs `config` as `role` on `world` ranks (logs in `dir`) and waits for
/// all of them, up to [`RUN_DEADLINE`]; each must succeed. Returns their
/// logs, by rank.
pub fn run_ranks(dir: &Path, role: &str, config: &Path, world: usize) -> Vec<String> {
    let group = Group::new(dir, config, world);
    let ranks = (0..world).map(|r| group.spawn(role, r, &[])).collect();
    join(ranks, RUN_DEADLINE)
        .into_iter()
        .map(|(ok, log, _)| {
            assert!(ok, "a rank failed:\n{log}");
            log
        })
        .collect()
}

/// The named tensors of a safetensors file, sorted by name.
pub fn read_sorted(path: &Path) -> Vec<(String, Tensor)> {
    let mut w = Tensor::read_safetensors(path).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// The largest absolute difference between two lists of named tensors,
/// which must hold the same names in the same order.
pub fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}
