//! The worker and its `generate` jobs: for one shard, read its inputs, run the generators off
//! the async runtime (so broker heartbeats keep flowing), write every object under
//! attempt-unique keys, and commit by writing the shard fragment last. How the broker is
//! answered (ack after commit, requeue, dead-letter, time limit) is `crate::protocol`'s.

use crate::compute::{compute, row, Inputs};
use crate::generators::{self, GenError, Generator};
use crate::masks::MaskAux;
use bytes::Bytes;
use chrono::Utc;
use defectforge::campaign::MaskSource;
use defectforge::imaging::{self};
use defectforge::job::Job;
use defectforge::ledger::FailureRecord;
use defectforge::manifest::{self, ManifestRow};
use defectforge::messages::ShardMessage;
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

pub struct Worker {
    pub cfg: WorkerConfig,
    generators: BTreeMap<&'static str, Arc<dyn Generator>>,
    models: Arc<crate::models::ModelCache>,
    stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
    cancelled: Mutex<HashMap<String, (Instant, bool)>>,
    textures: Mutex<HashMap<String, Arc<Vec<String>>>>,
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
            counters: Default::default(),
        }
    }

    async fn store(&self, root: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
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

    async fn read(&self, uri: &str) -> Result<Bytes, StoreError> {
        retry(
            self.cfg.retry,
            &format!("reading {uri}"),
            StoreError::is_transient,
            || async {
                let (s, key) = store::open_object(uri, &self.cfg.s3).await?;
                s.get(&key).await
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
    async fn prepare_masks(&self, msg: &ShardMessage) -> Result<MaskAux, JobError> {
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
                    let b =
                        self.read(f)
                            .await
                            .map_err(|e| match JobError::from_store(e, true) {
                                JobError::Permanent { cause, .. } => bad(cause),
                                e => e,
                            })?;
                    let m = imaging::decode_mask(&b, f).map_err(|e| bad(e.to_string()))?;
                    aux.foreground_masks.insert(f.clone(), m);
                }
            }
        }
        Ok(aux)
    }

    async fn fetch_inputs(&self, msg: &ShardMessage) -> Result<Vec<Inputs>, JobError> {
        let mut out = vec![];
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
                .read(&s.normal_uri)
                .await
                .map_err(|e| with_sample(JobError::from_store(e, true)))?;
            let mask = match &s.mask_uri {
                Some(u) => Some(
                    self.read(u)
                        .await
                        .map_err(|e| with_sample(JobError::from_store(e, true)))?,
                ),
                None => None,
            };
            let texture = match (&t.settings.perlin.texture_dir, t.generator.as_str()) {
                (Some(dir), "perlin") => {
                    let list = self.texture_list(dir).await.map_err(with_sample)?;
                    let i = (s.seed % list.len() as u64) as usize;
                    let b = self
                        .read(&list[i])
                        .await
                        .map_err(|e| with_sample(JobError::from_store(e, true)))?;
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

    async fn process(&self, msg: &ShardMessage) -> Result<Outcome, JobError> {
        let t0 = Instant::now();
        let started_at = Utc::now();
        let store = self
            .store(&msg.output)
            .await
            .map_err(|e| JobError::from_store(e, false))?;
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
        let shard_prefix = format!("{}{}/", layout::shards_prefix(cid), msg.shard_id);
        let existing = retry(
            self.cfg.retry,
            "listing shard fragments",
            StoreError::is_transient,
            || store.list(&shard_prefix),
        )
        .await
        .map_err(|e| JobError::from_store(e, false))?;
        if !existing.is_empty() {
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
        let aux = self.prepare_masks(msg).await?;
        self.counters
            .model_load_micros
            .store(self.models.load_micros(), Ordering::Relaxed);
        let attempt = ids::new_attempt_id();
        let inputs = self.fetch_inputs(msg).await?;
        let limit = Duration::from_secs(msg.shard_time_limit_s);
        let remaining = limit.saturating_sub(t0.elapsed());
        let gens = self.generators.clone();
        let m2 = msg.clone();
        let job = tokio::task::spawn_blocking(move || compute(&m2, inputs, &gens, &aux));
        let computed = match tokio::time::timeout(remaining, job).await {
            Err(_) => return Err(JobError::TimedOut(msg.shard_time_limit_s)),
            Ok(Err(join)) => {
                return Err(JobError::Transient(format!(
                    "generator thread panicked: {join}"
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

    async fn write_failure(&self, msg: &ShardMessage, f: Failure) -> Result<(), StoreError> {
        let rec = FailureRecord {
            campaign_id: msg.campaign_id.clone(),
            shard_id: msg.shard_id.clone(),
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
        let body = Bytes::from(serde_json::to_vec_pretty(&rec).expect("record serializes"));
        let key = layout::failure(&msg.campaign_id, &msg.shard_id);
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
        }
    }
}
