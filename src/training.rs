//! Training specs: which defect types an AnomalyDiffusion model learns, from which real
//! examples, with which schedule (`defectforge train`). Validated like campaigns: every
//! problem at once, each with its key path and the fix.
//!
//! ```toml
//! name = "demo-types"
//! seed = 23
//! base_model = "models/ad-0123456789abcdef"   # a directory `models import` wrote
//! output = "out"                             # training/<run_id>/… and models/<id>/ go here
//!
//! [dataset]
//! source = "demo-data"
//! layout = "mvtec"              # or "folder"
//! few_shot_split = "disjoint"   # or "official", as in campaigns
//!
//! [types."bottle+broken_large"]     # MVTec: <cat>/test/<defect>, <cat>/ground_truth/<defect>
//! [types."sheet+stain"]             # folder layout: defect images and their masks (same stem,
//! images = "sheet/stain/images"     # or <stem>_mask)
//! masks = "sheet/stain/masks"
//!
//! [training]
//! steps = 300000        # optimizer steps
//! batch = 4
//! accumulation = 1
//! base_lr = 5e-3        # lr = base_lr × batch × accumulation (official: 0.02)
//! encoder = "train"     # or "frozen" (extend a model without touching its encoder)
//! init_word = "anomaly" # new types' embeddings start from this token
//! augment = true        # the official batch augmentation (p ½)
//! checkpoint_every = 2000
//! preview_every = 2000
//! segment_steps = 2000  # steps per fleet job (train submit)
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::campaign::walk::{check_location, Walker};
use crate::campaign::{is_safe_name, resolve_location, split_type_name, FewShotSplit, Layout};
use crate::store::{ObjectStore, S3Config, StoreError};

/// Largest step count a spec may ask for (the official max_steps, 1e6).
pub const MAX_STEPS: u64 = 1_000_000;
/// Largest batch (per optimizer step, before accumulation).
pub const MAX_BATCH: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum TrainingSpecError {
    #[error("cannot read training spec {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("training spec {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("training spec {path} has problems:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: String, problems: Vec<String> },
}

/// Whether the spatial encoder is trained or kept as the base model has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EncoderMode {
    Train,
    Frozen,
}

/// What a run learns: the anomaly model (embeddings e_a and the spatial encoder, §4) or the
/// mask model (one mask embedding e_m per type, plain textual inversion, §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainingKind {
    #[default]
    Image,
    Mask,
}

impl TrainingKind {
    pub fn is_image(&self) -> bool {
        *self == TrainingKind::Image
    }
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// Where one type's real examples are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeSource {
    /// folder of defect images (MVTec: `<source>/<cat>/test/<defect>`)
    pub images: String,
    /// folder of masks (MVTec: `<source>/<cat>/ground_truth/<defect>`)
    pub masks: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSettings {
    pub steps: u64,
    pub batch: u32,
    pub accumulation: u32,
    pub base_lr: f64,
    pub encoder: EncoderMode,
    pub init_word: String,
    /// anomaly-embedding vectors per type (official 4)
    pub vectors: u32,
    pub augment: bool,
    pub checkpoint_every: u64,
    pub preview_every: u64,
    /// steps per job on the fleet (`train submit`): each segment commits a checkpoint and
    /// publishes the next; keep one under the broker's consumer timeout (30 min by default)
    pub segment_steps: u64,
    /// AdamW's decoupled weight decay (the mask model's official 0.01; 0 = Adam)
    #[serde(default, skip_serializing_if = "is_zero")]
    pub weight_decay: f64,
    /// mask model: the optimizer steps every type's embedding takes (`steps` is derived)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_per_type: Option<u64>,
}

impl TrainingSettings {
    /// The step the segment after one ending at `step` trains to.
    pub fn next_segment_end(&self, step: u64) -> u64 {
        (step + self.segment_steps).min(self.steps)
    }

    /// The learning rate actually used: `base_lr × batch × accumulation` (the official
    /// `scale_lr`).
    pub fn lr(&self) -> f64 {
        self.base_lr * self.batch as f64 * self.accumulation as f64
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSpec {
    /// image (default, not serialised: the digests of image specs stay as they were) or mask
    #[serde(default, skip_serializing_if = "TrainingKind::is_image")]
    pub kind: TrainingKind,
    pub name: String,
    pub seed: u64,
    /// the imported base model (a directory or s3://…/models/<id>)
    pub base_model: String,
    /// store root for the run's records and the trained model
    pub output: String,
    pub dataset_source: String,
    pub layout: Layout,
    pub demo: bool,
    pub few_shot_split: FewShotSplit,
    /// `<category>+<defect>` → its examples
    pub types: BTreeMap<String, TypeSource>,
    pub training: TrainingSettings,
}

impl TrainingSpec {
    /// Reads and validates a spec file; relative paths resolve against its folder.
    pub fn load(path: &Path) -> Result<Self, TrainingSpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainingSpecError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        Self::parse(&text, &base, &path.display().to_string())
    }

    /// Parses and validates spec TOML (`origin` names it in errors).
    pub fn parse(text: &str, base: &Path, origin: &str) -> Result<Self, TrainingSpecError> {
        let root: toml::Table = toml::from_str(text).map_err(|e| TrainingSpecError::Syntax {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        let mut w = Walker { problems: vec![] };
        w.unknown(
            &root,
            "",
            &[
                "kind",
                "name",
                "seed",
                "base_model",
                "output",
                "dataset",
                "types",
                "training",
            ],
        );
        let kind = match w.str_opt(&root, "", "kind").as_deref() {
            None | Some("image") => TrainingKind::Image,
            Some("mask") => TrainingKind::Mask,
            Some(o) => {
                w.problems.push(format!(
                    "kind: unknown {o:?} (expected \"image\": the anomaly model, or \"mask\": the mask model)"
                ));
                TrainingKind::Image
            }
        };
        let mask = kind == TrainingKind::Mask;
        let name = w.str_opt(&root, "", "name");
        if !root.contains_key("name") {
            w.problems
                .push("name: missing (a human-readable run name)".into());
        }
        if let Some(n) = &name {
            if n.trim().is_empty() {
                w.problems.push("name must not be empty".into());
            }
        }
        let seed = w.int_opt(&root, "", "seed", 0);
        if !root.contains_key("seed") {
            w.problems
                .push("seed: missing (any non-negative integer)".into());
        }
        let location = |w: &mut Walker, key: &str, what: &str| -> Option<String> {
            match w.str_opt(&root, "", key) {
                Some(s) => {
                    check_location(w, key, &s);
                    Some(resolve_location(base, &s))
                }
                None => {
                    if !root.contains_key(key) {
                        w.problems.push(format!("{key}: missing ({what})"));
                    }
                    None
                }
            }
        };
        let base_model = location(
            &mut w,
            "base_model",
            "the model directory `defectforge models import` wrote",
        );
        let output = location(
            &mut w,
            "output",
            "a local directory or s3://bucket/prefix for the run and the trained model",
        );

        // [dataset]
        let (mut source, mut layout, mut demo, mut split) = (
            None,
            Some(Layout::Mvtec),
            false,
            Some(FewShotSplit::Disjoint),
        );
        match w.table(&root, "", "dataset") {
            None if !root.contains_key("dataset") => w
                .problems
                .push("dataset: missing table [dataset] with source = \"<dir or s3://…>\"".into()),
            None => {}
            Some(d) => {
                w.unknown(
                    d,
                    "dataset",
                    &["source", "layout", "demo", "few_shot_split"],
                );
                match w.str_opt(d, "dataset", "source") {
                    Some(s) => {
                        check_location(&mut w, "dataset.source", &s);
                        source = Some(resolve_location(base, &s));
                    }
                    None if !d.contains_key("source") => w.problems.push(
                        "dataset.source: missing (a local directory or s3://bucket/prefix)".into(),
                    ),
                    None => {}
                }
                layout = match w.str_opt(d, "dataset", "layout").as_deref() {
                    None | Some("mvtec") => Some(Layout::Mvtec),
                    Some("folder") => Some(Layout::Folder),
                    Some(o) => {
                        w.problems.push(format!(
                            "dataset.layout: unknown layout {o:?} (expected \"mvtec\" or \"folder\")"
                        ));
                        None
                    }
                };
                demo = w.bool_opt(d, "dataset", "demo").unwrap_or(false);
                if demo && source.as_deref().is_some_and(|s| s.starts_with("s3://")) {
                    w.problems.push(
                        "dataset.demo: the demo dataset can only be materialised in a local directory"
                            .into(),
                    );
                }
                split = match w.str_opt(d, "dataset", "few_shot_split").as_deref() {
                    None | Some("disjoint") => Some(FewShotSplit::Disjoint),
                    Some("official") => Some(FewShotSplit::Official),
                    Some(o) => {
                        w.problems.push(format!(
                            "dataset.few_shot_split: unknown split {o:?} (expected \"disjoint\" or \"official\")"
                        ));
                        None
                    }
                };
            }
        }

        // [types."<category>+<defect>"]
        let mut types = BTreeMap::new();
        match w.table(&root, "", "types") {
            None if !root.contains_key("types") => w.problems.push(
                "types: missing; add [types.\"<category>+<defect>\"] for each defect type to learn"
                    .into(),
            ),
            None => {}
            Some(t) if t.is_empty() => w.problems.push(
                "types: empty; add [types.\"<category>+<defect>\"] for each defect type to learn"
                    .into(),
            ),
            Some(t) => {
                for (tname, v) in t {
                    let p = format!("types.{tname:?}");
                    let Some((cat, defect)) =
                        split_type_name(tname).filter(|(c, d)| is_safe_name(c) && is_safe_name(d))
                    else {
                        w.problems.push(format!(
                            "{p}: a type is named <category>+<defect> (letters, digits, _ . -)"
                        ));
                        continue;
                    };
                    let Some(tt) = v.as_table() else {
                        w.problems.push(format!("{p}: expected a table"));
                        continue;
                    };
                    w.unknown(tt, &p, &["images", "masks"]);
                    let images = w.str_opt(tt, &p, "images");
                    let masks = w.str_opt(tt, &p, "masks");
                    let src = match (layout, &source) {
                        (Some(Layout::Mvtec), Some(s)) => {
                            if images.is_some() || masks.is_some() {
                                w.problems.push(format!(
                                    "{p}: images/masks are for the folder layout; MVTec types are found under dataset.source"
                                ));
                            }
                            Some(TypeSource {
                                images: format!("{s}/{cat}/test/{defect}"),
                                masks: format!("{s}/{cat}/ground_truth/{defect}"),
                            })
                        }
                        (Some(Layout::Folder), Some(s)) => match (images, masks) {
                            (Some(i), Some(m)) => {
                                check_location(&mut w, &format!("{p}.images"), &i);
                                check_location(&mut w, &format!("{p}.masks"), &m);
                                let under = |x: &str| {
                                    if x.starts_with("s3://") || Path::new(x).is_absolute() {
                                        resolve_location(base, x)
                                    } else {
                                        format!("{s}/{x}")
                                    }
                                };
                                Some(TypeSource {
                                    images: under(&i),
                                    masks: under(&m),
                                })
                            }
                            _ => {
                                w.problems.push(format!(
                                    "{p}: the folder layout needs images = \"<folder of defect images>\" and masks = \"<folder of their masks>\" (relative to dataset.source)"
                                ));
                                None
                            }
                        },
                        _ => None,
                    };
                    if let Some(src) = src {
                        types.insert(tname.clone(), src);
                    }
                }
            }
        }

        // [training]
        let empty = toml::Table::new();
        let t = match w.table(&root, "", "training") {
            Some(t) => t,
            None => &empty,
        };
        w.unknown(
            t,
            "training",
            &[
                "steps",
                "steps_per_type",
                "batch",
                "accumulation",
                "base_lr",
                "encoder",
                "init_word",
                "vectors",
                "augment",
                "weight_decay",
                "checkpoint_every",
                "preview_every",
                "segment_steps",
            ],
        );
        let not_for = |w: &mut Walker, key: &str, why: &str| {
            if t.contains_key(key) {
                w.problems.push(format!("training.{key}: {why}"));
            }
        };
        if mask {
            not_for(
                &mut w,
                "steps",
                "mask training stops by training.steps_per_type (every type's embedding takes that many optimizer steps; the total follows)",
            );
            not_for(&mut w, "encoder", "the mask model has no spatial encoder");
            not_for(
                &mut w,
                "augment",
                "the official mask training does not augment (masks are read as RGB images, resized to 256)",
            );
        } else {
            not_for(
                &mut w,
                "steps_per_type",
                "only for kind = \"mask\"; the anomaly model trains training.steps joint steps",
            );
        }
        let per_type = if mask {
            let v = w
                .int_opt(t, "training", "steps_per_type", 1)
                .map(|s| s as u64);
            if !t.contains_key("steps_per_type") {
                w.problems.push(
                    "training.steps_per_type: missing (optimizer steps per type; the official train_mask.py runs 30001, its config 5000)"
                        .into(),
                );
            }
            v
        } else {
            None
        };
        let steps = if mask {
            None
        } else {
            let steps = w.int_opt(t, "training", "steps", 1).map(|s| s as u64);
            if !t.contains_key("steps") {
                w.problems.push(
                    "training.steps: missing (optimizer steps; the official run is 300000)".into(),
                );
            }
            steps
        };
        let batch = w.int_opt(t, "training", "batch", 1).unwrap_or(4) as u64;
        if batch > MAX_BATCH as u64 {
            w.problems.push(format!(
                "training.batch must be <= {MAX_BATCH} (got {batch})"
            ));
        }
        let accumulation = w.int_opt(t, "training", "accumulation", 1).unwrap_or(1) as u64;
        if accumulation > 64 {
            w.problems.push(format!(
                "training.accumulation must be <= 64 (got {accumulation})"
            ));
        }
        let steps = match (steps, per_type) {
            (Some(s), _) => Some(s),
            (None, Some(p)) if p > MAX_STEPS => {
                w.problems.push(format!(
                    "training.steps_per_type must be <= {MAX_STEPS} (got {p})"
                ));
                None
            }
            (None, Some(p)) if !types.is_empty() => Some(mask_total_steps(
                p,
                batch.min(MAX_BATCH as u64) as u32,
                accumulation.min(64) as u32,
                types.len(),
            )),
            _ => None,
        };
        if let Some(s) = steps {
            if s > MAX_STEPS {
                w.problems.push(if mask {
                    format!(
                        "training.steps_per_type: {} types at batch {batch} need {s} steps, more than {MAX_STEPS}; raise the batch or lower steps_per_type",
                        types.len()
                    )
                } else {
                    format!("training.steps must be <= {MAX_STEPS} (got {s})")
                });
            }
        }
        let base_lr = w
            .f32_opt(t, "training", "base_lr", 1e-8, 1.0)
            .map(f64::from)
            .unwrap_or(5e-3);
        let encoder = match w.str_opt(t, "training", "encoder").as_deref() {
            None if mask => Some(EncoderMode::Frozen),
            None | Some("train") => Some(EncoderMode::Train),
            Some("frozen") => Some(EncoderMode::Frozen),
            Some(o) => {
                w.problems.push(format!(
                    "training.encoder: unknown mode {o:?} (expected \"train\" or \"frozen\")"
                ));
                None
            }
        };
        let init_word = w
            .str_opt(t, "training", "init_word")
            .unwrap_or_else(|| if mask { "crack" } else { "anomaly" }.into());
        if init_word.trim().is_empty() || init_word.contains(char::is_whitespace) {
            w.problems.push(format!(
                "training.init_word must be one word (got {init_word:?})"
            ));
        }
        let vectors = w
            .int_opt(t, "training", "vectors", 1)
            .unwrap_or(if mask { 16 } else { 4 }) as u64;
        if vectors > 32 {
            w.problems
                .push(format!("training.vectors must be <= 32 (got {vectors})"));
        }
        let augment = w.bool_opt(t, "training", "augment").unwrap_or(!mask);
        let weight_decay = w
            .f32_opt(t, "training", "weight_decay", 0.0, 1.0)
            .map(f64::from)
            .unwrap_or(if mask { 0.01 } else { 0.0 });
        let total = steps.unwrap_or(1);
        let checkpoint_every = w
            .int_opt(t, "training", "checkpoint_every", 1)
            .map(|n| n as u64)
            .unwrap_or_else(|| total.min(2000));
        let preview_every = w
            .int_opt(t, "training", "preview_every", 0)
            .map(|n| n as u64)
            .unwrap_or_else(|| total.min(2000));
        let segment_steps = w
            .int_opt(t, "training", "segment_steps", 1)
            .map(|n| n as u64)
            .unwrap_or(checkpoint_every);

        if !w.problems.is_empty() {
            return Err(TrainingSpecError::Invalid {
                path: origin.to_string(),
                problems: w.problems,
            });
        }
        Ok(TrainingSpec {
            kind,
            name: name.unwrap_or_default(),
            seed: seed.unwrap_or(0) as u64,
            base_model: base_model.unwrap_or_default(),
            output: output.unwrap_or_default(),
            dataset_source: source.unwrap_or_default(),
            layout: layout.unwrap_or(Layout::Mvtec),
            demo,
            few_shot_split: split.unwrap_or(FewShotSplit::Disjoint),
            types,
            training: TrainingSettings {
                steps: steps.unwrap_or(1),
                batch: batch as u32,
                accumulation: accumulation as u32,
                base_lr,
                encoder: encoder.unwrap_or(EncoderMode::Train),
                init_word,
                vectors: vectors as u32,
                augment,
                checkpoint_every,
                preview_every,
                segment_steps,
                weight_decay,
                steps_per_type: per_type,
            },
        })
    }

    /// The few-shot examples taken out of `n` sorted ones: the campaign split for the image
    /// model; for the mask model the official `[:l]` (floor(n/3), one fewer than the image
    /// model's official split) or, for `disjoint`, the images the disjoint split gives.
    pub fn take(&self, n: usize) -> usize {
        match (self.kind, self.few_shot_split) {
            (TrainingKind::Mask, FewShotSplit::Official) => n / 3,
            _ => self.few_shot_split.take(n),
        }
    }

    /// Every location the run reads from (the dataset and each type's folders).
    pub fn input_roots(&self) -> Vec<String> {
        let mut v = vec![self.dataset_source.clone()];
        for s in self.types.values() {
            v.push(s.images.clone());
            v.push(s.masks.clone());
        }
        v.sort();
        v.dedup();
        v
    }

    /// The canonical JSON of the spec (what the run id and the resume check hash).
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("a spec serialises")
    }

    /// SHA-256 of [`Self::canonical_json`], hex.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(self.canonical_json().as_bytes()))
    }

    /// The run id: the name as a key-safe slug (lowercase letters, digits, dashes). The
    /// name is the run's identity: submitting the same name again resumes the run, and a
    /// changed spec under that name is refused ([`Self::differences`]).
    pub fn run_id(&self) -> String {
        let slug: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .split('-')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("-");
        let slug: String = slug.chars().take(64).collect();
        let slug = slug.trim_end_matches('-').to_string();
        if slug.is_empty() {
            "train".into()
        } else {
            slug
        }
    }

    /// The top-level keys (dotted for `training.*`) in which `other` differs from `self`.
    pub fn differences(&self, other: &TrainingSpec) -> Vec<String> {
        let a = serde_json::to_value(self).expect("json");
        let b = serde_json::to_value(other).expect("json");
        let mut out = Vec::new();
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, va) in a {
                let vb = b.get(k);
                match (va.as_object(), vb.and_then(|v| v.as_object())) {
                    (Some(ia), Some(ib)) if k == "training" => {
                        for (ik, iva) in ia {
                            if ib.get(ik) != Some(iva) {
                                out.push(format!(
                                    "{k}.{ik}: {} → {}",
                                    iva,
                                    ib.get(ik).cloned().unwrap_or_default()
                                ));
                            }
                        }
                    }
                    _ if vb != Some(va) => out.push(k.clone()),
                    _ => {}
                }
            }
        }
        out
    }
}

/// The types (indices into the sorted type list) of the rows of micro-batch `micro` of step
/// `step` (1-based) of a mask-model run: rows go round-robin over the types, so batches mix
/// types and every type gets the same share.
pub fn mask_batch_types(
    step: u64,
    micro: u32,
    batch: u32,
    accumulation: u32,
    ntypes: usize,
) -> Vec<usize> {
    let first = ((step - 1) * accumulation as u64 + micro as u64) * batch as u64;
    (0..batch as u64)
        .map(|i| ((first + i) % ntypes as u64) as usize)
        .collect()
}

/// The smallest step count after which every one of `ntypes` types has taken `per_type`
/// optimizer steps under [`mask_batch_types`] (a type steps when a row of one of its
/// micro-batches is its own). With R = batch × accumulation rows per step and R < T types,
/// the windows repeat every T steps and cover each type exactly R times per period.
pub fn mask_total_steps(per_type: u64, batch: u32, accumulation: u32, ntypes: usize) -> u64 {
    let (rows, t) = (batch as u64 * accumulation as u64, ntypes as u64);
    if t == 0 || rows == 0 {
        return 0;
    }
    if rows >= t {
        return per_type;
    }
    let periods = per_type / rows;
    let mut step = periods * t;
    let mut counts = vec![periods * rows; ntypes];
    while counts.iter().any(|&c| c < per_type) {
        step += 1;
        let mut seen = vec![false; ntypes];
        for m in 0..accumulation {
            for j in mask_batch_types(step, m, batch, accumulation, ntypes) {
                seen[j] = true;
            }
        }
        for (c, s) in counts.iter_mut().zip(seen) {
            *c += s as u64;
        }
    }
    step
}

/// Object keys of a training run under its output root.
pub mod keys {
    pub fn run_record(run: &str) -> String {
        format!("training/{run}/run.json")
    }
    pub fn cancelled(run: &str) -> String {
        format!("training/{run}/cancelled.json")
    }
    pub fn checkpoints(run: &str) -> String {
        format!("training/{run}/checkpoints/")
    }
    pub fn checkpoint_state(run: &str, step: u64, attempt: &str) -> String {
        format!("training/{run}/checkpoints/{step:08}/{attempt}/state.safetensors")
    }
    pub fn checkpoint_commit(run: &str, step: u64, attempt: &str) -> String {
        format!("training/{run}/checkpoints/{step:08}/{attempt}.commit")
    }
    pub fn log_part(run: &str, step: u64, attempt: &str) -> String {
        format!("training/{run}/log/{step:08}-{attempt}.parquet")
    }
    pub fn preview(run: &str, step: u64) -> String {
        format!("training/{run}/previews/{step:08}.png")
    }
    pub fn result(run: &str) -> String {
        format!("training/{run}/result.json")
    }
    /// Marker: the fleet job that trains to `step` has been published.
    pub fn segment_published(run: &str, step: u64) -> String {
        format!("training/{run}/segments/{step:08}")
    }
    /// `(step, attempt)` of a commit key under [`checkpoints`].
    pub fn parse_commit(run: &str, key: &str) -> Option<(u64, String)> {
        let rest = key.strip_prefix(&checkpoints(run))?;
        let (step, file) = rest.split_once('/')?;
        let attempt = file.strip_suffix(".commit")?;
        if attempt.contains('/') || step.len() != 8 {
            return None;
        }
        Some((step.parse().ok()?, attempt.to_string()))
    }
}

/// A checkpoint's commit record (`<step>/<attempt>.commit`, written last): what it holds and
/// the digest of every file, so a reader can tell a whole checkpoint from a torn one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointCommit {
    pub run_id: String,
    pub spec_digest: String,
    pub step: u64,
    pub attempt: String,
    /// key (relative to the output root) → sha256
    pub files: BTreeMap<String, String>,
    /// the loss of the last step before the checkpoint
    pub loss: f64,
    /// the loss on the run's fixed evaluation batch at this checkpoint, and before step 1
    pub eval_loss: f64,
    pub initial_eval_loss: f64,
}

/// The record a finished run writes last (`result.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingResult {
    pub run_id: String,
    pub spec_digest: String,
    pub steps: u64,
    pub final_loss: f64,
    /// the fixed evaluation batch's loss before training and after the last step
    pub initial_eval_loss: f64,
    pub final_eval_loss: f64,
    /// URI of the trained model directory
    pub model: String,
    pub model_id: String,
    pub model_digest: String,
}

/// One row of the training log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub augmented: bool,
    /// the batch's defect types, comma-separated
    pub types: String,
    pub seconds: f64,
}

/// The training log rows as Parquet (columns step, loss, lr, augmented, types, seconds).
pub fn log_parquet(rows: &[LogRow]) -> Result<Vec<u8>, String> {
    use arrow::array::{ArrayRef, BooleanArray, Float64Array, StringArray, UInt64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use std::sync::Arc;
    let schema = Arc::new(Schema::new(vec![
        Field::new("step", DataType::UInt64, false),
        Field::new("loss", DataType::Float64, false),
        Field::new("lr", DataType::Float64, false),
        Field::new("augmented", DataType::Boolean, false),
        Field::new("types", DataType::Utf8, false),
        Field::new("seconds", DataType::Float64, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.step))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.loss))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.lr))),
        Arc::new(BooleanArray::from(
            rows.iter().map(|r| r.augmented).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.types.as_str()),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.seconds),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(&mut buf, schema, None).map_err(|e| e.to_string())?;
    w.write(&batch).map_err(|e| e.to_string())?;
    w.close().map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Reads training log rows back (any number of parts, concatenated by the caller).
pub fn read_log_parquet(bytes: bytes::Bytes) -> Result<Vec<LogRow>, String> {
    use arrow::array::{BooleanArray, Float64Array, StringArray, UInt64Array};
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| e.to_string())?
        .build()
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for b in r {
        let b = b.map_err(|e| e.to_string())?;
        let col = |n: &str| b.column_by_name(n).ok_or_else(|| format!("log has no {n}"));
        let step = col("step")?
            .as_any()
            .downcast_ref::<UInt64Array>()
            .ok_or("step")?
            .clone();
        let loss = col("loss")?
            .as_any()
            .downcast_ref::<Float64Array>()
            .ok_or("loss")?
            .clone();
        let lr = col("lr")?
            .as_any()
            .downcast_ref::<Float64Array>()
            .ok_or("lr")?
            .clone();
        let aug = col("augmented")?
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or("augmented")?
            .clone();
        let types = col("types")?
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or("types")?
            .clone();
        let secs = col("seconds")?
            .as_any()
            .downcast_ref::<Float64Array>()
            .ok_or("seconds")?
            .clone();
        for i in 0..b.num_rows() {
            out.push(LogRow {
                step: step.value(i),
                loss: loss.value(i),
                lr: lr.value(i),
                augmented: aug.value(i),
                types: types.value(i).to_string(),
                seconds: secs.value(i),
            });
        }
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Conflict(String),
}

/// Writes the run's record (`run.json`) if there is none; a record of a different spec under
/// the same name is refused, naming the changed keys.
pub async fn ensure_run_record(
    out: &dyn ObjectStore,
    spec: &TrainingSpec,
) -> Result<(), RecordError> {
    let run_id = spec.run_id();
    let key = keys::run_record(&run_id);
    match out.get(&key).await {
        Ok(b) => {
            let prev: TrainingSpec = serde_json::from_slice(&b).map_err(|e| {
                RecordError::Conflict(format!("{}: not a training record: {e}", out.uri(&key)))
            })?;
            if prev.digest() != spec.digest() {
                return Err(RecordError::Conflict(format!(
                    "training run {run_id} already exists at {} with a different spec ({}); resume it with the same spec, or give the new one another name",
                    out.uri(&key),
                    prev.differences(spec).join("; ")
                )));
            }
            Ok(())
        }
        Err(StoreError::NotFound { .. }) => {
            let body = serde_json::to_vec_pretty(spec).expect("json");
            out.put(&key, body.into(), "application/json").await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The highest step with a commit record (not verified: cheap, for scheduling the next
/// segment), or 0.
pub async fn committed_step(out: &dyn ObjectStore, run_id: &str) -> Result<u64, StoreError> {
    Ok(out
        .list(&keys::checkpoints(run_id))
        .await?
        .into_iter()
        .filter_map(|m| keys::parse_commit(run_id, &m.key))
        .map(|(s, _)| s)
        .max()
        .unwrap_or(0))
}

/// The newest valid checkpoint commit, if any (a commit whose files all exist with their
/// digests; torn or foreign ones are skipped with a warning).
pub async fn latest_checkpoint(
    out: &dyn ObjectStore,
    run_id: &str,
    spec_digest: &str,
) -> Result<Option<(CheckpointCommit, bytes::Bytes)>, StoreError> {
    let mut commits: Vec<(u64, String)> = out
        .list(&keys::checkpoints(run_id))
        .await?
        .into_iter()
        .filter_map(|m| keys::parse_commit(run_id, &m.key))
        .collect();
    commits.sort();
    while let Some((step, attempt)) = commits.pop() {
        let key = keys::checkpoint_commit(run_id, step, &attempt);
        let Ok(body) = out.get(&key).await else {
            continue;
        };
        let Ok(c) = serde_json::from_slice::<CheckpointCommit>(&body) else {
            tracing::warn!(%key, "unreadable checkpoint commit; skipped");
            continue;
        };
        if c.spec_digest != spec_digest || c.step != step || c.attempt != attempt {
            tracing::warn!(%key, "checkpoint commit of another spec or key; skipped");
            continue;
        }
        let state_key = keys::checkpoint_state(run_id, step, &attempt);
        let Some(want) = c.files.get(&state_key) else {
            continue;
        };
        match out.get(&state_key).await {
            Ok(b) if &crate::ids::sha256_hex(&b) == want => return Ok(Some((c, b))),
            Ok(_) => {
                tracing::warn!(%state_key, "checkpoint state differs from its commit; skipped")
            }
            Err(e) => {
                tracing::warn!(%state_key, error = %e, "checkpoint state unreadable; skipped")
            }
        }
    }
    Ok(None)
}

/// Status of a run read from its store: the newest valid checkpoint and the result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainStatus {
    pub run_id: String,
    pub steps: u64,
    pub checkpoint_step: Option<u64>,
    pub checkpoint_loss: Option<f64>,
    /// the fixed evaluation batch's loss before training and at the newest checkpoint
    pub initial_eval_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub cancelled: bool,
    pub result: Option<TrainingResult>,
    /// the training log so far (committed checkpoints only)
    pub log_rows: usize,
    pub last_losses: Vec<(u64, f64)>,
}

/// Reads a run's status (what `train status` prints).
pub async fn status(spec: &TrainingSpec, s3: &S3Config) -> Result<TrainStatus, StoreError> {
    let run_id = spec.run_id();
    let out = crate::store::open(&spec.output, s3).await?;
    let digest = spec.digest();
    let ck = latest_checkpoint(out.as_ref(), &run_id, &digest).await?;
    let result = match out.get(&keys::result(&run_id)).await {
        Ok(b) => serde_json::from_slice::<TrainingResult>(&b)
            .ok()
            .filter(|r| r.spec_digest == digest),
        Err(_) => None,
    };
    // the log of committed checkpoints only
    let mut rows = Vec::new();
    let mut commits: Vec<(u64, String)> = out
        .list(&keys::checkpoints(&run_id))
        .await?
        .into_iter()
        .filter_map(|m| keys::parse_commit(&run_id, &m.key))
        .collect();
    commits.sort();
    let mut covered = 0u64;
    for (step, attempt) in commits {
        if step <= covered {
            continue;
        }
        if let Ok(b) = out.get(&keys::log_part(&run_id, step, &attempt)).await {
            if let Ok(r) = read_log_parquet(b) {
                rows.extend(r.into_iter().filter(|r| r.step > covered));
                covered = step;
            }
        }
    }
    let last_losses = rows
        .iter()
        .rev()
        .take(5)
        .rev()
        .map(|r| (r.step, r.loss))
        .collect();
    Ok(TrainStatus {
        run_id: run_id.clone(),
        steps: spec.training.steps,
        checkpoint_step: ck.as_ref().map(|(c, _)| c.step),
        checkpoint_loss: ck.as_ref().map(|(c, _)| c.loss),
        initial_eval_loss: ck.as_ref().map(|(c, _)| c.initial_eval_loss),
        eval_loss: ck.as_ref().map(|(c, _)| c.eval_loss),
        cancelled: matches!(out.head(&keys::cancelled(&run_id)).await, Ok(Some(_))),
        result,
        log_rows: rows.len(),
        last_losses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<TrainingSpec, TrainingSpecError> {
        TrainingSpec::parse(s, Path::new("/base"), "t.toml")
    }

    const MASK_SPEC: &str = r#"
kind = "mask"
name = "masks"
seed = 1
base_model = "m"
output = "out"
[dataset]
source = "data"
[types."bottle+broken_large"]
[types."bottle+contamination"]
[types."wood+color"]
[training]
steps_per_type = 10
"#;

    #[test]
    fn a_mask_spec_takes_the_official_mask_recipe_and_derives_its_steps() {
        let s = parse(MASK_SPEC).unwrap();
        assert_eq!(s.kind, TrainingKind::Mask);
        let t = &s.training;
        assert_eq!((t.vectors, t.init_word.as_str()), (16, "crack"));
        assert_eq!((t.lr(), t.weight_decay), (0.02, 0.01));
        assert!(!t.augment);
        assert_eq!(t.steps_per_type, Some(10));
        // batch 4 ≥ 3 types: every type in every batch → 10 steps
        assert_eq!(t.steps, 10);
        // the official mask split is [:floor(n/3)], one fewer than the image model's
        assert_eq!(s.take(10), 3);
        let mut o = s.clone();
        o.few_shot_split = FewShotSplit::Official;
        assert_eq!((o.take(10), o.take(2)), (3, 0));
        // image specs keep their digests: the new fields are not serialised for them
        let img = parse(
            &MASK_SPEC
                .replace("kind = \"mask\"", "")
                .replace("steps_per_type", "steps"),
        )
        .unwrap();
        let json = img.canonical_json();
        assert!(
            !json.contains("kind")
                && !json.contains("weight_decay")
                && !json.contains("steps_per_type"),
            "{json}"
        );
        assert!(s.canonical_json().contains("\"kind\":\"mask\""));
    }

    #[test]
    fn the_mask_schedule_mixes_types_and_gives_each_its_steps() {
        // 5 types, batch 2: rows cycle 0 1 | 2 3 | 4 0 | 1 2 | 3 4 | 0 1 …
        assert_eq!(mask_batch_types(1, 0, 2, 1, 5), vec![0, 1]);
        assert_eq!(mask_batch_types(3, 0, 2, 1, 5), vec![4, 0]);
        assert_eq!(mask_batch_types(2, 1, 2, 2, 5), vec![1, 2]);
        for (per, b, acc, n) in [
            (7, 2, 1, 5),
            (10, 4, 1, 3),
            (3, 3, 2, 20),
            (1, 1, 1, 4),
            (12, 5, 1, 7),
        ] {
            let total = mask_total_steps(per, b, acc, n);
            let mut counts = vec![0u64; n];
            for k in 1..=total {
                let mut seen = vec![false; n];
                for m in 0..acc {
                    for j in mask_batch_types(k, m, b, acc, n) {
                        seen[j] = true;
                    }
                }
                for (c, s) in counts.iter_mut().zip(seen) {
                    *c += s as u64;
                }
            }
            assert!(
                counts.iter().all(|&c| c >= per),
                "{per} {b} {acc} {n}: {counts:?}"
            );
            // one step fewer leaves some type short
            let short = (1..total).fold(vec![0u64; n], |mut c, k| {
                let mut seen = vec![false; n];
                for m in 0..acc {
                    for j in mask_batch_types(k, m, b, acc, n) {
                        seen[j] = true;
                    }
                }
                for (x, s) in c.iter_mut().zip(seen) {
                    *x += s as u64;
                }
                c
            });
            assert!(
                short.iter().any(|&c| c < per),
                "{per} {b} {acc} {n}: {total} is not minimal"
            );
        }
    }

    #[test]
    fn mask_specs_refuse_image_only_keys_and_image_specs_mask_only_ones() {
        let bad = MASK_SPEC.replace(
            "steps_per_type = 10",
            "steps = 10\nencoder = \"train\"\naugment = true",
        );
        let msg = parse(&bad).unwrap_err().to_string();
        for want in [
            "training.steps: mask training stops by training.steps_per_type",
            "training.encoder: the mask model has no spatial encoder",
            "training.augment: the official mask training does not augment",
            "training.steps_per_type: missing",
        ] {
            assert!(msg.contains(want), "{want} not in {msg}");
        }
        let img = MASK_SPEC.replace("kind = \"mask\"", "kind = \"picture\"");
        let msg = parse(&img).unwrap_err().to_string();
        assert!(msg.contains("kind: unknown \"picture\""), "{msg}");
        assert!(
            msg.contains("training.steps_per_type: only for kind = \"mask\""),
            "{msg}"
        );
    }

    #[test]
    fn a_minimal_spec_takes_the_official_defaults() {
        let s = parse(
            r#"
name = "Demo types"
seed = 23
base_model = "models/ad-1"
output = "out"
[dataset]
source = "data"
[types."bottle+broken_large"]
[training]
steps = 40
"#,
        )
        .unwrap();
        assert_eq!(s.training.lr(), 0.02);
        assert_eq!(s.training.batch, 4);
        assert_eq!(s.training.encoder, EncoderMode::Train);
        assert_eq!(s.training.init_word, "anomaly");
        assert_eq!(s.few_shot_split, FewShotSplit::Disjoint);
        assert_eq!(
            s.types["bottle+broken_large"].images,
            "/base/data/bottle/test/broken_large"
        );
        assert_eq!(s.base_model, "/base/models/ad-1");
        assert_eq!(s.run_id(), "demo-types");
        let mut t = s.clone();
        t.training.steps = 41;
        assert_eq!(s.run_id(), t.run_id(), "the name is the run");
        assert_ne!(s.digest(), t.digest());
        assert_eq!(
            s.differences(&t),
            vec!["training.steps: 40 → 41".to_string()]
        );
        assert_eq!(
            keys::parse_commit("r", &keys::checkpoint_commit("r", 20, "a1")),
            Some((20, "a1".to_string()))
        );
        assert_eq!(
            keys::parse_commit("r", &keys::checkpoint_state("r", 20, "a1")),
            None
        );
        let rows = vec![LogRow {
            step: 1,
            loss: 0.5,
            lr: 0.02,
            augmented: true,
            types: "a+b".into(),
            seconds: 1.5,
        }];
        let back = read_log_parquet(log_parquet(&rows).unwrap().into()).unwrap();
        assert_eq!(back, rows);
    }

    #[test]
    fn every_example_training_spec_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/training");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|e| e.to_str()) == Some("toml") {
                TrainingSpec::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 2, "only {n} example specs");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let e = parse(
            r#"
seed = -1
base_model = "http://x"
[dataset]
source = "data"
layout = "folder"
few_shot_split = "half"
[types.nocategory]
[types."sheet+stain"]
images = "i"
[training]
steps = 0
batch = 1000
encoder = "thawed"
init_word = "two words"
bogus = 1
"#,
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "name: missing",
            "seed must be >= 0",
            "base_model: \"http://x\" is neither",
            "output: missing",
            "few_shot_split: unknown split \"half\"",
            "types.\"nocategory\": a type is named <category>+<defect>",
            "types.\"sheet+stain\": the folder layout needs images",
            "training.steps must be >= 1",
            "training.batch must be <= 64",
            "training.encoder: unknown mode \"thawed\"",
            "training.init_word must be one word",
            "training.bogus: unknown key",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
        }
    }
}
