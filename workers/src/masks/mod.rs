//! Mask sources: procedural (Perlin, CutPaste, scar), learned (a type's mask model), banks
//! (learned masks drawn ahead by `mask_bank` jobs), and what a shard does with them: sampling
//! the learned masks of its generated-mask samples and the foreground constraint.

pub mod bank;
#[cfg(feature = "engine")]
pub(crate) mod bank_job;
#[cfg(feature = "engine")]
pub mod learned;
pub mod procedural;
#[cfg(feature = "engine")]
mod shard;

#[cfg(feature = "engine")]
pub(crate) use shard::{constrain, learned_masks_of, MaskAux, MaskPlacement};

use defectforge::campaign::MaskModelSettings;

/// Draw counts, for the rejection rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DrawStats {
    pub drawn: u64,
    pub rejected_border: u64,
    pub rejected_empty: u64,
    /// rejected because they vanish at the latent grid (`reject_thin`)
    #[serde(default)]
    pub rejected_thin: u64,
}

impl DrawStats {
    pub fn rejected(&self) -> u64 {
        self.rejected_border + self.rejected_empty + self.rejected_thin
    }
    /// Fraction of draws rejected (0 when nothing was drawn).
    pub fn rejection_rate(&self) -> f64 {
        if self.drawn == 0 {
            0.0
        } else {
            self.rejected() as f64 / self.drawn as f64
        }
    }
    pub fn add(&mut self, o: &DrawStats) {
        self.drawn += o.drawn;
        self.rejected_border += o.rejected_border;
        self.rejected_empty += o.rejected_empty;
        self.rejected_thin += o.rejected_thin;
    }
}

/// The mask embedding a type uses: the configured one or `<category>+<defect>`.
pub fn embedding_name(category: &str, defect: &str, s: &MaskModelSettings) -> String {
    s.embedding
        .clone()
        .unwrap_or_else(|| format!("{category}+{defect}"))
}

/// Checks that the model at `uri` has the mask model `name`; the error names the import that
/// adds it (or another embedding to pick).
pub fn require_mask_model(
    manifest: &crate::models::ModelManifest,
    uri: &str,
    name: &str,
) -> Result<(), String> {
    if manifest.mask_types.iter().any(|t| t == name) {
        return Ok(());
    }
    Err(format!(
        "model {uri} has no mask model {name:?} (it has: {}); import it with `defectforge models import … --mask-embeddings {name}=<train_mask.py embeddings.pt>`, or pick another embedding",
        if manifest.mask_types.is_empty() {
            "none".to_string()
        } else {
            manifest.mask_types.join(", ")
        }
    ))
}
