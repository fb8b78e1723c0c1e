//! The worker and its `generate` jobs: for one shard, read its inputs, run the generators off
//! the async runtime (so broker heartbeats keep flowing), write every object under
//! attempt-unique keys, and commit by writing the shard fragment last. How the broker is
//! answered (ack after commit, requeue, dead-letter, time limit) is `crate::protocol`'s.

use crate::generators::{self, composite, masks, GenError, GenInput, Generator};
use bytes::Bytes;
use chrono::Utc;
use defectforge::campaign::MaskSource;
use defectforge::imaging::{self, ImageError};
use defectforge::job::Job;
use defectforge::ledger::FailureRecord;
use defectforge::manifest::{self, ManifestRow};
use defectforge::messages::{SampleSpec, ShardMessage};
use defectforge::queue::Delivery;
use defectforge::retry::{retry, Backoff};
use defectforge::store::{self, ObjectStore, S3Config, StoreError};
use defectforge::{ids, layout, ledger};
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use image::{GrayImage, RgbImage};
use rand::SeedableRng;
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

struct Inputs {
    normal: Bytes,
    mask: Option<Bytes>,
    texture: Option<(String, Bytes)>,
}

struct Computed {
    image_png: Bytes,
    mask_png: Bytes,
    image_sha256: String,
    mask_sha256: String,
    width: u32,
    height: u32,
    stats: imaging::MaskStats,
    change: (f32, f32),
    psnr: f32,
    normal_size: (u32, u32),
    generator: String,
    version: String,
    info: generators::SampleInfo,
    micros: u64,
    placement: MaskPlacement,
    latent_area: u32,
}

/// What the mask source and the foreground constraint did for one sample.
#[derive(Debug, Clone, Default)]
struct MaskPlacement {
    /// "off" or the placement outcome
    action: String,
    coverage: Option<f32>,
    attempts: Option<u32>,
}

/// What a shard's masks need beyond the sample inputs: the loaded mask models of the types
/// with generated masks, and the object masks named by `foreground_mask`.
#[derive(Default)]
struct MaskAux {
    models: HashMap<u32, Arc<crate::models::LoadedModel>>,
    /// decoded once per shard
    foreground_masks: HashMap<String, GrayImage>,
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
                let name =
                    generators::learned_masks::embedding_name(&t.category, &t.defect_type, s);
                generators::learned_masks::require_mask_model(&m.manifest, uri, &name)
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
                crate::bank::run_job(j, root, &self.models, &self.cfg.worker_id, self.cfg.retry)
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
                crate::bank::record_failure(j, root, &self.cfg.worker_id, self.cfg.retry, failure)
                    .await
            }),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn row(
    msg: &ShardMessage,
    s: &SampleSpec,
    c: &Computed,
    store: &dyn ObjectStore,
    attempt: &str,
    worker_id: &str,
    per_sample_ms: f32,
    started_at: chrono::DateTime<Utc>,
    finished_at: chrono::DateTime<Utc>,
) -> ManifestRow {
    let t = &msg.types[s.type_idx as usize];
    ManifestRow {
        sample_id: s.sample_id.clone(),
        shard_id: msg.shard_id.clone(),
        campaign_id: msg.campaign_id.clone(),
        sample_index: s.index,
        category: t.category.clone(),
        defect_type: t.defect_type.clone(),
        image_uri: store.uri(&layout::sample_image(
            &msg.campaign_id,
            &s.sample_id,
            attempt,
        )),
        mask_uri: store.uri(&layout::sample_mask(
            &msg.campaign_id,
            &s.sample_id,
            attempt,
        )),
        normal_uri: s.normal_uri.clone(),
        mask_source: t.mask_source.as_str().to_string(),
        source_mask_uri: s.mask_uri.clone(),
        generator: c.generator.clone(),
        generator_version: c.version.clone(),
        model_digest: c.info.model_digest.clone(),
        seed: s.seed,
        generator_settings: serde_json::to_string(&t.settings).expect("settings serialize"),
        width: c.width,
        height: c.height,
        mask_area: c.stats.area,
        bbox_x: c.stats.bbox.0,
        bbox_y: c.stats.bbox.1,
        bbox_w: c.stats.bbox.2,
        bbox_h: c.stats.bbox.3,
        image_sha256: c.image_sha256.clone(),
        image_size: c.image_png.len() as u64,
        mask_sha256: c.mask_sha256.clone(),
        mask_size: c.mask_png.len() as u64,
        mean_abs_change_inside: c.change.0,
        mean_abs_change_outside: c.change.1,
        background_psnr: c.psnr,
        normal_width: c.normal_size.0,
        normal_height: c.normal_size.1,
        diffusion_steps: c.info.diffusion_steps,
        reweighting: c.info.reweighting.clone(),
        mask_placement: c.placement.action.clone(),
        foreground_coverage: c.placement.coverage,
        mask_attempts: c.placement.attempts,
        latent_mask_area: c.latent_area,
        thin_defect: c.latent_area == 0,
        worker_id: worker_id.to_string(),
        attempt: attempt.to_string(),
        duration_ms: per_sample_ms,
        started_at,
        finished_at,
    }
}

fn image_err(e: ImageError, s: &SampleSpec, uri: &str) -> JobError {
    JobError::Permanent {
        sample: Some((s.sample_id.clone(), s.index)),
        input_uri: Some(uri.to_string()),
        cause: format!("sample {} (#{}): {e}", s.sample_id, s.index),
    }
}

/// Decodes inputs, builds masks, runs the generators (batched per generator), composites,
/// encodes and hashes. CPU/GPU-bound: runs on a blocking thread.
fn compute(
    msg: &ShardMessage,
    inputs: Vec<Inputs>,
    gens: &BTreeMap<&'static str, Arc<dyn Generator>>,
    aux: &MaskAux,
) -> Result<Vec<Computed>, JobError> {
    let mut normals: Vec<RgbImage> = vec![];
    let mut masks_v: Vec<GrayImage> = vec![];
    let mut textures: Vec<Option<RgbImage>> = vec![];
    let mut normal_sizes: Vec<(u32, u32)> = vec![];
    let mut placements: Vec<MaskPlacement> = vec![];
    let mut learned = learned_masks_of(msg, aux)?;
    for (i, (s, inp)) in msg.samples.iter().zip(&inputs).enumerate() {
        let t = &msg.types[s.type_idx as usize];
        let normal = imaging::decode_rgb(&inp.normal, "normal image", &s.normal_uri)
            .map_err(|e| image_err(e, s, &s.normal_uri))?;
        let (w, h) = normal.dimensions();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed ^ 0x4d41_534b);
        let mut attempts = None;
        let mask = match (t.mask_source, &inp.mask, &s.mask_uri) {
            (MaskSource::Generated, _, _) => {
                let lm = learned
                    .remove(&i)
                    .expect("a learned mask per generated sample");
                attempts = Some(lm.attempts);
                imaging::resize_mask(&lm.mask, w, h)
            }
            (MaskSource::Bank, Some(b), Some(uri)) => {
                // Bank masks are stored at the mask model's resolution: resized to the image.
                let m = imaging::decode_mask(b, uri).map_err(|e| image_err(e, s, uri))?;
                let m = if m.dimensions() == (w, h) {
                    m
                } else {
                    imaging::resize_mask(&m, w, h)
                };
                if imaging::mask_stats(&m).area == 0 {
                    return Err(image_err(
                        ImageError::EmptyMask { uri: uri.clone() },
                        s,
                        uri,
                    ));
                }
                m
            }
            (MaskSource::Real | MaskSource::Folder, Some(b), Some(uri)) => {
                let m = imaging::decode_mask(b, uri).map_err(|e| image_err(e, s, uri))?;
                if m.dimensions() != (w, h) {
                    return Err(image_err(
                        ImageError::SizeMismatch {
                            mask_uri: uri.clone(),
                            image_uri: s.normal_uri.clone(),
                            mw: m.width(),
                            mh: m.height(),
                            iw: w,
                            ih: h,
                        },
                        s,
                        uri,
                    ));
                }
                if imaging::mask_stats(&m).area == 0 {
                    return Err(image_err(
                        ImageError::EmptyMask { uri: uri.clone() },
                        s,
                        uri,
                    ));
                }
                m
            }
            (MaskSource::Real | MaskSource::Folder | MaskSource::Bank, _, _) => {
                return Err(JobError::Permanent {
                    sample: Some((s.sample_id.clone(), s.index)),
                    input_uri: None,
                    cause: format!(
                        "sample {} uses mask source {:?} but names no mask file",
                        s.sample_id, t.mask_source
                    ),
                })
            }
            (MaskSource::Perlin, _, _) => masks::perlin_mask(w, h, &t.settings.perlin, &mut rng),
            (MaskSource::Cutpaste, _, _) => masks::rect_mask(w, h, &t.settings.cutpaste, &mut rng),
            (MaskSource::Scar, _, _) => masks::scar_mask(w, h, &t.settings.cutpaste, &mut rng),
        };
        let (mask, placement) = constrain(&normal, mask, &t.settings.placement, aux, &mut rng)
            .map_err(|cause| JobError::Permanent {
                sample: Some((s.sample_id.clone(), s.index)),
                input_uri: t.settings.placement.mask_file.clone(),
                cause: format!("sample {} (#{}): {cause}", s.sample_id, s.index),
            })?;
        placements.push(MaskPlacement {
            attempts,
            ..placement
        });
        let texture = match &inp.texture {
            Some((uri, b)) => {
                Some(imaging::decode_rgb(b, "texture", uri).map_err(|e| image_err(e, s, uri))?)
            }
            None => None,
        };
        let g = &gens[t.generator.as_str()];
        let (normal, mask) = match g.working_size(&t.settings) {
            Some((ww, wh)) if (ww, wh) != (w, h) => {
                let n = image::imageops::resize(
                    &normal,
                    ww,
                    wh,
                    image::imageops::FilterType::CatmullRom,
                );
                let m = imaging::resize_mask(&mask, ww, wh);
                if imaging::mask_stats(&m).area == 0 {
                    return Err(JobError::Permanent {
                        sample: Some((s.sample_id.clone(), s.index)),
                        input_uri: s.mask_uri.clone(),
                        cause: format!(
                            "sample {} (#{}): its mask vanishes when resized from {w}x{h} to the generator's {ww}x{wh}; use a coarser mask or full_resolution = true",
                            s.sample_id, s.index
                        ),
                    });
                }
                (n, m)
            }
            _ => (normal, mask),
        };
        normal_sizes.push((w, h));
        normals.push(normal);
        masks_v.push(mask);
        textures.push(texture);
    }
    // Batch per generator, keeping plan order in the result.
    let mut results: Vec<Option<(RgbImage, u64)>> = (0..msg.samples.len()).map(|_| None).collect();
    let mut by_gen: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, s) in msg.samples.iter().enumerate() {
        by_gen
            .entry(msg.types[s.type_idx as usize].generator.as_str())
            .or_default()
            .push(i);
    }
    for (gname, idx) in &by_gen {
        let g = &gens[gname];
        let batch: Vec<GenInput<'_>> = idx
            .iter()
            .map(|&i| GenInput {
                category: &msg.types[msg.samples[i].type_idx as usize].category,
                defect_type: &msg.types[msg.samples[i].type_idx as usize].defect_type,
                normal: &normals[i],
                mask: &masks_v[i],
                seed: msg.samples[i].seed,
                settings: &msg.types[msg.samples[i].type_idx as usize].settings,
                texture: textures[i].as_ref(),
            })
            .collect();
        let t = Instant::now();
        let out = g.generate(&batch).map_err(|e| match e {
            GenError::Input(c) => JobError::Permanent {
                sample: None,
                input_uri: None,
                cause: c,
            },
            GenError::Transient(c) => JobError::Transient(c),
        })?;
        let micros = t.elapsed().as_micros() as u64 / idx.len().max(1) as u64;
        if out.len() != idx.len() {
            return Err(JobError::Transient(format!(
                "generator {gname} returned {} images for {}",
                out.len(),
                idx.len()
            )));
        }
        for (&i, img) in idx.iter().zip(out) {
            if img.dimensions() != normals[i].dimensions() {
                return Err(JobError::Transient(format!(
                    "generator {gname} returned a {}x{} image for a {}x{} input",
                    img.width(),
                    img.height(),
                    normals[i].width(),
                    normals[i].height()
                )));
            }
            results[i] = Some((img, micros));
        }
    }
    let mut out = vec![];
    for (i, r) in results.into_iter().enumerate() {
        let (gen_img, micros) = r.expect("every sample generated");
        let t = &msg.types[msg.samples[i].type_idx as usize];
        let g = &gens[t.generator.as_str()];
        let final_img = if g.runner_composites(&t.settings) {
            composite(&normals[i], &gen_img, &masks_v[i])
        } else {
            gen_img
        };
        let change = imaging::change_inside_outside(&normals[i], &final_img, &masks_v[i]);
        let psnr = imaging::background_psnr(&normals[i], &final_img, &masks_v[i]);
        // encoding and hashing stay on this blocking thread, off the async runtime
        let image_png =
            imaging::encode_png_rgb(&final_img).map_err(|e| JobError::Transient(e.to_string()))?;
        let mask_png = imaging::encode_png_gray(&masks_v[i])
            .map_err(|e| JobError::Transient(e.to_string()))?;
        out.push(Computed {
            image_sha256: ids::sha256_hex(&image_png),
            mask_sha256: ids::sha256_hex(&mask_png),
            image_png: Bytes::from(image_png),
            mask_png: Bytes::from(mask_png),
            width: final_img.width(),
            height: final_img.height(),
            stats: imaging::mask_stats(&masks_v[i]),
            change,
            psnr,
            normal_size: normal_sizes[i],
            generator: g.name().to_string(),
            version: g.version().to_string(),
            info: g.describe(&t.settings),
            micros,
            placement: placements[i].clone(),
            latent_area: imaging::latent_mask_area(&masks_v[i]),
        });
    }
    Ok(out)
}

/// Samples the learned masks of every generated-mask sample of a shard, batched per type.
fn learned_masks_of(
    msg: &ShardMessage,
    aux: &MaskAux,
) -> Result<HashMap<usize, generators::learned_masks::LearnedMask>, JobError> {
    let mut by_type: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, s) in msg.samples.iter().enumerate() {
        if msg.types[s.type_idx as usize].mask_source == MaskSource::Generated {
            by_type.entry(s.type_idx).or_default().push(i);
        }
    }
    let mut out = HashMap::new();
    for (ti, idx) in by_type {
        let t = &msg.types[ti as usize];
        let m = aux.models.get(&ti).ok_or_else(|| {
            JobError::Transient(format!(
                "mask model of {}/{} not loaded",
                t.category, t.defect_type
            ))
        })?;
        let name = generators::learned_masks::embedding_name(
            &t.category,
            &t.defect_type,
            &t.settings.mask_model,
        );
        let seeds: Vec<u64> = idx
            .iter()
            .map(|&i| msg.samples[i].seed ^ 0x4c45_4152_4e4d_534b)
            .collect();
        let mut stats = generators::learned_masks::DrawStats::default();
        let masks = generators::learned_masks::sample_accepted(
            &m.model,
            &name,
            &seeds,
            &t.settings.mask_model,
            &mut stats,
            &mut |_| {},
        )
        .map_err(|f| {
            let sample = f.index.map(|k| &msg.samples[idx[k]]);
            match f.error {
                GenError::Input(c) => JobError::Permanent {
                    sample: sample.map(|s| (s.sample_id.clone(), s.index)),
                    input_uri: None,
                    cause: match sample {
                        Some(s) => format!(
                            "sample {} (#{}, seed {}) of {}/{}: {c}",
                            s.sample_id, s.index, s.seed, t.category, t.defect_type
                        ),
                        None => format!("{}/{}: {c}", t.category, t.defect_type),
                    },
                },
                GenError::Transient(c) => JobError::Transient(c),
            }
        })?;
        tracing::info!(
            category = %t.category,
            defect = %t.defect_type,
            masks = masks.len(),
            drawn = stats.drawn,
            rejected_border = stats.rejected_border,
            rejected_empty = stats.rejected_empty,
            rejected_thin = stats.rejected_thin,
            rejection_rate = stats.rejection_rate(),
            "learned masks sampled"
        );
        out.extend(idx.into_iter().zip(masks));
    }
    Ok(out)
}

/// Applies the foreground constraint to a mask (see `defectforge::foreground`).
fn constrain(
    normal: &RgbImage,
    mask: GrayImage,
    p: &defectforge::campaign::PlacementSettings,
    aux: &MaskAux,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<(GrayImage, MaskPlacement), String> {
    use defectforge::foreground;
    let (w, h) = normal.dimensions();
    use defectforge::campaign::PlacementMode;
    let fg = match (p.mode, &p.mask_file) {
        (PlacementMode::Estimate, _) => {
            foreground::estimate_foreground(normal, &foreground::ForegroundParams::default()).mask
        }
        (PlacementMode::File, Some(f)) => {
            let m = aux
                .foreground_masks
                .get(f)
                .ok_or_else(|| format!("foreground_mask {f} was not read"))?;
            if m.dimensions() == (w, h) {
                m.clone()
            } else {
                imaging::resize_mask(m, w, h)
            }
        }
        _ => {
            return Ok((
                mask,
                MaskPlacement {
                    action: "off".into(),
                    ..Default::default()
                },
            ))
        }
    };
    let placed = foreground::place_on_foreground(&mask, &fg, p.min_coverage, rng);
    Ok((
        placed.mask,
        MaskPlacement {
            action: placed.placement.as_str().to_string(),
            coverage: Some(placed.coverage),
            attempts: None,
        },
    ))
}
