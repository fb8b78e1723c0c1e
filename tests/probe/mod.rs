//! A tiny HTTP client for the worker's endpoint (/healthz, /readyz, /metrics), and the parsing
//! of what it returns; shared by tests/cluster.rs and tests/broker_restart.rs.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// GET http://<addr><path>: (status code, body), or None when nothing answers.
pub fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// The address a worker started with `--http-addr 127.0.0.1:0` logged, once it has.
pub fn endpoint(log: impl Fn() -> String) -> String {
    let t0 = Instant::now();
    loop {
        let l = log();
        if let Some(i) = l.find("listening on http://") {
            let rest = &l[i + "listening on http://".len()..];
            return rest
                .split(|c: char| c.is_whitespace() || c == '(')
                .next()
                .unwrap()
                .to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the worker did not log its HTTP endpoint: {l}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls GET <path> until it answers `code`; panics after `timeout`.
pub fn wait_code(addr: &str, path: &str, code: u16, timeout: Duration) {
    let t0 = Instant::now();
    loop {
        let got = get(addr, path);
        if got.as_ref().map(|g| g.0) == Some(code) {
            return;
        }
        assert!(
            t0.elapsed() < timeout,
            "{path} on {addr} did not answer {code} within {timeout:?}: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of one sample line (`name{labels}` exactly as rendered), if present.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok())?
    })
}
