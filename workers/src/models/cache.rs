//! The worker's model cache: fetch a model by URI, verify every file against the manifest,
//! keep it on local disk and loaded across jobs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use defectforge::store::{self, S3Config};
use defectforge_engine::ad_model::AnomalyModel;
use defectforge_engine::{DType, Device};
use sha2::{Digest, Sha256};
use tracing::info;

use super::*;

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

    /// The model at `uri` fetched and verified into the cache: its manifest and local
    /// directory (for a caller that builds its own copy, e.g. training).
    pub async fn fetch_dir(&self, uri: &str) -> Result<(ModelManifest, PathBuf), ModelError> {
        self.fetch(uri).await
    }

    /// Downloads the model's files into `<dir>/<id>/`, verifying each digest. Files already
    /// cached are hashed again on every load (a process loads a model once): a cached file
    /// changed on disk is fetched again, never loaded under the manifest's digest.
    async fn fetch(&self, uri: &str) -> Result<(ModelManifest, PathBuf), ModelError> {
        let root = store::open(&normalize_uri(uri), &self.s3).await?;
        let manifest = read_manifest(root.as_ref(), uri).await?;
        let dir = self.dir.join(&manifest.id);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        // a marker of earlier versions, which skipped this check: no longer trusted
        let _ = std::fs::remove_file(dir.join(".verified"));
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
                tracing::warn!(%uri, file = %name, "cached model file differs from its manifest digest; fetching it again");
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
        Ok((manifest, dir))
    }
}
