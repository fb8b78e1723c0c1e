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
/// The longest shard time limit a campaign may set (a week).
pub const MAX_SHARD_TIME_LIMIT_S: u64 = 7 * 24 * 3600;
/// The most samples a campaign may ask for, per defect type and in total (far above any
/// dataset; it keeps plan arithmetic, shard lists and records within bounds).
pub const MAX_SAMPLES: u64 = 1_000_000_000;

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

/// Splits a defect type written `<category>+<defect>` (mask banks, mask models, embeddings),
/// when both names are safe.
pub fn split_type_name(t: &str) -> Option<(&str, &str)> {
    t.split_once('+')
        .filter(|(c, d)| is_safe_name(c) && is_safe_name(d))
}

mod parse;
pub(crate) mod walk;

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

impl Campaign {
    /// Every location the campaign reads inputs from: the dataset, per-category normal folders,
    /// mask folders and banks, texture folders and foreground mask files. A worker opens no
    /// input outside them.
    pub fn input_roots(&self) -> Vec<String> {
        let mut v = vec![self.dataset.source.clone()];
        for c in self.categories.values() {
            v.extend(c.normal_dir.clone());
            for d in c.defects.values() {
                v.extend(d.mask_dir.clone());
                v.extend(d.mask_bank.clone());
                v.extend(d.settings.perlin.texture_dir.clone());
                v.extend(d.settings.placement.mask_file.clone());
            }
        }
        v.sort();
        v.dedup();
        v
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
