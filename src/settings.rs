//! Typed per-defect-type settings: what a generator and a mask source need for one defect type.
//! Every choice is an enum (serde + `FromStr`, written as the campaign's lower-case words), and
//! every settings struct has one `validate()` used by campaign validation and by each CLI
//! command that takes the same settings, so a rule is written once.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// MVTec AD's texture categories: AnomalyDiffusion's adaptive attention re-weighting is on by
/// default for these (the official `run-mvtec.py` recommends it for texture-type anomalies) and
/// off for object categories.
pub const TEXTURE_CATEGORIES: &[&str] = &["carpet", "grid", "leather", "tile", "wood"];

/// A closed set of named choices: serde, `FromStr` (with an error listing the choices),
/// `Display`, and the list of names.
macro_rules! choice {
    ($(#[$m:meta])* $name:ident, $what:literal, { $($(#[$vm:meta])* $var:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $var),+
        }
        impl $name {
            /// Every choice, as written in campaigns.
            pub const NAMES: &'static [&'static str] = &[$($s),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s),+ }
            }
        }
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($name::$var),)+
                    other => Err(format!(
                        "unknown {} {other:?} (expected {})",
                        $what,
                        Self::NAMES.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
                    )),
                }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

choice!(
    /// Generators a campaign may name. The worker's registry implements exactly these (a test
    /// in the workers crate checks it).
    GeneratorKind, "generator", {
        Perlin => "perlin",
        Cutpaste => "cutpaste",
        Noop => "noop",
        AttemptNoise => "attempt-noise",
        AnomalyDiffusion => "anomalydiffusion",
    }
);

choice!(
    /// AnomalyDiffusion's adaptive attention re-weighting (the engine's `AarMode`).
    Reweighting, "mode", {
        Off => "off",
        /// the official code at HEAD
        Official => "official",
        /// the official code before d8baf69
        Legacy => "legacy",
        /// the paper's formulation
        Paper => "paper",
    }
);

impl Reweighting {
    /// The default for a category: on (official) for MVTec textures, off for objects.
    pub fn default_for(category: &str) -> Self {
        if TEXTURE_CATEGORIES.contains(&category) {
            Reweighting::Official
        } else {
            Reweighting::Off
        }
    }
}

choice!(
    /// Spatial-encoder BatchNorm statistics during generation.
    SpatialBn, "mode", {
        /// running statistics: a sample is the same whatever batch it lands in
        Eval => "eval",
        /// the official generation script's batch statistics
        Batch => "batch",
    }
);

choice!(
    /// What AnomalyDiffusion does with masks thinner than the 32×32 latent grid.
    #[derive(Default)]
    ThinDefects, "mode", {
        /// official: the model samples the bilinear latent mask, where they may vanish
        #[default]
        Keep => "keep",
        /// the model samples every latent cell the mask touches; the normal image is pasted
        /// back outside the mask
        Dilate => "dilate",
    }
);

choice!(
    /// How the object region of a category is known for the foreground constraint.
    PlacementMode, "mode", {
        /// masks are not constrained
        Off => "off",
        /// estimated from each normal image
        Estimate => "estimate",
        /// `foreground_mask`: the same object mask for every image of the category
        File => "file",
    }
);

choice!(
    /// A category's `foreground` key as written (resolved per defect type to a
    /// [`PlacementMode`]).
    #[derive(Default)]
    Foreground, "mode", {
        /// learned masks on object categories are constrained, textures and other sources not
        #[default]
        Auto => "auto",
        Estimate => "estimate",
        Off => "off",
    }
);

/// A text prompt: a template with the placeholder `*` exactly once, or the official template
/// list ("random", one chosen per sample from its seed). Written as one string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Prompt {
    Random,
    Template(String),
}

impl Prompt {
    /// The prompt for one sample: the template with `*` replaced by `placeholder`, or the
    /// official template that `random` picks (given by the caller, which owns the list).
    pub fn render(&self, placeholder: &str, random: impl FnOnce() -> String) -> String {
        match self {
            Prompt::Random => random(),
            Prompt::Template(t) => t.replace('*', placeholder),
        }
    }
}

impl FromStr for Prompt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "random" {
            Ok(Prompt::Random)
        } else if s.matches('*').count() == 1 {
            Ok(Prompt::Template(s.to_string()))
        } else {
            Err(format!(
                "{s:?} must contain the placeholder * exactly once (or be \"random\")"
            ))
        }
    }
}

impl TryFrom<String> for Prompt {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Prompt> for String {
    fn from(p: Prompt) -> String {
        p.to_string()
    }
}

impl fmt::Display for Prompt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prompt::Random => f.write_str("random"),
            Prompt::Template(t) => f.write_str(t),
        }
    }
}

/// Problems of one settings value, each with its key path.
#[derive(Debug, Default)]
struct Problems(Vec<String>);

/// `path.key`, or `key` alone under the empty path.
pub(crate) fn key_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl Problems {
    fn range<T: PartialOrd + fmt::Display>(&mut self, path: &str, key: &str, v: T, lo: T, hi: T) {
        if !(lo <= v && v <= hi) {
            self.0.push(format!(
                "{} must be in [{lo}, {hi}] (got {v})",
                key_path(path, key)
            ));
        }
    }
    fn ddim_steps(&mut self, path: &str, n: u32) {
        if n == 0 || n > 1000 {
            self.0.push(format!(
                "{} must be in [1, 1000] (got {n})",
                key_path(path, "steps")
            ));
        } else if 1000 % n != 0 {
            self.0.push(format!(
                "{}: {n} does not divide the 1000 diffusion steps (use e.g. 10, 20, 25, 50, 100, 200, 250, 500)",
                key_path(path, "steps")
            ));
        }
    }
    fn non_empty(&mut self, path: &str, key: &str, v: &Option<String>) {
        if v.as_deref() == Some("") {
            self.0
                .push(format!("{} must not be empty", key_path(path, key)));
        }
    }
}

/// Perlin mask and DRAEM blend parameters (reference/model_free_synthesis.md §5.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerlinSettings {
    /// anomaly opacity 1−β range; DRAEM: β ~ U(0, 0.8) → opacity in (0.2, 1]
    pub opacity: [f32; 2],
    /// mask threshold on the noise (DRAEM: 0.5)
    pub threshold: f32,
    /// lattice resolution exponents: 2^k cells per axis, k in [min, max] (DRAEM: 0..=5)
    pub scale_exp: [u32; 2],
    /// folder (local or s3://) of texture images used as anomaly source; none = self-augmentation
    pub texture_dir: Option<String>,
}

impl Default for PerlinSettings {
    fn default() -> Self {
        Self {
            opacity: [0.2, 1.0],
            threshold: 0.5,
            scale_exp: [0, 5],
            texture_dir: None,
        }
    }
}

/// CutPaste / scar parameters (reference/model_free_synthesis.md §5.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CutPasteSettings {
    /// patch area as a fraction of the image area
    pub area: [f32; 2],
    /// aspect ratio range; drawn from [min, 1) or [1, max] with probability ½ each
    pub aspect: [f32; 2],
    /// ColorJitter strength for brightness, contrast, saturation and hue
    pub jitter: f32,
    /// scar width in pixels (at 256 px; scaled with the image's shorter side)
    pub scar_width: [u32; 2],
    /// scar length in pixels (at 256 px; scaled with the image's shorter side)
    pub scar_length: [u32; 2],
}

impl Default for CutPasteSettings {
    fn default() -> Self {
        Self {
            area: [0.02, 0.15],
            aspect: [0.3, 3.3],
            jitter: 0.1,
            scar_width: [2, 16],
            scar_length: [10, 25],
        }
    }
}

/// AnomalyDiffusion generation parameters (docs/campaign.md, "anomalydiffusion").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyDiffusionSettings {
    /// the imported model directory (`…/models/<id>`, local or s3://), as printed by
    /// `defectforge models import`
    pub model: Option<String>,
    /// the learned embedding to use; `None` = "<category>+<defect>"
    pub embedding: Option<String>,
    /// DDIM steps (official: 200)
    pub steps: u32,
    /// DDIM eta (official: 1)
    pub eta: f32,
    /// adaptive attention re-weighting (resolved from the category when the campaign says
    /// "auto" or nothing)
    pub reweighting: Reweighting,
    /// spatial-encoder BatchNorm statistics
    pub spatial_bn: SpatialBn,
    /// prompt with the placeholder `*`, or "random" for the official template list (chosen
    /// per sample from its seed)
    pub prompt: Prompt,
    /// paste the normal image back outside the mask, blending over `feather_px` pixels
    pub background_paste: bool,
    pub feather_px: f32,
    /// write outputs at the normal image's own resolution by compositing the generated masked
    /// region into the original (implies a background paste); otherwise outputs are 256×256
    pub full_resolution: bool,
    /// masks thinner than the 32×32 latent grid: "keep" (official: the model samples the
    /// bilinear latent mask, where they may vanish; flagged `thin_defect`) or "dilate" (the
    /// model samples every latent cell the mask touches, and the normal image is pasted back
    /// outside the mask)
    #[serde(default)]
    pub thin_defects: ThinDefects,
}

impl Default for AnomalyDiffusionSettings {
    fn default() -> Self {
        Self {
            model: None,
            embedding: None,
            steps: 200,
            eta: 1.0,
            reweighting: Reweighting::Off,
            spatial_bn: SpatialBn::Eval,
            prompt: Prompt::Random,
            background_paste: false,
            feather_px: 3.0,
            full_resolution: false,
            thin_defects: ThinDefects::Keep,
        }
    }
}

/// Learned mask-model sampling (`mask = "generated"`, and `defectforge masks generate`);
/// the defaults are the official `generate_mask.py` ones (docs/masks.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MaskModelSettings {
    /// the imported model directory holding the mask embeddings (default: the
    /// `anomalydiffusion.model` of the same defect type)
    pub model: Option<String>,
    /// the mask embedding to use; `None` = "<category>+<defect>"
    pub embedding: Option<String>,
    /// DDIM steps (official: 100)
    pub steps: u32,
    /// DDIM eta (official: 1)
    pub eta: f32,
    /// classifier-free guidance scale against the empty prompt (official: 5)
    pub guidance: f32,
    /// binarisation threshold on the decoded RGB mean in [-1, 1] (official: 0.8)
    pub threshold: f32,
    /// draws per mask before the sample fails (a draw is rejected when a border line holds
    /// more than a third of its pixels, or when it is empty)
    pub max_attempts: u32,
    /// prompt with the placeholder `*`, or "random" for the official templates
    pub prompt: Prompt,
    /// masks sampled per model call
    pub batch: u32,
    /// also reject masks that vanish at the 32×32 latent grid (AnomalyDiffusion cannot paint
    /// them); by default they are kept and flagged `thin_defect` in the manifest
    pub reject_thin: bool,
}

impl Default for MaskModelSettings {
    fn default() -> Self {
        Self {
            model: None,
            embedding: None,
            steps: 100,
            eta: 1.0,
            guidance: 5.0,
            threshold: 0.8,
            max_attempts: 16,
            prompt: Prompt::Random,
            batch: 8,
            reject_thin: false,
        }
    }
}

/// The foreground constraint (docs/masks.md): whether and how masks are kept on the object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlacementSettings {
    /// whether and how the object region is known
    pub mode: PlacementMode,
    /// the object mask when mode = "file" (resized to each image)
    pub mask_file: Option<String>,
    /// the fraction of a mask's pixels that must lie on the object; below it the mask is
    /// moved (or scaled, or clipped) onto the object
    pub min_coverage: f32,
}

impl Default for PlacementSettings {
    fn default() -> Self {
        Self {
            mode: PlacementMode::Off,
            mask_file: None,
            min_coverage: 0.98,
        }
    }
}

/// Everything a generator and a mask source need for one defect type; copied into every sample
/// message so that workers hold no campaign state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GeneratorSettings {
    pub perlin: PerlinSettings,
    pub cutpaste: CutPasteSettings,
    #[serde(default)]
    pub anomalydiffusion: AnomalyDiffusionSettings,
    #[serde(default)]
    pub mask_model: MaskModelSettings,
    #[serde(default)]
    pub placement: PlacementSettings,
}

impl AnomalyDiffusionSettings {
    /// Every problem of these settings, with key paths under `path` (e.g.
    /// `categories.wood.defects.scratch.anomalydiffusion`).
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Problems::default();
        p.non_empty(path, "embedding", &self.embedding);
        p.ddim_steps(path, self.steps);
        p.range(path, "eta", self.eta, 0.0, 1.0);
        p.range(path, "feather_px", self.feather_px, 0.0, 64.0);
        p.0
    }

    /// The settings that one sampler call shares. Samples whose settings differ only in
    /// per-sample choices (embedding, prompt, background paste, feather, full resolution) run
    /// in one batch, and each sample applies its own values of those.
    pub fn sampler_key(&self) -> SamplerKey {
        SamplerKey {
            model: self.model.clone(),
            steps: self.steps,
            eta_bits: self.eta.to_bits(),
            reweighting: self.reweighting,
            spatial_bn: self.spatial_bn,
            thin_defects: self.thin_defects,
        }
    }
}

/// What a batch of AnomalyDiffusion samples must share (see
/// [`AnomalyDiffusionSettings::sampler_key`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SamplerKey {
    pub model: Option<String>,
    pub steps: u32,
    eta_bits: u32,
    pub reweighting: Reweighting,
    pub spatial_bn: SpatialBn,
    pub thin_defects: ThinDefects,
}

impl SamplerKey {
    pub fn eta(&self) -> f32 {
        f32::from_bits(self.eta_bits)
    }
}

impl MaskModelSettings {
    /// Every problem of these settings, with key paths under `path` (campaigns:
    /// `….mask_model`; `masks generate`: its flags).
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Problems::default();
        p.non_empty(path, "embedding", &self.embedding);
        p.ddim_steps(path, self.steps);
        p.range(path, "eta", self.eta, 0.0, 1.0);
        p.range(path, "guidance", self.guidance, 0.0, 50.0);
        p.range(path, "threshold", self.threshold, -1.0, 1.0);
        p.range(path, "max_attempts", self.max_attempts, 1, 10_000);
        p.range(path, "batch", self.batch, 1, 256);
        p.0
    }
}

impl PlacementSettings {
    /// Every problem of these settings, with key paths under `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Problems::default();
        p.range(path, "min_coverage", self.min_coverage, 0.05, 1.0);
        if (self.mode == PlacementMode::File) != self.mask_file.is_some() {
            p.0.push(format!(
                "{path}: placement mode {} {} a foreground mask file",
                self.mode,
                if self.mask_file.is_some() {
                    "does not take"
                } else {
                    "needs"
                }
            ));
        }
        p.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_print_and_serialize_as_the_campaign_words() {
        for n in Reweighting::NAMES {
            let r: Reweighting = n.parse().unwrap();
            assert_eq!(r.to_string(), *n);
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("{n:?}"));
        }
        let e = "sometimes".parse::<Reweighting>().unwrap_err();
        assert!(
            e.contains("\"sometimes\"") && e.contains("\"paper\""),
            "{e}"
        );
        assert_eq!(
            "attempt-noise".parse::<GeneratorKind>().unwrap(),
            GeneratorKind::AttemptNoise
        );
        assert_eq!(Reweighting::default_for("wood"), Reweighting::Official);
        assert_eq!(Reweighting::default_for("bottle"), Reweighting::Off);
    }

    #[test]
    fn prompts_need_one_placeholder_and_round_trip_as_strings() {
        assert_eq!("random".parse::<Prompt>().unwrap(), Prompt::Random);
        let t: Prompt = "a photo of a *".parse().unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"a photo of a *\"");
        assert_eq!(t.render("<x>", || unreachable!()), "a photo of a <x>");
        assert!("no placeholder".parse::<Prompt>().is_err());
        assert!("two * *".parse::<Prompt>().is_err());
        assert!(serde_json::from_str::<Prompt>("\"bad\"").is_err());
    }

    #[test]
    fn validate_reports_every_problem_with_its_path() {
        let s = MaskModelSettings {
            steps: 7,
            eta: 2.0,
            guidance: -1.0,
            batch: 0,
            ..Default::default()
        };
        let p = s.validate("m");
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].starts_with("m.steps: 7 does not divide"), "{p:?}");
        assert!(
            p.iter().any(|x| x == "m.eta must be in [0, 1] (got 2)"),
            "{p:?}"
        );
        assert!(MaskModelSettings::default().validate("m").is_empty());
        assert!(AnomalyDiffusionSettings::default().validate("a").is_empty());
        assert!(PlacementSettings::default().validate("p").is_empty());
    }

    #[test]
    fn the_sampler_key_ignores_per_sample_choices_only() {
        let a = AnomalyDiffusionSettings {
            model: Some("m".into()),
            ..Default::default()
        };
        let b = AnomalyDiffusionSettings {
            embedding: Some("wood+color".into()),
            background_paste: true,
            feather_px: 1.0,
            prompt: "a *".parse().unwrap(),
            full_resolution: true,
            ..a.clone()
        };
        assert_eq!(a.sampler_key(), b.sampler_key());
        let c = AnomalyDiffusionSettings {
            thin_defects: ThinDefects::Dilate,
            ..a.clone()
        };
        assert_ne!(a.sampler_key(), c.sampler_key());
    }
}
