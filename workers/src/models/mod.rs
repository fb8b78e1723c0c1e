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

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use defectforge::store::{self, ObjectStore, S3Config, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[cfg(feature = "engine")]
use defectforge_engine::spatial::SpatialEncoderConfig;
/// Without the engine the manifest's spatial-encoder shape is kept as written (nothing here
/// reads it; `models show` prints it).
#[cfg(not(feature = "engine"))]
type SpatialEncoderConfig = serde_json::Value;

#[cfg(feature = "engine")]
mod cache;
#[cfg(feature = "engine")]
mod import;
#[cfg(feature = "engine")]
pub use cache::{engine_device, LoadedModel, ModelCache};
#[cfg(feature = "engine")]
pub use import::{build_model_dir, import};

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
    #[cfg(feature = "engine")]
    #[error("{0}")]
    Engine(#[from] defectforge_engine::EngineError),
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
    /// How the model was made, for trained models (`defectforge train`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<serde_json::Value>,
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

/// The default local cache folder: `$XDG_CACHE_HOME/defectforge/models`, else
/// `$HOME/.cache/defectforge/models`, else the temp dir.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("defectforge/models")
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
    /// Where the model came from, recorded in `model.json` (a trained model's base model,
    /// data, split, hyper-parameters, steps, final loss).
    pub lineage: Option<serde_json::Value>,
}

/// Parses a `--mask-embeddings` value: `<category>+<defect>=<file>` or a bare file.
pub fn parse_mask_embedding_arg(s: &str) -> Result<(Option<String>, PathBuf), ModelError> {
    match s.split_once('=') {
        Some((name, path)) => {
            if defectforge::campaign::split_type_name(name).is_none() {
                return Err(ModelError::Invalid(format!(
                    "--mask-embeddings {s:?}: the name must be <category>+<defect> (as in the anomaly embeddings), e.g. bottle+broken_large=logs/mask-checkpoints/bottle-broken_large/checkpoints/embeddings.pt"
                )));
            }
            Ok((Some(name.to_string()), PathBuf::from(path)))
        }
        None => Ok((None, PathBuf::from(s))),
    }
}
