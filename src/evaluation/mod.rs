//! `defectforge eval`: does a campaign's data train a better detector? The spec, the honest
//! test split, the metric summaries and the comparison table (docs/evaluation.md). The detector
//! itself is trained by the worker crate (`defectforge_worker::evaluation`).

pub mod metrics;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::campaign::Layout;
use crate::dataset::list_images;
use crate::ledger::CampaignRecord;
use crate::store::S3Config;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot read the evaluation spec {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("evaluation spec {path}: {message}")]
    Spec { path: String, message: String },
    #[error("{0}")]
    Input(String),
}

/// Which test set and which model selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// test defects outside the generator's few-shot split, the fixed schedule's last epoch
    #[default]
    Honest,
    /// the paper's scripts: test defects from index ⌊n/3⌋ (one may be a generator example when
    /// the campaign used the official few-shot split) and the best epoch chosen on the test
    /// set (img AUROC + px AUROC + px AP + AU-PRO). For comparison with published numbers only.
    Official,
}

/// The detector and its schedule (the paper's values by default, reference §7.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorSettings {
    /// images and masks are resized to this square (bilinear), a multiple of 32
    pub image_size: u32,
    /// channels of the first U-Net level (DRAEM: 64)
    pub base_channels: usize,
    pub epochs: u32,
    /// samples per epoch
    pub epoch_samples: u32,
    pub batch: usize,
    pub lr: f64,
    /// share of training samples that are real normal images with an empty mask
    pub normal_fraction: f64,
    /// learning-rate milestones as fractions of the epochs (MultiStepLR, gamma below)
    pub milestones: Vec<f64>,
    pub gamma: f64,
}

impl Default for DetectorSettings {
    fn default() -> Self {
        Self {
            image_size: 256,
            base_channels: 64,
            epochs: 200,
            epoch_samples: 500,
            batch: 8,
            lr: 1e-4,
            normal_fraction: 0.5,
            milestones: vec![0.8, 0.9],
            gamma: 0.2,
        }
    }
}

impl DetectorSettings {
    /// The learning rate during `epoch` (0-based): lr · gamma^(milestones passed).
    pub fn lr_at(&self, epoch: u32) -> f64 {
        let passed = self
            .milestones
            .iter()
            .filter(|&&m| epoch >= (m * self.epochs as f64) as u32)
            .count();
        self.lr * self.gamma.powi(passed as i32)
    }

    pub fn steps_per_epoch(&self) -> u32 {
        self.epoch_samples.div_ceil(self.batch.max(1) as u32)
    }
}

/// An evaluation spec (TOML). Relative local paths resolve against the spec's folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    pub name: String,
    /// results go to `<output>/evaluations/<name>/`
    pub output: String,
    /// finalized campaigns, each as its folder `<store>/campaigns/<id>`; several are compared
    pub campaigns: Vec<String>,
    /// the dataset the test set comes from; every campaign must have been generated from it
    /// (default: the first campaign's)
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
    /// one detector per seed, category and campaign
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// categories to evaluate (default: every category of the campaigns)
    #[serde(default)]
    pub categories: Vec<String>,
    #[serde(default)]
    pub detector: DetectorSettings,
}

fn default_seeds() -> Vec<u64> {
    vec![1, 2, 3]
}

fn resolve_loc(base: &Path, loc: &str) -> String {
    if loc.starts_with("s3://") || Path::new(loc).is_absolute() {
        loc.trim_end_matches('/').to_string()
    } else {
        base.join(loc).display().to_string()
    }
}

impl EvalSpec {
    pub fn load(path: &Path) -> Result<Self, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|source| EvalError::Read {
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

    pub fn parse(text: &str, base: &Path, origin: &str) -> Result<Self, EvalError> {
        let bad = |message: String| EvalError::Spec {
            path: origin.to_string(),
            message,
        };
        let mut s: EvalSpec = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        s.output = resolve_loc(base, &s.output);
        s.campaigns = s.campaigns.iter().map(|c| resolve_loc(base, c)).collect();
        s.dataset = s.dataset.as_deref().map(|d| resolve_loc(base, d));
        s.check().map_err(bad)?;
        Ok(s)
    }

    /// Validates the values (also after `--compare` replaced the campaigns).
    pub fn check(&self) -> Result<(), String> {
        if !crate::ids::is_safe_campaign_id(&self.name) {
            return Err(format!(
                "name {:?} must be 1–64 lowercase letters, digits and dashes (it names the results folder)",
                self.name
            ));
        }
        if self.campaigns.is_empty() {
            return Err(
                "campaigns: name at least one finalized campaign folder (<output>/campaigns/<id>)"
                    .into(),
            );
        }
        for c in &self.campaigns {
            campaign_location(c)?;
        }
        if self.seeds.is_empty() {
            return Err("seeds: give at least one seed".into());
        }
        let d = &self.detector;
        if d.image_size == 0 || d.image_size % 32 != 0 || d.image_size > 1024 {
            return Err(format!(
                "detector.image_size: {} is not a multiple of 32 in 32..=1024 (the U-Net halves it five times)",
                d.image_size
            ));
        }
        if d.base_channels == 0 || d.base_channels > 256 {
            return Err("detector.base_channels: expected 1..=256 (the paper: 64)".into());
        }
        if d.epochs == 0 || d.epoch_samples == 0 || d.batch == 0 {
            return Err("detector: epochs, epoch_samples and batch must be ≥ 1".into());
        }
        if !(d.lr > 0.0 && d.lr.is_finite()) {
            return Err("detector.lr must be a positive number".into());
        }
        if !(0.0..1.0).contains(&d.normal_fraction) {
            return Err("detector.normal_fraction must be in [0, 1)".into());
        }
        if d.milestones.iter().any(|m| !(0.0..=1.0).contains(m)) {
            return Err("detector.milestones are fractions of the epochs in [0, 1]".into());
        }
        Ok(())
    }
}

/// `<store>/campaigns/<id>` → (store, id).
pub fn campaign_location(loc: &str) -> Result<(String, String), String> {
    let t = loc.trim_end_matches('/');
    match t.rsplit_once("/campaigns/") {
        Some((store, id)) if crate::ids::is_safe_campaign_id(id) && !store.is_empty() => {
            Ok((store.to_string(), id.to_string()))
        }
        _ => Err(format!(
            "{loc} is not a campaign folder: expected <output>/campaigns/<campaign id>, as printed by `defectforge run` or `finalize`"
        )),
    }
}

/// One real test image with its ground truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestImage {
    /// the defect type, or "good"
    pub defect_type: String,
    pub image_uri: String,
    /// None for good images (an empty mask)
    pub mask_uri: Option<String>,
}

fn stem(uri: &str) -> &str {
    let name = uri.rsplit('/').next().unwrap_or(uri);
    name.rsplit_once('.').map(|(s, _)| s).unwrap_or(name)
}

/// The real test set of one category of a campaign's dataset: every `test/good` image and,
/// per defect type the campaign generated, the real defects the generator never saw (honest:
/// those after the campaign's own few-shot split; official: from index ⌊n/3⌋). Honest sets are
/// checked against the campaign record's few-shot masks by file identity.
pub async fn test_set(
    rec: &CampaignRecord,
    dataset_root: &str,
    category: &str,
    protocol: Protocol,
    s3: &S3Config,
) -> Result<Vec<TestImage>, EvalError> {
    let spec = &rec.spec;
    if spec.dataset.layout != Layout::Mvtec {
        return Err(EvalError::Input(format!(
            "campaign {} uses the folder layout, which has no real test defects: evaluation needs an MVTec-layout dataset (<category>/test/<defect>, <category>/ground_truth/<defect>)",
            rec.campaign_id
        )));
    }
    let cat = spec.categories.get(category).ok_or_else(|| {
        EvalError::Input(format!(
            "campaign {} has no category {category:?} (it has: {})",
            rec.campaign_id,
            spec.categories
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let root = dataset_root.trim_end_matches('/');
    let list = |dir: String| async move {
        list_images(&dir, s3)
            .await
            .map_err(|e| EvalError::Input(format!("cannot list {dir}: {e}")))
    };
    let mut out: Vec<TestImage> = list(format!("{root}/{category}/test/good"))
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|u| TestImage {
            defect_type: "good".into(),
            image_uri: u,
            mask_uri: None,
        })
        .collect();
    let few_shot: std::collections::HashSet<String> = rec
        .inputs
        .as_ref()
        .and_then(|i| i.categories.get(category))
        .map(|c| {
            c.defects
                .values()
                .flat_map(|d| d.masks.iter().cloned())
                .collect()
        })
        .unwrap_or_default();
    let mut defects = 0;
    for (dname, d) in &cat.defects {
        let imgs = list(format!("{root}/{category}/test/{dname}")).await?;
        let gts = list(format!("{root}/{category}/ground_truth/{dname}")).await?;
        let start = match protocol {
            Protocol::Honest => d.few_shot_split.take(imgs.len()),
            Protocol::Official => imgs.len() / 3,
        };
        for img in &imgs[start.min(imgs.len())..] {
            let want = format!("{}_mask", stem(img));
            let gt = gts.iter().find(|g| stem(g) == want).ok_or_else(|| {
                EvalError::Input(format!(
                    "test image {img} has no ground-truth mask {want}.png in {root}/{category}/ground_truth/{dname}"
                ))
            })?;
            if protocol == Protocol::Honest && few_shot.contains(gt) {
                return Err(EvalError::Input(format!(
                    "{gt} is one of the generator's few-shot examples of campaign {} but would be a test defect: the dataset changed since the campaign was planned; evaluate against the dataset it was generated from",
                    rec.campaign_id
                )));
            }
            out.push(TestImage {
                defect_type: dname.clone(),
                image_uri: img.clone(),
                mask_uri: Some(gt.clone()),
            });
            defects += 1;
        }
    }
    if defects == 0 {
        return Err(EvalError::Input(format!(
            "category {category} has no real test defects outside the few-shot split in {root}/{category}/test/ (each defect type needs more images than the generator took); nothing to score"
        )));
    }
    Ok(out)
}

/// The metrics of one detector on one test set (None where undefined, e.g. image metrics
/// without good images).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub image_auroc: Option<f64>,
    pub image_ap: Option<f64>,
    pub image_f1_max: Option<f64>,
    pub pixel_auroc: Option<f64>,
    pub pixel_ap: Option<f64>,
    pub pixel_f1_max: Option<f64>,
    pub au_pro: Option<f64>,
}

impl Metrics {
    pub const NAMES: [&'static str; 7] = [
        "image_auroc",
        "image_ap",
        "image_f1_max",
        "pixel_auroc",
        "pixel_ap",
        "pixel_f1_max",
        "au_pro",
    ];

    pub fn values(&self) -> [Option<f64>; 7] {
        [
            self.image_auroc,
            self.image_ap,
            self.image_f1_max,
            self.pixel_auroc,
            self.pixel_ap,
            self.pixel_f1_max,
            self.au_pro,
        ]
    }

    /// The official script's selection score: img AUROC + px AUROC + px AP + AU-PRO.
    pub fn selection_score(&self) -> f64 {
        [
            self.image_auroc,
            self.pixel_auroc,
            self.pixel_ap,
            self.au_pro,
        ]
        .iter()
        .map(|v| v.unwrap_or(0.0))
        .sum()
    }

    /// Every metric from per-image maps `[h·w]`, ground truths and image scores.
    pub fn compute(maps: &[&[f32]], gts: &[&[bool]], w: usize, h: usize) -> Self {
        use metrics::*;
        let img_scores: Vec<f32> = maps.iter().map(|m| image_score(m, w, h)).collect();
        let img_labels: Vec<bool> = gts.iter().map(|g| g.iter().any(|&x| x)).collect();
        let px: Vec<f32> = maps.iter().flat_map(|m| m.iter().copied()).collect();
        let pl: Vec<bool> = gts.iter().flat_map(|g| g.iter().copied()).collect();
        Metrics {
            image_auroc: auroc(&img_scores, &img_labels),
            image_ap: average_precision(&img_scores, &img_labels),
            image_f1_max: f1_max(&img_scores, &img_labels),
            pixel_auroc: auroc(&px, &pl),
            pixel_ap: average_precision(&px, &pl),
            pixel_f1_max: f1_max_at_thresholds(&px, &pl),
            au_pro: au_pro(maps, gts, w, h, 0.3),
        }
    }
}

/// Mean and sample standard deviation over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(xs: &[f64]) -> Option<Self> {
        if xs.is_empty() {
            return None;
        }
        let n = xs.len();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Spread { mean, std, n })
    }
}

/// One detector's result: a campaign, a category, a seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedResult {
    pub campaign: String,
    pub category: String,
    pub seed: u64,
    /// the epoch whose model was scored (the last one, or the official protocol's test-set pick)
    pub scored_epoch: u32,
    pub category_metrics: Metrics,
    pub per_type: BTreeMap<String, Metrics>,
    pub final_loss: f64,
}

/// Per campaign: metric → spread over seeds of the category average.
pub type CampaignSummary = BTreeMap<String, Spread>;

/// The category-averaged metric of each seed, then mean ± std over seeds.
pub fn summarise(results: &[SeedResult], campaign: &str) -> CampaignSummary {
    let mut seeds: Vec<u64> = results
        .iter()
        .filter(|r| r.campaign == campaign)
        .map(|r| r.seed)
        .collect();
    seeds.sort();
    seeds.dedup();
    let mut out = BTreeMap::new();
    for (mi, name) in Metrics::NAMES.iter().enumerate() {
        let per_seed: Vec<f64> = seeds
            .iter()
            .filter_map(|s| {
                let v: Vec<f64> = results
                    .iter()
                    .filter(|r| r.campaign == campaign && r.seed == *s)
                    .filter_map(|r| r.category_metrics.values()[mi])
                    .collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            })
            .collect();
        if let Some(s) = Spread::of(&per_seed) {
            out.insert(name.to_string(), s);
        }
    }
    out
}

/// The comparison table: one row per metric, one column per campaign (mean ± std over seeds,
/// category averages) and, after the first, its difference to the first (mean ± std of the
/// per-seed differences: the seeds and test set are the same).
pub fn comparison_table(results: &[SeedResult], campaigns: &[String]) -> String {
    let short = |c: &str| c.rsplit('/').next().unwrap_or(c).to_string();
    let mut header = vec!["metric".to_string()];
    for (i, c) in campaigns.iter().enumerate() {
        header.push(short(c));
        if i > 0 {
            header.push(format!("Δ {}", short(c)));
        }
    }
    let mut rows = vec![header];
    let cat_avg = |c: &str, seed: u64, mi: usize| -> Option<f64> {
        let v: Vec<f64> = results
            .iter()
            .filter(|r| r.campaign == c && r.seed == seed)
            .filter_map(|r| r.category_metrics.values()[mi])
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let mut seeds: Vec<u64> = results.iter().map(|r| r.seed).collect();
    seeds.sort();
    seeds.dedup();
    for (mi, name) in Metrics::NAMES.iter().enumerate() {
        let mut row = vec![name.to_string()];
        for (i, c) in campaigns.iter().enumerate() {
            let vals: Vec<f64> = seeds.iter().filter_map(|&s| cat_avg(c, s, mi)).collect();
            row.push(match Spread::of(&vals) {
                Some(s) => format!("{:.4} ± {:.4}", s.mean, s.std),
                None => "—".into(),
            });
            if i > 0 {
                let diffs: Vec<f64> = seeds
                    .iter()
                    .filter_map(|&s| Some(cat_avg(c, s, mi)? - cat_avg(&campaigns[0], s, mi)?))
                    .collect();
                row.push(match Spread::of(&diffs) {
                    Some(s) => format!("{:+.4} ± {:.4}", s.mean, s.std),
                    None => "—".into(),
                });
            }
        }
        rows.push(row);
    }
    let ncol = rows[0].len();
    let widths: Vec<usize> = (0..ncol)
        .map(|j| rows.iter().map(|r| r[j].chars().count()).max().unwrap_or(0))
        .collect();
    let mut s = String::new();
    for (k, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        s.push_str(cells.join("  ").trim_end());
        s.push('\n');
        if k == 0 {
            s.push_str(
                &widths
                    .iter()
                    .map(|w| "-".repeat(*w))
                    .collect::<Vec<_>>()
                    .join("  "),
            );
            s.push('\n');
        }
    }
    s
}

/// Per-image scores written to `scores.parquet`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageScore {
    pub campaign: String,
    pub category: String,
    pub seed: u64,
    pub defect_type: String,
    pub image_uri: String,
    pub is_defect: bool,
    pub image_score: f32,
    pub max_pixel_score: f32,
    pub defect_pixels: u64,
}

/// `scores.parquet`: one row per scored test image, campaign and seed.
pub fn scores_parquet(rows: &[ImageScore]) -> Result<Vec<u8>, String> {
    use arrow::array::{ArrayRef, BooleanArray, Float32Array, StringArray, UInt64Array};
    use arrow::record_batch::RecordBatch;
    use std::sync::Arc;
    let s = |f: &dyn Fn(&ImageScore) -> String| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let batch = RecordBatch::try_from_iter(vec![
        ("campaign", s(&|r| r.campaign.clone())),
        ("category", s(&|r| r.category.clone())),
        (
            "seed",
            Arc::new(UInt64Array::from(
                rows.iter().map(|r| r.seed).collect::<Vec<_>>(),
            )) as ArrayRef,
        ),
        ("defect_type", s(&|r| r.defect_type.clone())),
        ("image_uri", s(&|r| r.image_uri.clone())),
        (
            "is_defect",
            Arc::new(BooleanArray::from(
                rows.iter().map(|r| r.is_defect).collect::<Vec<_>>(),
            )),
        ),
        (
            "image_score",
            Arc::new(Float32Array::from(
                rows.iter().map(|r| r.image_score).collect::<Vec<_>>(),
            )),
        ),
        (
            "max_pixel_score",
            Arc::new(Float32Array::from(
                rows.iter().map(|r| r.max_pixel_score).collect::<Vec<_>>(),
            )),
        ),
        (
            "defect_pixels",
            Arc::new(UInt64Array::from(
                rows.iter().map(|r| r.defect_pixels).collect::<Vec<_>>(),
            )),
        ),
    ])
    .map_err(|e| e.to_string())?;
    let mut buf = vec![];
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), None)
        .map_err(|e| e.to_string())?;
    w.write(&batch).map_err(|e| e.to_string())?;
    w.close().map_err(|e| e.to_string())?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_defaults_are_the_papers_and_paths_resolve() {
        let s = EvalSpec::parse(
            "name = \"e1\"\noutput = \"out\"\ncampaigns = [\"runs/campaigns/c-1\"]\n",
            Path::new("/base"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(s.output, "/base/out");
        assert_eq!(
            campaign_location(&s.campaigns[0]).unwrap(),
            ("/base/runs".to_string(), "c-1".to_string())
        );
        assert_eq!(s.detector, DetectorSettings::default());
        assert_eq!(s.protocol, Protocol::Honest);
        assert_eq!(s.seeds.len(), 3);
        // MultiStepLR at 80 % and 90 % of 200 epochs, gamma 0.2
        let d = &s.detector;
        assert_eq!(d.lr_at(159), 1e-4);
        assert!((d.lr_at(160) - 2e-5).abs() < 1e-12);
        assert!((d.lr_at(199) - 4e-6).abs() < 1e-12);
        assert_eq!(d.steps_per_epoch(), 63);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let e = EvalSpec::parse(
            "name = \"e\"\noutput = \"o\"\ncampaigns = [\"o/c-1\"]\n",
            Path::new("/"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a campaign folder"), "{e}");
        let e = EvalSpec::parse(
            "name = \"e\"\noutput = \"o\"\ncampaigns = [\"o/campaigns/c\"]\n[detector]\nimage_size = 100\n",
            Path::new("/"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("detector.image_size"), "{e}");
        let e = EvalSpec::parse(
            "name = \"e\"\noutput = \"o\"\ncampaigns = [\"o/campaigns/c\"]\n[detector]\nepoch = 3\n",
            Path::new("/"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `epoch`"), "{e}");
    }

    #[test]
    fn table_shows_differences_per_seed() {
        let r = |c: &str, seed, auroc| SeedResult {
            campaign: c.into(),
            category: "x".into(),
            seed,
            scored_epoch: 1,
            category_metrics: Metrics {
                pixel_auroc: Some(auroc),
                ..Default::default()
            },
            per_type: BTreeMap::new(),
            final_loss: 0.0,
        };
        let (a, b) = ("s/campaigns/a", "s/campaigns/b");
        let rs = vec![r(a, 1, 0.8), r(a, 2, 0.9), r(b, 1, 0.85), r(b, 2, 0.95)];
        let t = comparison_table(&rs, &[a.into(), b.into()]);
        let line = t.lines().find(|l| l.starts_with("pixel_auroc")).unwrap();
        assert!(line.contains("0.8500 ± 0.0707"), "{t}");
        assert!(line.contains("+0.0500 ± 0.0000"), "{t}");
        assert!(t
            .lines()
            .find(|l| l.starts_with("au_pro"))
            .unwrap()
            .contains('—'));
    }
}
