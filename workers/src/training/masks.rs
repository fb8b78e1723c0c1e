//! The mask model's parts of a training run (`kind = "mask"`, shared/reference/
//! anomalydiffusion.md §5.1): masks read as RGB images and VAE-encoded, the plain
//! textual-inversion loss on the mask embeddings, and the preview of
//! sampled, post-processed masks with their acceptance.

use bytes::Bytes;
use defectforge::store::{self, S3Config};
use defectforge_engine::ad_model::AnomalyModel;
use defectforge_engine::maskgen::MaskSamplerOptions;
use defectforge_engine::noise::{PerSampleNoise, SplitMix64};
use defectforge_engine::train::{mask_training_loss, MaskLossBatch};
use defectforge_engine::Tensor;
use image::imageops::FilterType;

use super::{TrainError, MAX_INPUT_BYTES, TRAIN_SIZE};

/// Share of a mask's pixels allowed strictly between "dark" (≤ 63) and "bright" (≥ 192):
/// anti-aliased or JPEG-compressed edges stay far below it, a photo or a soft map does not.
const MAX_GREY_SHARE: f64 = 0.05;

/// Reads one ground-truth mask as the official mask loader does (an RGB image, bicubic-resized
/// to 256, scaled to [−1, 1]), `[3, 256, 256]` row-major, after checking that it marks a
/// defect and is a binary mask.
pub async fn load_mask_rgb(uri: &str, s3: &S3Config) -> Result<Vec<f32>, TrainError> {
    let (dir, name) = uri
        .rsplit_once('/')
        .ok_or_else(|| TrainError::Invalid(format!("{uri}: not a file")))?;
    let st = store::open(dir, s3).await?;
    let bytes: Bytes = st.get_limited(name, MAX_INPUT_BYTES).await?;
    let rgb = defectforge::imaging::decode_rgb(&bytes, "mask", uri)
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    check_binary(&rgb, uri)?;
    let s = TRAIN_SIZE as u32;
    let r = image::imageops::resize(&rgb, s, s, FilterType::CatmullRom);
    let n = TRAIN_SIZE * TRAIN_SIZE;
    let mut out = vec![0f32; 3 * n];
    for (p, px) in r.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + p] = px.0[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(out)
}

/// A mask must mark something and be binary (black background, white defect).
fn check_binary(img: &image::RgbImage, uri: &str) -> Result<(), TrainError> {
    let total = (img.width() as u64 * img.height() as u64).max(1);
    let (mut bright, mut grey) = (0u64, 0u64);
    for p in img.pixels() {
        let v = (p.0[0] as u32 + p.0[1] as u32 + p.0[2] as u32) / 3;
        if v >= 192 {
            bright += 1;
        } else if v > 63 {
            grey += 1;
        }
    }
    if bright == 0 {
        return Err(TrainError::Invalid(format!(
            "{uri} is empty (no white pixel): a mask-model example must mark its defect in white on black"
        )));
    }
    let share = grey as f64 / total as f64;
    if share > MAX_GREY_SHARE {
        return Err(TrainError::Invalid(format!(
            "{uri} is not a binary mask: {:.0} % of its pixels are grey (neither black nor white); use the ground-truth mask, white defect on black",
            share * 100.0
        )));
    }
    Ok(())
}

/// The mask loss of one batch: rows `picks` (type, example), with `rng`'s draws
/// ([`super::draw_batch`]).
pub fn batch_loss(
    model: &AnomalyModel,
    picks: &[(usize, usize)],
    masks: &[Vec<Vec<f32>>],
    names: &[String],
    rng: &mut SplitMix64,
) -> Result<(Tensor, Vec<String>), TrainError> {
    let b = picks.len();
    let dev = model.ldm.device().clone();
    let dtype = model.ldm.dtype();
    let s = TRAIN_SIZE;
    let mut flat = Vec::with_capacity(b * 3 * s * s);
    for &(t, i) in picks {
        flat.extend_from_slice(&masks[t][i]);
    }
    let images = Tensor::from_vec(flat, (b, 3, s, s), &dev)?.to_dtype(dtype)?;
    let d = super::draw_batch(model, &images, picks, names, rng)?;
    let out = mask_training_loss(
        model,
        &MaskLossBatch {
            latents: &d.latents,
            prompts: &d.prompts,
            names: &d.names,
            timesteps: &d.timesteps,
            noise: &d.eps,
        },
    )?;
    Ok((out.loss, d.names))
}

/// A preview: the PNG grid and each type's accepted share.
pub type Preview = (Vec<u8>, Vec<(String, f64)>);

/// Masks sampled per type for a preview.
pub const PREVIEW_MASKS: usize = 4;

/// The preview: per type one row of [`PREVIEW_MASKS`] masks sampled with fixed seeds from the
/// current embeddings and post-processed (binarised; a rejected one — border rule or empty —
/// drawn dimmed, in red), and per type the accepted share.
pub fn preview(
    model: &AnomalyModel,
    names: &[String],
    seed: u64,
    steps: usize,
) -> Result<Preview, TrainError> {
    let opts = MaskSamplerOptions {
        steps,
        ..Default::default()
    };
    let n = PREVIEW_MASKS;
    let mut rows = Vec::new();
    let mut acceptance = Vec::new();
    for name in names {
        let prompts: Vec<String> = (0..n as u64).map(|i| model.random_prompt(i)).collect();
        let seeds: Vec<u64> = (0..n as u64).map(|i| seed.wrapping_add(i)).collect();
        let out = model.sample_masks(
            &prompts,
            &vec![name.clone(); n],
            &opts,
            &mut PerSampleNoise::new(&seeds),
        )?;
        let ok = out.accepted.iter().filter(|a| **a).count();
        acceptance.push((name.clone(), ok as f64 / n as f64));
        rows.push((out.masks, out.accepted, out.width, out.height));
    }
    let (w, h) = rows
        .first()
        .map(|r| (r.2, r.3))
        .unwrap_or((TRAIN_SIZE, TRAIN_SIZE));
    let mut grid = image::RgbImage::new((n * w) as u32, (rows.len() * h) as u32);
    for (r, (masks, accepted, _, _)) in rows.iter().enumerate() {
        for (c, m) in masks.iter().enumerate() {
            for y in 0..h {
                for x in 0..w {
                    let on = m[y * w + x] > 0;
                    let px = match (on, accepted[c]) {
                        (true, true) => [255, 255, 255],
                        (true, false) => [160, 40, 40],
                        (false, true) => [0, 0, 0],
                        (false, false) => [40, 0, 0],
                    };
                    grid.put_pixel((c * w + x) as u32, (r * h + y) as u32, image::Rgb(px));
                }
            }
        }
    }
    let mut buf = std::io::Cursor::new(Vec::new());
    grid.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| TrainError::Invalid(format!("preview PNG: {e}")))?;
    Ok((buf.into_inner(), acceptance))
}
