//! `defectforge train`: learning new defect types (anomaly embeddings and the spatial
//! encoder) from a few real examples, with the official recipe
//! (shared/reference/anomalydiffusion.md §4; the graph and optimizer are
//! `defectforge_engine::train`'s).
//!
//! A run is identified by its spec's name ([`TrainingSpec::run_id`]) and lives under the spec's
//! output root (keys in [`defectforge::training::keys`]):
//! * `run.json`: the spec as submitted, written before any step; a later submission under the
//!   same name must match it;
//! * checkpoints every `checkpoint_every` steps: `checkpoints/<step>/<attempt>/state.safetensors`
//!   (embeddings, encoder parameters and BatchNorm buffers, Adam moments; the Adam steps and
//!   the trajectory are in its metadata), then `<step>/<attempt>.commit` with every file's
//!   digest, written last. A run resumes from its newest valid commit; a torn checkpoint (no
//!   commit, or a digest that does not match) is ignored;
//! * the training log (`log/<step>-<attempt>.parquet`, the rows since the previous
//!   checkpoint) and preview grids (`previews/<step>.png`);
//! * `result.json`, last: the trained model's URI (a model directory exactly as `models
//!   import` writes it, with its lineage in `model.json`).
//!
//! Randomness: every draw of step `k` (which samples, augmentation, prompt templates, the VAE
//! posterior sample, t, ε) comes from a generator seeded with `(seed, k)`, so the run's RNG
//! state is the step number alone: a resumed run continues exactly where the uninterrupted one
//! would have been (CPU is deterministic; see `tests/training.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use defectforge::dataset;
use defectforge::store::{self, ObjectStore, S3Config};
use defectforge::training::{
    keys, mask_batch_types, CheckpointCommit, EncoderMode, LogRow, TrainingKind, TrainingResult,
    TrainingSpec,
};
use defectforge_engine::ad_model::{self, AnomalyModel, PROMPT_TEMPLATES};
use defectforge_engine::anomaly::SamplerOptions;
use defectforge_engine::noise::{SeededNoise, SplitMix64};
use defectforge_engine::spatial::BnMode;
use defectforge_engine::train::adam::{Adam, AdamConfig, ParamState};
use defectforge_engine::train::augment::{prepare_batch, LoadedSample};
use defectforge_engine::train::{init_embedding, masked_training_loss, LossBatch, Trainable};
use defectforge_engine::{DType, Device, NoiseSource, Tensor};
use image::imageops::FilterType;
use tracing::info;

use crate::models::{self, ModelError};

mod masks;

/// The loaded size (official 512) and the training size (256).
pub const LOAD_SIZE: usize = 512;
pub const TRAIN_SIZE: usize = 256;
/// DDIM steps of a preview sample.
pub const PREVIEW_STEPS: usize = 10;
/// Largest image or mask file a run reads.
const MAX_INPUT_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The spec, the dataset or the base model is wrong: retrying will not help.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("training step failed: {0}")]
    Engine(#[from] defectforge_engine::EngineError),
    #[error("cancelled")]
    Cancelled,
}

impl From<defectforge_engine::candle::Error> for TrainError {
    fn from(e: defectforge_engine::candle::Error) -> Self {
        TrainError::Engine(e.into())
    }
}

/// How a run is executed.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// where base models are cached
    pub model_cache: PathBuf,
    /// where the trained model is staged before upload
    pub staging: PathBuf,
    /// stop after this step (a segment of a longer run); `None`: the spec's steps
    pub stop_at: Option<u64>,
    /// show a progress bar on stderr
    pub progress: bool,
}

/// What a call to [`run`] did.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub run_id: String,
    /// the step the run started from (0: fresh)
    pub resumed_from: u64,
    /// the last step completed
    pub step: u64,
    /// the finished run's record, when the run is complete
    pub result: Option<TrainingResult>,
}

/// One type's few-shot examples.
#[derive(Debug, Clone)]
pub struct TypeExamples {
    pub name: String,
    /// (image, mask) URIs, in the official numeric order, the split applied
    pub pairs: Vec<(String, String)>,
}

/// The numeric prefix the official loader sorts by (`"012_x.png"` → 12); names without one
/// sort after, by name.
fn numeric_key(uri: &str) -> (u64, String) {
    let name = uri.rsplit('/').next().unwrap_or(uri).to_string();
    let digits: String = name.chars().take_while(|c| c.is_ascii_digit()).collect();
    (digits.parse().unwrap_or(u64::MAX), name)
}

fn stem(uri: &str) -> &str {
    let name = uri.rsplit('/').next().unwrap_or(uri);
    name.rsplit_once('.').map(|(s, _)| s).unwrap_or(name)
}

/// Lists every type's examples and applies the few-shot split, reporting every problem.
pub async fn resolve_examples(
    spec: &TrainingSpec,
    s3: &S3Config,
) -> Result<Vec<TypeExamples>, TrainError> {
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for (name, src) in &spec.types {
        let images = match dataset::list_images(&src.images, s3).await {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!(
                    "{name}: cannot list its images in {}: {e}",
                    src.images
                ));
                continue;
            }
        };
        let masks = match dataset::list_images(&src.masks, s3).await {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!(
                    "{name}: cannot list its masks in {}: {e}",
                    src.masks
                ));
                continue;
            }
        };
        if masks.is_empty() {
            problems.push(format!(
                "{name}: no masks in {} — every training image needs its ground-truth mask (add them, or remove the type from [types])",
                src.masks
            ));
            continue;
        }
        let by_stem: BTreeMap<String, String> = masks
            .iter()
            .map(|m| {
                let s = stem(m);
                (s.strip_suffix("_mask").unwrap_or(s).to_string(), m.clone())
            })
            .collect();
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut unmatched = Vec::new();
        for img in &images {
            match by_stem.get(stem(img)) {
                Some(m) => pairs.push((img.clone(), m.clone())),
                None => unmatched.push(img.rsplit('/').next().unwrap_or(img).to_string()),
            }
        }
        if !unmatched.is_empty() {
            problems.push(format!(
                "{name}: {} image(s) without a mask in {} ({}): a mask is <stem>.png or <stem>_mask.png",
                unmatched.len(),
                src.masks,
                unmatched.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            ));
            continue;
        }
        pairs.sort_by_key(|(i, _)| numeric_key(i));
        let take = spec.take(pairs.len());
        if take == 0 {
            problems.push(format!(
                "{name}: the {:?} split of {} example(s) in {} leaves no training image",
                spec.few_shot_split,
                pairs.len(),
                src.images
            ));
            continue;
        }
        pairs.truncate(take);
        out.push(TypeExamples {
            name: name.clone(),
            pairs,
        });
    }
    if !problems.is_empty() {
        return Err(TrainError::Invalid(format!(
            "training data problems:\n{}",
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        )));
    }
    Ok(out)
}

/// Reads and prepares one example at the loaded size: the image bicubic-resized to 512 and
/// scaled to [−1, 1], the mask bicubic-resized and binarised at ½ (the official loader).
async fn load_example(img: &str, mask: &str, s3: &S3Config) -> Result<LoadedSample, TrainError> {
    let read = |uri: String| async move {
        let (dir, name) = uri
            .rsplit_once('/')
            .ok_or_else(|| TrainError::Invalid(format!("{uri}: not a file")))?;
        let st = store::open(dir, s3).await?;
        Ok::<Bytes, TrainError>(st.get_limited(name, MAX_INPUT_BYTES).await?)
    };
    let ib = read(img.to_string()).await?;
    let mb = read(mask.to_string()).await?;
    let i = defectforge::imaging::decode_rgb(&ib, "image", img)
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    let m = defectforge::imaging::decode_mask(&mb, mask)
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    if i.dimensions() != m.dimensions() {
        return Err(TrainError::Invalid(format!(
            "{img} is {}x{} but its mask {mask} is {}x{}: the mask must have the image's size",
            i.width(),
            i.height(),
            m.width(),
            m.height()
        )));
    }
    if !m.pixels().any(|p| p.0[0] > 0) {
        return Err(TrainError::Invalid(format!(
            "{mask} is empty: a training example needs the defect marked in its mask"
        )));
    }
    let s = LOAD_SIZE as u32;
    let i = image::imageops::resize(&i, s, s, FilterType::CatmullRom);
    let m = image::imageops::resize(&m, s, s, FilterType::CatmullRom);
    let n = LOAD_SIZE * LOAD_SIZE;
    let mut image = vec![0f32; 3 * n];
    for (p, px) in i.pixels().enumerate() {
        for c in 0..3 {
            image[c * n + p] = px.0[c] as f32 / 127.5 - 1.0;
        }
    }
    let mask = m
        .pixels()
        .map(|p| {
            if p.0[0] as f32 / 255.0 > 0.5 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Ok(LoadedSample { image, mask })
}

/// The generator of step `k`'s draws.
fn step_rng(seed: u64, step: u64, stream: u64) -> SplitMix64 {
    let mut s = SplitMix64::new(seed ^ 0x7472_6169_6e00_0000);
    let a = s.next_u64();
    SplitMix64::new(a ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.rotate_left(32))
}

/// Parses a checkpoint's state file into its parts.
struct CheckpointState {
    embeddings: BTreeMap<String, Tensor>,
    encoder: Vec<(String, Tensor)>,
    adam: BTreeMap<String, ParamState>,
    loss: f64,
}

fn read_state(bytes: &[u8], dev: &Device) -> Result<CheckpointState, TrainError> {
    let tensors = defectforge_engine::candle::safetensors::load_buffer(bytes, dev)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| TrainError::Invalid(format!("checkpoint state: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let steps: BTreeMap<String, u64> = meta
        .get("adam_steps")
        .map(|s| serde_json::from_str(s))
        .transpose()
        .map_err(|e| TrainError::Invalid(format!("checkpoint adam_steps: {e}")))?
        .unwrap_or_default();
    let loss = meta
        .get("loss")
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN);
    let mut embeddings = BTreeMap::new();
    let mut encoder = Vec::new();
    for (k, t) in &tensors {
        if let Some(n) = k.strip_prefix("embedding.") {
            embeddings.insert(n.to_string(), t.clone());
        } else if let Some(n) = k.strip_prefix("encoder.") {
            encoder.push((n.to_string(), t.clone()));
        }
    }
    encoder.sort_by(|a, b| a.0.cmp(&b.0));
    let mut adam = BTreeMap::new();
    for (p, step) in steps {
        let m = tensors.get(&format!("adam.m.{p}"));
        let v = tensors.get(&format!("adam.v.{p}"));
        match (m, v) {
            (Some(m), Some(v)) => {
                adam.insert(
                    p,
                    ParamState {
                        step,
                        exp_avg: m.clone(),
                        exp_avg_sq: v.clone(),
                    },
                );
            }
            _ => {
                return Err(TrainError::Invalid(format!(
                    "checkpoint state lacks the Adam moments of {p}"
                )))
            }
        }
    }
    Ok(CheckpointState {
        embeddings,
        encoder,
        adam,
        loss,
    })
}

/// The whole learned state as one safetensors file.
fn write_state(
    model: &AnomalyModel,
    tr: &Trainable,
    opt: &Adam,
    loss: f64,
    step: u64,
) -> Result<Vec<u8>, TrainError> {
    let mut tensors: Vec<(String, Tensor)> = tr
        .embeddings
        .iter()
        .map(|(n, v)| (format!("embedding.{n}"), v.as_tensor().detach()))
        .collect();
    for (n, t) in model.spatial.state_dict(&tr.encoder)? {
        tensors.push((format!("encoder.{n}"), t));
    }
    let mut steps = BTreeMap::new();
    for (p, st) in opt.states() {
        tensors.push((format!("adam.m.{p}"), st.exp_avg.clone()));
        tensors.push((format!("adam.v.{p}"), st.exp_avg_sq.clone()));
        steps.insert(p.clone(), st.step);
    }
    let meta: std::collections::HashMap<String, String> = [
        (
            "adam_steps".to_string(),
            serde_json::to_string(&steps).expect("json"),
        ),
        ("loss".to_string(), format!("{loss:e}")),
        ("step".to_string(), step.to_string()),
    ]
    .into();
    let tmp = tempfile::NamedTempFile::new()
        .map_err(|e| TrainError::Invalid(format!("temporary file: {e}")))?;
    defectforge_engine::weights::save_safetensors(&tensors, Some(meta), tmp.path())?;
    std::fs::read(tmp.path()).map_err(|e| TrainError::Invalid(format!("temporary file: {e}")))
}

/// A preview grid: per type one row of (real example, its mask, a sample generated on the
/// example with the current embeddings, fixed seed).
fn preview(
    model: &AnomalyModel,
    examples: &[(String, LoadedSample)],
    seed: u64,
) -> Result<Vec<u8>, TrainError> {
    let s = TRAIN_SIZE;
    let dev = model.ldm.device().clone();
    let dtype = model.ldm.dtype();
    let mut rows: Vec<[Vec<f32>; 3]> = Vec::new();
    for (i, (name, ex)) in examples.iter().enumerate() {
        let mut rng = SplitMix64::new(seed);
        let b = prepare_batch(std::slice::from_ref(ex), LOAD_SIZE, s, false, &mut rng);
        let img = Tensor::from_vec(b.images.clone(), (1, 3, s, s), &dev)?.to_dtype(dtype)?;
        let mask: Vec<f32> = b.masks.iter().map(|&v| (v >= 0.5) as u8 as f32).collect();
        let m = Tensor::from_vec(mask.clone(), (1, 1, s, s), &dev)?.to_dtype(dtype)?;
        let opts = SamplerOptions {
            steps: PREVIEW_STEPS,
            ..Default::default()
        };
        let mut noise = SeededNoise::new(seed.wrapping_add(i as u64));
        let out = model.generate(
            &img,
            &m,
            &[model.random_prompt(0)],
            std::slice::from_ref(name),
            &opts,
            BnMode::Batch,
            &mut noise,
        )?;
        let gen: Vec<f32> = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mask3: Vec<f32> = mask
            .iter()
            .map(|&v| v * 2.0 - 1.0)
            .cycle()
            .take(3 * s * s)
            .collect();
        rows.push([b.images, mask3, gen]);
    }
    let (w, h) = ((3 * s) as u32, (rows.len() * s) as u32);
    let mut grid = image::RgbImage::new(w, h);
    for (r, cols) in rows.iter().enumerate() {
        for (c, plane) in cols.iter().enumerate() {
            for y in 0..s {
                for x in 0..s {
                    let px = |ch: usize| {
                        let v = plane[ch * s * s + y * s + x];
                        ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
                    };
                    grid.put_pixel(
                        (c * s + x) as u32,
                        (r * s + y) as u32,
                        image::Rgb([px(0), px(1), px(2)]),
                    );
                }
            }
        }
    }
    let mut buf = std::io::Cursor::new(Vec::new());
    grid.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| TrainError::Invalid(format!("preview PNG: {e}")))?;
    Ok(buf.into_inner())
}

/// The loss of one batch: `picks` (type, example) prepared with `rng`'s draws (augmentation,
/// prompt templates, the VAE posterior sample, t, ε).
#[allow(clippy::too_many_arguments)]
fn batch_loss(
    model: &AnomalyModel,
    picks: &[(usize, usize)],
    samples: &[Vec<LoadedSample>],
    names: &[String],
    augment: bool,
    bn: BnMode,
    rng: &mut SplitMix64,
) -> Result<(Tensor, bool, Vec<String>), TrainError> {
    let b = picks.len();
    let batch: Vec<LoadedSample> = picks.iter().map(|&(t, i)| samples[t][i].clone()).collect();
    let prepared = prepare_batch(&batch, LOAD_SIZE, TRAIN_SIZE, augment, rng);
    let dev = model.ldm.device().clone();
    let dtype = model.ldm.dtype();
    let s = TRAIN_SIZE;
    let images = Tensor::from_vec(prepared.images, (b, 3, s, s), &dev)?.to_dtype(dtype)?;
    let masks = Tensor::from_vec(prepared.masks, (b, 1, s, s), &dev)?.to_dtype(dtype)?;
    let d = draw_batch(model, &images, picks, names, rng)?;
    let out = masked_training_loss(
        model,
        &LossBatch {
            latents: &d.latents,
            masks: &masks,
            prompts: &d.prompts,
            names: &d.names,
            timesteps: &d.timesteps,
            noise: &d.eps,
        },
        bn,
    )?;
    Ok((out.loss, prepared.augmented, d.names))
}

/// What both models' batches draw once their images `[B, 3, 256, 256]` are ready.
struct Draws {
    latents: Tensor,
    prompts: Vec<String>,
    names: Vec<String>,
    timesteps: Vec<usize>,
    eps: Tensor,
}

/// The draws of a batch from `rng`, in this order: a prompt template per row, the seed of the
/// VAE posterior sample (then ε from the same stream), a timestep per row; the latents are
/// `encode_first_stage(images)`, detached.
fn draw_batch(
    model: &AnomalyModel,
    images: &Tensor,
    picks: &[(usize, usize)],
    names: &[String],
    rng: &mut SplitMix64,
) -> Result<Draws, TrainError> {
    let b = picks.len();
    let prompts: Vec<String> = (0..b)
        .map(|_| {
            let t = PROMPT_TEMPLATES[(rng.next_u64() % PROMPT_TEMPLATES.len() as u64) as usize];
            t.replace("{}", &model.placeholder)
        })
        .collect();
    let names: Vec<String> = picks.iter().map(|&(t, _)| names[t].clone()).collect();
    let mut noise = SeededNoise::new(rng.next_u64());
    let latents = model.ldm.encode_first_stage(images, &mut noise)?.detach();
    let t_max = model.ldm.schedule.num_timesteps() as u64;
    let timesteps: Vec<usize> = (0..b).map(|_| (rng.next_u64() % t_max) as usize).collect();
    let eps = noise.randn(latents.shape(), model.ldm.dtype(), model.ldm.device())?;
    Ok(Draws {
        latents,
        prompts,
        names,
        timesteps,
        eps,
    })
}

/// Most examples the fixed evaluation batch holds.
const EVAL_EXAMPLES: usize = 16;

/// The loss on a fixed evaluation set (every example up to [`EVAL_EXAMPLES`], the same draws
/// at every call; the image model without augmentation and with batch-statistics BatchNorm
/// that leaves the running statistics alone): comparable across checkpoints. `loss` scores
/// one chunk of the training batch's size, so evaluating never needs more memory than a
/// training step; the result is the mean over all rows.
fn eval_loss(
    pool: &[(usize, usize)],
    seed: u64,
    batch: usize,
    loss: impl Fn(&[(usize, usize)], &mut SplitMix64) -> Result<Tensor, TrainError>,
) -> Result<f64, TrainError> {
    let picks: Vec<(usize, usize)> = pool.iter().copied().take(EVAL_EXAMPLES).collect();
    let mut sum = 0.0;
    for (i, chunk) in picks.chunks(batch.max(1)).enumerate() {
        let mut rng = step_rng(seed, u64::MAX, i as u64);
        let l = loss(chunk, &mut rng)?;
        sum += l.detach().to_dtype(DType::F64)?.to_scalar::<f64>()? * chunk.len() as f64;
    }
    Ok(sum / picks.len() as f64)
}

/// Runs (or resumes, or finds finished) the training run of `spec`. Blocking: call it on a
/// blocking thread; `rt` serves the store calls.
pub fn run_blocking(
    spec: &TrainingSpec,
    s3: &S3Config,
    opts: &TrainOptions,
    rt: &tokio::runtime::Handle,
    mut on_step: impl FnMut(u64, f64),
) -> Result<TrainOutcome, TrainError> {
    let run_id = spec.run_id();
    let digest = spec.digest();
    let out: Arc<dyn ObjectStore> = rt.block_on(store::open(&spec.output, s3))?;

    // The run record: written once; a different spec under the same name is refused.
    rt.block_on(defectforge::training::ensure_run_record(out.as_ref(), spec))
        .map_err(|e| match e {
            defectforge::training::RecordError::Store(e) => TrainError::Store(e),
            e => TrainError::Invalid(e.to_string()),
        })?;
    if let Ok(b) = rt.block_on(out.get(&keys::result(&run_id))) {
        if let Ok(r) = serde_json::from_slice::<TrainingResult>(&b) {
            if r.spec_digest == digest {
                info!(run = %run_id, model = %r.model, "training run already finished");
                return Ok(TrainOutcome {
                    run_id,
                    resumed_from: r.steps,
                    step: r.steps,
                    result: Some(r),
                });
            }
        }
    }

    // Data, then the model.
    let examples = rt.block_on(resolve_examples(spec, s3))?;
    let mask_kind = spec.kind == TrainingKind::Mask;
    // the image model reads (image, mask) pairs; the mask model only the masks, as RGB
    let mut samples: Vec<Vec<LoadedSample>> = Vec::new();
    let mut mask_rgb: Vec<Vec<Vec<f32>>> = Vec::new();
    for ex in &examples {
        let (mut v, mut mv) = (Vec::new(), Vec::new());
        for (i, m) in &ex.pairs {
            if mask_kind {
                mv.push(rt.block_on(masks::load_mask_rgb(m, s3))?);
            } else {
                v.push(rt.block_on(load_example(i, m, s3))?);
            }
        }
        samples.push(v);
        mask_rgb.push(mv);
    }
    let names: Vec<String> = examples.iter().map(|e| e.name.clone()).collect();
    let pool: Vec<(usize, usize)> = examples
        .iter()
        .enumerate()
        .flat_map(|(t, e)| (0..e.pairs.len()).map(move |i| (t, i)))
        .collect();
    info!(run = %run_id, types = names.len(), examples = pool.len(), "training data loaded");

    let cache = models::ModelCache::new(opts.model_cache.clone(), s3.clone());
    let (manifest, model_dir) =
        rt.block_on(cache.fetch_dir(&spec.base_model))
            .map_err(|e| match e {
                ModelError::Store(store::StoreError::NotFound { .. }) => {
                    TrainError::Invalid(format!(
                "base_model {}: no model there (import one with `defectforge models import`)",
                spec.base_model
            ))
                }
                ModelError::Invalid(m) => TrainError::Invalid(format!("base_model: {m}")),
                e => e.into(),
            })?;
    let (dev, dtype) = models::engine_device()?;
    let mut model = AnomalyModel::from_dir(&model_dir, dtype, &dev)?;
    let init = init_embedding(
        &model,
        &spec.training.init_word,
        spec.training.vectors as usize,
    )?;
    let encoder_file = model_dir.join(ad_model::SPATIAL_ENCODER);

    // Resume from the newest valid checkpoint.
    let ckpt = rt.block_on(defectforge::training::latest_checkpoint(
        out.as_ref(),
        &run_id,
        &digest,
    ))?;
    let mut start = 0u64;
    let mut last_loss = f64::NAN;
    let mut state = None;
    if let Some((c, bytes)) = &ckpt {
        let st = read_state(bytes, &dev)?;
        start = c.step;
        last_loss = st.loss;
        state = Some(st);
    }
    let enc_tmp;
    let encoder_src: Option<&Path> = match (&state, spec.training.encoder) {
        (_, EncoderMode::Frozen) => None,
        (Some(st), EncoderMode::Train) => {
            enc_tmp = tempfile::NamedTempFile::new()
                .map_err(|e| TrainError::Invalid(format!("temporary file: {e}")))?;
            let meta: std::collections::HashMap<String, String> = [(
                "config".to_string(),
                serde_json::to_string(model.spatial.config()).expect("json"),
            )]
            .into();
            defectforge_engine::weights::save_safetensors(&st.encoder, Some(meta), enc_tmp.path())?;
            Some(enc_tmp.path())
        }
        (None, EncoderMode::Train) => Some(encoder_file.as_path()),
    };
    // New types start from the initialiser word; types the base model knows continue from
    // their embedding (extending a model).
    let tr = if mask_kind {
        Trainable::install_masks(&mut model, &names, &init)?
    } else {
        Trainable::install(&mut model, &names, &init, encoder_src)?
    };
    if let Some(st) = &state {
        for (n, v) in &tr.embeddings {
            let t = st
                .embeddings
                .get(n)
                .ok_or_else(|| TrainError::Invalid(format!("checkpoint has no embedding {n}")))?;
            v.set(&t.to_dtype(dtype)?)?;
        }
    }
    let adam_cfg = if spec.training.weight_decay > 0.0 {
        AdamConfig::adamw(spec.training.lr(), spec.training.weight_decay)
    } else {
        AdamConfig::adam(spec.training.lr())
    };
    let mut opt = Adam::new(tr.named(), adam_cfg)?;
    let evaluate = |model: &AnomalyModel| -> Result<f64, TrainError> {
        eval_loss(
            &pool,
            spec.seed,
            spec.training.batch as usize,
            |chunk, rng| {
                Ok(if mask_kind {
                    masks::batch_loss(model, chunk, &mask_rgb, &names, rng)?.0
                } else {
                    batch_loss(model, chunk, &samples, &names, false, BnMode::Batch, rng)?.0
                })
            },
        )
    };
    if let Some(st) = state.take() {
        opt.set_states(st.adam)?;
    }
    let initial_eval_loss = match &ckpt {
        Some((c, _)) => c.initial_eval_loss,
        None => evaluate(&model)?,
    };
    let mut last_eval = match &ckpt {
        Some((c, _)) => c.eval_loss,
        None => initial_eval_loss,
    };
    if start > 0 {
        info!(run = %run_id, step = start, "resuming from checkpoint");
    } else {
        info!(run = %run_id, eval_loss = initial_eval_loss, "evaluation loss before training");
    }

    let end = opts
        .stop_at
        .unwrap_or(spec.training.steps)
        .min(spec.training.steps);
    let preview_examples: Vec<(String, LoadedSample)> = names
        .iter()
        .cloned()
        .zip(samples.iter().filter_map(|v| v.first().cloned()))
        .collect();
    let bar = if opts.progress {
        let pb = indicatif::ProgressBar::new(spec.training.steps);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} steps ({per_sec}, eta {eta}) {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        pb.set_prefix(format!("train {run_id}"));
        pb.set_position(start);
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut rows: Vec<LogRow> = Vec::new();
    let attempt = defectforge::ids::new_attempt_id();
    let cancelled = || -> bool {
        matches!(
            rt.block_on(out.head(&keys::cancelled(&run_id))),
            Ok(Some(_))
        )
    };
    for step in start + 1..=end {
        let t0 = Instant::now();
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0.0;
        let mut augmented = false;
        let mut types_seen = std::collections::BTreeSet::new();
        let acc = spec.training.accumulation as u64;
        for micro in 0..acc {
            let mut rng = step_rng(spec.seed, step, micro);
            let (loss, aug, bn) = if mask_kind {
                // rows round-robin over the types (every batch mixes them, each type gets its
                // share), a random example of the row's type
                let t = &spec.training;
                let picks: Vec<(usize, usize)> =
                    mask_batch_types(step, micro as u32, t.batch, t.accumulation, names.len())
                        .into_iter()
                        .map(|ty| (ty, (rng.next_u64() % mask_rgb[ty].len() as u64) as usize))
                        .collect();
                let (loss, bn) = masks::batch_loss(&model, &picks, &mask_rgb, &names, &mut rng)?;
                (loss, false, bn)
            } else {
                let picks: Vec<(usize, usize)> = (0..spec.training.batch)
                    .map(|_| pool[(rng.next_u64() % pool.len() as u64) as usize])
                    .collect();
                batch_loss(
                    &model,
                    &picks,
                    &samples,
                    &names,
                    spec.training.augment,
                    BnMode::Train,
                    &mut rng,
                )?
            };
            let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !l.is_finite() {
                return Err(TrainError::Invalid(format!(
                    "step {step}: the loss is {l}; lower training.base_lr"
                )));
            }
            loss_sum += l;
            augmented |= aug;
            types_seen.extend(bn);
            let g = (loss / acc as f64)?.backward()?;
            for (n, v) in opt.params() {
                if let Some(gt) = g.get(v.as_tensor()) {
                    let sum = match grads.remove(n) {
                        Some(s) => (s + gt)?,
                        None => gt.clone(),
                    };
                    grads.insert(n.clone(), sum);
                }
            }
        }
        opt.step_named(&grads)?;
        last_loss = loss_sum / acc as f64;
        on_step(step, last_loss);
        bar.set_position(step);
        bar.set_message(format!("loss {last_loss:.4}"));
        rows.push(LogRow {
            step,
            loss: last_loss,
            lr: spec.training.lr(),
            augmented,
            types: types_seen.into_iter().collect::<Vec<_>>().join(","),
            seconds: t0.elapsed().as_secs_f64(),
        });
        let t = &spec.training;
        if t.preview_every > 0 && (step % t.preview_every == 0 || step == t.steps) {
            let png = if mask_kind {
                let (png, acceptance) = masks::preview(&model, &names, spec.seed, PREVIEW_STEPS)?;
                let rate: BTreeMap<String, f64> = acceptance.into_iter().collect();
                info!(run = %run_id, step, acceptance = ?rate, "mask preview (share of sampled masks accepted)");
                rt.block_on(
                    out.put(
                        &keys::preview(&run_id, step).replace(".png", ".json"),
                        serde_json::to_vec_pretty(&serde_json::json!({
                            "step": step,
                            "masks_per_type": masks::PREVIEW_MASKS,
                            "ddim_steps": PREVIEW_STEPS,
                            "accepted_share": rate,
                        }))
                        .expect("json")
                        .into(),
                        "application/json",
                    ),
                )?;
                png
            } else {
                preview(&model, &preview_examples, spec.seed)?
            };
            rt.block_on(out.put(&keys::preview(&run_id, step), png.into(), "image/png"))?;
        }
        if step % t.checkpoint_every == 0 || step == end {
            last_eval = evaluate(&model)?;
            let state = write_state(&model, &tr, &opt, last_loss, step)?;
            let skey = keys::checkpoint_state(&run_id, step, &attempt);
            let lkey = keys::log_part(&run_id, step, &attempt);
            let log = defectforge::training::log_parquet(&rows).map_err(TrainError::Invalid)?;
            let mut files = BTreeMap::new();
            files.insert(skey.clone(), defectforge::ids::sha256_hex(&state));
            files.insert(lkey.clone(), defectforge::ids::sha256_hex(&log));
            rt.block_on(out.put(&skey, state.into(), "application/octet-stream"))?;
            rt.block_on(out.put(&lkey, log.into(), "application/vnd.apache.parquet"))?;
            let commit = CheckpointCommit {
                run_id: run_id.clone(),
                spec_digest: digest.clone(),
                step,
                attempt: attempt.clone(),
                files,
                loss: last_loss,
                eval_loss: last_eval,
                initial_eval_loss,
            };
            rt.block_on(out.put(
                &keys::checkpoint_commit(&run_id, step, &attempt),
                serde_json::to_vec_pretty(&commit).expect("json").into(),
                "application/json",
            ))?;
            rows.clear();
            info!(run = %run_id, step, loss = last_loss, eval_loss = last_eval, "checkpoint committed");
            if cancelled() {
                bar.abandon_with_message("cancelled");
                return Err(TrainError::Cancelled);
            }
        }
    }
    bar.finish_and_clear();
    if end < spec.training.steps {
        return Ok(TrainOutcome {
            run_id,
            resumed_from: start,
            step: end,
            result: None,
        });
    }

    // The trained model: the base model's files with the learned embeddings (and encoder),
    // imported like any model.
    let staging = tempfile::Builder::new()
        .prefix("trained-")
        .tempdir_in({
            std::fs::create_dir_all(&opts.staging)
                .map_err(|e| TrainError::Invalid(format!("{}: {e}", opts.staging.display())))?;
            &opts.staging
        })
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", opts.staging.display())))?;
    let emb_path = staging.path().join("embeddings.safetensors");
    let mut params = BTreeMap::new();
    for (n, t) in &model.embeddings {
        params.insert(n.clone(), t.detach().to_dtype(DType::F32)?);
    }
    let emb_file = defectforge_engine::ad_files::EmbeddingsFile {
        params,
        placeholder_tokens: [(model.placeholder.clone(), model.placeholder_token as i64)].into(),
    };
    defectforge_engine::ad_files::write_embeddings_safetensors(&emb_file, &emb_path)?;
    let enc_path = staging.path().join("spatial_encoder.safetensors");
    let meta: std::collections::HashMap<String, String> = [(
        "config".to_string(),
        serde_json::to_string(model.spatial.config()).expect("json"),
    )]
    .into();
    let enc_tensors: Vec<(String, Tensor)> = if tr.encoder.is_empty() {
        defectforge_engine::candle::safetensors::load(&encoder_file, &Device::Cpu)?
            .into_iter()
            .collect()
    } else {
        model
            .spatial
            .state_dict(&tr.encoder)?
            .into_iter()
            .map(|(n, t)| {
                Ok((
                    n,
                    t.to_dtype(if t.dtype() == DType::I64 {
                        DType::I64
                    } else {
                        DType::F32
                    })?,
                ))
            })
            .collect::<Result<_, TrainError>>()?
    };
    defectforge_engine::weights::save_safetensors(&enc_tensors, Some(meta), &enc_path)?;
    let mut mask_embeddings = Vec::new();
    let me = model_dir.join(ad_model::MASK_EMBEDDINGS);
    if mask_kind {
        // the base model's mask embeddings with the learned ones added (or replaced)
        let path = staging.path().join(ad_model::MASK_EMBEDDINGS);
        let mut params = BTreeMap::new();
        for (n, t) in &model.mask_embeddings {
            params.insert(n.clone(), t.detach().to_dtype(DType::F32)?);
        }
        let file = defectforge_engine::ad_files::EmbeddingsFile {
            params,
            placeholder_tokens: [(model.placeholder.clone(), model.placeholder_token as i64)]
                .into(),
        };
        defectforge_engine::ad_files::write_embeddings_safetensors(&file, &path)?;
        mask_embeddings.push((None, path));
    } else if me.is_file() {
        mask_embeddings.push((None, me));
    }
    let lineage = serde_json::json!({
        "trained_by": "defectforge train",
        "learned": if mask_kind { "mask embeddings" } else { "anomaly embeddings and spatial encoder" },
        "run_id": run_id,
        "spec_digest": digest,
        "base_model": {"uri": spec.base_model, "id": manifest.id, "digest": manifest.digest},
        "dataset": spec.dataset_source,
        "few_shot_split": spec.few_shot_split,
        "types": names,
        "examples": examples.iter().map(|e| (e.name.clone(), e.pairs.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>())).collect::<BTreeMap<_, _>>(),
        "hyperparameters": spec.training,
        "lr": spec.training.lr(),
        "steps": spec.training.steps,
        "final_loss": last_loss,
        "eval_loss": {"initial": initial_eval_loss, "final": last_eval},
    });
    let inputs = models::ImportInputs {
        ldm_checkpoint: model_dir.join(ad_model::LDM_WEIGHTS),
        ldm_config: model_dir.join(ad_model::LDM_CONFIG),
        vocab: model_dir.join(ad_model::VOCAB),
        embeddings: emb_path,
        spatial_encoder: enc_path,
        spatial_config: None,
        mask_embeddings,
        lineage: Some(lineage),
    };
    drop(model);
    let (m, uri) = rt.block_on(models::import(inputs, &spec.output, s3, staging.path()))?;
    let result = TrainingResult {
        run_id: run_id.clone(),
        spec_digest: digest,
        steps: spec.training.steps,
        final_loss: last_loss,
        initial_eval_loss,
        final_eval_loss: last_eval,
        model: uri,
        model_id: m.id,
        model_digest: m.digest,
    };
    rt.block_on(out.put(
        &keys::result(&run_id),
        serde_json::to_vec_pretty(&result).expect("json").into(),
        "application/json",
    ))?;
    info!(run = %run_id, model = %result.model, "training finished");
    Ok(TrainOutcome {
        run_id,
        resumed_from: start,
        step: end,
        result: Some(result),
    })
}

/// Runs one `train` job (the worker's handler): reads and checks the run's record, resumes
/// from its newest checkpoint, trains to the job's step, commits that checkpoint, and returns
/// the next segment's job ([`Outcome::Continue`]) unless the run is finished. A job whose
/// step is already committed (a redelivered or duplicated message) trains nothing; it
/// publishes the next segment only if nobody has (the `segments/<step>` marker).
pub async fn run_job(
    j: &defectforge::job::TrainJob,
    out: Arc<dyn ObjectStore>,
    s3: &S3Config,
    model_cache: &Path,
    progress: crate::metrics::TrainingGauge,
) -> Result<crate::protocol::Outcome, crate::protocol::JobError> {
    use crate::protocol::{JobError, Outcome};
    let permanent = |cause: String| JobError::Permanent {
        sample: None,
        input_uri: None,
        cause,
    };
    let rkey = keys::run_record(&j.run_id);
    let b = out.get(&rkey).await.map_err(|e| match e {
        store::StoreError::NotFound { uri } => JobError::Rejected(format!(
            "training run record {uri} does not exist (`defectforge train submit` writes it before publishing)"
        )),
        e => JobError::from_store(e, false),
    })?;
    let spec: TrainingSpec = serde_json::from_slice(&b)
        .map_err(|e| permanent(format!("{}: not a training record: {e}", out.uri(&rkey))))?;
    if spec.digest() != j.spec_digest || spec.run_id() != j.run_id {
        return Err(JobError::Rejected(format!(
            "the job was published for spec {} of run {}, but {} holds spec {} of run {}",
            j.spec_digest,
            j.run_id,
            out.uri(&rkey),
            spec.digest(),
            spec.run_id()
        )));
    }
    if out
        .head(&keys::cancelled(&j.run_id))
        .await
        .map_err(|e| JobError::from_store(e, false))?
        .is_some()
    {
        return Ok(Outcome::Skipped {
            reason: format!("training run {} is cancelled", j.run_id),
        });
    }
    let opts = TrainOptions {
        model_cache: model_cache.to_path_buf(),
        staging: model_cache.join("staging"),
        stop_at: Some(j.until_step),
        progress: false,
    };
    let (spec2, s3c) = (spec.clone(), s3.clone());
    let rt = tokio::runtime::Handle::current();
    let run = j.run_id.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        run_blocking(&spec2, &s3c, &opts, &rt, |step, loss| {
            tracing::debug!(step, loss, "training step");
            if let Ok(mut g) = progress.lock() {
                g.insert(run.clone(), (step, loss));
            }
        })
    })
    .await
    .map_err(|e| permanent(format!("the training thread failed: {e}")))?;
    let o = match outcome {
        Ok(o) => o,
        Err(TrainError::Cancelled) => {
            return Ok(Outcome::Skipped {
                reason: format!("training run {} was cancelled", j.run_id),
            })
        }
        Err(TrainError::Store(e)) => return Err(JobError::from_store(e, false)),
        Err(TrainError::Model(e)) if e.is_transient() => {
            return Err(JobError::Transient(e.to_string()))
        }
        Err(e) => return Err(permanent(e.to_string())),
    };
    if o.result.is_some() {
        return Ok(Outcome::Committed {
            samples: (o.step - o.resumed_from) as usize,
        });
    }
    let next = spec.training.next_segment_end(o.step.max(j.until_step));
    let marker = keys::segment_published(&j.run_id, next);
    let trained = o.step > o.resumed_from;
    if !trained
        && out
            .head(&marker)
            .await
            .map_err(|e| JobError::from_store(e, false))?
            .is_some()
    {
        return Ok(Outcome::Skipped {
            reason: format!(
                "step {} of {} is committed and its next segment is queued: a duplicate",
                o.step, j.run_id
            ),
        });
    }
    out.put(&marker, Bytes::from_static(b"{}"), "application/json")
        .await
        .map_err(|e| JobError::from_store(e, false))?;
    Ok(Outcome::Continue {
        next: Box::new(defectforge::job::Job::Train(defectforge::job::TrainJob {
            until_step: next,
            ..j.clone()
        })),
    })
}
