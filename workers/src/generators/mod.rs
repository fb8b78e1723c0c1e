//! The `Generator` seam: given normal images, binary masks and seeds, paint a defect inside each
//! mask. Unless a generator says it composites itself, the runner composites every result back
//! onto its normal image through its mask, so a model-free generator can never change a pixel
//! outside the mask. Model-free generators (Perlin/DRAEM texture blend, CutPaste) and the
//! AnomalyDiffusion generator (`anomalydiffusion`, a diffusion model that works at 256×256 and
//! owns its background handling) live here.

pub mod anomalydiffusion;
pub mod augment;
pub mod cutpaste;
pub mod perlin;
pub mod simple;

use defectforge::campaign::GeneratorSettings;
use image::{GrayImage, RgbImage};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// bad input for this sample (never retried)
    #[error("{0}")]
    Input(String),
    /// the generator could not run (model missing, out of memory): retried later
    #[error("generator failure: {0}")]
    Transient(String),
}

/// One sample to paint.
pub struct GenInput<'a> {
    pub category: &'a str,
    pub defect_type: &'a str,
    pub normal: &'a RgbImage,
    /// binary mask (0/255), same size as `normal`, at least one pixel set
    pub mask: &'a GrayImage,
    pub seed: u64,
    pub settings: &'a GeneratorSettings,
    /// anomaly source texture, when the campaign names a texture folder
    pub texture: Option<&'a RgbImage>,
}

/// What a manifest row records about how a sample was generated, beyond the generator name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleInfo {
    /// content digest of the model used, for model-based generators
    pub model_digest: Option<String>,
    pub diffusion_steps: Option<u32>,
    pub reweighting: Option<String>,
}

#[async_trait::async_trait]
pub trait Generator: Send + Sync {
    fn name(&self) -> &'static str;
    /// recorded in every manifest row; bump when outputs for the same inputs change
    fn version(&self) -> &'static str;
    /// Makes whatever `settings` needs ready (downloads and loads a model) before a shard's
    /// samples are computed; runs on the async runtime.
    async fn prepare(&self, _settings: &GeneratorSettings) -> Result<(), GenError> {
        Ok(())
    }
    /// The fixed resolution the generator works at, if any: the runner resizes the normal
    /// image and the mask to it (and records the original size) unless the generator handles
    /// other sizes itself for these settings.
    fn working_size(&self, _settings: &GeneratorSettings) -> Option<(u32, u32)> {
        None
    }
    /// Whether the runner composites the output through the mask (true: pixels outside the
    /// mask stay exactly the normal image's). A generator that owns its background returns
    /// false.
    fn runner_composites(&self, _settings: &GeneratorSettings) -> bool {
        true
    }
    /// What the manifest records for a sample made with `settings`.
    fn describe(&self, _settings: &GeneratorSettings) -> SampleInfo {
        SampleInfo::default()
    }
    /// Paints a batch. Returns one image per input, each of its input's size.
    fn generate(&self, batch: &[GenInput<'_>]) -> Result<Vec<RgbImage>, GenError>;
}

/// The generators a worker can run, by campaign name; `models` serves the model-based ones.
pub fn registry(
    models: Arc<crate::models::ModelCache>,
) -> BTreeMap<&'static str, Arc<dyn Generator>> {
    let gens: Vec<Arc<dyn Generator>> = vec![
        Arc::new(perlin::PerlinGenerator),
        Arc::new(cutpaste::CutPasteGenerator),
        Arc::new(simple::NoopGenerator),
        Arc::new(simple::AttemptNoiseGenerator),
        Arc::new(anomalydiffusion::AnomalyDiffusionGenerator::new(models)),
    ];
    gens.into_iter().map(|g| (g.name(), g)).collect()
}

/// Keeps the normal image outside the mask and the generated image inside it.
pub fn composite(normal: &RgbImage, generated: &RgbImage, mask: &GrayImage) -> RgbImage {
    let mut out = normal.clone();
    for ((o, g), m) in out.pixels_mut().zip(generated.pixels()).zip(mask.pixels()) {
        if m.0[0] > 0 {
            *o = *g;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_matches_campaign_generators() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(crate::models::ModelCache::new(
            dir.path().to_path_buf(),
            Default::default(),
        ));
        let names: Vec<&str> = registry(cache).keys().copied().collect();
        let mut known: Vec<&str> = defectforge::campaign::KNOWN_GENERATORS.to_vec();
        known.sort();
        assert_eq!(names, known);
    }
}
