//! The worker's HTTP endpoint for Kubernetes probes and Prometheus: a minimal HTTP/1.1 server
//! on tokio (one request per connection, `Connection: close`), so that no web framework is
//! compiled into the worker.
//!
//! - `GET /healthz`: 200 while the process runs (liveness).
//! - `GET /readyz`: 200 only while at least one consumer is attached to the broker and no
//!   shutdown was requested; 503 before the first connection, during the bounded reconnect
//!   window after the broker went away, and after SIGTERM (readiness).
//! - `GET /metrics`: Prometheus text format 0.0.4 (see `render_metrics`).

use crate::metrics::{Counters, Histogram, ShardKind};
use crate::runner::Worker;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

/// What the endpoint reads: the worker's counters and the shutdown flag.
pub struct HttpState {
    pub worker: Arc<Worker>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl HttpState {
    pub fn new(worker: Arc<Worker>, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { worker, shutdown }
    }

    /// connected to the broker and consuming, and not shutting down
    pub fn ready(&self) -> bool {
        !*self.shutdown.borrow() && self.worker.counters.consumers.load(Ordering::Relaxed) > 0
    }
}

/// Parses `--http-addr`: `off`, `none` or an empty value disable the endpoint.
pub fn parse_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    let t = s.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    t.parse()
        .map(Some)
        .map_err(|e| format!("--http-addr {t:?} is not host:port ({e}); use off to disable"))
}

/// Binds the endpoint and serves it on the current runtime until the process ends. Returns
/// the bound address (useful with port 0).
pub async fn spawn(addr: SocketAddr, state: Arc<HttpState>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    info!("http endpoint listening on http://{local} (/healthz, /readyz, /metrics)");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let st = state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(conn, &st).await {
                            debug!("http connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    debug!("http accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(local)
}

async fn serve(mut conn: TcpStream, st: &HttpState) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > 8192 {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET" | "HEAD", "/readyz") => {
            if st.ready() {
                ("200 OK", "text/plain", "ready\n".to_string())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready: not consuming from the broker (connecting, reconnecting or shutting down)\n".to_string(),
                )
            }
        }
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render_metrics(&st.worker.counters, st.ready()),
        ),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        resp.extend_from_slice(body.as_bytes());
    }
    conn.write_all(&resp).await?;
    conn.shutdown().await
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, h: &Histogram) {
    let (buckets, count, sum) = h.snapshot();
    for (le, n) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {count}");
}

/// The worker's metrics in Prometheus text format 0.0.4. All counters are per process (they
/// restart at 0 with the pod; use `increase()`/`rate()`).
pub fn render_metrics(c: &Counters, ready: bool) -> String {
    let mut o = String::with_capacity(4096);
    family(
        &mut o,
        "defectforge_shards_total",
        "counter",
        "Shards this worker answered, by outcome (committed, skipped, dead_lettered_permanent, dead_lettered_exhausted, dead_lettered_unreadable, dead_lettered_rejected, requeued, timed_out, fatal).",
    );
    for k in ShardKind::ALL {
        let _ = writeln!(
            o,
            "defectforge_shards_total{{outcome=\"{}\"}} {}",
            k.label(),
            c.shards_of(k)
        );
    }
    family(
        &mut o,
        "defectforge_samples_total",
        "counter",
        "Samples in the shards this worker answered, by the shard's outcome.",
    );
    for k in ShardKind::ALL {
        let _ = writeln!(
            o,
            "defectforge_samples_total{{outcome=\"{}\"}} {}",
            k.label(),
            c.samples_of(k)
        );
    }
    family(
        &mut o,
        "defectforge_shard_duration_seconds",
        "histogram",
        "Seconds from a shard's delivery to the worker's answer (ack, requeue or dead-letter).",
    );
    histogram(
        &mut o,
        "defectforge_shard_duration_seconds",
        &c.shard_seconds,
    );
    family(
        &mut o,
        "defectforge_generator_seconds_total",
        "counter",
        "Generator time summed over committed samples.",
    );
    let _ = writeln!(
        o,
        "defectforge_generator_seconds_total {}",
        c.generator_micros.load(Ordering::Relaxed) as f64 / 1e6
    );
    family(
        &mut o,
        "defectforge_uploaded_bytes_total",
        "counter",
        "Bytes of images and masks uploaded to the output store.",
    );
    let _ = writeln!(
        o,
        "defectforge_uploaded_bytes_total {}",
        c.bytes_uploaded.load(Ordering::Relaxed)
    );
    family(
        &mut o,
        "defectforge_model_load_seconds",
        "gauge",
        "Seconds spent loading models at start-up (0 for model-free generators).",
    );
    let _ = writeln!(
        o,
        "defectforge_model_load_seconds {}",
        c.model_load_micros.load(Ordering::Relaxed) as f64 / 1e6
    );
    family(
        &mut o,
        "defectforge_current_campaign",
        "gauge",
        "Shards of this campaign in progress on this worker; the campaign handled last stays listed with 0.",
    );
    for (cid, n) in c.campaigns() {
        let _ = writeln!(
            o,
            "defectforge_current_campaign{{campaign=\"{}\"}} {n}",
            escape_label(&cid)
        );
    }
    let training = c.training.lock().expect("training gauge").clone();
    family(
        &mut o,
        "defectforge_training_step",
        "gauge",
        "The last step this worker trained of each training run.",
    );
    for (run, (step, _)) in &training {
        let _ = writeln!(
            o,
            "defectforge_training_step{{run=\"{}\"}} {step}",
            escape_label(run)
        );
    }
    family(
        &mut o,
        "defectforge_training_loss",
        "gauge",
        "The loss of that step.",
    );
    for (run, (_, loss)) in &training {
        let _ = writeln!(
            o,
            "defectforge_training_loss{{run=\"{}\"}} {loss}",
            escape_label(run)
        );
    }
    family(
        &mut o,
        "defectforge_consumers",
        "gauge",
        "Consumers attached to the broker.",
    );
    let _ = writeln!(
        o,
        "defectforge_consumers {}",
        c.consumers.load(Ordering::Relaxed)
    );
    family(
        &mut o,
        "defectforge_ready",
        "gauge",
        "1 while consuming from the broker and not shutting down (what /readyz answers).",
    );
    let _ = writeln!(o, "defectforge_ready {}", ready as u8);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_disables_addresses() {
        assert_eq!(parse_addr("off").unwrap(), None);
        assert_eq!(parse_addr("").unwrap(), None);
        assert_eq!(
            parse_addr("0.0.0.0:9090").unwrap(),
            Some("0.0.0.0:9090".parse().unwrap())
        );
        assert!(parse_addr("localhost").is_err());
    }

    #[test]
    fn renders_prometheus_text() {
        let c = Counters::default();
        c.record(ShardKind::Committed, 4);
        c.record(ShardKind::DeadLetteredExhausted, 2);
        c.shard_seconds.observe(Duration::from_millis(700));
        c.shard_seconds.observe(Duration::from_secs(4000));
        let t = render_metrics(&c, false);
        assert!(t.contains("defectforge_shards_total{outcome=\"committed\"} 1\n"));
        assert!(t.contains("defectforge_samples_total{outcome=\"committed\"} 4\n"));
        assert!(t.contains("defectforge_samples_total{outcome=\"dead_lettered_exhausted\"} 2\n"));
        assert!(t.contains("defectforge_shard_duration_seconds_bucket{le=\"0.5\"} 0\n"));
        assert!(t.contains("defectforge_shard_duration_seconds_bucket{le=\"1\"} 1\n"));
        assert!(t.contains("defectforge_shard_duration_seconds_bucket{le=\"3600\"} 1\n"));
        assert!(t.contains("defectforge_shard_duration_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(t.contains("defectforge_shard_duration_seconds_count 2\n"));
        assert!(t.contains("defectforge_ready 0\n"));
        assert!(t.contains("defectforge_model_load_seconds 0\n"));
        c.training
            .lock()
            .unwrap()
            .insert("demo-types".into(), (7, 0.25));
        let t = render_metrics(&c, false);
        assert!(
            t.contains("defectforge_training_step{run=\"demo-types\"} 7\n"),
            "{t}"
        );
        assert!(
            t.contains("defectforge_training_loss{run=\"demo-types\"} 0.25\n"),
            "{t}"
        );
        // every sample line belongs to a declared family
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(t.contains(&format!("# TYPE {base} ")), "{l}");
        }
    }
}
