//! The campaign file (TOML): what to generate, from which dataset, with which generator and mask
//! source per defect type, and where results go. `Campaign::parse` validates the whole file and
//! reports every problem at once, each with its key path; docs/campaign.md is the user's guide.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use crate::settings::*;

/// Generators a campaign may name. The worker's registry implements exactly these (a test in the
/// workers crate checks it).
pub const KNOWN_GENERATORS: &[&str] = GeneratorKind::NAMES;

/// Default number of samples per shard: a shard is one queue message and one unit of retry. At
/// diffusion speeds (seconds per sample on a GPU) 32 samples are a few minutes of work.
pub const DEFAULT_SHARD_SIZE: u32 = 32;
/// Default per-shard wall-clock limit. It must stay below RabbitMQ's consumer_timeout (30 min by
/// default) so that the worker, not the broker, decides what a stuck shard means.
pub const DEFAULT_SHARD_TIME_LIMIT_S: u64 = 20 * 60;

#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    #[error("cannot read campaign file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("campaign {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("campaign {path} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: String, problems: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// category/train/good, category/test/<defect>, category/ground_truth/<defect>/*_mask.png
    Mvtec,
    /// a folder of normal images per category (`normal_dir`) and, per defect, a folder of masks
    Folder,
}

/// Which real defect images form the few-shot training split (reference/datasets.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FewShotSplit {
    /// indices 0..⌊n/3⌋−1 (at least one): disjoint from the test split. The default.
    Disjoint,
    /// the official AnomalyDiffusion split, indices 0..=⌊n/3⌋: shares one image with the test split.
    Official,
}

impl FewShotSplit {
    /// The number of few-shot images taken (from the start of the sorted list) out of `n`.
    pub fn take(self, n: usize) -> usize {
        match self {
            FewShotSplit::Disjoint => (n / 3).max(1).min(n),
            FewShotSplit::Official => (n / 3 + 1).min(n),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskSource {
    /// real ground-truth masks of the few-shot split
    Real,
    /// DRAEM-style Perlin noise blobs
    Perlin,
    /// CutPaste rectangles
    Cutpaste,
    /// CutPaste-scar thin rotated rectangles
    Scar,
    /// binary masks from a folder (`mask_dir`)
    Folder,
    /// masks sampled on the fly by the type's learned mask model (`[…mask_model]`)
    Generated,
    /// masks from a mask bank written by `defectforge masks generate` (`mask_bank`)
    Bank,
}

impl MaskSource {
    pub fn as_str(self) -> &'static str {
        match self {
            MaskSource::Real => "real",
            MaskSource::Perlin => "perlin",
            MaskSource::Cutpaste => "cutpaste",
            MaskSource::Scar => "scar",
            MaskSource::Folder => "folder",
            MaskSource::Generated => "generated",
            MaskSource::Bank => "bank",
        }
    }
    /// Whether masks come from files listed at plan time.
    pub fn from_files(self) -> bool {
        matches!(
            self,
            MaskSource::Real | MaskSource::Folder | MaskSource::Bank
        )
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "real" => MaskSource::Real,
            "perlin" => MaskSource::Perlin,
            "cutpaste" => MaskSource::Cutpaste,
            "scar" => MaskSource::Scar,
            "folder" => MaskSource::Folder,
            "generated" => MaskSource::Generated,
            "bank" => MaskSource::Bank,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefectSpec {
    pub count: u64,
    pub generator: GeneratorKind,
    pub mask: MaskSource,
    /// folder of masks when `mask = "folder"` (absolute after resolution); with
    /// `mask = "bank"`, the bank's folder of this type (`<mask_bank>/<category>/<defect>`)
    pub mask_dir: Option<String>,
    /// the mask bank when `mask = "bank"`
    #[serde(default)]
    pub mask_bank: Option<String>,
    pub few_shot_split: FewShotSplit,
    pub settings: GeneratorSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategorySpec {
    /// folder of normal images (folder layout; for MVTec it is <root>/<category>/train/good)
    pub normal_dir: Option<String>,
    /// the category's foreground setting as written
    #[serde(default)]
    pub foreground: Foreground,
    pub defects: BTreeMap<String, DefectSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSpec {
    /// local directory (absolute after resolution) or s3://bucket/prefix
    pub source: String,
    pub layout: Layout,
    /// materialise the built-in procedural demo dataset at `source` when it does not exist
    pub demo: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    pub name: String,
    pub seed: u64,
    pub shard_size: u32,
    pub shard_time_limit_s: u64,
    pub dataset: DatasetSpec,
    /// local directory (absolute after resolution) or s3://bucket/prefix
    pub output: String,
    pub categories: BTreeMap<String, CategorySpec>,
}

/// True when a category or defect-type name is safe: 1..=64 of [A-Za-z0-9_.-], not starting with
/// a dot. Names become dataset path segments, so nothing else is allowed.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

struct Walker {
    problems: Vec<String>,
}

impl Walker {
    fn unknown(&mut self, t: &toml::Table, path: &str, known: &[&str]) {
        for k in t.keys() {
            if !known.contains(&k.as_str()) {
                self.problems.push(format!(
                    "{}: unknown key (expected one of: {})",
                    join(path, k),
                    known.join(", ")
                ));
            }
        }
    }
    fn str_opt(&mut self, t: &toml::Table, path: &str, key: &str) -> Option<String> {
        match t.get(key) {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(v) => {
                self.problems.push(format!(
                    "{}: expected a string, got {}",
                    join(path, key),
                    v.type_str()
                ));
                None
            }
        }
    }
    /// A string key that names one of a closed set of choices (`T`'s `FromStr`).
    fn choice<T: std::str::FromStr<Err = String>>(
        &mut self,
        t: &toml::Table,
        path: &str,
        key: &str,
    ) -> Option<T> {
        let v = self.str_opt(t, path, key)?;
        match v.parse() {
            Ok(c) => Some(c),
            Err(e) => {
                self.problems.push(format!("{}: {e}", join(path, key)));
                None
            }
        }
    }
    /// A non-negative integer that fits a `u32` (range rules belong to the settings'
    /// `validate()`).
    fn u32_opt(&mut self, t: &toml::Table, path: &str, key: &str) -> Option<u32> {
        self.int_opt(t, path, key, 0)
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
    }
    /// Any number (range rules belong to the settings' `validate()`).
    fn num_opt(&mut self, t: &toml::Table, path: &str, key: &str) -> Option<f32> {
        self.f32_opt(t, path, key, f64::MIN, f64::MAX)
    }
    fn int_opt(&mut self, t: &toml::Table, path: &str, key: &str, min: i64) -> Option<i64> {
        match t.get(key) {
            None => None,
            Some(toml::Value::Integer(i)) if *i >= min => Some(*i),
            Some(toml::Value::Integer(i)) => {
                self.problems
                    .push(format!("{} must be >= {min} (got {i})", join(path, key)));
                None
            }
            Some(v) => {
                self.problems.push(format!(
                    "{}: expected an integer, got {}",
                    join(path, key),
                    v.type_str()
                ));
                None
            }
        }
    }
    fn bool_opt(&mut self, t: &toml::Table, path: &str, key: &str) -> Option<bool> {
        match t.get(key) {
            None => None,
            Some(toml::Value::Boolean(b)) => Some(*b),
            Some(v) => {
                self.problems.push(format!(
                    "{}: expected true or false, got {}",
                    join(path, key),
                    v.type_str()
                ));
                None
            }
        }
    }
    fn float(v: &toml::Value) -> Option<f64> {
        match v {
            toml::Value::Float(f) => Some(*f),
            toml::Value::Integer(i) => Some(*i as f64),
            _ => None,
        }
    }
    fn f32_opt(&mut self, t: &toml::Table, path: &str, key: &str, lo: f64, hi: f64) -> Option<f32> {
        let v = t.get(key)?;
        match Self::float(v) {
            Some(f) if (lo..=hi).contains(&f) => Some(f as f32),
            Some(f) => {
                self.problems.push(format!(
                    "{} must be in [{lo}, {hi}] (got {f})",
                    join(path, key)
                ));
                None
            }
            None => {
                self.problems.push(format!(
                    "{}: expected a number, got {}",
                    join(path, key),
                    v.type_str()
                ));
                None
            }
        }
    }
    fn range_f32(
        &mut self,
        t: &toml::Table,
        path: &str,
        key: &str,
        lo: f64,
        hi: f64,
    ) -> Option<[f32; 2]> {
        let v = t.get(key)?;
        let p = join(path, key);
        let arr = match v.as_array() {
            Some(a) if a.len() == 2 => a,
            _ => {
                self.problems
                    .push(format!("{p}: expected [min, max], got {v}"));
                return None;
            }
        };
        match (Self::float(&arr[0]), Self::float(&arr[1])) {
            (Some(a), Some(b)) if a <= b && a >= lo && b <= hi => Some([a as f32, b as f32]),
            _ => {
                self.problems.push(format!(
                    "{p}: expected [min, max] with {lo} <= min <= max <= {hi}, got {v}"
                ));
                None
            }
        }
    }
    fn range_u32(
        &mut self,
        t: &toml::Table,
        path: &str,
        key: &str,
        lo: i64,
        hi: i64,
    ) -> Option<[u32; 2]> {
        let v = t.get(key)?;
        let p = join(path, key);
        match v.as_array().map(|a| a.as_slice()) {
            Some([toml::Value::Integer(a), toml::Value::Integer(b)])
                if a <= b && *a >= lo && *b <= hi =>
            {
                Some([*a as u32, *b as u32])
            }
            _ => {
                self.problems.push(format!(
                    "{p}: expected [min, max] integers with {lo} <= min <= max <= {hi}, got {v}"
                ));
                None
            }
        }
    }
    fn table<'t>(&mut self, t: &'t toml::Table, path: &str, key: &str) -> Option<&'t toml::Table> {
        match t.get(key) {
            None => None,
            Some(toml::Value::Table(tt)) => Some(tt),
            Some(v) => {
                self.problems.push(format!(
                    "{}: expected a table, got {}",
                    join(path, key),
                    v.type_str()
                ));
                None
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Resolves a location written in a campaign: `s3://…` stays as is, a relative local path is
/// taken relative to the campaign file's folder.
pub fn resolve_location(base: &Path, loc: &str) -> String {
    if loc.starts_with("s3://") {
        return loc.to_string();
    }
    let p = PathBuf::from(loc);
    let p = if p.is_absolute() { p } else { base.join(p) };
    normalize(&p).to_string_lossy().into_owned()
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                if !out.pop() {
                    out.push("..")
                }
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

fn check_location(w: &mut Walker, path: &str, loc: &str) {
    if let Some(rest) = loc.strip_prefix("s3://") {
        let bucket = rest.split('/').next().unwrap_or("");
        if bucket.is_empty() {
            w.problems.push(format!(
                "{path}: {loc:?} names no bucket (write s3://bucket/prefix)"
            ));
        }
    } else if loc.contains("://") {
        w.problems.push(format!(
            "{path}: {loc:?} is neither a local path nor an s3://bucket/prefix URI"
        ));
    } else if loc.is_empty() {
        w.problems.push(format!("{path} must not be empty"));
    }
}

impl Campaign {
    /// Reads and validates a campaign file. Relative paths inside resolve against its folder.
    pub fn load(path: &Path) -> Result<Campaign, CampaignError> {
        let text = std::fs::read_to_string(path).map_err(|source| CampaignError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        Campaign::parse(&text, &base, &path.display().to_string())
    }

    /// Parses and validates campaign TOML; `base` resolves relative paths, `origin` names the
    /// file in errors.
    pub fn parse(text: &str, base: &Path, origin: &str) -> Result<Campaign, CampaignError> {
        let root: toml::Table = toml::from_str(text).map_err(|e| CampaignError::Syntax {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        let mut w = Walker { problems: vec![] };
        w.unknown(
            &root,
            "",
            &[
                "name",
                "seed",
                "shard_size",
                "shard_time_limit_s",
                "dataset",
                "output",
                "categories",
            ],
        );
        let name = w.str_opt(&root, "", "name");
        if name.is_none() && !root.contains_key("name") {
            w.problems
                .push("name: missing (a human-readable campaign name)".into());
        }
        let seed = w.int_opt(&root, "", "seed", 0);
        if !root.contains_key("seed") {
            w.problems
                .push("seed: missing (any non-negative integer)".into());
        }
        let shard_size = w.int_opt(&root, "", "shard_size", 1);
        if let Some(s) = shard_size {
            if s > 4096 {
                w.problems
                    .push(format!("shard_size must be <= 4096 (got {s})"));
            }
        }
        let shard_time_limit_s = w.int_opt(&root, "", "shard_time_limit_s", 10);

        // [dataset]
        let mut dataset = None;
        match w.table(&root, "", "dataset") {
            None if !root.contains_key("dataset") => w
                .problems
                .push("dataset: missing table [dataset] with source = \"<dir or s3://…>\"".into()),
            None => {}
            Some(d) => {
                w.unknown(d, "dataset", &["source", "layout", "demo"]);
                let source = w.str_opt(d, "dataset", "source");
                if source.is_none() && !d.contains_key("source") {
                    w.problems.push(
                        "dataset.source: missing (a local directory or s3://bucket/prefix)".into(),
                    );
                }
                let layout = match w.str_opt(d, "dataset", "layout").as_deref() {
                    None | Some("mvtec") => Some(Layout::Mvtec),
                    Some("folder") => Some(Layout::Folder),
                    Some(other) => {
                        w.problems.push(format!(
                            "dataset.layout: unknown layout {other:?} (expected \"mvtec\" or \"folder\")"
                        ));
                        None
                    }
                };
                let demo = w.bool_opt(d, "dataset", "demo").unwrap_or(false);
                if let Some(s) = &source {
                    check_location(&mut w, "dataset.source", s);
                    if demo && s.starts_with("s3://") {
                        w.problems.push(
                            "dataset.demo: the demo dataset can only be materialised in a local directory".into(),
                        );
                    }
                }
                if let (Some(source), Some(layout)) = (source, layout) {
                    dataset = Some(DatasetSpec {
                        source: resolve_location(base, &source),
                        layout,
                        demo,
                    });
                }
            }
        }

        // output
        let output = match root.get("output") {
            None => {
                w.problems.push(
                    "output: missing (a local directory or s3://bucket/prefix for results)".into(),
                );
                None
            }
            Some(toml::Value::String(s)) => {
                check_location(&mut w, "output", s);
                Some(resolve_location(base, s))
            }
            Some(v) => {
                w.problems
                    .push(format!("output: expected a string, got {}", v.type_str()));
                None
            }
        };

        // [categories.<name>.defects.<type>]
        let mut categories = BTreeMap::new();
        let layout = dataset.as_ref().map(|d: &DatasetSpec| d.layout);
        match w.table(&root, "", "categories") {
            None if !root.contains_key("categories") => w.problems.push(
                "categories: missing (at least one [categories.<name>.defects.<type>] table)"
                    .into(),
            ),
            None => {}
            Some(cats) => {
                if cats.is_empty() {
                    w.problems
                        .push("categories: at least one category is needed".into());
                }
                for (cname, cv) in cats {
                    let cpath = format!("categories.{}", quote_key(cname));
                    if !is_safe_name(cname) {
                        w.problems.push(format!(
                            "{cpath}: category name {cname:?} is not allowed (use 1-64 of A-Z a-z 0-9 _ - ., not starting with a dot)"
                        ));
                    }
                    let Some(ct) = cv.as_table() else {
                        w.problems.push(format!("{cpath}: expected a table"));
                        continue;
                    };
                    w.unknown(
                        ct,
                        &cpath,
                        &[
                            "normal_dir",
                            "defects",
                            "foreground",
                            "foreground_mask",
                            "foreground_min_coverage",
                        ],
                    );
                    let fg = parse_foreground(&mut w, ct, &cpath, base);
                    let normal_dir = w
                        .str_opt(ct, &cpath, "normal_dir")
                        .map(|s| resolve_location(base, &s));
                    if layout == Some(Layout::Folder) && normal_dir.is_none() {
                        w.problems.push(format!(
                            "{cpath}.normal_dir: missing (the folder layout needs a folder of normal images per category)"
                        ));
                    }
                    let mut defects = BTreeMap::new();
                    match w.table(ct, &cpath, "defects") {
                        None => w.problems.push(format!(
                            "{cpath}.defects: missing (at least one [{cpath}.defects.<type>] with a count)"
                        )),
                        Some(dt) => {
                            if dt.is_empty() {
                                w.problems.push(format!("{cpath}.defects: at least one defect type is needed"));
                            }
                            for (dname, dv) in dt {
                                let dpath = format!("{cpath}.defects.{}", quote_key(dname));
                                if !is_safe_name(dname) {
                                    w.problems.push(format!(
                                        "{dpath}: defect type name {dname:?} is not allowed (use 1-64 of A-Z a-z 0-9 _ - ., not starting with a dot)"
                                    ));
                                }
                                let Some(d) = dv.as_table() else {
                                    w.problems.push(format!("{dpath}: expected a table"));
                                    continue;
                                };
                                if let Some(spec) =
                                    parse_defect(&mut w, d, &dpath, base, layout, (cname, dname), &fg)
                                {
                                    defects.insert(dname.clone(), spec);
                                }
                            }
                        }
                    }
                    categories.insert(
                        cname.clone(),
                        CategorySpec {
                            normal_dir,
                            foreground: fg.mode,
                            defects,
                        },
                    );
                }
            }
        }

        if !w.problems.is_empty() {
            return Err(CampaignError::Invalid {
                path: origin.to_string(),
                problems: w.problems,
            });
        }
        Ok(Campaign {
            name: name.expect("checked"),
            seed: seed.expect("checked") as u64,
            shard_size: shard_size.map(|s| s as u32).unwrap_or(DEFAULT_SHARD_SIZE),
            shard_time_limit_s: shard_time_limit_s
                .map(|s| s as u64)
                .unwrap_or(DEFAULT_SHARD_TIME_LIMIT_S),
            dataset: dataset.expect("checked"),
            output: output.expect("checked"),
            categories,
        })
    }

    /// Total number of samples the campaign asks for.
    pub fn total_samples(&self) -> u64 {
        self.categories
            .values()
            .flat_map(|c| c.defects.values())
            .map(|d| d.count)
            .sum()
    }

    /// The names of all generators the campaign uses.
    pub fn generators(&self) -> BTreeSet<GeneratorKind> {
        self.categories
            .values()
            .flat_map(|c| c.defects.values())
            .map(|d| d.generator)
            .collect()
    }
}

fn quote_key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

/// A category's foreground keys as written (resolved per defect type by [`resolve_placement`]).
struct CategoryForeground {
    mode: Foreground,
    mask_file: Option<String>,
    min_coverage: f32,
}

fn parse_foreground(
    w: &mut Walker,
    ct: &toml::Table,
    cpath: &str,
    base: &Path,
) -> CategoryForeground {
    let mut fg = CategoryForeground {
        mode: Foreground::Auto,
        mask_file: None,
        min_coverage: PlacementSettings::default().min_coverage,
    };
    if ct.contains_key("foreground") {
        match w.choice(ct, cpath, "foreground") {
            Some(m) => fg.mode = m,
            None => {
                if let Some(last) = w.problems.last_mut() {
                    last.push_str(" — for a fixed object mask set foreground_mask");
                }
            }
        }
    }
    if let Some(f) = w.str_opt(ct, cpath, "foreground_mask") {
        check_location(w, &format!("{cpath}.foreground_mask"), &f);
        if fg.mode == Foreground::Off {
            w.problems.push(format!(
                "{cpath}.foreground_mask: given while foreground = \"off\"; remove one of them"
            ));
        }
        fg.mask_file = Some(resolve_location(base, &f));
    }
    if let Some(c) = w.f32_opt(ct, cpath, "foreground_min_coverage", 0.05, 1.0) {
        fg.min_coverage = c;
    }
    fg
}

/// The placement a defect type gets: a `foreground_mask` constrains every synthetic mask
/// source; "estimate" likewise with the estimated object; "auto" constrains learned masks
/// (generated, bank) on object categories only (textures have no background); "off" never.
/// Real masks are never moved.
fn resolve_placement(
    fg: &CategoryForeground,
    category: &str,
    mask: MaskSource,
) -> PlacementSettings {
    let synthetic = mask != MaskSource::Real;
    let learned = matches!(mask, MaskSource::Generated | MaskSource::Bank);
    let mode = match (fg.mask_file.is_some(), fg.mode) {
        _ if !synthetic => PlacementMode::Off,
        (true, _) => PlacementMode::File,
        (false, Foreground::Estimate) => PlacementMode::Estimate,
        (false, Foreground::Auto) if learned && !TEXTURE_CATEGORIES.contains(&category) => {
            PlacementMode::Estimate
        }
        _ => PlacementMode::Off,
    };
    PlacementSettings {
        mode,
        mask_file: if mode == PlacementMode::File {
            fg.mask_file.clone()
        } else {
            None
        },
        min_coverage: fg.min_coverage,
    }
}

fn parse_defect(
    w: &mut Walker,
    d: &toml::Table,
    dpath: &str,
    base: &Path,
    layout: Option<Layout>,
    (category, defect): (&str, &str),
    fg: &CategoryForeground,
) -> Option<DefectSpec> {
    w.unknown(
        d,
        dpath,
        &[
            "count",
            "generator",
            "mask",
            "mask_dir",
            "mask_bank",
            "mask_model",
            "few_shot_split",
            "perlin",
            "cutpaste",
            "anomalydiffusion",
        ],
    );
    let count = w.int_opt(d, dpath, "count", 1);
    if !d.contains_key("count") {
        w.problems.push(format!(
            "{dpath}.count: missing (how many samples of this type to generate)"
        ));
    }
    let generator = if d.contains_key("generator") {
        w.choice(d, dpath, "generator")
    } else {
        Some(GeneratorKind::Perlin)
    };
    let default_mask = if layout == Some(Layout::Folder) {
        "perlin"
    } else {
        "real"
    };
    let mask_s = w
        .str_opt(d, dpath, "mask")
        .unwrap_or_else(|| default_mask.into());
    let mask = MaskSource::parse(&mask_s);
    if mask.is_none() {
        w.problems.push(format!(
            "{dpath}.mask: unknown mask source {mask_s:?} (expected real, perlin, cutpaste, scar, folder, generated or bank)"
        ));
    }
    let mut mask_dir = w.str_opt(d, dpath, "mask_dir");
    if let Some(md) = &mask_dir {
        check_location(w, &format!("{dpath}.mask_dir"), md);
    }
    let mask_bank = w.str_opt(d, dpath, "mask_bank");
    if let Some(b) = &mask_bank {
        check_location(w, &format!("{dpath}.mask_bank"), b);
        if mask != Some(MaskSource::Bank) {
            w.problems.push(format!(
                "{dpath}.mask_bank: only used with mask = \"bank\" (this type has mask = {mask_s:?})"
            ));
        }
    }
    let mask_bank = mask_bank.map(|b| resolve_location(base, &b));
    match (mask, &mask_bank) {
        (Some(MaskSource::Bank), None) => w.problems.push(format!(
            "{dpath}.mask_bank: missing (mask = \"bank\" needs the bank written by `defectforge masks generate --to <bank>`)"
        )),
        (Some(MaskSource::Bank), Some(b)) => {
            if mask_dir.is_some() {
                w.problems.push(format!(
                    "{dpath}.mask_dir: not used with mask = \"bank\" (the bank's folder of this type is used)"
                ));
            }
            mask_dir = Some(format!("{}/{category}/{defect}", b.trim_end_matches('/')));
        }
        _ => {}
    }
    match mask {
        Some(MaskSource::Folder) if mask_dir.is_none() => w.problems.push(format!(
            "{dpath}.mask_dir: missing (mask = \"folder\" needs a folder of binary masks)"
        )),
        Some(MaskSource::Real) if layout == Some(Layout::Folder) => w.problems.push(format!(
            "{dpath}.mask: \"real\" needs the mvtec layout; with the folder layout use mask = \"folder\" and mask_dir"
        )),
        _ => {}
    }
    let split = match w.str_opt(d, dpath, "few_shot_split").as_deref() {
        None | Some("disjoint") => FewShotSplit::Disjoint,
        Some("official") => FewShotSplit::Official,
        Some(o) => {
            w.problems.push(format!(
                "{dpath}.few_shot_split: unknown split {o:?} (expected \"disjoint\" or \"official\")"
            ));
            FewShotSplit::Disjoint
        }
    };
    let mut settings = GeneratorSettings::default();
    if let Some(p) = w.table(d, dpath, "perlin") {
        let pp = format!("{dpath}.perlin");
        w.unknown(
            p,
            &pp,
            &["opacity", "threshold", "scale_exp", "texture_dir"],
        );
        if let Some(o) = w.range_f32(p, &pp, "opacity", 0.0, 1.0) {
            if o[1] <= 0.0 {
                w.problems.push(format!(
                    "{pp}.opacity: max must be > 0 so the anomaly is visible"
                ));
            }
            settings.perlin.opacity = o;
        }
        if let Some(t) = w.f32_opt(p, &pp, "threshold", -0.9, 0.9) {
            settings.perlin.threshold = t;
        }
        if let Some(s) = w.range_u32(p, &pp, "scale_exp", 0, 6) {
            settings.perlin.scale_exp = s;
        }
        if let Some(t) = w.str_opt(p, &pp, "texture_dir") {
            check_location(w, &format!("{pp}.texture_dir"), &t);
            settings.perlin.texture_dir = Some(resolve_location(base, &t));
        }
    }
    if let Some(c) = w.table(d, dpath, "cutpaste") {
        let cp = format!("{dpath}.cutpaste");
        w.unknown(
            c,
            &cp,
            &["area", "aspect", "jitter", "scar_width", "scar_length"],
        );
        if let Some(a) = w.range_f32(c, &cp, "area", 0.0005, 0.9) {
            settings.cutpaste.area = a;
        }
        if let Some(a) = w.range_f32(c, &cp, "aspect", 0.05, 20.0) {
            settings.cutpaste.aspect = a;
        }
        if let Some(j) = w.f32_opt(c, &cp, "jitter", 0.0, 0.5) {
            settings.cutpaste.jitter = j;
        }
        if let Some(s) = w.range_u32(c, &cp, "scar_width", 1, 256) {
            settings.cutpaste.scar_width = s;
        }
        if let Some(s) = w.range_u32(c, &cp, "scar_length", 2, 1024) {
            settings.cutpaste.scar_length = s;
        }
    }
    parse_anomalydiffusion(w, d, dpath, base, category, generator, &mut settings);
    parse_mask_model(w, d, dpath, base, mask, &mut settings);
    if let Some(m) = mask {
        settings.placement = resolve_placement(fg, category, m);
    }
    Some(DefectSpec {
        count: count? as u64,
        generator: generator?,
        mask: mask?,
        mask_dir: mask_dir.map(|m| resolve_location(base, &m)),
        mask_bank,
        few_shot_split: split,
        settings,
    })
}

fn parse_anomalydiffusion(
    w: &mut Walker,
    d: &toml::Table,
    dpath: &str,
    base: &Path,
    category: &str,
    generator: Option<GeneratorKind>,
    settings: &mut GeneratorSettings,
) {
    let ap = format!("{dpath}.anomalydiffusion");
    let s = &mut settings.anomalydiffusion;
    s.reweighting = Reweighting::default_for(category);
    if let Some(a) = w.table(d, dpath, "anomalydiffusion") {
        w.unknown(
            a,
            &ap,
            &[
                "model",
                "embedding",
                "steps",
                "eta",
                "reweighting",
                "spatial_bn",
                "prompt",
                "background_paste",
                "feather_px",
                "full_resolution",
                "thin_defects",
            ],
        );
        if let Some(m) = w.str_opt(a, &ap, "model") {
            check_location(w, &format!("{ap}.model"), &m);
            s.model = Some(resolve_location(base, &m));
        }
        if let Some(e) = w.str_opt(a, &ap, "embedding") {
            s.embedding = Some(e);
        }
        if let Some(n) = w.u32_opt(a, &ap, "steps") {
            s.steps = n;
        }
        if let Some(e) = w.num_opt(a, &ap, "eta") {
            s.eta = e;
        }
        // "auto" (the default) is the category's default
        if a.get("reweighting").and_then(|v| v.as_str()) != Some("auto") {
            if let Some(r) = w.choice(a, &ap, "reweighting") {
                s.reweighting = r;
            }
        }
        if let Some(b) = w.choice(a, &ap, "spatial_bn") {
            s.spatial_bn = b;
        }
        if let Some(p) = w.choice(a, &ap, "prompt") {
            s.prompt = p;
        }
        if let Some(b) = w.bool_opt(a, &ap, "background_paste") {
            s.background_paste = b;
        }
        if let Some(f) = w.num_opt(a, &ap, "feather_px") {
            s.feather_px = f;
        }
        if let Some(b) = w.bool_opt(a, &ap, "full_resolution") {
            s.full_resolution = b;
        }
        if let Some(t) = w.choice(a, &ap, "thin_defects") {
            s.thin_defects = t;
        }
    }
    w.problems.extend(s.validate(&ap));
    if generator == Some(GeneratorKind::AnomalyDiffusion) && s.model.is_none() {
        w.problems.push(format!(
            "{ap}.model: missing (generator \"anomalydiffusion\" needs the model directory printed by `defectforge models import`, e.g. \"s3://bucket/models/ad-…\")"
        ));
    }
}

fn parse_mask_model(
    w: &mut Walker,
    d: &toml::Table,
    dpath: &str,
    base: &Path,
    mask: Option<MaskSource>,
    settings: &mut GeneratorSettings,
) {
    let mp = format!("{dpath}.mask_model");
    let s = &mut settings.mask_model;
    if let Some(a) = w.table(d, dpath, "mask_model") {
        if mask != Some(MaskSource::Generated) {
            w.problems.push(format!(
                "{mp}: only used with mask = \"generated\" (a bank records its own sampling settings)"
            ));
        }
        w.unknown(
            a,
            &mp,
            &[
                "model",
                "embedding",
                "steps",
                "eta",
                "guidance",
                "threshold",
                "max_attempts",
                "prompt",
                "batch",
                "reject_thin",
            ],
        );
        if let Some(b) = w.bool_opt(a, &mp, "reject_thin") {
            s.reject_thin = b;
        }
        if let Some(m) = w.str_opt(a, &mp, "model") {
            check_location(w, &format!("{mp}.model"), &m);
            s.model = Some(resolve_location(base, &m));
        }
        if let Some(e) = w.str_opt(a, &mp, "embedding") {
            s.embedding = Some(e);
        }
        if let Some(n) = w.u32_opt(a, &mp, "steps") {
            s.steps = n;
        }
        if let Some(e) = w.num_opt(a, &mp, "eta") {
            s.eta = e;
        }
        if let Some(g) = w.num_opt(a, &mp, "guidance") {
            s.guidance = g;
        }
        if let Some(t) = w.num_opt(a, &mp, "threshold") {
            s.threshold = t;
        }
        if let Some(n) = w.u32_opt(a, &mp, "max_attempts") {
            s.max_attempts = n;
        }
        if let Some(p) = w.choice(a, &mp, "prompt") {
            s.prompt = p;
        }
        if let Some(n) = w.u32_opt(a, &mp, "batch") {
            s.batch = n;
        }
        w.problems.extend(s.validate(&mp));
    }
    if mask == Some(MaskSource::Generated) && s.model.is_none() {
        match &settings.anomalydiffusion.model {
            Some(m) => s.model = Some(m.clone()),
            None => w.problems.push(format!(
                "{mp}.model: missing (mask = \"generated\" needs a model imported with --mask-embeddings; set mask_model.model or anomalydiffusion.model)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_problem_with_its_key_path() {
        let text = r#"
name = "x"
seed = -1
shard_size = 0
colour = "blue"
output = "ftp://nowhere"
[dataset]
source = "d"
layout = "visa2"
[categories."../etc".defects.scratch]
count = 0
generator = "dalle"
mask = "circles"
[categories.bottle.defects.crack]
mask = "folder"
"#;
        let err = Campaign::parse(text, Path::new("/tmp"), "c.toml").unwrap_err();
        let CampaignError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        let all = problems.join("\n");
        for needle in [
            "seed must be >= 0",
            "shard_size must be >= 1",
            "colour: unknown key",
            "output: \"ftp://nowhere\"",
            "dataset.layout: unknown layout \"visa2\"",
            "categories.\"../etc\": category name",
            "categories.\"../etc\".defects.scratch.count must be >= 1",
            "defects.scratch.generator: unknown generator \"dalle\"",
            "defects.scratch.mask: unknown mask source \"circles\"",
            "categories.bottle.defects.crack.count: missing",
            "categories.bottle.defects.crack.mask_dir: missing",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(err.to_string().contains("c.toml"));
    }

    #[test]
    fn parses_a_valid_campaign_with_defaults() {
        let text = r#"
name = "Demo run"
seed = 7
output = "out"
[dataset]
source = "data"
[categories.carpet.defects.color]
count = 10
[categories.carpet.defects.cut]
count = 5
generator = "cutpaste"
mask = "scar"
[categories.carpet.defects.cut.cutpaste]
scar_width = [2, 8]
"#;
        let c = Campaign::parse(text, Path::new("/base"), "c.toml").unwrap();
        assert_eq!(c.total_samples(), 15);
        assert_eq!(c.shard_size, DEFAULT_SHARD_SIZE);
        assert_eq!(c.dataset.source, "/base/data");
        assert_eq!(c.output, "/base/out");
        let color = &c.categories["carpet"].defects["color"];
        assert_eq!(color.generator, GeneratorKind::Perlin);
        assert_eq!(color.mask, MaskSource::Real);
        assert_eq!(color.few_shot_split, FewShotSplit::Disjoint);
        let cut = &c.categories["carpet"].defects["cut"];
        assert_eq!(cut.settings.cutpaste.scar_width, [2, 8]);
        assert_eq!(cut.settings.cutpaste.scar_length, [10, 25]);
    }

    #[test]
    fn few_shot_splits_follow_the_reference() {
        // n = 10: official trains on 0..=3 (4 images), disjoint on 0..=2 (3 images)
        assert_eq!(FewShotSplit::Official.take(10), 4);
        assert_eq!(FewShotSplit::Disjoint.take(10), 3);
        assert_eq!(FewShotSplit::Disjoint.take(2), 1);
        assert_eq!(FewShotSplit::Official.take(1), 1);
    }

    #[test]
    fn every_example_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|e| e.to_str()) == Some("toml") {
                Campaign::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 4, "only {n} example configs");
    }

    #[test]
    fn learned_mask_sources_and_the_foreground_constraint_resolve() {
        let text = r#"
name = "x"
seed = 1
output = "/tmp/o"
[dataset]
source = "/tmp/d"
[categories.screw.defects.gen]
count = 1
generator = "perlin"
mask = "generated"
[categories.screw.defects.gen.mask_model]
model = "s3://b/models/ad-1"
steps = 50
reject_thin = true
[categories.screw.defects.banked]
count = 1
mask = "bank"
mask_bank = "s3://b/banks/v1/"
[categories.screw.defects.blob]
count = 1
mask = "perlin"
[categories.screw.defects.realm]
count = 1
mask = "real"
[categories.wood.defects.gen]
count = 1
generator = "anomalydiffusion"
mask = "generated"
[categories.wood.defects.gen.anomalydiffusion]
model = "s3://b/models/ad-2"
[categories.pill]
foreground = "estimate"
foreground_min_coverage = 0.9
[categories.pill.defects.blob]
count = 1
mask = "perlin"
[categories.pill.defects.realm]
count = 1
mask = "real"
[categories.tile]
foreground_mask = "tile_roi.png"
[categories.tile.defects.cut]
count = 1
mask = "cutpaste"
"#;
        let c = Campaign::parse(text, Path::new("/data"), "t").unwrap();
        let d = |cat: &str, t: &str| &c.categories[cat].defects[t];
        let g = d("screw", "gen");
        assert_eq!(g.mask, MaskSource::Generated);
        assert_eq!(
            g.settings.mask_model.model.as_deref(),
            Some("s3://b/models/ad-1")
        );
        assert_eq!(g.settings.mask_model.steps, 50);
        assert!(g.settings.mask_model.reject_thin);
        assert_eq!(g.settings.mask_model.guidance, 5.0);
        // Learned masks on an object category are constrained by default; other sources not.
        assert_eq!(g.settings.placement.mode, PlacementMode::Estimate);
        let b = d("screw", "banked");
        assert_eq!(b.mask, MaskSource::Bank);
        assert_eq!(b.mask_dir.as_deref(), Some("s3://b/banks/v1/screw/banked"));
        assert_eq!(b.settings.placement.mode, PlacementMode::Estimate);
        assert_eq!(
            d("screw", "blob").settings.placement.mode,
            PlacementMode::Off
        );
        assert_eq!(
            d("screw", "realm").settings.placement.mode,
            PlacementMode::Off
        );
        // A texture: off under auto; the mask model defaults to the anomaly model.
        let w = d("wood", "gen");
        assert_eq!(w.settings.placement.mode, PlacementMode::Off);
        assert_eq!(
            w.settings.mask_model.model.as_deref(),
            Some("s3://b/models/ad-2")
        );
        // estimate: every synthetic source, never real masks; the coverage is carried.
        assert_eq!(
            d("pill", "blob").settings.placement.mode,
            PlacementMode::Estimate
        );
        assert_eq!(d("pill", "blob").settings.placement.min_coverage, 0.9);
        assert_eq!(
            d("pill", "realm").settings.placement.mode,
            PlacementMode::Off
        );
        assert_eq!(c.categories["pill"].foreground, Foreground::Estimate);
        // A fixed object mask, resolved against the campaign's folder.
        let t = &d("tile", "cut").settings.placement;
        assert_eq!(t.mode, PlacementMode::File);
        assert_eq!(t.mask_file.as_deref(), Some("/data/tile_roi.png"));

        let bad = r#"
name = "x"
seed = 1
output = "/tmp/o"
[dataset]
source = "/tmp/d"
[categories.a]
foreground = "maybe"
[categories.a.defects.b]
count = 1
mask = "bank"
[categories.a.defects.c]
count = 1
mask = "generated"
[categories.a.defects.c.anomalydiffusion]
thin_defects = "fatten"
[categories.a.defects.d]
count = 1
mask = "perlin"
mask_bank = "/banks"
[categories.a.defects.d.mask_model]
steps = 7
prompt = "no placeholder"
"#;
        let err = Campaign::parse(bad, Path::new("/"), "t").unwrap_err();
        let CampaignError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        for want in [
            "categories.a.foreground: unknown mode \"maybe\"",
            "categories.a.defects.b.mask_bank: missing",
            "categories.a.defects.c.mask_model.model: missing",
            "categories.a.defects.c.anomalydiffusion.thin_defects: unknown mode \"fatten\"",
            "categories.a.defects.d.mask_bank: only used with mask = \"bank\"",
            "categories.a.defects.d.mask_model: only used with mask = \"generated\"",
            "categories.a.defects.d.mask_model.steps: 7 does not divide",
            "categories.a.defects.d.mask_model.prompt",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(want)),
                "{want:?} not in {problems:#?}"
            );
        }
    }

    #[test]
    fn anomalydiffusion_settings_are_validated_and_defaulted() {
        let base = |extra: &str, cat: &str| {
            format!(
                "name = \"x\"\nseed = 1\noutput = \"/tmp/o\"\n[dataset]\nsource = \"/tmp/d\"\n[categories.{cat}.defects.d]\ncount = 1\ngenerator = \"anomalydiffusion\"\n{extra}"
            )
        };
        let ok = Campaign::parse(
            &base(
                "[categories.wood.defects.d.anomalydiffusion]\nmodel = \"s3://b/models/ad-1\"\nsteps = 50",
                "wood",
            ),
            Path::new("/"),
            "t",
        )
        .unwrap();
        let s = &ok.categories["wood"].defects["d"].settings.anomalydiffusion;
        assert_eq!(
            s.reweighting,
            Reweighting::Official,
            "texture categories re-weight by default"
        );
        assert_eq!(s.steps, 50);
        assert_eq!(s.spatial_bn, SpatialBn::Eval);
        let obj = Campaign::parse(
            &base(
                "[categories.bottle.defects.d.anomalydiffusion]\nmodel = \"m\"",
                "bottle",
            ),
            Path::new("/"),
            "t",
        )
        .unwrap();
        let s = &obj.categories["bottle"].defects["d"]
            .settings
            .anomalydiffusion;
        assert_eq!(
            s.reweighting,
            Reweighting::Off,
            "objects do not re-weight by default"
        );
        assert_eq!(
            s.model.as_deref(),
            Some("/m"),
            "relative model paths resolve"
        );
        let err = Campaign::parse(
            &base(
                "[categories.wood.defects.d.anomalydiffusion]\nsteps = 300\nreweighting = \"sometimes\"\nprompt = \"no placeholder\"\nspatial_bn = \"train\"\neta = 2.0\ncolour = 1",
                "wood",
            ),
            Path::new("/"),
            "t",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "anomalydiffusion.model: missing",
            "anomalydiffusion.steps: 300 does not divide",
            "anomalydiffusion.reweighting: unknown mode \"sometimes\"",
            "anomalydiffusion.prompt",
            "anomalydiffusion.spatial_bn",
            "anomalydiffusion.eta must be in [0, 1]",
            "anomalydiffusion.colour: unknown key",
        ] {
            assert!(err.contains(want), "{want} missing from {err}");
        }
    }
}
