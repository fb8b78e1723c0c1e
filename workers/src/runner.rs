//! The worker and its `generate` jobs: for one shard, read the campaign record (from a store
//! this worker is configured for), derive the shard's samples from it (digest-checked), read
//! its inputs (only under the campaign's input roots, within the input budgets), run the
//! generators off the async runtime (so broker heartbeats keep flowing), write every object
//! under attempt-unique keys, and commit by writing the shard fragment last. How the broker is
//! answered (ack after commit, requeue, dead-letter, time limit) is `crate::protocol`'s.

use crate::compute::{compute, row, Inputs};
use crate::generators::{self, GenError, Generator};
use crate::masks::MaskAux;
use bytes::Bytes;
use chrono::Utc;
use defectforge::campaign::MaskSource;
use defectforge::imaging::{self};
use defectforge::job::{GenerateJob, Job};
use defectforge::ledger::{CampaignRecord, FailureRecord, LedgerError};
use defectforge::manifest::{self, ManifestRow};
use defectforge::messages::ShardMessage;
use defectforge::plan::Plan;
use defectforge::queue::Delivery;
use defectforge::retry::{retry, Backoff};
use defectforge::store::{self, ObjectStore, S3Config, StoreError};
use defectforge::{ids, layout, ledger};
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Counters;
use crate::protocol::{self, DeliveryPolicy, Failure, JobError, JobHandler, Outcome, WorkerError};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker_id: String,
    pub s3: S3Config,
    pub retry: Backoff,
    /// must equal the queue's delivery limit: on the last allowed delivery a transient failure
    /// is dead-lettered with a failure record instead of requeued
    pub delivery_limit: u64,
    /// concurrent object uploads per shard
    pub upload_concurrency: usize,
    /// local folder where model files are cached (verified by digest) across restarts
    pub model_cache: std::path::PathBuf,
    /// the output stores this worker takes jobs for: a job naming another is dead-lettered
    pub stores: Vec<String>,
    pub budgets: Budgets,
}

/// What one input, and one shard, may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// largest input file read, in bytes
    pub max_input_bytes: u64,
    /// largest decoded input, in pixels (from the header, before decoding)
    pub max_input_pixels: u64,
    /// decoded input pixels of one shard held at once
    pub max_shard_pixels: u64,
}

impl Default for Budgets {
    fn default() -> Self {
        Self {
            max_input_bytes: 64 << 20,
            max_input_pixels: imaging::DEFAULT_MAX_INPUT_PIXELS,
            max_shard_pixels: 400_000_000,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_id: default_worker_id(),
            s3: S3Config::default(),
            retry: Backoff::default(),
            delivery_limit: 5,
            upload_concurrency: 8,
            model_cache: crate::models::default_cache_dir(),
            stores: vec![],
            budgets: Budgets::default(),
        }
    }
}

pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// Smallest image side a worker accepts: smaller inputs are bad input, not work.
pub const MIN_INPUT_SIDE: u32 = 16;

pub struct Worker {
    pub cfg: WorkerConfig,
    generators: BTreeMap<&'static str, Arc<dyn Generator>>,
    models: Arc<crate::models::ModelCache>,
    stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
    cancelled: Mutex<HashMap<String, (Instant, bool)>>,
    textures: Mutex<HashMap<String, Arc<Vec<String>>>>,
    /// campaign records (immutable once written) and their checked plans, by output and id
    plans: Mutex<HashMap<String, Arc<(CampaignRecord, Plan)>>>,
    pub counters: Counters,
}

impl Worker {
    pub fn new(cfg: WorkerConfig) -> Self {
        let models = Arc::new(crate::models::ModelCache::new(
            cfg.model_cache.clone(),
            cfg.s3.clone(),
        ));
        let gens = generators::registry(models.clone());
        Self::build(cfg, gens, models)
    }

    pub fn with_generators(
        cfg: WorkerConfig,
        generators: BTreeMap<&'static str, Arc<dyn Generator>>,
    ) -> Self {
        let models = Arc::new(crate::models::ModelCache::new(
            cfg.model_cache.clone(),
            cfg.s3.clone(),
        ));
        Self::build(cfg, generators, models)
    }

    fn build(
        cfg: WorkerConfig,
        generators: BTreeMap<&'static str, Arc<dyn Generator>>,
        models: Arc<crate::models::ModelCache>,
    ) -> Self {
        Self {
            cfg,
            generators,
            models,
            stores: Default::default(),
            cancelled: Default::default(),
            textures: Default::default(),
            plans: Default::default(),
            counters: Default::default(),
        }
    }

    /// Opens (once) a store a job names, when it is one this worker is configured for.
    async fn store(&self, root: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
        if !self
            .cfg
            .stores
            .iter()
            .any(|allowed| store::is_within(root, allowed))
        {
            return Err(StoreError::NotAllowed {
                uri: root.to_string(),
                allowed: self.cfg.stores.join(","),
            });
        }
        if let Some(s) = self.stores.lock().expect("stores").get(root) {
            return Ok(s.clone());
        }
        let s = store::open(root, &self.cfg.s3).await?;
        s.check().await?;
        self.stores
            .lock()
            .expect("stores")
            .insert(root.to_string(), s.clone());
        Ok(s)
    }

    async fn is_cancelled(&self, store: &dyn ObjectStore, cid: &str) -> Result<bool, StoreError> {
        if let Some((at, v)) = self.cancelled.lock().expect("cancel cache").get(cid) {
            if at.elapsed() < Duration::from_secs(5) {
                return Ok(*v);
            }
        }
        let v = ledger::is_cancelled(store, cid).await?;
        self.cancelled
            .lock()
            .expect("cancel cache")
            .insert(cid.to_string(), (Instant::now(), v));
        Ok(v)
    }

    /// Reads one input of a campaign: only under one of its input roots (local paths with
    /// their symbolic links resolved), a regular file, at most `max_input_bytes`.
    async fn read(&self, uri: &str, roots: &[String]) -> Result<Bytes, StoreError> {
        let outside = || StoreError::NotAllowed {
            uri: uri.to_string(),
            allowed: roots.join(","),
        };
        if !roots.iter().any(|r| store::is_within(uri, r)) {
            return Err(outside());
        }
        if !uri.starts_with("s3://") {
            let real = |p: &str| std::fs::canonicalize(p).map(|p| p.to_string_lossy().into_owned());
            if let Ok(real_uri) = real(uri) {
                let inside = roots
                    .iter()
                    .filter_map(|r| real(r).ok())
                    .any(|r| store::is_within(&real_uri, &r));
                if !inside {
                    return Err(outside());
                }
            }
        }
        let limit = self.cfg.budgets.max_input_bytes;
        retry(
            self.cfg.retry,
            &format!("reading {uri}"),
            StoreError::is_transient,
            || async {
                let (s, key) = store::open_object(uri, &self.cfg.s3).await?;
                s.get_limited(&key, limit).await
            },
        )
        .await
    }

    async fn texture_list(&self, dir: &str) -> Result<Arc<Vec<String>>, JobError> {
        if let Some(l) = self.textures.lock().expect("textures").get(dir) {
            return Ok(l.clone());
        }
        let l = defectforge::dataset::list_images(dir, &self.cfg.s3)
            .await
            .map_err(JobError::Transient)?;
        if l.is_empty() {
            return Err(JobError::Permanent {
                sample: None,
                input_uri: Some(dir.to_string()),
                cause: format!("texture folder {dir} holds no images"),
            });
        }
        let l = Arc::new(l);
        self.textures
            .lock()
            .expect("textures")
            .insert(dir.to_string(), l.clone());
        Ok(l)
    }

    /// Loads the mask models of the shard's types with generated masks (checking that each has
    /// its type's mask embedding) and reads the object masks named by `foreground_mask`.
    async fn prepare_masks(
        &self,
        msg: &ShardMessage,
        roots: &[String],
    ) -> Result<MaskAux, JobError> {
        let mut aux = MaskAux::default();
        let used: std::collections::BTreeSet<u32> =
            msg.samples.iter().map(|s| s.type_idx).collect();
        for &ti in &used {
            let t = &msg.types[ti as usize];
            let permanent = |cause: String| JobError::Permanent {
                sample: None,
                input_uri: None,
                cause: format!("{}/{}: {cause}", t.category, t.defect_type),
            };
            if t.mask_source == MaskSource::Generated {
                let s = &t.settings.mask_model;
                let uri = s.model.as_deref().ok_or_else(|| {
                    permanent(
                        "mask = \"generated\" but the campaign names no mask_model.model".into(),
                    )
                })?;
                let m = self.models.get(uri).await.map_err(|e| {
                    if e.is_transient() {
                        JobError::Transient(format!("loading mask model {uri}: {e}"))
                    } else {
                        permanent(format!("mask model {uri}: {e}"))
                    }
                })?;
                let name = crate::masks::learned::embedding_name(&t.category, &t.defect_type, s);
                crate::masks::learned::require_mask_model(&m.manifest, uri, &name)
                    .map_err(permanent)?;
                aux.models.insert(ti, m);
            }
            if let Some(f) = &t.settings.placement.mask_file {
                if !aux.foreground_masks.contains_key(f) {
                    let bad = |cause: String| JobError::Permanent {
                        sample: None,
                        input_uri: Some(f.clone()),
                        cause: format!("{}: foreground_mask {f}: {cause}", t.category),
                    };
                    let b = self.read(f, roots).await.map_err(|e| {
                        match JobError::from_store(e, true) {
                            JobError::Permanent { cause, .. } => bad(cause),
                            e => e,
                        }
                    })?;
                    let m = imaging::decode_mask_limited(&b, f, self.cfg.budgets.max_input_pixels)
                        .map_err(|e| bad(e.to_string()))?;
                    aux.foreground_masks.insert(f.clone(), m);
                }
            }
        }
        Ok(aux)
    }

    /// Reads every input of the shard (encoded; decoding happens on the compute thread) and
    /// checks, from the image headers, that the shard stays within its decoded-pixel budget.
    async fn fetch_inputs(
        &self,
        msg: &ShardMessage,
        roots: &[String],
    ) -> Result<Vec<Inputs>, JobError> {
        let mut out = vec![];
        let budget = self.cfg.budgets;
        let mut shard_pixels = 0u64;
        let mut count = |b: &Bytes,
                         what: &'static str,
                         uri: &str,
                         s: &defectforge::messages::SampleSpec| {
            let (w, h) = imaging::dimensions(b, what, uri)
                .map_err(|e| crate::compute::image_err(e, s, uri))?;
            if w < MIN_INPUT_SIDE || h < MIN_INPUT_SIDE {
                return Err(JobError::Permanent {
                    sample: Some((s.sample_id.clone(), s.index)),
                    input_uri: Some(uri.to_string()),
                    cause: format!(
                        "{what} {uri} is {w}×{h}: defect synthesis needs at least {MIN_INPUT_SIDE}×{MIN_INPUT_SIDE} pixels; remove it from the dataset"
                    ),
                });
            }
            let px = w as u64 * h as u64;
            if px > budget.max_input_pixels {
                return Err(crate::compute::image_err(
                    imaging::ImageError::TooManyPixels {
                        what,
                        uri: uri.to_string(),
                        w,
                        h,
                        limit: budget.max_input_pixels,
                    },
                    s,
                    uri,
                ));
            }
            shard_pixels += px;
            if shard_pixels > budget.max_shard_pixels {
                return Err(JobError::Permanent {
                    sample: Some((s.sample_id.clone(), s.index)),
                    input_uri: Some(uri.to_string()),
                    cause: format!(
                        "the shard's inputs exceed {} decoded pixels at {uri}: lower the campaign's shard_size, or raise --max-shard-pixels / DEFECTFORGE_MAX_SHARD_PIXELS on workers with the memory",
                        budget.max_shard_pixels
                    ),
                });
            }
            Ok(())
        };
        for s in &msg.samples {
            let t = &msg.types[s.type_idx as usize];
            let with_sample = |e: JobError| match e {
                JobError::Permanent {
                    input_uri, cause, ..
                } => JobError::Permanent {
                    sample: Some((s.sample_id.clone(), s.index)),
                    input_uri,
                    cause,
                },
                e => e,
            };
            let normal = self
                .read(&s.normal_uri, roots)
                .await
                .map_err(|e| with_sample(JobError::from_store(e, true)))?;
            count(&normal, "normal image", &s.normal_uri, s)?;
            let mask = match &s.mask_uri {
                Some(u) => {
                    let b = self
                        .read(u, roots)
                        .await
                        .map_err(|e| with_sample(JobError::from_store(e, true)))?;
                    count(&b, "mask", u, s)?;
                    Some(b)
                }
                None => None,
            };
            let texture = match (&t.settings.perlin.texture_dir, t.generator.as_str()) {
                (Some(dir), "perlin") => {
                    let list = self.texture_list(dir).await.map_err(with_sample)?;
                    let i = (s.seed % list.len() as u64) as usize;
                    let b = self
                        .read(&list[i], roots)
                        .await
                        .map_err(|e| with_sample(JobError::from_store(e, true)))?;
                    count(&b, "texture", &list[i], s)?;
                    Some((list[i].clone(), b))
                }
                _ => None,
            };
            out.push(Inputs {
                normal,
                mask,
                texture,
            });
        }
        Ok(out)
    }

    /// The record of a job's campaign and the plan it determines, checked (cached: a record
    /// never changes once written).
    async fn campaign(
        &self,
        store: &dyn ObjectStore,
        job: &GenerateJob,
    ) -> Result<Arc<(CampaignRecord, Plan)>, JobError> {
        let key = format!("{}|{}", job.output, job.campaign_id);
        if let Some(p) = self.plans.lock().expect("plans").get(&key) {
            return Ok(p.clone());
        }
        let permanent = |cause: String| JobError::Permanent {
            sample: None,
            input_uri: None,
            cause,
        };
        let rec = retry(
            self.cfg.retry,
            "reading the campaign record",
            |e: &LedgerError| matches!(e, LedgerError::Store(s) if s.is_transient()),
            || ledger::read_record(store, &job.campaign_id),
        )
        .await
        .map_err(|e| match e {
            LedgerError::Store(e) => JobError::from_store(e, false),
            e @ LedgerError::UnknownCampaign { .. } => JobError::Rejected(format!(
                "the job names campaign {} but {e}",
                job.campaign_id
            )),
            e => permanent(e.to_string()),
        })?;
        let uri = store.uri(&layout::campaign_record(&job.campaign_id));
        // re-planning hashes the whole dataset listing: off the async threads
        let (rec, plan) = tokio::task::spawn_blocking(move || {
            let p = rec.plan(&uri);
            (rec, p)
        })
        .await
        .map_err(|e| JobError::Transient(format!("checking the campaign record: {e}")))?;
        let plan = plan.map_err(|e| permanent(e.to_string()))?;
        let both = Arc::new((rec, plan));
        self.plans.lock().expect("plans").insert(key, both.clone());
        Ok(both)
    }

    /// One `generate` job, within the campaign's shard time limit from the first store call
    /// to the commit.
    async fn process(&self, job: &GenerateJob) -> Result<Outcome, JobError> {
        let t0 = Instant::now();
        let store = self.store(&job.output).await.map_err(|e| match e {
            // the job names a store this worker has no business with, or a bucket that does
            // not exist: nothing to retry, and nowhere to write a failure record
            e @ (StoreError::NotAllowed { .. } | StoreError::NoBucket { .. }) => {
                JobError::Rejected(e.to_string())
            }
            e => JobError::from_store(e, false),
        })?;
        let both = self.campaign(store.as_ref(), job).await?;
        let (rec, plan) = (&both.0, &both.1);
        if rec.plan_digest != job.plan_digest {
            return Err(JobError::Rejected(format!(
                "the job was published for plan {} but campaign {} has plan {}",
                &job.plan_digest[..12],
                job.campaign_id,
                &rec.plan_digest[..12]
            )));
        }
        if job.shard >= rec.shard_count {
            return Err(JobError::Rejected(format!(
                "campaign {} has {} shards; there is no shard {}",
                job.campaign_id, rec.shard_count, job.shard
            )));
        }
        if !store::is_within(&rec.spec.output, &job.output)
            || !store::is_within(&job.output, &rec.spec.output)
        {
            return Err(JobError::Rejected(format!(
                "the job names output {} but campaign {} writes to {}",
                job.output, job.campaign_id, rec.spec.output
            )));
        }
        let limit = Duration::from_secs(rec.shard_time_limit_s);
        let msg = plan.shard(job.shard);
        let roots = rec.spec.input_roots();
        match tokio::time::timeout(
            limit.saturating_sub(t0.elapsed()),
            self.generate(&msg, rec, store, &roots, t0, limit),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(JobError::TimedOut(rec.shard_time_limit_s)),
        }
    }

    async fn generate(
        &self,
        msg: &ShardMessage,
        rec: &CampaignRecord,
        store: Arc<dyn ObjectStore>,
        roots: &[String],
        t0: Instant,
        limit: Duration,
    ) -> Result<Outcome, JobError> {
        let started_at = Utc::now();
        let cid = &msg.campaign_id;
        let cancelled = retry(
            self.cfg.retry,
            "checking for cancellation",
            StoreError::is_transient,
            || self.is_cancelled(store.as_ref(), cid),
        )
        .await
        .map_err(|e| JobError::from_store(e, false))?;
        if cancelled {
            return Ok(Outcome::Skipped {
                reason: "campaign cancelled".into(),
            });
        }
        // Skipped only when a commit is valid: a fragment with exactly the planned samples
        // whose objects all exist. An invalid or damaged one is generated again.
        let committed = retry(
            self.cfg.retry,
            "checking the shard's commits",
            |e: &LedgerError| matches!(e, LedgerError::Store(s) if s.is_transient()),
            || ledger::shard_committed(store.as_ref(), rec, msg.shard_index),
        )
        .await
        .map_err(|e| match e {
            LedgerError::Store(e) => JobError::from_store(e, false),
            e => JobError::Transient(e.to_string()),
        })?;
        if committed {
            return Ok(Outcome::Skipped {
                reason: "shard already committed".into(),
            });
        }
        for t in &msg.types {
            if !self.generators.contains_key(t.generator.as_str()) {
                return Err(JobError::Permanent {
                    sample: None,
                    input_uri: None,
                    cause: format!(
                        "unknown generator {:?} for {}/{} (this worker has: {})",
                        t.generator,
                        t.category,
                        t.defect_type,
                        self.generators
                            .keys()
                            .copied()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }
        for t in &msg.types {
            let g = &self.generators[t.generator.as_str()];
            g.prepare(&t.settings).await.map_err(|e| match e {
                GenError::Input(c) => JobError::Permanent {
                    sample: None,
                    input_uri: None,
                    cause: format!("{}/{}: {c}", t.category, t.defect_type),
                },
                GenError::Transient(c) => JobError::Transient(c),
            })?;
        }
        let aux = self.prepare_masks(msg, roots).await?;
        self.counters
            .model_load_micros
            .store(self.models.load_micros(), Ordering::Relaxed);
        let attempt = ids::new_attempt_id();
        let inputs = self.fetch_inputs(msg, roots).await?;
        let remaining = limit.saturating_sub(t0.elapsed());
        let gens = self.generators.clone();
        let m2 = msg.clone();
        let max_pixels = self.cfg.budgets.max_input_pixels;
        let job =
            tokio::task::spawn_blocking(move || compute(&m2, inputs, &gens, &aux, max_pixels));
        let computed = match tokio::time::timeout(remaining, job).await {
            Err(_) => return Err(JobError::TimedOut(msg.shard_time_limit_s)),
            // a panic on this shard's inputs: the same inputs panic again on any worker
            Ok(Err(join)) if join.is_panic() => {
                let p = join.into_panic();
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-text panic".into());
                return Err(JobError::Permanent {
                    sample: None,
                    input_uri: None,
                    cause: format!("the generator panicked on this shard's inputs: {what}"),
                });
            }
            Ok(Err(join)) => {
                return Err(JobError::Transient(format!(
                    "generator thread was cancelled: {join}"
                )))
            }
            Ok(Ok(r)) => r?,
        };
        // Upload every object under this attempt's keys.
        let mut uploads = vec![];
        for (s, c) in msg.samples.iter().zip(&computed) {
            uploads.push((
                layout::sample_image(cid, &s.sample_id, &attempt),
                c.image_png.clone(),
            ));
            uploads.push((
                layout::sample_mask(cid, &s.sample_id, &attempt),
                c.mask_png.clone(),
            ));
        }
        let store2 = store.clone();
        let policy = self.cfg.retry;
        let results: Vec<Result<u64, StoreError>> = futures_util::stream::iter(uploads)
            .map(|(key, body)| {
                let store = store2.clone();
                async move {
                    let n = body.len() as u64;
                    retry(
                        policy,
                        &format!("uploading {key}"),
                        StoreError::is_transient,
                        || store.put(&key, body.clone(), "image/png"),
                    )
                    .await
                    .map(|_| n)
                }
            })
            .buffer_unordered(self.cfg.upload_concurrency.max(1))
            .collect()
            .await;
        let mut bytes_up = 0;
        for r in results {
            bytes_up += r.map_err(|e| JobError::from_store(e, false))?;
        }
        self.counters
            .bytes_uploaded
            .fetch_add(bytes_up, Ordering::Relaxed);
        if t0.elapsed() > limit {
            return Err(JobError::TimedOut(msg.shard_time_limit_s));
        }
        // Commit: the fragment names exactly the objects written above.
        let finished_at = Utc::now();
        let per_sample_ms = t0.elapsed().as_secs_f32() * 1000.0 / msg.samples.len().max(1) as f32;
        let rows: Vec<ManifestRow> = msg
            .samples
            .iter()
            .zip(&computed)
            .map(|(s, c)| {
                row(
                    msg,
                    s,
                    c,
                    &*store,
                    &attempt,
                    &self.cfg.worker_id,
                    per_sample_ms,
                    started_at,
                    finished_at,
                )
            })
            .collect();
        let frag =
            manifest::write_parquet(&rows).map_err(|e| JobError::Transient(e.to_string()))?;
        let fkey = layout::fragment(cid, &msg.shard_id, &attempt);
        let fbytes = Bytes::from(frag);
        retry(
            self.cfg.retry,
            "committing the shard fragment",
            StoreError::is_transient,
            || store.put(&fkey, fbytes.clone(), "application/vnd.apache.parquet"),
        )
        .await
        .map_err(|e| JobError::from_store(e, false))?;
        let micros: u64 = computed.iter().map(|c| c.micros).sum();
        self.counters
            .generator_micros
            .fetch_add(micros, Ordering::Relaxed);
        // A shard that once failed and now succeeded is no longer failed.
        let _ = store.delete(&layout::failure(cid, &msg.shard_id)).await;
        Ok(Outcome::Committed {
            samples: rows.len(),
        })
    }
}

impl Worker {
    /// Processes one delivery and answers the broker (see [`crate::protocol::handle`]).
    pub async fn handle(&self, d: Delivery) -> Result<Outcome, WorkerError> {
        protocol::handle(self, d).await
    }

    async fn write_failure(&self, msg: &GenerateJob, f: Failure) -> Result<(), StoreError> {
        let rec = FailureRecord {
            campaign_id: msg.campaign_id.clone(),
            shard_id: msg.shard_id(),
            sample_id: f.sample.as_ref().map(|s| s.0.clone()),
            sample_index: f.sample.map(|s| s.1),
            input_uri: f.input_uri,
            cause: f.cause,
            class: f.class.to_string(),
            worker_id: self.cfg.worker_id.clone(),
            deliveries: f.deliveries,
            at: Utc::now(),
        };
        let store = self.store(&msg.output).await?;
        // no campaign, no failure record (a job naming a campaign that does not exist must
        // not litter the store): the dead-letter headers carry the reason
        let rkey = layout::campaign_record(&msg.campaign_id);
        if store.head(&rkey).await?.is_none() {
            return Err(StoreError::NotFound {
                uri: store.uri(&rkey),
            });
        }
        let body = Bytes::from(serde_json::to_vec_pretty(&rec).expect("record serializes"));
        let key = layout::failure(&msg.campaign_id, &msg.shard_id());
        retry(
            self.cfg.retry,
            "writing a failure record",
            StoreError::is_transient,
            || store.put(&key, body.clone(), "application/json"),
        )
        .await
        .map(|_| ())
    }
}

impl JobHandler for Worker {
    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn policy(&self) -> DeliveryPolicy {
        DeliveryPolicy {
            delivery_limit: self.cfg.delivery_limit,
            retry: self.cfg.retry,
        }
    }

    fn run<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Outcome, JobError>> {
        match job {
            Job::Generate(m) => Box::pin(self.process(m)),
            Job::MaskBank(j) => Box::pin(async move {
                let root = self
                    .store(&j.bank)
                    .await
                    .map_err(|e| JobError::from_store(e, false))?;
                crate::masks::bank_job::run_job(
                    j,
                    root,
                    &self.models,
                    &self.cfg.worker_id,
                    self.cfg.retry,
                )
                .await
            }),
            Job::Train(j) => Box::pin(async move {
                let root = self
                    .store(&j.output)
                    .await
                    .map_err(|e| JobError::from_store(e, false))?;
                crate::training::run_job(
                    j,
                    root,
                    &self.cfg.s3,
                    &self.cfg.model_cache,
                    self.counters.training.clone(),
                )
                .await
            }),
        }
    }

    fn record_failure<'a>(
        &'a self,
        job: &'a Job,
        failure: Failure,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        match job {
            Job::Generate(m) => Box::pin(self.write_failure(m, failure)),
            Job::MaskBank(j) => Box::pin(async move {
                let root = self.store(&j.bank).await?;
                crate::masks::bank_job::record_failure(
                    j,
                    root,
                    &self.cfg.worker_id,
                    self.cfg.retry,
                    failure,
                )
                .await
            }),
            Job::Train(j) => Box::pin(async move {
                let root = self.store(&j.output).await?;
                let key = format!("training/{}/failures/{:08}.json", j.run_id, j.until_step);
                let body = serde_json::json!({
                    "run_id": j.run_id,
                    "until_step": j.until_step,
                    "cause": failure.cause,
                    "class": failure.class,
                    "deliveries": failure.deliveries,
                    "worker": self.cfg.worker_id,
                    "at": Utc::now(),
                });
                root.put(
                    &key,
                    Bytes::from(serde_json::to_vec_pretty(&body).expect("json")),
                    "application/json",
                )
                .await
            }),
        }
    }
}
