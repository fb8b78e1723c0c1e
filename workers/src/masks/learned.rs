//! Learned defect masks (`mask = "generated"` and `defectforge masks generate`): each defect
//! type's mask model (the LDM base with the type's mask embedding) sampled with classifier-free
//! guidance, binarised and checked with the official rule (engine `maskgen`), redrawn until a
//! mask is accepted.
//!
//! A mask depends only on its seed: draw k of a mask uses the noise of `attempt_seed(seed, k)`,
//! and the prompt (official templates, "random") is chosen from the seed, so a mask does not
//! depend on the other masks of its batch (up to floating-point reduction order, which can flip
//! pixels that sit on the threshold) and a resumed bank continues where it stopped.

use defectforge::campaign::MaskModelSettings;
use defectforge_engine::ad_model::AnomalyModel;
use defectforge_engine::maskgen::{MaskSamplerOptions, Rejection};
use defectforge_engine::PerSampleNoise;
use image::{GrayImage, Luma};

pub use super::{embedding_name, require_mask_model, DrawStats};
use crate::generators::GenError;

/// One accepted mask.
#[derive(Debug, Clone)]
pub struct LearnedMask {
    /// 0/255 at the model's resolution (256×256).
    pub mask: GrayImage,
    /// Draws until this one was accepted (1 = the first).
    pub attempts: u32,
    /// The prompt it was sampled with.
    pub prompt: String,
}

/// Why [`sample_accepted`] failed, and for which of its seeds (`None`: the whole call).
#[derive(Debug)]
pub struct DrawFailure {
    pub index: Option<usize>,
    pub error: GenError,
}

impl From<GenError> for DrawFailure {
    fn from(error: GenError) -> Self {
        Self { index: None, error }
    }
}

/// The noise seed of draw `attempt` (0-based) of the mask with `seed`.
pub fn attempt_seed(seed: u64, attempt: u32) -> u64 {
    if attempt == 0 {
        return seed;
    }
    // SplitMix64 finaliser over (seed, attempt): distinct, well-mixed streams per draw.
    let mut z = seed ^ (attempt as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn options(s: &MaskModelSettings) -> MaskSamplerOptions {
    MaskSamplerOptions {
        steps: s.steps as usize,
        eta: s.eta as f64,
        guidance: s.guidance as f64,
        threshold: s.threshold,
    }
}

/// Samples one accepted mask per seed for embedding `name`, redrawing rejected masks up to
/// `max_attempts` draws each; `progress` is told how many masks were accepted after each
/// batch. Fails (as bad input: the same seeds fail again) when a mask exhausts its draws,
/// naming the index of its seed.
pub fn sample_accepted(
    model: &AnomalyModel,
    name: &str,
    seeds: &[u64],
    s: &MaskModelSettings,
    stats: &mut DrawStats,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<LearnedMask>, DrawFailure> {
    let opts = options(s);
    let mut out: Vec<Option<LearnedMask>> = vec![None; seeds.len()];
    // (index, attempt) still to draw, in order.
    let mut pending: Vec<(usize, u32)> = (0..seeds.len()).map(|i| (i, 0)).collect();
    let mut rejects: Vec<DrawStats> = vec![DrawStats::default(); seeds.len()];
    let batch = s.batch.max(1) as usize;
    let mut done = 0usize;
    while !pending.is_empty() {
        let chunk: Vec<(usize, u32)> = pending.drain(..pending.len().min(batch)).collect();
        let noise_seeds: Vec<u64> = chunk
            .iter()
            .map(|&(i, a)| attempt_seed(seeds[i], a))
            .collect();
        let prompts: Vec<String> = noise_seeds
            .iter()
            .map(|&ns| {
                s.prompt
                    .render(&model.placeholder, || model.random_prompt(ns))
            })
            .collect();
        let names = vec![name.to_string(); chunk.len()];
        let mut noise = PerSampleNoise::new(&noise_seeds);
        let sampled = model
            .sample_masks(&prompts, &names, &opts, &mut noise)
            .map_err(|e| match e {
                defectforge_engine::EngineError::Invalid(m) => GenError::Input(m),
                e => GenError::Transient(e.to_string()),
            })?;
        let (w, h) = (sampled.width as u32, sampled.height as u32);
        for (k, &(i, a)) in chunk.iter().enumerate() {
            stats.drawn += 1;
            rejects[i].drawn += 1;
            let px = &sampled.masks[k];
            let mask = GrayImage::from_fn(w, h, |x, y| {
                Luma([if px[(y * w + x) as usize] != 0 {
                    255
                } else {
                    0
                }])
            });
            let thin = s.reject_thin
                && sampled.rejection[k].is_none()
                && defectforge::imaging::latent_mask_area(&mask) == 0;
            match (sampled.rejection[k], thin) {
                (None, false) => {
                    out[i] = Some(LearnedMask {
                        mask,
                        attempts: a + 1,
                        prompt: prompts[k].clone(),
                    });
                    done += 1;
                }
                (r, _) => {
                    match r {
                        Some(Rejection::Border) => {
                            stats.rejected_border += 1;
                            rejects[i].rejected_border += 1;
                        }
                        Some(Rejection::Empty) => {
                            stats.rejected_empty += 1;
                            rejects[i].rejected_empty += 1;
                        }
                        None => {
                            stats.rejected_thin += 1;
                            rejects[i].rejected_thin += 1;
                        }
                    }
                    if a + 1 >= s.max_attempts {
                        let r = rejects[i];
                        return Err(DrawFailure {
                            index: Some(i),
                            error: GenError::Input(format!(
                            "mask model {name:?}: no acceptable mask in {} draws for seed {} ({} spilled over a border line, {} were empty, {} thin); the embedding may be undertrained or the threshold ({}) wrong for it: look at a few masks with `defectforge masks generate`, or raise the draw limit (mask_model.max_attempts in a campaign, --max-attempts for a bank)",
                            r.drawn, seeds[i], r.rejected_border, r.rejected_empty, r.rejected_thin, s.threshold
                        )),
                        });
                    }
                    pending.push((i, a + 1));
                }
            }
        }
        progress(done);
    }
    Ok(out
        .into_iter()
        .map(|m| m.expect("every mask accepted"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_seeds_are_distinct_and_start_at_the_seed() {
        let s: Vec<u64> = (0..64).map(|a| attempt_seed(42, a)).collect();
        assert_eq!(s[0], 42);
        let mut u = s.clone();
        u.sort();
        u.dedup();
        assert_eq!(u.len(), s.len());
        assert_ne!(attempt_seed(43, 1), attempt_seed(42, 1));
    }

    #[test]
    fn rejection_rate_counts_both_reasons() {
        let mut a = DrawStats {
            drawn: 10,
            rejected_border: 2,
            rejected_empty: 1,
            rejected_thin: 0,
        };
        a.add(&DrawStats {
            drawn: 10,
            rejected_border: 0,
            rejected_empty: 0,
            rejected_thin: 1,
        });
        assert_eq!(a.rejected(), 4);
        assert!((a.rejection_rate() - 0.2).abs() < 1e-12);
        assert_eq!(DrawStats::default().rejection_rate(), 0.0);
    }
}
