//! The delivery protocol every job kind shares: read the message (version and kind first), run
//! the kind's [`JobHandler`], and answer the broker from how the job ended — ack after the
//! commit or a skip; requeue with backoff on a transient failure; dead-letter with a failure
//! record on bad input or after the delivery limit; requeue and stop the worker past the time
//! limit or when it is misconfigured. The consume loop (prefetch, SIGTERM between jobs, idle
//! exit) lives here too. Nothing in this file knows what a job computes.

use defectforge::job::Job;
use defectforge::queue::{DeadLetter, Delivery, JobQueue, QueueError};
use defectforge::retry::Backoff;
use defectforge::store::StoreError;
use futures_util::future::BoxFuture;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{info, warn, Instrument};

use crate::metrics::{Attached, Counters, ShardKind};

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Committed {
        samples: usize,
    },
    /// committed, and the job continues as `next` (a training run's next segment), which is
    /// published — confirmed by the broker — before this delivery is acked
    Continue {
        next: Box<Job>,
    },
    Skipped {
        reason: String,
    },
    DeadLettered {
        cause: String,
    },
    Requeued {
        cause: String,
    },
}

/// Conditions after which the worker must stop (the supervisor restarts it).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("job {shard} exceeded its time limit of {secs} s; it was requeued and this worker stops because the compute thread may be stuck")]
    TimedOut { shard: String, secs: u64 },
    #[error("worker misconfigured: {0}")]
    Fatal(String),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// How a job failed, which decides the broker's answer.
pub enum JobError {
    /// bad input: retrying cannot help; dead-lettered with a failure record
    Permanent {
        /// the sample (id, index) it concerns, when one
        sample: Option<(String, u64)>,
        input_uri: Option<String>,
        cause: String,
    },
    /// the message does not match its campaign's committed record (another plan, a shard or
    /// output the campaign does not have, no such campaign) or names a store this worker does
    /// not serve: forged or stale. Dead-lettered with the reason in its headers and no failure
    /// record — writing one would let any message mark a real campaign's shard as failed.
    Rejected(String),
    /// retried with backoff, dead-lettered after the delivery limit
    Transient(String),
    /// the worker cannot work (credentials, missing bucket): requeued, the worker stops
    Fatal(String),
    /// the job overran its limit (seconds): requeued, the worker stops
    TimedOut(u64),
}

impl JobError {
    /// An object store error: a missing input is the job's fault, credentials and buckets the
    /// worker's, anything else transient.
    pub fn from_store(e: StoreError, input: bool) -> JobError {
        match e {
            StoreError::NotFound { uri } if input => JobError::Permanent {
                sample: None,
                input_uri: Some(uri.clone()),
                cause: format!("input {uri} does not exist"),
            },
            // what the job names is wrong: the same on every worker and every retry
            StoreError::TooLarge { ref uri, .. }
            | StoreError::NotAFile { ref uri }
            | StoreError::NotAllowed { ref uri, .. } => JobError::Permanent {
                sample: None,
                input_uri: Some(uri.clone()),
                cause: e.to_string(),
            },
            e @ (StoreError::NoBucket { .. } | StoreError::BadKey { .. }) => JobError::Permanent {
                sample: None,
                input_uri: None,
                cause: e.to_string(),
            },
            // the worker cannot work: requeued, and the worker stops for its supervisor
            e @ (StoreError::Auth { .. } | StoreError::Full { .. }) => {
                JobError::Fatal(e.to_string())
            }
            // transient (5xx, timeouts) or unclassified: retried later, never dead-lettered
            e => JobError::Transient(e.to_string()),
        }
    }
}

/// Why a job is being dead-lettered, for its failure record.
#[derive(Debug, Clone)]
pub struct Failure {
    pub sample: Option<(String, u64)>,
    pub input_uri: Option<String>,
    pub cause: String,
    /// "permanent" (bad input) or "exhausted" (the delivery limit)
    pub class: &'static str,
    pub deliveries: u64,
}

/// How deliveries are retried.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryPolicy {
    /// must equal the queue's delivery limit: on the last allowed delivery a transient failure
    /// is dead-lettered with a failure record instead of requeued
    pub delivery_limit: u64,
    pub retry: Backoff,
}

/// One kind of work as the delivery protocol sees it. A new job kind adds a [`Job`] variant
/// in the core crate and its arm in the worker's handler (the match is exhaustive, so the
/// compiler lists every place).
pub trait JobHandler: Send + Sync {
    fn counters(&self) -> &Counters;
    fn policy(&self) -> DeliveryPolicy;
    /// Runs one job to its commit (everything written under attempt-unique keys, the commit
    /// record last), or decides that it is already done or cancelled (a skip).
    fn run<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Outcome, JobError>>;
    /// Writes the failure record of a job about to be dead-lettered; without it a dead job
    /// would be invisible, so a job whose record cannot be written is requeued instead.
    fn record_failure<'a>(
        &'a self,
        job: &'a Job,
        failure: Failure,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// Processes one delivery and answers the broker. Returns how it ended, or an error after
/// which the worker must stop.
pub async fn handle(h: &dyn JobHandler, d: Delivery) -> Result<Outcome, WorkerError> {
    handle_with(h, d, None).await
}

/// [`handle`] with the queue that follow-up jobs ([`Outcome::Continue`]) are published to.
pub async fn handle_with(
    h: &dyn JobHandler,
    d: Delivery,
    queue: Option<&dyn JobQueue>,
) -> Result<Outcome, WorkerError> {
    let c = h.counters();
    let job = match Job::from_bytes(&d.body) {
        Ok(j) => j,
        Err(e) => {
            warn!("dead-lettering an unreadable job message: {e}");
            d.acker
                .dead_letter(&DeadLetter {
                    class: "unreadable",
                    reason: e.to_string(),
                })
                .await?;
            c.shards_dead_lettered.fetch_add(1, Ordering::Relaxed);
            c.record(ShardKind::DeadLetteredUnreadable, 0);
            return Ok(Outcome::DeadLettered {
                cause: e.to_string(),
            });
        }
    };
    let span = tracing::info_span!("job", kind = %job.kind(), id = %job.id());
    let t0 = Instant::now();
    let _in_progress = c.start(job.group());
    let r = answer(h, d, &job, queue).instrument(span).await;
    c.shard_seconds.observe(t0.elapsed());
    r
}

async fn answer(
    h: &dyn JobHandler,
    d: Delivery,
    job: &Job,
    queue: Option<&dyn JobQueue>,
) -> Result<Outcome, WorkerError> {
    let c = h.counters();
    let policy = h.policy();
    let deliveries = d.previous_deliveries + 1;
    let n = 0;
    let kind = job.kind();
    match h.run(job).await {
        Ok(Outcome::Committed { samples }) => {
            d.acker.ack().await?;
            c.shards_committed.fetch_add(1, Ordering::Relaxed);
            c.samples_committed
                .fetch_add(samples as u64, Ordering::Relaxed);
            c.record(ShardKind::Committed, samples as u64);
            info!(samples, %kind, "shard committed");
            Ok(Outcome::Committed { samples })
        }
        Ok(Outcome::Continue { next }) => {
            let published = match queue {
                Some(q) => q
                    .publish(vec![next.to_bytes()])
                    .await
                    .map_err(|e| e.to_string()),
                None => Err("this worker has no queue to publish follow-up jobs to".into()),
            };
            match published {
                Ok(()) => {
                    d.acker.ack().await?;
                    c.shards_committed.fetch_add(1, Ordering::Relaxed);
                    c.record(ShardKind::Committed, 0);
                    info!(%kind, next = %next.id(), "segment committed; the next one is queued");
                    Ok(Outcome::Continue { next })
                }
                Err(cause) => {
                    // the work is committed; redelivered, the job finds it and publishes again
                    warn!(%cause, "could not publish the follow-up job; requeueing this one");
                    d.acker.requeue().await?;
                    c.shards_requeued.fetch_add(1, Ordering::Relaxed);
                    c.record(ShardKind::Requeued, 0);
                    Ok(Outcome::Requeued { cause })
                }
            }
        }
        Ok(other) => {
            d.acker.ack().await?;
            c.shards_skipped.fetch_add(1, Ordering::Relaxed);
            c.record(ShardKind::Skipped, n);
            info!(%kind, "shard skipped: {other:?}");
            Ok(other)
        }
        Err(JobError::Permanent {
            sample,
            input_uri,
            cause,
        }) => {
            warn!(%cause, "job failed permanently; dead-lettering it");
            let f = Failure {
                sample,
                input_uri,
                cause,
                class: "permanent",
                deliveries,
            };
            dead_letter(h, d, job, f).await
        }
        Err(JobError::Rejected(cause)) => {
            warn!(%cause, "rejecting the job message; dead-lettering it");
            d.acker
                .dead_letter(&DeadLetter {
                    class: "rejected",
                    reason: cause.clone(),
                })
                .await?;
            c.shards_dead_lettered.fetch_add(1, Ordering::Relaxed);
            c.record(ShardKind::DeadLetteredRejected, 0);
            Ok(Outcome::DeadLettered { cause })
        }
        Err(JobError::Transient(cause)) if deliveries >= policy.delivery_limit => {
            let cause = format!("gave up after {deliveries} deliveries: {cause}");
            warn!(%cause, "dead-lettering the job");
            let f = Failure {
                sample: None,
                input_uri: None,
                cause,
                class: "exhausted",
                deliveries,
            };
            dead_letter(h, d, job, f).await
        }
        Err(JobError::Transient(cause)) => {
            let pause = policy.retry.delay(deliveries as u32 + 1);
            warn!(%cause, pause_ms = pause.as_millis() as u64, "transient failure; requeueing the job");
            tokio::time::sleep(pause).await;
            d.acker.requeue().await?;
            c.shards_requeued.fetch_add(1, Ordering::Relaxed);
            c.record(ShardKind::Requeued, n);
            Ok(Outcome::Requeued { cause })
        }
        Err(JobError::Fatal(cause)) => {
            let _ = d.acker.requeue().await;
            c.record(ShardKind::Fatal, n);
            Err(WorkerError::Fatal(cause))
        }
        Err(JobError::TimedOut(secs)) => {
            let _ = d.acker.requeue().await;
            c.record(ShardKind::TimedOut, n);
            Err(WorkerError::TimedOut {
                shard: job.id(),
                secs,
            })
        }
    }
}

async fn dead_letter(
    h: &dyn JobHandler,
    d: Delivery,
    job: &Job,
    f: Failure,
) -> Result<Outcome, WorkerError> {
    let c = h.counters();
    let (cause, class) = (f.cause.clone(), f.class);
    match h.record_failure(job, f).await {
        Ok(()) => {}
        // nowhere to record it (a store this worker may not use, a bucket or campaign that
        // does not exist): the dead-letter queue's headers are the record
        Err(
            e @ (StoreError::NotAllowed { .. }
            | StoreError::NoBucket { .. }
            | StoreError::NotFound { .. }
            | StoreError::BadKey { .. }),
        ) => {
            warn!("no failure record ({e}); the reason travels in the dead-letter headers");
        }
        Err(e) => {
            // Without its failure record a dead job would be invisible: keep it in the queue.
            warn!("cannot write the failure record ({e}); requeueing instead of dead-lettering");
            d.acker.requeue().await?;
            c.shards_requeued.fetch_add(1, Ordering::Relaxed);
            c.record(ShardKind::Requeued, 0);
            return Ok(Outcome::Requeued { cause });
        }
    }
    d.acker
        .dead_letter(&DeadLetter {
            class,
            reason: cause.clone(),
        })
        .await?;
    c.shards_dead_lettered.fetch_add(1, Ordering::Relaxed);
    c.record(ShardKind::dead_lettered(class), 0);
    Ok(Outcome::DeadLettered { cause })
}

/// How a consume loop ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopEnd {
    /// the queue was closed and drained (embedded mode)
    Drained,
    /// shutdown was requested (SIGTERM); the current job was finished first
    Shutdown,
    /// no delivery arrived within the idle limit
    Idle,
}

/// Consumes until drained, shut down, idle, or an error. Shutdown is checked between jobs,
/// never during one: a started job always finishes, commits and acks.
pub async fn consume_loop(
    worker: &dyn JobHandler,
    queue: &dyn JobQueue,
    prefetch: u16,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    idle_exit: Option<Duration>,
) -> Result<LoopEnd, WorkerError> {
    let mut consumer = queue.consume(prefetch).await?;
    worker.counters().consumers.fetch_add(1, Ordering::Relaxed);
    let _attached = Attached(worker.counters());
    loop {
        if *shutdown.borrow() {
            return Ok(LoopEnd::Shutdown);
        }
        let next = async {
            match idle_exit {
                Some(d) => tokio::time::timeout(d, consumer.next()).await.ok(),
                None => Some(consumer.next().await),
            }
        };
        let d = tokio::select! {
            _ = shutdown.changed() => return Ok(LoopEnd::Shutdown),
            d = next => d,
        };
        match d {
            None => return Ok(LoopEnd::Idle),
            Some(Ok(None)) => return Ok(LoopEnd::Drained),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Some(d))) => {
                handle_with(worker, d, Some(queue)).await?;
            }
        }
    }
}
