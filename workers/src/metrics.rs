//! The worker's counters: what `/metrics` renders (see `crate::http`) and what the delivery
//! protocol records for every job it answers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Counters for logs and metrics (`/metrics` renders them; see `crate::http`).
#[derive(Debug, Default)]
pub struct Counters {
    pub shards_committed: AtomicU64,
    pub shards_skipped: AtomicU64,
    /// every dead-lettered shard, whatever the class (see `shards` for the split)
    pub shards_dead_lettered: AtomicU64,
    pub shards_requeued: AtomicU64,
    pub samples_committed: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    /// generator time summed over committed samples
    pub generator_micros: AtomicU64,
    /// time spent loading models at start-up (0 for model-free generators)
    pub model_load_micros: AtomicU64,
    /// shards by how their delivery ended, indexed by `ShardKind`
    pub shards: [AtomicU64; ShardKind::ALL.len()],
    /// the samples those shards held, indexed by `ShardKind`
    pub samples: [AtomicU64; ShardKind::ALL.len()],
    /// time from delivery to the broker's answer, every shard whose message was readable
    pub shard_seconds: Histogram,
    /// consume loops currently attached to the broker (readiness: > 0)
    pub consumers: AtomicU64,
    campaigns: Mutex<CampaignGauge>,
    /// training runs this worker has trained: run id → (last step, its loss)
    pub training: TrainingGauge,
}

/// The step and loss of every training run a worker has trained, for `/metrics`.
pub type TrainingGauge = std::sync::Arc<Mutex<BTreeMap<String, (u64, f64)>>>;

/// How a delivery ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardKind {
    Committed,
    Skipped,
    DeadLetteredPermanent,
    DeadLetteredExhausted,
    /// the message itself could not be parsed
    DeadLetteredUnreadable,
    /// a readable message that does not match its campaign's committed record, or names a
    /// store this worker does not serve (forged or stale): no failure record is written
    DeadLetteredRejected,
    Requeued,
    /// requeued because it overran its time limit; the worker then exits (code 3)
    TimedOut,
    /// requeued because the worker is misconfigured; the worker then exits (code 3)
    Fatal,
}

impl ShardKind {
    pub const ALL: [ShardKind; 9] = [
        ShardKind::Committed,
        ShardKind::Skipped,
        ShardKind::DeadLetteredPermanent,
        ShardKind::DeadLetteredExhausted,
        ShardKind::DeadLetteredUnreadable,
        ShardKind::DeadLetteredRejected,
        ShardKind::Requeued,
        ShardKind::TimedOut,
        ShardKind::Fatal,
    ];

    /// the `outcome` label value
    pub fn label(self) -> &'static str {
        match self {
            ShardKind::Committed => "committed",
            ShardKind::Skipped => "skipped",
            ShardKind::DeadLetteredPermanent => "dead_lettered_permanent",
            ShardKind::DeadLetteredExhausted => "dead_lettered_exhausted",
            ShardKind::DeadLetteredUnreadable => "dead_lettered_unreadable",
            ShardKind::DeadLetteredRejected => "dead_lettered_rejected",
            ShardKind::Requeued => "requeued",
            ShardKind::TimedOut => "timed_out",
            ShardKind::Fatal => "fatal",
        }
    }

    pub(crate) fn dead_lettered(class: &str) -> Self {
        if class == "exhausted" {
            ShardKind::DeadLetteredExhausted
        } else {
            ShardKind::DeadLetteredPermanent
        }
    }
}

/// A fixed-bucket histogram of seconds (Prometheus `le` buckets, cumulative when rendered).
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; Histogram::BOUNDS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// upper bounds in seconds; shards take seconds (model-free) to tens of minutes (diffusion)
    pub const BOUNDS: [f64; 14] = [
        0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 3600.0,
    ];

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = Self::BOUNDS.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// (upper bound, cumulative count) per bucket, then the total count and the sum in seconds
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut acc = 0;
        let buckets = Self::BOUNDS
            .iter()
            .zip(&self.counts)
            .map(|(&b, c)| {
                acc += c.load(Ordering::Relaxed);
                (b, acc)
            })
            .collect();
        (
            buckets,
            self.count.load(Ordering::Relaxed),
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

/// Shards in progress per campaign, and the campaign handled last.
#[derive(Debug, Default)]
struct CampaignGauge {
    in_progress: BTreeMap<String, u64>,
    last: Option<String>,
}

pub(crate) struct InProgress<'a>(&'a Counters, String);

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        let mut g = self.0.campaigns.lock().expect("campaign gauge");
        if let Some(n) = g.in_progress.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                g.in_progress.remove(&self.1);
            }
        }
    }
}

impl Counters {
    pub fn record(&self, kind: ShardKind, samples: u64) {
        let i = ShardKind::ALL
            .iter()
            .position(|&k| k == kind)
            .expect("kind listed");
        self.shards[i].fetch_add(1, Ordering::Relaxed);
        self.samples[i].fetch_add(samples, Ordering::Relaxed);
    }

    pub fn shards_of(&self, kind: ShardKind) -> u64 {
        let i = ShardKind::ALL.iter().position(|&k| k == kind).unwrap_or(0);
        self.shards[i].load(Ordering::Relaxed)
    }

    pub fn samples_of(&self, kind: ShardKind) -> u64 {
        let i = ShardKind::ALL.iter().position(|&k| k == kind).unwrap_or(0);
        self.samples[i].load(Ordering::Relaxed)
    }

    /// (campaign, shards in progress) for the campaigns in progress, plus the campaign handled
    /// last with 0 when nothing of it is in progress.
    pub fn campaigns(&self) -> Vec<(String, u64)> {
        let g = self.campaigns.lock().expect("campaign gauge");
        let mut v: Vec<(String, u64)> =
            g.in_progress.iter().map(|(c, n)| (c.clone(), *n)).collect();
        if let Some(l) = &g.last {
            if !g.in_progress.contains_key(l) {
                v.push((l.clone(), 0));
            }
        }
        v
    }

    pub(crate) fn start(&self, campaign: &str) -> InProgress<'_> {
        let mut g = self.campaigns.lock().expect("campaign gauge");
        *g.in_progress.entry(campaign.to_string()).or_default() += 1;
        g.last = Some(campaign.to_string());
        InProgress(self, campaign.to_string())
    }
}

/// Counts this consume loop as attached to the broker while it lives.
pub(crate) struct Attached<'a>(pub(crate) &'a Counters);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.0.consumers.fetch_sub(1, Ordering::Relaxed);
    }
}
