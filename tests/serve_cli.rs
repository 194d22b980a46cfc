//! `align serve` as a process: SIGTERM and SIGINT stop it cleanly — no new
//! requests, the one in progress finished, exit status 0, the port closed;
//! `--workers 0` and `--max-tokens-limit 0` are refused.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

mod common;

fn fixture() -> String {
    common::fixture("mqa").to_string_lossy().into_owned()
}

/// A running `align serve`; killed (and reaped) if a test fails before it exits.
struct Serve {
    child: Child,
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `align serve` on a free port; returns it, its address and the rest
/// of its stderr.
fn spawn_serve() -> (Serve, SocketAddr, BufReader<ChildStderr>) {
    let mut serve = Serve {
        child: Command::new(env!("CARGO_BIN_EXE_align"))
            .args(["serve", "--model", &fixture(), "--port", "0", "--device", "cpu", "--model-name", "mqa"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    };
    let mut err = BufReader::new(serve.child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "align serve exited before serving");
        if let Some(rest) = line.split("http://").nth(1) {
            let addr = rest.split('/').next().unwrap().parse().unwrap();
            return (serve, addr, err);
        }
    }
}

fn signal(serve: &Serve, name: &str) {
    let ok =
        Command::new("kill").args([&format!("-{name}"), &serve.child.id().to_string()]).status().unwrap();
    assert!(ok.success());
}

fn wait(serve: &mut Serve, limit: Duration) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = serve.child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > limit {
            panic!("align serve did not exit within {limit:?} of the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// After the signal: `align serve` exits with status 0 within 30 s, says on
/// stderr that `signal` stopped it, and its port is closed.
fn exited_cleanly(serve: &mut Serve, err: &mut BufReader<ChildStderr>, addr: SocketAddr, signal: &str) {
    let status = wait(serve, Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(rest.contains(signal) && rest.contains("stopped"), "{rest}");
    assert!(TcpStream::connect(addr).is_err(), "the port is closed");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn sigterm_finishes_the_request_in_progress_and_exits_0() {
    let (mut serve, addr, mut err) = spawn_serve();
    // A streaming request; SIGTERM once its first tokens have arrived.
    let body = r#"{"model": "mqa", "messages": [{"role": "user", "content": "Tell me a story"}],
                   "max_tokens": 200, "temperature": 0, "stream": true}"#;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = vec![];
    let mut buf = [0u8; 4096];
    let mut signalled = false;
    // Read to the end of the chunked body ("0\r\n\r\n" after [DONE]).
    while find(&raw, b"data: [DONE]").is_none() || !raw.ends_with(b"0\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream was cut: {}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
        if !signalled && find(&raw, b"\"content\"").is_some() {
            signal(&serve, "TERM");
            signalled = true;
        }
    }
    assert!(signalled);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"finish_reason\":\""), "the final chunk came: {text}");
    exited_cleanly(&mut serve, &mut err, addr, "SIGTERM");
}

#[test]
fn sigint_stops_an_idle_server_with_status_0() {
    let (mut serve, addr, mut err) = spawn_serve();
    // It answers before the signal.
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200") && reply.contains("\"mqa\""), "{reply}");
    signal(&serve, "INT");
    exited_cleanly(&mut serve, &mut err, addr, "SIGINT");
}

#[test]
fn zero_workers_or_token_limit_are_refused() {
    for (flag, value) in [("--workers", "0"), ("--max-tokens-limit", "0")] {
        let out = Command::new(env!("CARGO_BIN_EXE_align"))
            .args(["serve", "--model", &fixture(), "--port", "0", "--device", "cpu", flag, value])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag) && err.contains("0"), "{flag}: {err}");
        assert!(!err.contains("serving"), "it must not start: {err}");
    }
}
