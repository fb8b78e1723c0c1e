//! A shard's masks beyond its inputs: the learned masks of its generated-mask samples, sampled
//! per type in batches, and the foreground constraint.

use crate::generators::GenError;
use crate::protocol::JobError;
use defectforge::campaign::MaskSource;
use defectforge::imaging;
use defectforge::messages::ShardMessage;
use image::{GrayImage, RgbImage};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What the mask source and the foreground constraint did for one sample.
#[derive(Debug, Clone, Default)]
pub(crate) struct MaskPlacement {
    /// "off" or the placement outcome
    pub(crate) action: String,
    pub(crate) coverage: Option<f32>,
    pub(crate) attempts: Option<u32>,
}

/// What a shard's masks need beyond the sample inputs: the loaded mask models of the types
/// with generated masks, and the object masks named by `foreground_mask`.
#[derive(Default)]
pub(crate) struct MaskAux {
    pub(crate) models: HashMap<u32, Arc<crate::models::LoadedModel>>,
    /// decoded once per shard
    pub(crate) foreground_masks: HashMap<String, GrayImage>,
}

/// Samples the learned masks of every generated-mask sample of a shard, batched per type.
pub(crate) fn learned_masks_of(
    msg: &ShardMessage,
    aux: &MaskAux,
) -> Result<HashMap<usize, crate::masks::learned::LearnedMask>, JobError> {
    let mut by_type: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, s) in msg.samples.iter().enumerate() {
        if msg.types[s.type_idx as usize].mask_source == MaskSource::Generated {
            by_type.entry(s.type_idx).or_default().push(i);
        }
    }
    let mut out = HashMap::new();
    for (ti, idx) in by_type {
        let t = &msg.types[ti as usize];
        let m = aux.models.get(&ti).ok_or_else(|| {
            JobError::Transient(format!(
                "mask model of {}/{} not loaded",
                t.category, t.defect_type
            ))
        })?;
        let name = crate::masks::learned::embedding_name(
            &t.category,
            &t.defect_type,
            &t.settings.mask_model,
        );
        let seeds: Vec<u64> = idx
            .iter()
            .map(|&i| msg.samples[i].seed ^ 0x4c45_4152_4e4d_534b)
            .collect();
        let mut stats = crate::masks::learned::DrawStats::default();
        let masks = crate::masks::learned::sample_accepted(
            &m.model,
            &name,
            &seeds,
            &t.settings.mask_model,
            &mut stats,
            &mut |_| {},
        )
        .map_err(|f| {
            let sample = f.index.map(|k| &msg.samples[idx[k]]);
            match f.error {
                GenError::Input(c) => JobError::Permanent {
                    sample: sample.map(|s| (s.sample_id.clone(), s.index)),
                    input_uri: None,
                    cause: match sample {
                        Some(s) => format!(
                            "sample {} (#{}, seed {}) of {}/{}: {c}",
                            s.sample_id, s.index, s.seed, t.category, t.defect_type
                        ),
                        None => format!("{}/{}: {c}", t.category, t.defect_type),
                    },
                },
                GenError::Transient(c) => JobError::Transient(c),
            }
        })?;
        tracing::info!(
            category = %t.category,
            defect = %t.defect_type,
            masks = masks.len(),
            drawn = stats.drawn,
            rejected_border = stats.rejected_border,
            rejected_empty = stats.rejected_empty,
            rejected_thin = stats.rejected_thin,
            rejection_rate = stats.rejection_rate(),
            "learned masks sampled"
        );
        out.extend(idx.into_iter().zip(masks));
    }
    Ok(out)
}

/// Applies the foreground constraint to a mask (see `defectforge::foreground`).
pub(crate) fn constrain(
    normal: &RgbImage,
    mask: GrayImage,
    p: &defectforge::campaign::PlacementSettings,
    aux: &MaskAux,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<(GrayImage, MaskPlacement), String> {
    use defectforge::foreground;
    let (w, h) = normal.dimensions();
    use defectforge::campaign::PlacementMode;
    let fg = match (p.mode, &p.mask_file) {
        (PlacementMode::Estimate, _) => {
            foreground::estimate_foreground(normal, &foreground::ForegroundParams::default()).mask
        }
        (PlacementMode::File, Some(f)) => {
            let m = aux
                .foreground_masks
                .get(f)
                .ok_or_else(|| format!("foreground_mask {f} was not read"))?;
            if m.dimensions() == (w, h) {
                m.clone()
            } else {
                imaging::resize_mask(m, w, h)
            }
        }
        _ => {
            return Ok((
                mask,
                MaskPlacement {
                    action: "off".into(),
                    ..Default::default()
                },
            ))
        }
    };
    let placed = foreground::place_on_foreground(&mask, &fg, p.min_coverage, rng);
    Ok((
        placed.mask,
        MaskPlacement {
            action: placed.placement.as_str().to_string(),
            coverage: Some(placed.coverage),
            attempts: None,
        },
    ))
}
