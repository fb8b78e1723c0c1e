//! `defectforge-worker`: consumes shards from RabbitMQ and writes results to S3 (or a local
//! directory). Exit codes: 0 after SIGTERM/SIGINT (current shard finished and acked) or when
//! idle; 2 when the broker stayed unreachable beyond --reconnect-window-s; 3 when a shard
//! overran its time limit or the worker is misconfigured (e.g. wrong S3 credentials).

use anyhow::Result;
use clap::Parser;
use defectforge::queue::{redact_url, AmqpQueue};
use defectforge::retry::Backoff;
use defectforge_worker::cli::{init_logging, AmqpArgs, LogFormat, S3Args};
use defectforge_worker::http;
use defectforge_worker::protocol::{consume_loop, LoopEnd, WorkerError};
use defectforge_worker::runner::{default_worker_id, Worker, WorkerConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Generates defect image + mask pairs from shards on RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "defectforge-worker", version)]
struct Args {
    #[command(flatten)]
    amqp: AmqpArgs,
    #[command(flatten)]
    s3: S3Args,
    /// shards held unacked at once per consumer (1 suits GPU shards of minutes)
    #[arg(long, env = "DEFECTFORGE_PREFETCH", default_value_t = 1)]
    prefetch: u16,
    /// shards processed concurrently by this process (one consumer each)
    #[arg(long, env = "DEFECTFORGE_CONCURRENCY", default_value_t = 1)]
    concurrency: usize,
    /// worker id recorded in manifest rows (default: hostname-pid)
    #[arg(long, env = "DEFECTFORGE_WORKER_ID")]
    worker_id: Option<String>,
    /// seconds to keep trying to (re)connect to the broker before exiting with code 2
    #[arg(long, env = "DEFECTFORGE_RECONNECT_WINDOW_S", default_value_t = 60)]
    reconnect_window_s: u64,
    /// tries per store operation for transient errors (backoff with jitter between tries)
    #[arg(long, env = "DEFECTFORGE_RETRY_ATTEMPTS", default_value_t = 5)]
    retry_attempts: u32,
    /// exit 0 after this many seconds without a delivery (unset: run until stopped)
    #[arg(long, env = "DEFECTFORGE_IDLE_EXIT_S")]
    idle_exit_s: Option<u64>,
    /// local folder where model files are cached (verified by digest) between shards and runs
    #[arg(long, env = "DEFECTFORGE_MODEL_CACHE", default_value_os_t = defectforge_worker::models::default_cache_dir())]
    model_cache: std::path::PathBuf,
    /// address of the HTTP endpoint (/healthz, /readyz, /metrics); `off` disables it
    #[arg(long, env = "DEFECTFORGE_HTTP_ADDR", default_value = "127.0.0.1:9090")]
    http_addr: String,
    /// output stores this worker takes jobs for, comma-separated (s3://bucket[/prefix] or
    /// directories): a job naming any other store is dead-lettered unread. Required.
    #[arg(
        long,
        env = "DEFECTFORGE_STORES",
        value_delimiter = ',',
        required = true
    )]
    stores: Vec<String>,
    /// largest input file read, in bytes (normal images, masks, textures)
    #[arg(long, env = "DEFECTFORGE_MAX_INPUT_BYTES", default_value_t = defectforge_worker::runner::Budgets::default().max_input_bytes)]
    max_input_bytes: u64,
    /// largest decoded input, in pixels (checked from the file header before decoding)
    #[arg(long, env = "DEFECTFORGE_MAX_INPUT_PIXELS", default_value_t = defectforge_worker::runner::Budgets::default().max_input_pixels)]
    max_input_pixels: u64,
    /// decoded input pixels one shard may hold in memory at once
    #[arg(long, env = "DEFECTFORGE_MAX_SHARD_PIXELS", default_value_t = defectforge_worker::runner::Budgets::default().max_shard_pixels)]
    max_shard_pixels: u64,
    /// log format
    #[arg(long, env = "DEFECTFORGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            error!("{e:#}");
            eprintln!("defectforge-worker: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(args: Args) -> Result<i32> {
    let worker_id = args.worker_id.clone().unwrap_or_else(default_worker_id);
    let cfg = WorkerConfig {
        worker_id: worker_id.clone(),
        s3: args.s3.config(),
        retry: Backoff {
            attempts: args.retry_attempts.max(1),
            ..Backoff::default()
        },
        delivery_limit: args.amqp.delivery_limit as u64,
        upload_concurrency: 8,
        model_cache: args.model_cache.clone(),
        stores: args
            .stores
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        budgets: defectforge_worker::runner::Budgets {
            max_input_bytes: args.max_input_bytes,
            max_input_pixels: args.max_input_pixels,
            max_shard_pixels: args.max_shard_pixels,
        },
    };
    if cfg.stores.is_empty() {
        anyhow::bail!("--stores / DEFECTFORGE_STORES names no store: list the output stores this worker takes jobs for (e.g. s3://defectforge/campaigns)");
    }
    info!(
        worker = %worker_id,
        amqp = %redact_url(&args.amqp.amqp_url),
        queue = %args.amqp.queue,
        stores = ?cfg.stores,
        s3 = ?cfg.s3,
        "starting worker"
    );
    let http_addr = http::parse_addr(&args.http_addr).map_err(anyhow::Error::msg)?;
    let worker = Arc::new(Worker::new(cfg));
    let (sig_tx, sig_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = http_addr {
        let st = Arc::new(http::HttpState::new(worker.clone(), sig_rx.clone()));
        // Not fatal: several workers on one host (tests, a laptop) share the default port. In
        // Kubernetes the probes then fail and the pod is restarted, with this error in its log.
        if let Err(e) = http::spawn(addr, st).await {
            error!("cannot serve the HTTP endpoint on {addr} ({e}); running without /healthz, /readyz and /metrics (set --http-addr, or off)");
        }
    }
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("shutdown requested: finishing the current shard");
        let _ = sig_tx.send(true);
    });
    let window = Duration::from_secs(args.reconnect_window_s);
    let mut lost_since = Instant::now();
    let mut backoff_n = 0u32;
    let idle = args.idle_exit_s.map(Duration::from_secs);
    loop {
        if *sig_rx.borrow() {
            return Ok(0);
        }
        let q = match AmqpQueue::connect(args.amqp.config(&worker_id)).await {
            Ok(q) => q,
            Err(e) => {
                if lost_since.elapsed() >= window {
                    let msg = format!(
                        "the broker at {} was unreachable for {} s ({e}); exiting so that the supervisor restarts this worker (unacked shards are redelivered)",
                        redact_url(&args.amqp.amqp_url),
                        window.as_secs()
                    );
                    error!("{msg}");
                    eprintln!("defectforge-worker: {msg}");
                    return Ok(2);
                }
                backoff_n += 1;
                let d = Backoff {
                    attempts: u32::MAX,
                    base: Duration::from_millis(500),
                    max: Duration::from_secs(5),
                }
                .delay(backoff_n);
                warn!("broker unavailable ({e}); retrying in {} ms", d.as_millis());
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = async { let mut r = sig_rx.clone(); let _ = r.changed().await; } => {}
                }
                continue;
            }
        };
        backoff_n = 0;
        info!("connected to the broker; consuming");
        // One stop signal for this connection's consumers: SIGTERM, or the first consumer error.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stop_tx = Arc::new(stop_tx);
        {
            let mut s = sig_rx.clone();
            let stop_tx = stop_tx.clone();
            tokio::spawn(async move {
                if !*s.borrow() {
                    let _ = s.changed().await;
                }
                let _ = stop_tx.send(true);
            });
        }
        let mut loops = vec![];
        for _ in 0..args.concurrency.max(1) {
            let (w, q2, rx, stop) = (worker.clone(), &q, stop_rx.clone(), stop_tx.clone());
            loops.push(async move {
                let r = consume_loop(w.as_ref(), q2, args.prefetch.max(1), rx, idle).await;
                if r.is_err() {
                    let _ = stop.send(true);
                }
                r
            });
        }
        let results = futures_util::future::join_all(loops).await;
        let mut lost = None;
        let mut end = LoopEnd::Drained;
        for r in results {
            match r {
                Ok(e) => end = e,
                Err(WorkerError::Queue(e)) => lost = Some(e),
                Err(e) => {
                    q.close().await;
                    error!("{e}");
                    eprintln!("defectforge-worker: {e}");
                    return Ok(3);
                }
            }
        }
        if let Some(e) = lost {
            if *sig_rx.borrow() {
                return Ok(0);
            }
            warn!(
                "lost the broker connection ({e}); reconnecting for up to {} s",
                window.as_secs()
            );
            lost_since = Instant::now();
            continue;
        }
        q.close().await;
        let c = &worker.counters;
        info!(
            shards = c
                .shards_committed
                .load(std::sync::atomic::Ordering::Relaxed),
            samples = c
                .samples_committed
                .load(std::sync::atomic::Ordering::Relaxed),
            "worker stopping ({end:?})"
        );
        return Ok(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_http_endpoint_binds_loopback_unless_configured() {
        let cmd = Args::command();
        let a = cmd
            .get_arguments()
            .find(|a| a.get_id() == "http_addr")
            .unwrap();
        assert_eq!(a.get_default_values(), ["127.0.0.1:9090"]);
        assert_eq!(a.get_env().unwrap(), "DEFECTFORGE_HTTP_ADDR");
    }
}
