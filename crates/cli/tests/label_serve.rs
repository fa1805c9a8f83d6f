//! `preftune label serve` as a process: the bind policy, and slow clients under a low open-file
//! limit (the audit of issue 23: with the limit at 64, 80 slow connections made a real request
//! time out).
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn preftune() -> Command {
    Command::new(env!("CARGO_BIN_EXE_preftune"))
}

#[test]
fn a_public_bind_without_insecure_is_refused_before_the_database_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("labels.sqlite");
    let out = preftune()
        .args(["label", "serve", "--bind", "0.0.0.0:0", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refusing to serve on 0.0.0.0:0") && err.contains("--insecure"),
        "{err}"
    );
    assert!(!db.exists());
}

/// Kills the server when the test ends, passed or not.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(unix)]
#[test]
fn real_requests_are_answered_past_80_slow_clients_at_a_64_file_limit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("labels.sqlite");
    let out = preftune()
        .args(["label", "add-annotator", "ann", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let mut child = Child(
        Command::new("bash")
            .arg("-c")
            .arg("ulimit -n 64 && exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_preftune"))
            .args(["label", "serve", "--bind", "127.0.0.1:0", "--db"])
            .arg(&db)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let banner = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.starts_with("labelling at http://"))
        .expect("the server's banner");
    // 64 files, less the spares for the database, its WAL and the listener.
    assert!(banner.contains("at most 48 connections"), "{banner}");
    let addr = banner
        .trim_start_matches("labelling at http://")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    // Keep reading stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));

    let mut slow = Vec::new();
    for _ in 0..80 {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /api/me HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .unwrap();
        slow.push(s);
    }
    let t0 = Instant::now();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /api/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "{reply:?} after {:?}",
        t0.elapsed()
    );
    // At most one header timeout (10 s) behind the slow clients that hold the slots.
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    drop(slow);
}
