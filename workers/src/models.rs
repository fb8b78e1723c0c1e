//! Model directories: `defectforge models import` turns the official AnomalyDiffusion files (the
//! LDM `model.ckpt` with its YAML and `vocab.txt`, `embeddings.pt`, `spatial_encoder.pt`) into
//! a content-hashed directory of safetensors files with a small manifest, locally or in S3;
//! workers fetch a model by its URI, verify every file's digest, cache it on local disk and
//! keep it loaded across shards.
//!
//! Layout: `<root>/models/<id>/{ldm.safetensors, ldm.json, vocab.txt,
//! spatial_encoder.safetensors, embeddings.safetensors, model.json}`. `model.json` is written
//! last and is the commit: a directory without it is an interrupted import. The id is
//! `ad-<first 16 hex of digest>`, where `digest` is the SHA-256 of the sorted
//! `name:sha256` lines of the files, so the same inputs always import to the same id.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use defectforge::store::{self, ObjectStore, S3Config, StoreError};
use defectforge_engine::ad_files::{
    read_embeddings_pt, read_embeddings_safetensors, read_torch_state_dict,
    write_embeddings_safetensors, EmbeddingsFile,
};
use defectforge_engine::ad_model::{self, infer_spatial_config, AnomalyModel};
use defectforge_engine::ldm::{open_checkpoint, LdmConfig, LdmModel};
use defectforge_engine::spatial::{SpatialEncoder, SpatialEncoderConfig};
use defectforge_engine::tokenizer::WordPieceTokenizer;
use defectforge_engine::{DType, Device, EngineError, Tensor, Weights};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::info;

/// The manifest's file name (written last: the commit of an import).
pub const MANIFEST_FILE: &str = "model.json";
/// The manifest format this code writes and reads.
pub const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The input files or the model directory are wrong: retrying will not help.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Engine(#[from] EngineError),
}

impl ModelError {
    /// Whether retrying later may succeed (store hiccups), as opposed to a bad model.
    pub fn is_transient(&self) -> bool {
        matches!(self, ModelError::Store(e) if e.is_transient())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file's digest and size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileDigest {
    pub sha256: String,
    pub bytes: u64,
}

/// `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub format: u32,
    /// `ad-<16 hex>`: the directory name.
    pub id: String,
    /// SHA-256 over the sorted `name:sha256` lines of `files` (recorded in manifest rows).
    pub digest: String,
    pub kind: String,
    /// What the base model is, in words (architecture summary of the LDM config).
    pub base_model: String,
    pub created_at: String,
    pub files: BTreeMap<String, FileDigest>,
    /// The learned anomaly embeddings (`<category>+<defect>`).
    pub defect_types: Vec<String>,
    pub placeholder: String,
    pub placeholder_token: u32,
    /// `[vectors, width]` of every anomaly embedding.
    pub embedding_shape: [usize; 2],
    /// The types with a learned mask model (`mask_embeddings.safetensors`).
    #[serde(default)]
    pub mask_types: Vec<String>,
    /// `[vectors, width]` of the mask embeddings (16 in the official files).
    #[serde(default)]
    pub mask_embedding_shape: Option<[usize; 2]>,
    pub spatial_encoder: SpatialEncoderConfig,
    /// Parameter counts per part.
    pub parameters: BTreeMap<String, u64>,
    /// The files the model was imported from: role → (file name, digest).
    pub sources: BTreeMap<String, (String, FileDigest)>,
}

/// Computes the content digest and id of a set of files.
pub fn content_id(files: &BTreeMap<String, FileDigest>) -> (String, String) {
    let mut h = Sha256::new();
    for (name, d) in files {
        h.update(format!("{name}:{}\n", d.sha256).as_bytes());
    }
    let digest = hex::encode(h.finalize());
    let id = format!("ad-{}", &digest[..16]);
    (digest, id)
}

/// SHA-256 and size of a file, streamed.
pub fn file_digest(path: &Path) -> Result<FileDigest, ModelError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io(path))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok(FileDigest {
        sha256: hex::encode(h.finalize()),
        bytes: n,
    })
}

/// The official files of one AnomalyDiffusion model.
#[derive(Debug, Clone)]
pub struct ImportInputs {
    /// The LDM `model.ckpt` (or its safetensors twin).
    pub ldm_checkpoint: PathBuf,
    /// The official YAML (`txt2img-1p4B-eval.yaml`) or its JSON equivalent.
    pub ldm_config: PathBuf,
    /// bert-base-uncased's `vocab.txt`.
    pub vocab: PathBuf,
    /// `embeddings.pt` (or a flat safetensors copy).
    pub embeddings: PathBuf,
    /// `spatial_encoder.pt` (or safetensors).
    pub spatial_encoder: PathBuf,
    /// The spatial encoder's shape as JSON; inferred from the tensor shapes when absent.
    pub spatial_config: Option<PathBuf>,
    /// Per-type mask-model embeddings (`train_mask.py`'s `embeddings.pt`): `(name, file)`,
    /// the name `<category>+<defect>` given for a file holding one embedding (the official
    /// files hold only `*`), or `None` for a file whose embeddings are already named.
    pub mask_embeddings: Vec<(Option<String>, PathBuf)>,
}

/// Parses a `--mask-embeddings` value: `<category>+<defect>=<file>` or a bare file.
pub fn parse_mask_embedding_arg(s: &str) -> Result<(Option<String>, PathBuf), ModelError> {
    match s.split_once('=') {
        Some((name, path)) => {
            let ok = name.split_once('+').is_some_and(|(c, d)| {
                defectforge::campaign::is_safe_name(c) && defectforge::campaign::is_safe_name(d)
            });
            if !ok {
                return Err(ModelError::Invalid(format!(
                    "--mask-embeddings {s:?}: the name must be <category>+<defect> (as in the anomaly embeddings), e.g. bottle+broken_large=logs/mask-checkpoints/bottle-broken_large/checkpoints/embeddings.pt"
                )));
            }
            Ok((Some(name.to_string()), PathBuf::from(path)))
        }
        None => Ok((None, PathBuf::from(s))),
    }
}

/// Reads the mask embeddings of an import into one named set.
fn read_mask_embeddings(
    list: &[(Option<String>, PathBuf)],
) -> Result<Option<EmbeddingsFile>, ModelError> {
    let mut merged: Option<EmbeddingsFile> = None;
    for (name, path) in list {
        let f = if is_torch_file(path) {
            read_embeddings_pt(path)?
        } else {
            read_embeddings_safetensors(path)?
        };
        let params: Vec<(String, Tensor)> = match name {
            Some(n) => {
                if f.params.len() != 1 {
                    return Err(ModelError::Invalid(format!(
                        "{}: holds {} embeddings ({}); a file given as {n}=<file> must hold exactly one",
                        path.display(),
                        f.params.len(),
                        f.params.keys().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                let t = f.params.values().next().cloned().expect("one");
                vec![(n.clone(), t)]
            }
            None => {
                let bad: Vec<&String> = f.params.keys().filter(|k| !k.contains('+')).collect();
                if !bad.is_empty() {
                    return Err(ModelError::Invalid(format!(
                        "{}: embedding {:?} is not named <category>+<defect>; give the file as <category>+<defect>={}",
                        path.display(),
                        bad[0],
                        path.display()
                    )));
                }
                f.params.clone().into_iter().collect()
            }
        };
        let m = merged.get_or_insert_with(|| EmbeddingsFile {
            params: BTreeMap::new(),
            placeholder_tokens: f.placeholder_tokens.clone(),
        });
        if m.placeholder_tokens != f.placeholder_tokens {
            return Err(ModelError::Invalid(format!(
                "{}: placeholder tokens {:?} differ from the other mask embeddings' {:?}",
                path.display(),
                f.placeholder_tokens,
                m.placeholder_tokens
            )));
        }
        for (n, t) in params {
            if m.params.insert(n.clone(), t).is_some() {
                return Err(ModelError::Invalid(format!(
                    "mask embedding {n:?} is given twice (again in {})",
                    path.display()
                )));
            }
        }
    }
    Ok(merged)
}

fn is_torch_file(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("pt" | "pth" | "ckpt" | "bin")
    )
}

fn save_tensors(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<(), ModelError> {
    let views: Vec<(String, Tensor)> = tensors.to_vec();
    defectforge_engine::weights::save_safetensors(&views, metadata, path)?;
    Ok(())
}

/// Converts and checks the official files into `out` (created if needed) and writes
/// `model.json`; returns the manifest. Blocking and memory-heavy for the full-size model
/// (the LDM is read once and written as safetensors).
pub fn build_model_dir(inputs: &ImportInputs, out: &Path) -> Result<ModelManifest, ModelError> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let dev = Device::Cpu;
    let mut sources = BTreeMap::new();
    let mut add_source = |role: &str, p: &Path| -> Result<(), ModelError> {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        sources.insert(role.to_string(), (name, file_digest(p)?));
        Ok(())
    };
    for (role, p) in [
        ("ldm_checkpoint", &inputs.ldm_checkpoint),
        ("ldm_config", &inputs.ldm_config),
        ("vocab", &inputs.vocab),
        ("embeddings", &inputs.embeddings),
        ("spatial_encoder", &inputs.spatial_encoder),
    ] {
        if !p.is_file() {
            return Err(ModelError::Invalid(format!(
                "{role}: {} does not exist",
                p.display()
            )));
        }
        add_source(role, p)?;
    }
    for (name, p) in &inputs.mask_embeddings {
        if !p.is_file() {
            return Err(ModelError::Invalid(format!(
                "mask embeddings: {} does not exist",
                p.display()
            )));
        }
        let role = match name {
            Some(n) => format!("mask_embeddings:{n}"),
            None => format!("mask_embeddings:{}", p.display()),
        };
        add_source(&role, p)?;
    }

    // The LDM: validate by building it, then store its tensors under their original names.
    info!(checkpoint = %inputs.ldm_checkpoint.display(), "reading the LDM checkpoint");
    let cfg = LdmConfig::from_file(&inputs.ldm_config)?;
    let weights = open_checkpoint(&inputs.ldm_checkpoint, DType::F32, &dev)?;
    let ldm = LdmModel::from_weights(&cfg, &weights)?;
    let mut parameters = BTreeMap::new();
    let kept: Vec<(String, Tensor)> = weights
        .source_tensors()?
        .into_iter()
        .filter(|(k, _)| !defectforge_engine::ldm::is_ignored_key(k))
        .collect();
    for (part, prefix) in [
        ("unet", defectforge_engine::ldm::UNET_PREFIX),
        ("vae", defectforge_engine::ldm::VAE_PREFIX),
        ("text_encoder", defectforge_engine::ldm::BERT_PREFIX),
    ] {
        let n: usize = kept
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, t)| t.elem_count())
            .sum();
        parameters.insert(part.to_string(), n as u64);
    }
    save_tensors(&kept, None, &out.join(ad_model::LDM_WEIGHTS))?;
    drop(kept);
    drop(weights);
    let cfg_json = defectforge_engine::ldm::read_config_value(&inputs.ldm_config)?;
    std::fs::write(
        out.join(ad_model::LDM_CONFIG),
        serde_json::to_vec_pretty(&cfg_json).expect("json"),
    )
    .map_err(io(out))?;

    // Tokenizer.
    let tok = WordPieceTokenizer::from_vocab(&inputs.vocab, ldm.bert.config().max_seq_len)?;
    std::fs::copy(&inputs.vocab, out.join(ad_model::VOCAB)).map_err(io(&inputs.vocab))?;

    // Anomaly embeddings.
    let emb = if is_torch_file(&inputs.embeddings) {
        read_embeddings_pt(&inputs.embeddings)?
    } else {
        read_embeddings_safetensors(&inputs.embeddings)?
    };
    write_embeddings_safetensors(&emb, &out.join(ad_model::EMBEDDINGS))?;

    // Spatial encoder: shape from the given JSON or inferred; validated by building it.
    let st: Vec<(String, Tensor)> = if is_torch_file(&inputs.spatial_encoder) {
        read_torch_state_dict(&inputs.spatial_encoder)?
    } else {
        Weights::from_safetensors(&[&inputs.spatial_encoder], DType::F32, &dev)?.source_tensors()?
    };
    let se_cfg: SpatialEncoderConfig = match &inputs.spatial_config {
        Some(p) => serde_json::from_slice(&std::fs::read(p).map_err(io(p))?).map_err(|e| {
            ModelError::Invalid(format!(
                "{}: not a spatial encoder config: {e}",
                p.display()
            ))
        })?,
        None => {
            let shapes: Vec<(String, Vec<usize>)> = st
                .iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect();
            infer_spatial_config(&shapes)?
        }
    };
    let se_weights = Weights::from_tensors(st.iter().cloned().collect(), DType::F32, &dev)
        .with_origin(&inputs.spatial_encoder.display().to_string());
    let spatial = SpatialEncoder::from_weights(&se_weights, &se_cfg)?;
    parameters.insert("spatial_encoder".into(), se_cfg.parameter_count()? as u64);
    let meta: HashMap<String, String> = [(
        "config".to_string(),
        serde_json::to_string(&se_cfg).expect("json"),
    )]
    .into();
    save_tensors(&st, Some(meta), &out.join(ad_model::SPATIAL_ENCODER))?;

    // The parts must fit together (widths, placeholder id).
    let mut model = AnomalyModel::assemble(ldm, spatial, emb.clone(), tok, DType::F32, &dev)?;
    let mut mask_embedding_shape = None;
    if let Some(me) = read_mask_embeddings(&inputs.mask_embeddings)? {
        model.set_mask_embeddings(me.clone())?;
        let first = model.mask_embeddings.values().next().expect("non-empty");
        mask_embedding_shape = Some([
            first.dim(0).map_err(EngineError::from)?,
            first.dim(1).map_err(EngineError::from)?,
        ]);
        write_embeddings_safetensors(&me, &out.join(ad_model::MASK_EMBEDDINGS))?;
    }
    let first = model
        .embeddings
        .values()
        .next()
        .ok_or_else(|| ModelError::Invalid("the embeddings file holds no embedding".into()))?;
    let embedding_shape = [
        first.dim(0).map_err(EngineError::from)?,
        first.dim(1).map_err(EngineError::from)?,
    ];
    let u = &cfg.unet;
    let base_model = format!(
        "CompVis LDM txt2img: UNet {:?} channels, {} res blocks, context {}; KL VAE f{}; BERT {}×{} layers; {} steps {:?} schedule",
        u.block_out_channels,
        match &u.layers_per_block {
            defectforge_engine::unet::PerBlock::One(n) => *n,
            defectforge_engine::unet::PerBlock::Many(v) => v[0],
        },
        cfg.bert.n_embed,
        1usize << (cfg.vae.block_out_channels.len() - 1),
        cfg.bert.n_embed,
        cfg.bert.n_layer,
        cfg.schedule.timesteps,
        cfg.schedule.beta_schedule
    );

    let mut files = BTreeMap::new();
    for name in [
        ad_model::LDM_WEIGHTS,
        ad_model::LDM_CONFIG,
        ad_model::VOCAB,
        ad_model::EMBEDDINGS,
        ad_model::SPATIAL_ENCODER,
    ] {
        files.insert(name.to_string(), file_digest(&out.join(name))?);
    }
    if mask_embedding_shape.is_some() {
        let name = ad_model::MASK_EMBEDDINGS;
        files.insert(name.to_string(), file_digest(&out.join(name))?);
    }
    let (digest, id) = content_id(&files);
    let manifest = ModelManifest {
        format: FORMAT,
        id,
        digest,
        kind: "anomalydiffusion".into(),
        base_model,
        created_at: chrono::Utc::now().to_rfc3339(),
        files,
        defect_types: model.defect_types(),
        placeholder: model.placeholder.clone(),
        placeholder_token: model.placeholder_token,
        embedding_shape,
        mask_types: model.mask_types(),
        mask_embedding_shape,
        spatial_encoder: se_cfg,
        parameters,
        sources,
    };
    std::fs::write(
        out.join(MANIFEST_FILE),
        serde_json::to_vec_pretty(&manifest).expect("json"),
    )
    .map_err(io(out))?;
    Ok(manifest)
}

/// Imports a model: converts the official files in a staging folder under `staging`, then
/// uploads them to `<dest>/models/<id>/` (manifest last). Returns the manifest and the model's
/// URI. Importing the same files again finds the existing model and uploads nothing.
pub async fn import(
    inputs: ImportInputs,
    dest: &str,
    s3: &S3Config,
    staging: &Path,
) -> Result<(ModelManifest, String), ModelError> {
    std::fs::create_dir_all(staging).map_err(io(staging))?;
    let tmp = tempfile::Builder::new()
        .prefix("import-")
        .tempdir_in(staging)
        .map_err(io(staging))?;
    let dir = tmp.path().to_path_buf();
    let manifest = tokio::task::spawn_blocking(move || build_model_dir(&inputs, &dir))
        .await
        .map_err(|e| ModelError::Invalid(format!("import thread failed: {e}")))??;
    let root = store::open(dest, s3).await?;
    let prefix = format!("models/{}/", manifest.id);
    let uri = root.uri(&format!("models/{}", manifest.id));
    if let Ok(existing) = root.get(&format!("{prefix}{MANIFEST_FILE}")).await {
        if let Ok(m) = serde_json::from_slice::<ModelManifest>(&existing) {
            if m.digest == manifest.digest {
                info!(%uri, "model already imported");
                return Ok((m, uri));
            }
        }
    }
    for name in manifest.files.keys() {
        let p = tmp.path().join(name);
        let body = tokio::fs::read(&p).await.map_err(io(&p))?;
        info!(file = %name, bytes = body.len(), "uploading");
        root.put(
            &format!("{prefix}{name}"),
            Bytes::from(body),
            "application/octet-stream",
        )
        .await?;
    }
    root.put(
        &format!("{prefix}{MANIFEST_FILE}"),
        Bytes::from(serde_json::to_vec_pretty(&manifest).expect("json")),
        "application/json",
    )
    .await?;
    Ok((manifest, uri))
}

/// The default local cache folder: `$XDG_CACHE_HOME/defectforge/models`, else
/// `$HOME/.cache/defectforge/models`, else the temp dir.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("defectforge/models")
}

/// The device and dtype models run on: CUDA device 0 in bf16 in a `cuda` build, else CPU f32.
pub fn engine_device() -> Result<(Device, DType), ModelError> {
    #[cfg(feature = "cuda")]
    {
        let d = Device::new_cuda(0).map_err(EngineError::from)?;
        Ok((d, DType::BF16))
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok((Device::Cpu, DType::F32))
    }
}

/// A model in memory with its manifest.
pub struct LoadedModel {
    pub manifest: ModelManifest,
    pub model: AnomalyModel,
}

/// Fetches, verifies, caches and keeps models loaded (one load per model per worker).
pub struct ModelCache {
    dir: PathBuf,
    s3: S3Config,
    loaded: Mutex<HashMap<String, Arc<LoadedModel>>>,
    loading: tokio::sync::Mutex<()>,
    load_micros: AtomicU64,
}

/// The manifest of the model at `uri`, checked against its own file list (what commands that
/// only need a model's identity and types read, without fetching its weights).
pub async fn manifest(uri: &str, s3: &S3Config) -> Result<ModelManifest, ModelError> {
    let root = store::open(&normalize_uri(uri), s3).await?;
    read_manifest(root.as_ref(), uri).await
}

async fn read_manifest(root: &dyn ObjectStore, uri: &str) -> Result<ModelManifest, ModelError> {
    let bytes = root.get(MANIFEST_FILE).await.map_err(|e| match e {
            StoreError::NotFound { .. } => ModelError::Invalid(format!(
                "{uri} holds no {MANIFEST_FILE}: not a model imported with `defectforge models import` (or the import did not finish)"
            )),
            e => e.into(),
        })?;
    let manifest: ModelManifest = serde_json::from_slice(&bytes)
        .map_err(|e| ModelError::Invalid(format!("{uri}/{MANIFEST_FILE}: {e}")))?;
    if manifest.format != FORMAT {
        return Err(ModelError::Invalid(format!(
            "{uri}: model format {} (this worker reads {FORMAT})",
            manifest.format
        )));
    }
    let (digest, id) = content_id(&manifest.files);
    if digest != manifest.digest || id != manifest.id {
        return Err(ModelError::Invalid(format!(
            "{uri}/{MANIFEST_FILE}: its digest does not match its file list (edited by hand?)"
        )));
    }
    Ok(manifest)
}

fn normalize_uri(uri: &str) -> String {
    uri.trim_end_matches('/').to_string()
}

impl ModelCache {
    pub fn new(dir: PathBuf, s3: S3Config) -> Self {
        Self {
            dir,
            s3,
            loaded: Mutex::new(HashMap::new()),
            loading: tokio::sync::Mutex::new(()),
            load_micros: AtomicU64::new(0),
        }
    }

    /// Time spent fetching and loading models so far.
    pub fn load_micros(&self) -> u64 {
        self.load_micros.load(Ordering::Relaxed)
    }

    /// The model at `uri` if it is already loaded.
    pub fn loaded(&self, uri: &str) -> Option<Arc<LoadedModel>> {
        self.loaded
            .lock()
            .expect("model cache")
            .get(&normalize_uri(uri))
            .cloned()
    }

    /// The model at `uri` (`…/models/<id>`, local or s3://), fetched and loaded on first use.
    pub async fn get(&self, uri: &str) -> Result<Arc<LoadedModel>, ModelError> {
        if let Some(m) = self.loaded(uri) {
            return Ok(m);
        }
        let _guard = self.loading.lock().await;
        if let Some(m) = self.loaded(uri) {
            return Ok(m);
        }
        let t0 = Instant::now();
        let (manifest, dir) = self.fetch(uri).await?;
        let (device, dtype) = engine_device()?;
        let d2 = dir.clone();
        let model =
            tokio::task::spawn_blocking(move || AnomalyModel::from_dir(&d2, dtype, &device))
                .await
                .map_err(|e| ModelError::Invalid(format!("model load thread failed: {e}")))??;
        let loaded = Arc::new(LoadedModel { manifest, model });
        self.load_micros
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        info!(%uri, id = %loaded.manifest.id, seconds = t0.elapsed().as_secs_f64(), "model loaded");
        self.loaded
            .lock()
            .expect("model cache")
            .insert(normalize_uri(uri), loaded.clone());
        Ok(loaded)
    }

    /// Downloads the model's files into `<dir>/<id>/`, verifying each digest; files already
    /// cached and verified are not fetched again.
    async fn fetch(&self, uri: &str) -> Result<(ModelManifest, PathBuf), ModelError> {
        let root = store::open(&normalize_uri(uri), &self.s3).await?;
        let manifest = read_manifest(root.as_ref(), uri).await?;
        let dir = self.dir.join(&manifest.id);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let marker = dir.join(".verified");
        let verified = std::fs::read_to_string(&marker).ok();
        if verified.as_deref() == Some(manifest.digest.as_str()) {
            return Ok((manifest, dir));
        }
        for (name, want) in &manifest.files {
            let path = dir.join(name);
            if path.is_file() {
                let p2 = path.clone();
                let have = tokio::task::spawn_blocking(move || file_digest(&p2))
                    .await
                    .map_err(|e| ModelError::Invalid(e.to_string()))??;
                if &have == want {
                    continue;
                }
            }
            info!(%uri, file = %name, bytes = want.bytes, "downloading model file");
            let body = root.get(name).await?;
            let got = FileDigest {
                sha256: hex::encode(Sha256::digest(&body)),
                bytes: body.len() as u64,
            };
            if &got != want {
                return Err(ModelError::Invalid(format!(
                    "{uri}/{name}: digest {} ({} bytes) differs from the manifest's {} ({} bytes): the model files are corrupt or were replaced",
                    got.sha256, got.bytes, want.sha256, want.bytes
                )));
            }
            let part = dir.join(format!("{name}.part"));
            tokio::fs::write(&part, &body).await.map_err(io(&part))?;
            tokio::fs::rename(&part, &path).await.map_err(io(&path))?;
        }
        std::fs::write(&marker, &manifest.digest).map_err(io(&marker))?;
        Ok((manifest, dir))
    }
}
