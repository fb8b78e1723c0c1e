//! Weight loading with accounting. Models are built through a candle `VarBuilder` whose
//! backend records every tensor the model reads; afterwards the file's key set is compared with
//! the consumed set, so a checkpoint that does not fit the config fails with the exact tensor
//! names (missing, misshapen, or unexpected) instead of loading half a model.
//!
//! Sources: diffusers-layout safetensors files (memory-mapped, converted to the requested
//! dtype on load), an in-memory map (tests), or seeded random values (benchmarks, tests).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::error::{EngineError, Result};
use crate::noise::SplitMix64;

enum Source {
    Mmap(MmapedSafetensors),
    Map(HashMap<String, Tensor>),
    /// Random values: weights uniform with standard deviation `std` (uniform rather than
    /// normal so that a full-size model initialises in seconds); tensors whose hint is a
    /// constant (norm scales and biases) get 1 + 0.1·U / 0.1·U so normalisations are not trivial.
    Random {
        seed: u64,
        std: f64,
    },
}

#[derive(Debug, Clone)]
enum Problem {
    Missing {
        name: String,
        expected: Vec<usize>,
    },
    Shape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
}

/// Translates a name the model asks for into the source's name (checkpoint layouts).
pub type RenameFn = Arc<dyn Fn(&str) -> String + Send + Sync>;
/// Whether a source key belongs to a view (one model of a multi-model checkpoint).
pub type ScopeFn = Arc<dyn Fn(&str) -> bool + Send + Sync>;

struct Inner {
    source: Arc<Source>,
    /// Model name → source name; `None` is the identity.
    rename: Option<RenameFn>,
    /// The source keys this view accounts for; `None` is all of them.
    scope: Option<ScopeFn>,
    /// Names read by models, with the tensor kept where it cannot be read again from the
    /// source (random weights, for `save_consumed`); file-backed tensors are not kept, so a
    /// loaded model does not hold a second copy of its weights.
    used: Mutex<BTreeMap<String, (usize, Option<Tensor>)>>,
    keep_random: std::sync::atomic::AtomicBool,
    problems: Mutex<Vec<Problem>>,
}

impl Inner {
    fn source_name(&self, name: &str) -> String {
        match &self.rename {
            Some(f) => f(name),
            None => name.to_string(),
        }
    }

    fn in_scope(&self, key: &str) -> bool {
        self.scope.as_ref().is_none_or(|f| f(key))
    }

    fn source_shape(&self, name: &str) -> Option<Vec<usize>> {
        match &*self.source {
            Source::Mmap(m) => m.get(name).ok().map(|v| v.shape().to_vec()),
            Source::Map(m) => m.get(name).map(|t| t.dims().to_vec()),
            Source::Random { .. } => None,
        }
    }

    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        match &*self.source {
            Source::Mmap(m) => m.load(name, dev),
            Source::Map(m) => m
                .get(name)
                .cloned()
                .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() }),
            Source::Random { .. } => unreachable!("random source has no stored tensors"),
        }
    }

    fn record(&self, name: &str, t: &Tensor) {
        let keep = match *self.source {
            Source::Random { .. } => self.keep_random.load(std::sync::atomic::Ordering::Relaxed),
            _ => false,
        };
        self.used
            .lock()
            .expect("weights lock")
            .insert(name.to_string(), (t.elem_count(), keep.then(|| t.clone())));
    }

    fn problem(&self, p: Problem) -> candle_core::Error {
        let msg = match &p {
            Problem::Missing { name, .. } => format!("missing tensor {name}"),
            Problem::Shape {
                name,
                expected,
                got,
            } => format!("shape mismatch for {name}: expected {expected:?}, got {got:?}"),
        };
        self.problems.lock().expect("weights lock").push(p);
        candle_core::Error::Msg(msg)
    }
}

struct Backend(Arc<Inner>);

fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    seed ^ h.finish()
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let inner = &self.0;
        let name = &inner.source_name(name);
        let t = match &*inner.source {
            Source::Random { seed, std } => {
                let mut rng = SplitMix64::new(name_seed(*seed, name));
                let n = s.elem_count();
                // Uniform on [−√3, √3] has unit variance.
                let mut unit = move || ((rng.next_open01() * 2.0 - 1.0) * 3f64.sqrt()) as f32;
                let v: Vec<f32> = match h {
                    Init::Const(c) => {
                        let base = c as f32;
                        let spread = if base == 0.0 || base == 1.0 { 0.1 } else { 0.0 };
                        (0..n).map(|_| base + spread * unit()).collect()
                    }
                    _ => (0..n).map(|_| unit() * *std as f32).collect(),
                };
                Tensor::from_vec(v, s.clone(), &Device::Cpu)?
            }
            _ => {
                let Some(got) = inner.source_shape(name) else {
                    return Err(inner.problem(Problem::Missing {
                        name: name.into(),
                        expected: s.dims().to_vec(),
                    }));
                };
                // Checkpoints store 1×1 convolutions where the model has linear layers (the
                // CompVis VAE attention): accept shapes that differ only by trailing 1s.
                let squeeze = |d: &[usize]| {
                    let mut d = d.to_vec();
                    while d.len() > 1 && d.last() == Some(&1) {
                        d.pop();
                    }
                    d
                };
                if got != s.dims() && squeeze(&got) != squeeze(s.dims()) {
                    return Err(inner.problem(Problem::Shape {
                        name: name.into(),
                        expected: s.dims().to_vec(),
                        got,
                    }));
                }
                let t = inner.load(name, &Device::Cpu)?;
                if got != s.dims() {
                    t.reshape(s.clone())?
                } else {
                    t
                }
            }
        };
        let t = t.to_dtype(dtype)?.to_device(dev)?;
        inner.record(name, &t);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let inner = &self.0;
        let name = &inner.source_name(name);
        if inner.source_shape(name).is_none() {
            return Err(inner.problem(Problem::Missing {
                name: name.into(),
                expected: vec![],
            }));
        }
        let t = inner
            .load(name, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        inner.record(name, &t);
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.source_shape(&self.0.source_name(name)).is_some()
    }
}

/// A set of weights for one model, with accounting of what the model consumed.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Inner>,
    dtype: DType,
    device: Device,
    origin: String,
}

impl Weights {
    fn with_source(source: Source, dtype: DType, device: &Device, origin: String) -> Self {
        Self {
            inner: Arc::new(Inner {
                source: Arc::new(source),
                rename: None,
                scope: None,
                used: Mutex::new(BTreeMap::new()),
                keep_random: std::sync::atomic::AtomicBool::new(true),
                problems: Mutex::new(Vec::new()),
            }),
            dtype,
            device: device.clone(),
            origin,
        }
    }

    /// Memory-map one or more safetensors files (a sharded checkpoint is several files).
    pub fn from_safetensors<P: AsRef<Path>>(
        paths: &[P],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        for p in paths {
            if !p.as_ref().is_file() {
                return Err(EngineError::Io {
                    path: p.as_ref().to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                });
            }
        }
        // SAFETY: the files are opened read-only; like every mmap user we rely on nobody
        // truncating a weight file while the model is being built (tensors are copied out).
        let m = unsafe { MmapedSafetensors::multi(paths)? };
        let origin = paths
            .iter()
            .map(|p| p.as_ref().display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Self::with_source(Source::Mmap(m), dtype, device, origin))
    }

    /// Weights from tensors in memory (tests, converted checkpoints).
    pub fn from_tensors(map: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self::with_source(Source::Map(map), dtype, device, "in-memory tensors".into())
    }

    /// Names the weights' origin in error messages (e.g. the checkpoint path).
    pub fn with_origin(mut self, origin: &str) -> Self {
        self.origin = origin.to_string();
        self
    }

    /// A view of these weights for one model of a multi-model checkpoint: the model's tensor
    /// names are translated by `rename` into source names, and only source keys for which
    /// `scope` holds count as this model's (for the unexpected-tensor check). The view has its
    /// own accounting; errors name source (checkpoint) keys.
    pub fn view(&self, rename: RenameFn, scope: ScopeFn, origin: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                source: self.inner.source.clone(),
                rename: Some(rename),
                scope: Some(scope),
                used: Mutex::new(BTreeMap::new()),
                keep_random: std::sync::atomic::AtomicBool::new(false),
                problems: Mutex::new(Vec::new()),
            }),
            dtype: self.dtype,
            device: self.device.clone(),
            origin: format!("{} in {}", origin, self.origin),
        }
    }

    /// Every tensor of the source, by source name, as stored (no dtype conversion). Empty for
    /// random weights.
    pub fn source_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        match &*self.inner.source {
            Source::Mmap(m) => {
                for (k, _) in m.tensors() {
                    let t = m.load(&k, &Device::Cpu)?;
                    out.push((k, t));
                }
            }
            Source::Map(m) => out.extend(m.iter().map(|(k, t)| (k.clone(), t.clone()))),
            Source::Random { .. } => {}
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// One source tensor by source name, as stored, if present.
    pub fn source_tensor(&self, name: &str) -> Option<Tensor> {
        self.inner.source_shape(name)?;
        self.inner.load(name, &Device::Cpu).ok()
    }

    /// The names of all tensors in the source (sorted).
    pub fn source_names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &*self.inner.source {
            Source::Mmap(m) => m.tensors().into_iter().map(|(k, _)| k).collect(),
            Source::Map(m) => m.keys().cloned().collect(),
            Source::Random { .. } => Vec::new(),
        };
        v.sort();
        v
    }

    /// Seeded random weights: each tensor uniform with standard deviation `std`, from a
    /// generator keyed by (seed, name); norm scales 1 + 0.1·U, biases that default to 0 get 0.1·U.
    pub fn random(seed: u64, std: f64, dtype: DType, device: &Device) -> Self {
        Self::with_source(
            Source::Random { seed, std },
            dtype,
            device,
            format!("random weights (seed {seed})"),
        )
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Builds a model with `f` and checks the accounting: a missing or misshapen tensor is
    /// reported by name, and (for file and map sources) so is any tensor the model never read.
    pub fn build<T>(
        &self,
        model: &str,
        f: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
    ) -> Result<T> {
        let vb = VarBuilder::from_backend(
            Box::new(Backend(self.inner.clone())),
            self.dtype,
            self.device.clone(),
        );
        let model = format!("{model} ({})", self.origin);
        let built = f(vb);
        let first_problem = self
            .inner
            .problems
            .lock()
            .expect("weights lock")
            .first()
            .cloned();
        if let Some(p) = first_problem {
            return Err(match p {
                Problem::Missing { name, expected } => EngineError::MissingTensor {
                    model,
                    name,
                    expected,
                },
                Problem::Shape {
                    name,
                    expected,
                    got,
                } => EngineError::ShapeMismatch {
                    model,
                    name,
                    expected,
                    got,
                },
            });
        }
        let built = built?;
        let unexpected = self.unused_keys();
        if !unexpected.is_empty() {
            return Err(EngineError::UnexpectedTensors {
                model,
                names: unexpected,
            });
        }
        Ok(built)
    }

    /// Keys present in the source that no model has read (sorted). Empty for random weights.
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self.inner.used.lock().expect("weights lock");
        let all: BTreeSet<String> = match &*self.inner.source {
            Source::Mmap(m) => m.tensors().into_iter().map(|(k, _)| k).collect(),
            Source::Map(m) => m.keys().cloned().collect(),
            Source::Random { .. } => BTreeSet::new(),
        };
        all.into_iter()
            .filter(|k| self.inner.in_scope(k) && !used.contains_key(k))
            .collect()
    }

    /// Stops keeping generated random tensors (saves memory when they will not be saved).
    pub fn discard_random_tensors(&self) {
        self.inner
            .keep_random
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// The names of all tensors models have read from these weights.
    pub fn consumed_names(&self) -> Vec<String> {
        self.inner
            .used
            .lock()
            .expect("weights lock")
            .keys()
            .cloned()
            .collect()
    }

    /// The number of scalar parameters models have read from these weights.
    pub fn consumed_param_count(&self) -> usize {
        self.inner
            .used
            .lock()
            .expect("weights lock")
            .values()
            .map(|(n, _)| n)
            .sum()
    }

    /// The random tensors the models built from these weights consumed, by name (e.g. to save
    /// a randomly initialised model as a diffusers-layout safetensors file). Empty for file
    /// and map sources, whose tensors are already stored.
    pub fn consumed(&self) -> HashMap<String, Tensor> {
        self.inner
            .used
            .lock()
            .expect("weights lock")
            .iter()
            .filter_map(|(k, (_, v))| v.as_ref().map(|t| (k.clone(), t.clone())))
            .collect()
    }

    /// Saves the consumed tensors as a safetensors file.
    pub fn save_consumed(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.consumed(), path)?;
        Ok(())
    }
}

/// Reads and parses a JSON config file, naming the file on error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| EngineError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The first existing file among `names` inside `dir` (e.g. the fp32 file, then the fp16 one).
pub fn find_file(dir: &Path, names: &[&str]) -> Result<PathBuf> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| EngineError::Io {
            path: dir.join(names.first().copied().unwrap_or("")),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("none of {names:?} exists in {}", dir.display()),
            ),
        })
}

/// Writes named tensors (any of f32, f64, f16, bf16, i64, u32, u8) as one safetensors file,
/// with optional string metadata (candle's own writer has none).
pub fn save_safetensors(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    use safetensors::Dtype as S;
    let mut data: Vec<(String, S, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let shape = t.dims().to_vec();
        let t = t.to_device(&Device::Cpu)?.flatten_all()?;
        let (dt, bytes): (S, Vec<u8>) = match t.dtype() {
            DType::F32 => (
                S::F32,
                t.to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::F64 => (
                S::F64,
                t.to_vec1::<f64>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                S::F16,
                t.to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                S::BF16,
                t.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::I64 => (
                S::I64,
                t.to_vec1::<i64>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::U32 => (
                S::U32,
                t.to_vec1::<u32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::U8 => (S::U8, t.to_vec1::<u8>()?),
            other => {
                return Err(EngineError::Invalid(format!(
                    "cannot save tensor {name} of dtype {other:?}"
                )))
            }
        };
        data.push((name.clone(), dt, shape, bytes));
    }
    let views = data
        .iter()
        .map(|(n, dt, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| EngineError::Invalid(format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize_to_file(views, metadata, path)
        .map_err(|e| EngineError::Invalid(format!("writing {}: {e}", path.display())))?;
    Ok(())
}
