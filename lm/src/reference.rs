//! A benchmark's reference implementation (PyTorch, transformers, TRL) run
//! interleaved with align's own work.
//!
//! [`Reference`] starts a script once; the script sets up, runs one warm-up
//! unit of work and says it is ready, then runs one timed unit each time it
//! is asked. align alternates its own units with the reference's, so that
//! both see the same state of a shared machine, and the ratio of the two
//! medians is not swayed by the machine getting faster or slower between
//! two separate runs. The script side is `scripts/bench_protocol.py`.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// A reference script driven by the interleaved protocol of
/// `scripts/bench_protocol.py`: started once, it then times one unit of its
/// work (a generate call, a training step) each time align asks, so that
/// align's units and the reference's alternate and see the same state of a
/// shared machine.
pub struct Reference {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    /// Where the script's stderr goes, shown when it fails.
    stderr: tempfile::NamedTempFile,
    what: String,
}

impl Reference {
    /// Starts the script at `path` with `py` and one JSON argument, and
    /// waits until it has set up and warmed up.
    pub fn start(py: &str, path: &Path, args: &serde_json::Value) -> Result<Self> {
        use std::process::Stdio;
        let stderr =
            tempfile::NamedTempFile::new().context("cannot create a temp file for the reference's stderr")?;
        let mut child = std::process::Command::new(py)
            .arg(path)
            .arg(args.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen()?)
            .spawn()
            .with_context(|| format!("cannot run the reference {} with {py}", path.display()))?;
        let stdin = child.stdin.take().context("the reference has no stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("the reference has no stdout")?);
        let mut r = Reference { child, stdin, stdout, stderr, what: format!("{py} {}", path.display()) };
        let ready = r.read()?;
        if ready["ready"] != serde_json::Value::Bool(true) {
            bail!("the reference {} did not say it was ready: {ready}", r.what);
        }
        Ok(r)
    }

    /// One JSON line from the reference; its stderr in the error if it ended.
    fn read(&mut self) -> Result<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).with_context(|| format!("reading from {}", self.what))?;
        if n == 0 {
            let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            let err = std::fs::read_to_string(self.stderr.path()).unwrap_or_default();
            bail!("the reference {} ended ({status}):\n{err}", self.what);
        }
        serde_json::from_str(&line)
            .with_context(|| format!("the reference {} wrote {line:?}, not JSON", self.what))
    }

    fn send(&mut self, cmd: &str) -> Result<()> {
        use std::io::Write;
        writeln!(self.stdin, "{cmd}")
            .and_then(|_| self.stdin.flush())
            .with_context(|| format!("writing to {}", self.what))
    }

    /// One unit of the reference's work; its answer (at least `seconds`).
    pub fn run(&mut self) -> Result<serde_json::Value> {
        self.send("run")?;
        let v = self.read()?;
        if v["seconds"].as_f64().is_none() {
            bail!("the reference {} answered {v} to run, without seconds", self.what);
        }
        Ok(v)
    }

    /// Seconds of one unit of the reference's work.
    pub fn time(&mut self) -> Result<f64> {
        Ok(self.run()?["seconds"].as_f64().unwrap_or(f64::NAN))
    }

    /// Ends the reference; returns its final information (versions, memory).
    pub fn finish(mut self) -> Result<serde_json::Value> {
        self.send("done")?;
        let v = self.read()?;
        let _ = self.child.wait();
        Ok(v)
    }
}

impl Drop for Reference {
    /// A reference left behind by an error is stopped, not orphaned.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A stand-in reference on the protocol of scripts/bench_protocol.py
    /// (plain python3, no torch).
    fn fake(dir: &Path, body: &str) -> PathBuf {
        let scripts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts");
        let path = dir.join("fake.py");
        let text = format!(
            "import json, sys\nsys.path.insert(0, {:?})\nfrom bench_protocol import serve\nargs = json.loads(sys.argv[1])\n{body}\n",
            scripts.display().to_string()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_reference_protocol_times_units_on_demand_and_reports_at_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let script = fake(
            tmp.path(),
            "n = [0]\ndef unit():\n    n[0] += 1\n    return args['t'] * n[0]\nserve(unit, lambda: {'units': n[0]})",
        );
        let mut r = Reference::start("python3", &script, &serde_json::json!({"t": 0.25})).unwrap();
        // The warm-up was unit 1.
        assert_eq!(r.time().unwrap(), 0.5);
        assert_eq!(r.time().unwrap(), 0.75);
        assert_eq!(r.finish().unwrap(), serde_json::json!({"units": 3}));
    }

    #[test]
    fn a_failing_reference_is_an_error_with_its_stderr() {
        let tmp = tempfile::tempdir().unwrap();
        let script = fake(tmp.path(), "sys.stderr.write('no torch here\\n')\nsys.exit(3)");
        let e = match Reference::start("python3", &script, &serde_json::json!({})) {
            Ok(_) => panic!("a failing reference started"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("ended (exit status: 3)") && e.contains("no torch here"), "{e}");
        let script = fake(tmp.path(), "def unit():\n    raise RuntimeError('unit broke')\nserve(unit, dict)");
        let e = Reference::start("python3", &script, &serde_json::json!({})).err().unwrap().to_string();
        assert!(e.contains("unit broke"), "{e}");
    }
}
