//! One-machine modes: jobs published to an in-process queue and run by worker tasks in this
//! process, through the same delivery protocol and handlers as the fleet. Only in builds with
//! the `embedded` feature (the default); without it the CLI has no model code and these modes
//! say how to run the work on workers instead.

use anyhow::Result;
use defectforge::queue::InProcQueue;
use defectforge::store::S3Config;
use std::path::PathBuf;

/// Deliveries of one job before it is dead-lettered, in embedded mode.
pub const EMBEDDED_DELIVERY_LIMIT: u64 = 3;

/// Runs every job of `q` (closed once drained) with `workers` worker tasks; `progress` gets the
/// units committed so far (samples, masks) a few times a second.
#[cfg(feature = "embedded")]
pub async fn run_in_process(
    q: InProcQueue,
    workers: usize,
    model_cache: PathBuf,
    stores: Vec<String>,
    s3: &S3Config,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    use anyhow::Context;
    use defectforge_worker::protocol::consume_loop;
    use defectforge_worker::runner::{Worker, WorkerConfig};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    q.close_when_drained();
    let worker = Arc::new(Worker::new(WorkerConfig {
        worker_id: format!("embedded-{}", std::process::id()),
        s3: s3.clone(),
        delivery_limit: EMBEDDED_DELIVERY_LIMIT,
        model_cache,
        stores,
        ..WorkerConfig::default()
    }));
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let mut tasks = vec![];
    for _ in 0..workers.max(1) {
        let (w, q, rx) = (worker.clone(), q.clone(), rx.clone());
        tasks.push(tokio::spawn(async move {
            consume_loop(w.as_ref(), &q, 1, rx, None).await
        }));
    }
    let all = futures_util::future::join_all(tasks);
    tokio::pin!(all);
    let results = loop {
        tokio::select! {
            r = &mut all => break r,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                progress(worker.counters.samples_committed.load(Ordering::Relaxed));
            }
        }
    };
    progress(worker.counters.samples_committed.load(Ordering::Relaxed));
    for r in results {
        r.context("worker task panicked")??;
    }
    Ok(())
}

#[cfg(not(feature = "embedded"))]
pub async fn run_in_process(
    _q: InProcQueue,
    _workers: usize,
    _model_cache: PathBuf,
    _stores: Vec<String>,
    _s3: &S3Config,
    _progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    Err(not_embedded("running jobs in this process"))
}

/// Whether this build runs jobs in-process (the `embedded` feature).
pub const EMBEDDED: bool = cfg!(feature = "embedded");

/// The error of a one-machine mode in a build without the `embedded` feature.
pub fn not_embedded(what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{what} needs a defectforge built with the `embedded` feature (the default; this build has no model code): run the work on workers instead (`defectforge submit`, `defectforge masks generate --submit`), or rebuild without --no-default-features"
    )
}
