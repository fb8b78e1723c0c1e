//! Reading (and re-writing) the files the official AnomalyDiffusion code saves with
//! `torch.save`: the spatial-encoder state dict (`spatial_encoder.pt`) and the learned
//! embeddings of `EmbeddingManager.save` (`embeddings.pt` of the anomaly model, one per mask
//! model too), plus a flat safetensors form of the embeddings.
//!
//! A `torch.save` file is a zip archive `<stem>/data.pkl` (a pickle) + `<stem>/data/<key>`
//! (raw little-endian storages) + bookkeeping entries. candle's pickle loader only looks at
//! top-level dicts of tensors, which is enough for a state dict ([`read_torch_state_dict`]) but
//! finds nothing in `EmbeddingManager.save`'s
//! `{"string_to_token": {"*": tensor}, "string_to_param": nn.ParameterDict{name: Parameter}}`:
//! the `ParameterDict` is pickled as a module (`NEWOBJ` + `BUILD` with its `__dict__`, whose
//! `_parameters` dict holds `torch._utils._rebuild_parameter(_rebuild_tensor_v2(...), ...)`
//! calls). [`read_embeddings_pt`] therefore parses the pickle with candle's
//! [`candle_core::pickle::Stack`] and walks the object tree itself.
//!
//! Quirks handled here:
//! - `string_to_token["*"]` is a 0-d int64 *view* at a non-zero offset into a larger storage
//!   (the whole tokenised prompt row was saved), so views are materialised from (storage,
//!   offset, size, stride) rather than read from the start of the storage;
//! - candle's `SETITEMS` returns the entries of one batch in reverse order, so everything is
//!   mapped by name, never by position;
//! - candle's state-dict reader returns `Ok` with zero tensors for a file it does not
//!   understand; that is an error here.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

fn invalid(path: &Path, msg: impl std::fmt::Display) -> EngineError {
    EngineError::Invalid(format!("{}: {msg}", path.display()))
}

fn io_err(path: &Path, source: std::io::Error) -> EngineError {
    EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a torch state dict (a plain `{name: tensor}` dict / `OrderedDict` saved with
/// `torch.save`, e.g. the official `spatial_encoder.pt`), sorted by name. Fails when the file
/// is not a torch zip archive or holds no top-level tensors (candle itself would return an
/// empty list for, e.g., a checkpoint whose tensors sit under a `state_dict` key).
pub fn read_torch_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.is_file() {
        return Err(io_err(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let mut tensors = candle_core::pickle::read_all_with_key(path, None).map_err(|e| {
        invalid(
            path,
            format!("cannot read as a torch.save zip archive of tensors: {e}"),
        )
    })?;
    if tensors.is_empty() {
        return Err(invalid(
            path,
            "no tensors at the top level: expected a state dict {name: tensor} saved with torch.save \
             (a checkpoint that nests it under a key such as `state_dict` is not a plain state dict)",
        ));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// The learned embeddings of an official `EmbeddingManager` (`EmbeddingManager.save`).
#[derive(Debug, Clone)]
pub struct EmbeddingsFile {
    /// Placeholder string → its token id (`{"*": 1008}` for LDM-BERT's `*`).
    pub placeholder_tokens: BTreeMap<String, i64>,
    /// Embedding name → vectors `[N, D]` f32: `"<category>+<defect>"` → `[4, 1280]` for the
    /// anomaly model (e_a), `"*"` → `[16, 1280]` for a mask model.
    pub params: BTreeMap<String, Tensor>,
}

impl EmbeddingsFile {
    /// Checks what every consumer relies on: at least one embedding, all `[N, D]` f32 with
    /// the same `D`.
    fn check(&self, path: &Path) -> Result<()> {
        if self.params.is_empty() {
            return Err(invalid(path, "no embeddings (string_to_param is empty)"));
        }
        let mut dim = None;
        for (name, t) in &self.params {
            let (_, d) = t.dims2().map_err(|_| {
                invalid(
                    path,
                    format!(
                        "embedding `{name}` has shape {:?}, expected [N, D]",
                        t.dims()
                    ),
                )
            })?;
            if t.dtype() != DType::F32 {
                return Err(invalid(path, format!("embedding `{name}` is not f32")));
            }
            if *dim.get_or_insert(d) != d {
                return Err(invalid(
                    path,
                    format!(
                        "embedding `{name}` has width {d}, others have {}",
                        dim.unwrap_or(d)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Reads an official `EmbeddingManager.save` file (the anomaly model's `embeddings.pt`, or a mask model's).
/// Parameters are converted to f32 (the official files are f32 already, and are then read
/// bit-exactly).
pub fn read_embeddings_pt(path: &Path) -> Result<EmbeddingsFile> {
    let mut archive = TorchArchive::open(path)?;
    let root = archive.root.clone();
    let Object::Dict(entries) = root else {
        return Err(invalid(
            path,
            "the pickled object is not a dict (expected EmbeddingManager.save's {string_to_token, string_to_param})",
        ));
    };
    let mut string_to_token = None;
    let mut string_to_param = None;
    for (k, v) in entries {
        match k {
            Object::Unicode(k) if k == "string_to_token" => string_to_token = Some(v),
            Object::Unicode(k) if k == "string_to_param" => string_to_param = Some(v),
            _ => {}
        }
    }
    let tokens_obj =
        string_to_token.ok_or_else(|| invalid(path, "no string_to_token dict found"))?;
    let Object::Dict(token_entries) = tokens_obj else {
        return Err(invalid(path, "string_to_token is not a dict"));
    };
    let mut placeholder_tokens = BTreeMap::new();
    for (k, v) in token_entries {
        let name = dict_key(path, k, "string_to_token")?;
        let id = match v {
            Object::Int(i) => i as i64,
            Object::Long(i) => i,
            obj => {
                let t = archive.tensor(&obj)?.ok_or_else(|| {
                    invalid(
                        path,
                        format!("string_to_token[`{name}`] is neither an int nor a tensor"),
                    )
                })?;
                if t.elem_count() != 1 {
                    return Err(invalid(
                        path,
                        format!(
                            "string_to_token[`{name}`] has shape {:?}, expected a scalar",
                            t.dims()
                        ),
                    ));
                }
                t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?[0]
            }
        };
        placeholder_tokens.insert(name, id);
    }
    let params_obj = string_to_param
        .and_then(parameter_dict)
        .ok_or_else(|| invalid(path, "no string_to_param ParameterDict found"))?;
    let mut params = BTreeMap::new();
    for (k, v) in params_obj {
        let name = dict_key(path, k, "string_to_param")?;
        let t = archive.tensor(&v)?.ok_or_else(|| {
            invalid(
                path,
                format!("string_to_param[`{name}`] is not a tensor or Parameter"),
            )
        })?;
        params.insert(name, t.to_dtype(DType::F32)?);
    }
    let file = EmbeddingsFile {
        placeholder_tokens,
        params,
    };
    file.check(path)?;
    Ok(file)
}

/// Reads the flat safetensors form: `string_to_param.<name>` `[N, D]` and
/// `string_to_token.<placeholder>` (int64 scalar). Any other key is an error.
pub fn read_embeddings_safetensors(path: &Path) -> Result<EmbeddingsFile> {
    if !path.is_file() {
        return Err(io_err(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| invalid(path, format!("not a readable safetensors file: {e}")))?;
    let mut placeholder_tokens = BTreeMap::new();
    let mut params = BTreeMap::new();
    for (k, t) in map {
        if let Some(name) = k.strip_prefix("string_to_param.") {
            params.insert(name.to_string(), t.to_dtype(DType::F32)?);
        } else if let Some(name) = k.strip_prefix("string_to_token.") {
            if t.elem_count() != 1 || !matches!(t.dtype(), DType::I64 | DType::I32 | DType::U32) {
                return Err(invalid(
                    path,
                    format!(
                        "`{k}` must be an integer scalar, got {:?} {:?}",
                        t.dtype(),
                        t.dims()
                    ),
                ));
            }
            let id = t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?[0];
            placeholder_tokens.insert(name.to_string(), id);
        } else {
            return Err(invalid(
                path,
                format!("unexpected key `{k}` (expected string_to_param.<name> / string_to_token.<placeholder>)"),
            ));
        }
    }
    let file = EmbeddingsFile {
        placeholder_tokens,
        params,
    };
    file.check(path)?;
    Ok(file)
}

/// Writes `file` in the flat safetensors form read by [`read_embeddings_safetensors`].
pub fn write_embeddings_safetensors(file: &EmbeddingsFile, path: &Path) -> Result<()> {
    file.check(path)?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in &file.params {
        map.insert(
            format!("string_to_param.{name}"),
            t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
        );
    }
    for (name, id) in &file.placeholder_tokens {
        map.insert(
            format!("string_to_token.{name}"),
            Tensor::new(*id, &Device::Cpu)?,
        );
    }
    candle_core::safetensors::save(&map, path)
        .map_err(|e| invalid(path, format!("cannot write safetensors: {e}")))
}

/// A dict key that must be a string.
fn dict_key(path: &Path, k: Object, what: &str) -> Result<String> {
    match k {
        Object::Unicode(s) => Ok(s),
        other => Err(invalid(
            path,
            format!("{what} has a non-string key {other:?}"),
        )),
    }
}

/// The `{name: parameter}` entries of a pickled `nn.ParameterDict` (a module: NEWOBJ + BUILD
/// whose state holds `_parameters`), or of a plain dict.
fn parameter_dict(obj: Object) -> Option<Vec<(Object, Object)>> {
    match obj {
        Object::Build { args, .. } => match *args {
            Object::Dict(state) => state.into_iter().find_map(|(k, v)| match (k, v) {
                (Object::Unicode(k), Object::Dict(p)) if k == "_parameters" => Some(p),
                _ => None,
            }),
            _ => None,
        },
        Object::Dict(entries) => Some(entries),
        _ => None,
    }
}

/// An open `torch.save` archive: the unpickled root object and access to its storages.
struct TorchArchive {
    path: std::path::PathBuf,
    zip: zip::ZipArchive<BufReader<std::fs::File>>,
    /// The archive's top folder (`embeddings` for `embeddings.pt`; torch names it after the
    /// file it first wrote).
    prefix: String,
    root: Object,
}

impl TorchArchive {
    fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
        let mut zip = zip::ZipArchive::new(BufReader::new(f)).map_err(|e| {
            invalid(path, format!("not a torch.save zip archive ({e}); legacy non-zip torch files are not supported"))
        })?;
        let pickles: Vec<String> = zip
            .file_names()
            .filter_map(|n| n.ok().map(|n| n.into_owned()))
            .filter(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
            .collect();
        let pkl = match pickles.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(invalid(
                    path,
                    "no data.pkl in the zip archive: not a torch.save file",
                ))
            }
            _ => {
                return Err(invalid(
                    path,
                    format!("several pickles in the archive: {pickles:?}"),
                ))
            }
        };
        let prefix = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
        if let Ok(mut bo) = zip.by_name(&format!("{prefix}byteorder")) {
            let mut s = String::new();
            bo.read_to_string(&mut s).map_err(|e| io_err(path, e))?;
            if s.trim() != "little" {
                return Err(invalid(
                    path,
                    format!(
                        "byte order `{}` is not supported (only little-endian)",
                        s.trim()
                    ),
                ));
            }
        }
        let root = {
            let entry = zip
                .by_name(&pkl)
                .map_err(|e| invalid(path, format!("cannot open {pkl}: {e}")))?;
            let mut reader = BufReader::new(entry);
            let mut stack = Stack::empty();
            stack
                .read_loop(&mut reader)
                .map_err(|e| invalid(path, format!("cannot unpickle {pkl}: {e}")))?;
            stack
                .finalize()
                .map_err(|e| invalid(path, format!("cannot unpickle {pkl}: {e}")))?
        };
        Ok(Self {
            path: path.to_path_buf(),
            zip,
            prefix,
            root,
        })
    }

    /// Materialises a pickled tensor or Parameter; `Ok(None)` when `obj` is not one.
    fn tensor(&mut self, obj: &Object) -> Result<Option<Tensor>> {
        let Object::Reduce { callable, args } = obj else {
            return Ok(None);
        };
        let Object::Class {
            module_name,
            class_name,
        } = callable.as_ref()
        else {
            return Ok(None);
        };
        let Object::Tuple(args) = args.as_ref() else {
            return Ok(None);
        };
        match (module_name.as_str(), class_name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2") => self.rebuild_tensor(args).map(Some),
            // Parameter(data, requires_grad, backward_hooks[, state]) and tensor subclasses
            // (func, type, args, state): the tensor is the first / third argument.
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                match args.first() {
                    Some(inner) => self.tensor(inner),
                    None => Ok(None),
                }
            }
            ("torch._tensor", "_rebuild_from_type_v2") => match (args.first(), args.get(2)) {
                (Some(func @ Object::Class { .. }), Some(Object::Tuple(inner))) => {
                    self.tensor(&Object::Reduce {
                        callable: Box::new(func.clone()),
                        args: Box::new(Object::Tuple(inner.clone())),
                    })
                }
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks)`.
    fn rebuild_tensor(&mut self, args: &[Object]) -> Result<Tensor> {
        let path = self.path.clone();
        let bad = |what: &str| invalid(&path, format!("malformed tensor record ({what})"));
        let (Some(storage), Some(offset), Some(size), Some(stride)) =
            (args.first(), args.get(1), args.get(2), args.get(3))
        else {
            return Err(bad("too few arguments"));
        };
        let Object::PersistentLoad(storage) = storage else {
            return Err(bad("no persistent storage id"));
        };
        let Object::Tuple(storage) = storage.as_ref() else {
            return Err(bad("storage id is not a tuple"));
        };
        // ("storage", torch.<Type>Storage, key, location, numel)
        let (Some(Object::Class { class_name, .. }), Some(Object::Unicode(key)), Some(numel)) =
            (storage.get(1), storage.get(2), storage.get(4))
        else {
            return Err(bad("unexpected storage id layout"));
        };
        let numel = as_usize(numel).ok_or_else(|| bad("storage size"))?;
        let dtype = match class_name.as_str() {
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "ByteStorage" | "BoolStorage" => DType::U8,
            other => {
                return Err(invalid(&path, format!("unsupported storage type {other}")));
            }
        };
        let offset = as_usize(offset).ok_or_else(|| bad("storage offset"))?;
        let size = as_usize_tuple(size).ok_or_else(|| bad("size"))?;
        let stride = as_usize_tuple(stride).ok_or_else(|| bad("stride"))?;
        if size.len() != stride.len() {
            return Err(bad("size and stride ranks differ"));
        }
        let esz = dtype.size_in_bytes();
        let name = format!("{}data/{key}", self.prefix);
        let mut data = Vec::new();
        self.zip
            .by_name(&name)
            .map_err(|e| invalid(&path, format!("storage {name}: {e}")))?
            .read_to_end(&mut data)
            .map_err(|e| io_err(&path, e))?;
        if data.len() < numel * esz {
            return Err(invalid(
                &path,
                format!(
                    "storage {name} holds {} bytes, the pickle says {numel} × {esz}",
                    data.len()
                ),
            ));
        }
        // Gather the view's elements in row-major order: element (i_0..i_k) sits at storage
        // index offset + Σ i_d·stride_d.
        let count: usize = size.iter().product();
        let mut bytes = Vec::with_capacity(count * esz);
        let mut idx = vec![0usize; size.len()];
        for _ in 0..count {
            let at = offset + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
            if at >= numel {
                return Err(invalid(
                    &path,
                    format!("tensor view (offset {offset}, size {size:?}, stride {stride:?}) reaches past storage {name} of {numel} elements"),
                ));
            }
            bytes.extend_from_slice(&data[at * esz..(at + 1) * esz]);
            for d in (0..size.len()).rev() {
                idx[d] += 1;
                if idx[d] < size[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(Tensor::from_raw_buffer(&bytes, dtype, &size, &Device::Cpu)?)
    }
}

fn as_usize(o: &Object) -> Option<usize> {
    match o {
        Object::Int(i) => usize::try_from(*i).ok(),
        Object::Long(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

fn as_usize_tuple(o: &Object) -> Option<Vec<usize>> {
    match o {
        Object::Tuple(v) => v.iter().map(as_usize).collect(),
        _ => None,
    }
}
