//! A stage's output directory: owned by one run at a time, never someone
//! else's, cleaned of the debris a crash leaves.
//!
//! [`claim`] is what every training stage (SFT and pretraining, reward, RL)
//! does first:
//! - it refuses an `output_dir` that is one of the stage's inputs or lies
//!   inside one, and a directory holding files align did not write (a
//!   directory align made carries the [`MARKER_FILE`], or, from before the
//!   marker, `checkpoints/`, `summary.json`, `metrics.jsonl` or
//!   `manifest.json`), or the outputs of another kind of stage;
//! - it takes the [`OutputLock`] (`.align.lock`, created with `O_EXCL`, with
//!   the holder's pid, host and start time): a second run fails at once
//!   naming the first; a lock whose process is gone (same host) is stale and
//!   taken over;
//! - it removes crash debris ([`remove_debris`]): the temp files and
//!   directories of [`crate::fsio`]'s atomic writes and incomplete
//!   checkpoints, matched by their names only.
//!
//! [`finished`] tells a stage that its run is complete (so that a rerun does
//! no work and rewrites nothing).

use crate::fsio;
use crate::train;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The lock file in an output directory.
pub const LOCK_FILE: &str = ".align.lock";
/// The file that marks a directory as a stage's output (JSON: the stage kind).
pub const MARKER_FILE: &str = ".align-output";
/// What a directory align's stages made holds before the marker existed.
const LEGACY_SIGNS: [&str; 4] = ["checkpoints", "summary.json", "metrics.jsonl", "manifest.json"];

/// What [`LOCK_FILE`] records: who holds the directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockInfo {
    pub pid: u32,
    pub host: String,
    /// When the lock was taken (UTC, RFC 3339).
    pub since: String,
    /// The process's start time (Linux clock ticks since boot, from
    /// `/proc/PID/stat`), so that a reused pid is not taken for the holder.
    #[serde(default)]
    pub start_time: Option<u64>,
    /// The command line of the holder.
    #[serde(default)]
    pub command: String,
    /// Tells this lock from a later one of the same process.
    #[serde(default)]
    pub nonce: String,
}

impl std::fmt::Display for LockInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on host {} since {}", self.pid, self.host, self.since)?;
        if !self.command.is_empty() {
            write!(f, " ({})", self.command)?;
        }
        Ok(())
    }
}

/// The lock on an output directory, released (its file removed) on drop.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    info: LockInfo,
}

impl OutputLock {
    /// Takes the lock on `dir` (which must exist): creates `dir/.align.lock`
    /// atomically. Held by another live process: an error naming it (pid,
    /// host, since). Held by a process that is gone (same host, pid dead,
    /// a zombie, or reused by another process): stale, taken over.
    pub fn acquire(dir: &Path) -> Result<OutputLock> {
        let path = dir.join(LOCK_FILE);
        let info = LockInfo {
            pid: std::process::id(),
            host: hostname(),
            since: utc_now(),
            start_time: start_time(std::process::id()),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            nonce: format!(
                "{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ),
        };
        let body = serde_json::to_string_pretty(&info)?;
        for _ in 0..8 {
            match create_new(&path, body.as_bytes()) {
                Ok(()) => return Ok(OutputLock { path, info }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create the lock {}", path.display()))
                }
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                // Released between our attempt and the read: try again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot read the lock {}", path.display())),
            };
            let holder: Option<LockInfo> = serde_json::from_str(&text).ok();
            match &holder {
                Some(h) if is_stale(h) => {
                    eprintln!(
                        "warning: {} was left by a run that is gone ({h}); taking it over",
                        path.display()
                    );
                    take_away(&path, &text)?;
                }
                Some(h) => bail!(
                    "{} is in use by another align run: {h}. Wait for it to finish or use another output_dir; if that run is gone (another host's run cannot be checked from here), delete {}",
                    dir.display(),
                    path.display()
                ),
                None if text.trim().is_empty() => {
                    // A holder between creating and writing the file, or one
                    // killed in that instant: wait a moment before judging.
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    if std::fs::read_to_string(&path).is_ok_and(|t| t.trim().is_empty()) {
                        take_away(&path, &text)?;
                    }
                }
                None => bail!(
                    "{} is locked by {} which is not an align lock file; delete it if no run uses the directory",
                    dir.display(),
                    path.display()
                ),
            }
        }
        bail!("cannot take the lock {} (it keeps changing hands)", path.display())
    }

    /// Who holds the lock (this process).
    pub fn info(&self) -> &LockInfo {
        &self.info
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Only our own lock: one taken over from us (we looked dead) stays.
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| serde_json::from_str::<LockInfo>(&t).ok())
            .is_some_and(|h| h == self.info);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates `path` only if it does not exist (`O_EXCL`) holding `bytes`.
fn create_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Removes a stale lock whose contents were `seen`: it is renamed aside
/// first (one taker wins the rename) and, if what was renamed is not what
/// was judged stale (a new holder took it in between), put back.
fn take_away(path: &Path, seen: &str) -> Result<()> {
    let aside = path.with_file_name(format!("{LOCK_FILE}.stale-{}", std::process::id()));
    match std::fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot remove the stale lock {}", path.display())),
    }
    let moved = std::fs::read_to_string(&aside).unwrap_or_default();
    if moved != seen {
        // A live holder's lock: back where it was, unless yet another one exists.
        let _ = std::fs::hard_link(&aside, path);
    }
    let _ = std::fs::remove_file(&aside);
    Ok(())
}

/// Whether the holder of a lock is gone: on this host, its pid is not a
/// running process (absent, a zombie, or a process started at another time).
/// A lock of another host is never stale: its process cannot be checked.
fn is_stale(h: &LockInfo) -> bool {
    if h.host != hostname() {
        return false;
    }
    if !pid_alive(h.pid) {
        return true;
    }
    match (h.start_time, start_time(h.pid)) {
        (Some(a), Some(b)) => a != b,
        _ => false,
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(p, 0) };
    let exists = r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && proc_stat(pid).is_none_or(|f| f.first().is_none_or(|s| s != "Z" && s != "X"))
}

/// The fields of `/proc/PID/stat` after the command name (state first).
fn proc_stat(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(String::from).collect())
}

/// A process's start time (field 22 of `/proc/PID/stat`).
fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid)?.get(19)?.parse().ok()
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // when the name fits.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The current time in UTC as RFC 3339 (`2026-01-31T12:00:00Z`).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// What [`MARKER_FILE`] records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Marker {
    /// The kind of stage whose outputs the directory holds (`sft`, `reward`, `rl`).
    stage: String,
    created: String,
}

/// A claimed output directory: locked for this run, debris removed. The
/// lock is released when this is dropped.
#[derive(Debug)]
pub struct Claim {
    pub dir: PathBuf,
    /// `None` on the ranks other than 0 of a distributed run: rank 0
    /// holds the lock for the run.
    pub lock: Option<OutputLock>,
    /// The debris removed (paths).
    pub removed: Vec<PathBuf>,
}

/// Claims `dir` as the output directory of a `stage` run whose inputs are
/// `inputs` (`(what, path)`, e.g. `("model", …)`): refuses an output that
/// is or lies inside an input, or that holds someone else's files (entries
/// that are the stage's own inputs excepted); creates it; takes the lock;
/// removes crash debris; marks it as the stage's.
pub fn claim(dir: &Path, stage: &str, inputs: &[(&str, &Path)]) -> Result<Claim> {
    check_not_an_input(dir, inputs)?;
    if crate::dist::env_rank() > 0 {
        // One rank of a distributed run: rank 0 claims (and cleans) the
        // directory for all of them.
        return Ok(Claim { dir: dir.to_path_buf(), lock: None, removed: vec![] });
    }
    check_ours(dir, stage, inputs)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let lock = Some(OutputLock::acquire(dir)?);
    let removed = remove_debris(dir)?;
    if !removed.is_empty() {
        eprintln!(
            "removed {} leftover(s) of an interrupted run in {}: {}",
            removed.len(),
            dir.display(),
            removed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    if !dir.join(MARKER_FILE).exists() {
        let m = Marker { stage: stage.to_string(), created: utc_now() };
        fsio::write_atomic(&dir.join(MARKER_FILE), serde_json::to_string_pretty(&m)?.as_bytes())?;
    }
    Ok(Claim { dir: dir.to_path_buf(), lock, removed })
}

/// Refuses an output directory that is one of `inputs` or inside one.
pub fn check_not_an_input(dir: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let out = fsio::canonical(dir);
    for (what, p) in inputs {
        let p_abs = fsio::canonical(p);
        if out == p_abs {
            bail!(
                "output_dir {} is the stage's input {what}; give the outputs their own directory",
                dir.display()
            );
        }
        if p.is_dir() && out.starts_with(&p_abs) {
            bail!(
                "output_dir {} is inside the stage's input {what} ({}); give the outputs a directory of their own",
                dir.display(),
                p.display()
            );
        }
    }
    Ok(())
}

/// Refuses a directory that holds files align did not write, or the
/// outputs of another kind of stage.
fn check_ours(dir: &Path, stage: &str, inputs: &[(&str, &Path)]) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    let marker = dir.join(MARKER_FILE);
    if marker.exists() {
        let m: Option<Marker> =
            std::fs::read_to_string(&marker).ok().and_then(|t| serde_json::from_str(&t).ok());
        if let Some(m) = m.filter(|m| m.stage != stage) {
            bail!(
                "output_dir {} holds the outputs of a {} run ({}); give this {stage} run its own output_dir",
                dir.display(),
                m.stage,
                marker.display()
            );
        }
        return Ok(());
    }
    if LEGACY_SIGNS.iter().any(|n| dir.join(n).exists()) {
        return Ok(());
    }
    let inputs: Vec<PathBuf> = inputs.iter().map(|(_, p)| fsio::canonical(p)).collect();
    let mut foreign = vec![];
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let path = fsio::canonical(&e.path());
        if name == LOCK_FILE || is_debris_name(&name) || inputs.iter().any(|i| i.starts_with(&path)) {
            continue;
        }
        foreign.push(name);
    }
    if !foreign.is_empty() {
        foreign.sort();
        let n = foreign.len();
        foreign.truncate(5);
        bail!(
            "output_dir {} is not empty and was not made by align ({n} entr{} such as {}); a stage would write over them. Use an empty or new directory",
            dir.display(),
            if n == 1 { "y" } else { "ies" },
            foreign.join(", ")
        );
    }
    Ok(())
}

/// Whether `name` is one of the temp names of [`crate::fsio`]'s atomic
/// writes: `.tmpXXXXXX` (a temp file), `.NAME.partial-XXXXXX` (a directory
/// being assembled) or `.NAME.old-PID` (an old directory moved aside).
pub fn is_debris_name(name: &str) -> bool {
    if let Some(rest) = name.strip_prefix(".tmp") {
        return rest.len() == 6 && rest.chars().all(|c| c.is_ascii_alphanumeric());
    }
    let Some(rest) = name.strip_prefix('.') else { return false };
    if let Some((base, tail)) = rest.rsplit_once(".partial-") {
        return !base.is_empty() && !tail.is_empty() && tail.chars().all(|c| c.is_ascii_alphanumeric());
    }
    if let Some((base, pid)) = rest.rsplit_once(".old-") {
        return !base.is_empty() && !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit());
    }
    false
}

/// Removes what an interrupted run of the stage writing into `dir` left:
/// temp files and directories of atomic writes (by name, see
/// [`is_debris_name`]) in `dir`, `dir/checkpoints`, each checkpoint and
/// `dir/model`, and checkpoints `step-N` that lack their state file (cut off
/// while written). Returns what was removed. Call it holding the lock.
pub fn remove_debris(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = vec![];
    let ckpts = dir.join("checkpoints");
    let mut dirs = vec![dir.to_path_buf(), ckpts.clone(), dir.join("model")];
    if let Ok(rd) = std::fs::read_dir(&ckpts) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_step = name.strip_prefix("step-").is_some_and(|n| n.parse::<u64>().is_ok());
            if is_step && e.path().is_dir() {
                if e.path().join(train::STATE_FILE).exists() {
                    dirs.push(e.path());
                } else {
                    remove(&e.path())?;
                    removed.push(e.path());
                }
            }
        }
    }
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if is_debris_name(&e.file_name().to_string_lossy()) {
                remove(&e.path())?;
                removed.push(e.path());
            }
        }
    }
    removed.sort();
    Ok(removed)
}

fn remove(p: &Path) -> Result<()> {
    let r = if p.is_dir() && !p.is_symlink() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", p.display()))
        }
        _ => Ok(()),
    }
}

/// The summary of a finished run in `dir`, when there is one: the newest
/// checkpoint is of config `hash` and at its last step, `summary.json`
/// reads as `T` and `model/` holds a model. A stage then does no work and
/// rewrites nothing.
pub fn finished<T: serde::de::DeserializeOwned>(dir: &Path, hash: &str) -> Option<T> {
    let (_, last) = train::list_checkpoints(&dir.join("checkpoints")).ok()?.pop()?;
    let text = std::fs::read_to_string(last.join(train::STATE_FILE)).ok()?;
    let st: train::TrainerState = serde_json::from_str(&text).ok()?;
    if st.config_hash != hash || st.step < st.total_steps || !dir.join("model/config.json").exists() {
        return None;
    }
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debris_names_are_ours_only() {
        for n in [".tmpAb12Z9", ".step-00000010.partial-x1Y2z3", ".model.partial-abcDEF", ".model.old-1234"] {
            assert!(is_debris_name(n), "{n}");
        }
        for n in [".tmp", ".tmpfoo.txt", "tmpAb12Z9", "notes.txt", ".partial-abc", ".model.old-x", "model"] {
            assert!(!is_debris_name(n), "{n}");
        }
    }

    #[test]
    fn a_second_lock_names_the_first_and_a_dead_holders_lock_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let a = OutputLock::acquire(d.path()).unwrap();
        let e = OutputLock::acquire(d.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())) && e.contains(&hostname()), "{e}");
        drop(a);
        assert!(!d.path().join(LOCK_FILE).exists());
        // A lock left by a process that is gone.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = LockInfo {
            pid,
            host: hostname(),
            since: utc_now(),
            start_time: None,
            command: "align sft".into(),
            nonce: "1".into(),
        };
        std::fs::write(d.path().join(LOCK_FILE), serde_json::to_string(&dead).unwrap()).unwrap();
        let b = OutputLock::acquire(d.path()).unwrap();
        assert_eq!(b.info().pid, std::process::id());
        // Another host's lock is never judged stale.
        drop(b);
        let remote = LockInfo { host: "elsewhere".into(), ..dead };
        std::fs::write(d.path().join(LOCK_FILE), serde_json::to_string(&remote).unwrap()).unwrap();
        let e = OutputLock::acquire(d.path()).unwrap_err().to_string();
        assert!(e.contains("on host elsewhere"), "{e}");
    }

    #[test]
    fn utc_dates_are_civil() {
        let s = utc_now();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'), "{s}");
    }
}
