//! The `Generator` seam: given normal images, binary masks and seeds, paint a defect inside each
//! mask. The runner composites every result back onto its normal image through its mask, so no
//! generator can change a pixel outside the mask, whatever it returns. Model-free generators
//! (Perlin/DRAEM texture blend, CutPaste) live here; the diffusion generator joins later.

pub mod augment;
pub mod cutpaste;
pub mod masks;
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
    pub normal: &'a RgbImage,
    /// binary mask (0/255), same size as `normal`, at least one pixel set
    pub mask: &'a GrayImage,
    pub seed: u64,
    pub settings: &'a GeneratorSettings,
    /// anomaly source texture, when the campaign names a texture folder
    pub texture: Option<&'a RgbImage>,
}

pub trait Generator: Send + Sync {
    fn name(&self) -> &'static str;
    /// recorded in every manifest row; bump when outputs for the same inputs change
    fn version(&self) -> &'static str;
    /// content digest of the model weights, for model-based generators
    fn model_digest(&self) -> Option<String> {
        None
    }
    /// Paints a batch. Returns one image per input, each of its input's size.
    fn generate(&self, batch: &[GenInput<'_>]) -> Result<Vec<RgbImage>, GenError>;
}

/// The generators a worker can run, by campaign name.
pub fn registry() -> BTreeMap<&'static str, Arc<dyn Generator>> {
    let gens: Vec<Arc<dyn Generator>> = vec![
        Arc::new(perlin::PerlinGenerator),
        Arc::new(cutpaste::CutPasteGenerator),
        Arc::new(simple::NoopGenerator),
        Arc::new(simple::AttemptNoiseGenerator),
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
        let names: Vec<&str> = registry().keys().copied().collect();
        let mut known: Vec<&str> = defectforge::campaign::KNOWN_GENERATORS.to_vec();
        known.sort();
        assert_eq!(names, known);
    }
}
