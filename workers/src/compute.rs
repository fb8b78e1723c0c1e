//! Per-sample compute of a generation shard: decode the inputs, build each sample's mask,
//! run the generators in batches off the async runtime, composite, encode, and the manifest
//! row of each committed sample.

use crate::generators::{self, composite, GenError, GenInput, Generator};
use crate::masks::{constrain, learned_masks_of, procedural, MaskAux, MaskPlacement};
use crate::protocol::JobError;
use bytes::Bytes;
use chrono::Utc;
use defectforge::campaign::MaskSource;
use defectforge::imaging::{self, ImageError};
use defectforge::manifest::ManifestRow;
use defectforge::messages::{SampleSpec, ShardMessage};
use defectforge::store::ObjectStore;
use defectforge::{ids, layout};
use image::{GrayImage, RgbImage};
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

pub(crate) struct Inputs {
    pub(crate) normal: Bytes,
    pub(crate) mask: Option<Bytes>,
    pub(crate) texture: Option<(String, Bytes)>,
}

pub(crate) struct Computed {
    pub(crate) image_png: Bytes,
    pub(crate) mask_png: Bytes,
    image_sha256: String,
    mask_sha256: String,
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) stats: imaging::MaskStats,
    pub(crate) change: (f32, f32),
    pub(crate) psnr: f32,
    pub(crate) normal_size: (u32, u32),
    pub(crate) generator: String,
    pub(crate) version: String,
    pub(crate) info: generators::SampleInfo,
    pub(crate) micros: u64,
    pub(crate) placement: MaskPlacement,
    pub(crate) latent_area: u32,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn row(
    msg: &ShardMessage,
    s: &SampleSpec,
    c: &Computed,
    store: &dyn ObjectStore,
    attempt: &str,
    worker_id: &str,
    per_sample_ms: f32,
    started_at: chrono::DateTime<Utc>,
    finished_at: chrono::DateTime<Utc>,
) -> ManifestRow {
    let t = &msg.types[s.type_idx as usize];
    ManifestRow {
        sample_id: s.sample_id.clone(),
        shard_id: msg.shard_id.clone(),
        campaign_id: msg.campaign_id.clone(),
        sample_index: s.index,
        category: t.category.clone(),
        defect_type: t.defect_type.clone(),
        image_uri: store.uri(&layout::sample_image(
            &msg.campaign_id,
            &s.sample_id,
            attempt,
        )),
        mask_uri: store.uri(&layout::sample_mask(
            &msg.campaign_id,
            &s.sample_id,
            attempt,
        )),
        normal_uri: s.normal_uri.clone(),
        mask_source: t.mask_source.as_str().to_string(),
        source_mask_uri: s.mask_uri.clone(),
        generator: c.generator.clone(),
        generator_version: c.version.clone(),
        model_digest: c.info.model_digest.clone(),
        seed: s.seed,
        generator_settings: serde_json::to_string(&t.settings).expect("settings serialize"),
        width: c.width,
        height: c.height,
        mask_area: c.stats.area,
        bbox_x: c.stats.bbox.0,
        bbox_y: c.stats.bbox.1,
        bbox_w: c.stats.bbox.2,
        bbox_h: c.stats.bbox.3,
        image_sha256: c.image_sha256.clone(),
        image_size: c.image_png.len() as u64,
        mask_sha256: c.mask_sha256.clone(),
        mask_size: c.mask_png.len() as u64,
        mean_abs_change_inside: c.change.0,
        mean_abs_change_outside: c.change.1,
        background_psnr: c.psnr,
        normal_width: c.normal_size.0,
        normal_height: c.normal_size.1,
        diffusion_steps: c.info.diffusion_steps,
        reweighting: c.info.reweighting.clone(),
        mask_placement: c.placement.action.clone(),
        foreground_coverage: c.placement.coverage,
        mask_attempts: c.placement.attempts,
        latent_mask_area: c.latent_area,
        thin_defect: c.latent_area == 0,
        worker_id: worker_id.to_string(),
        attempt: attempt.to_string(),
        duration_ms: per_sample_ms,
        started_at,
        finished_at,
    }
}

pub(crate) fn image_err(e: ImageError, s: &SampleSpec, uri: &str) -> JobError {
    JobError::Permanent {
        sample: Some((s.sample_id.clone(), s.index)),
        input_uri: Some(uri.to_string()),
        cause: format!("sample {} (#{}): {e}", s.sample_id, s.index),
    }
}

/// Decodes inputs, builds masks, runs the generators (batched per generator), composites,
/// encodes and hashes. CPU/GPU-bound: runs on a blocking thread.
pub(crate) fn compute(
    msg: &ShardMessage,
    inputs: Vec<Inputs>,
    gens: &BTreeMap<&'static str, Arc<dyn Generator>>,
    aux: &MaskAux,
    max_pixels: u64,
) -> Result<Vec<Computed>, JobError> {
    let mut normals: Vec<RgbImage> = vec![];
    let mut masks_v: Vec<GrayImage> = vec![];
    let mut textures: Vec<Option<RgbImage>> = vec![];
    let mut normal_sizes: Vec<(u32, u32)> = vec![];
    let mut placements: Vec<MaskPlacement> = vec![];
    let mut learned = learned_masks_of(msg, aux)?;
    for (i, (s, inp)) in msg.samples.iter().zip(&inputs).enumerate() {
        let t = &msg.types[s.type_idx as usize];
        let normal =
            imaging::decode_rgb_limited(&inp.normal, "normal image", &s.normal_uri, max_pixels)
                .map_err(|e| image_err(e, s, &s.normal_uri))?;
        let (w, h) = normal.dimensions();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed ^ 0x4d41_534b);
        let mut attempts = None;
        let mask = match (t.mask_source, &inp.mask, &s.mask_uri) {
            (MaskSource::Generated, _, _) => {
                let lm = learned
                    .remove(&i)
                    .expect("a learned mask per generated sample");
                attempts = Some(lm.attempts);
                imaging::resize_mask(&lm.mask, w, h)
            }
            (MaskSource::Bank, Some(b), Some(uri)) => {
                // Bank masks are stored at the mask model's resolution: resized to the image.
                let m = imaging::decode_mask_limited(b, uri, max_pixels)
                    .map_err(|e| image_err(e, s, uri))?;
                let m = if m.dimensions() == (w, h) {
                    m
                } else {
                    imaging::resize_mask(&m, w, h)
                };
                if imaging::mask_stats(&m).area == 0 {
                    return Err(image_err(
                        ImageError::EmptyMask { uri: uri.clone() },
                        s,
                        uri,
                    ));
                }
                m
            }
            (MaskSource::Real | MaskSource::Folder, Some(b), Some(uri)) => {
                let m = imaging::decode_mask_limited(b, uri, max_pixels)
                    .map_err(|e| image_err(e, s, uri))?;
                if m.dimensions() != (w, h) {
                    return Err(image_err(
                        ImageError::SizeMismatch {
                            mask_uri: uri.clone(),
                            image_uri: s.normal_uri.clone(),
                            mw: m.width(),
                            mh: m.height(),
                            iw: w,
                            ih: h,
                        },
                        s,
                        uri,
                    ));
                }
                if imaging::mask_stats(&m).area == 0 {
                    return Err(image_err(
                        ImageError::EmptyMask { uri: uri.clone() },
                        s,
                        uri,
                    ));
                }
                m
            }
            (MaskSource::Real | MaskSource::Folder | MaskSource::Bank, _, _) => {
                return Err(JobError::Permanent {
                    sample: Some((s.sample_id.clone(), s.index)),
                    input_uri: None,
                    cause: format!(
                        "sample {} uses mask source {:?} but names no mask file",
                        s.sample_id, t.mask_source
                    ),
                })
            }
            (MaskSource::Perlin, _, _) => {
                procedural::perlin_mask(w, h, &t.settings.perlin, &mut rng)
            }
            (MaskSource::Cutpaste, _, _) => {
                procedural::rect_mask(w, h, &t.settings.cutpaste, &mut rng)
            }
            (MaskSource::Scar, _, _) => procedural::scar_mask(w, h, &t.settings.cutpaste, &mut rng),
        };
        let (mask, placement) = constrain(&normal, mask, &t.settings.placement, aux, &mut rng)
            .map_err(|cause| JobError::Permanent {
                sample: Some((s.sample_id.clone(), s.index)),
                input_uri: t.settings.placement.mask_file.clone(),
                cause: format!("sample {} (#{}): {cause}", s.sample_id, s.index),
            })?;
        placements.push(MaskPlacement {
            attempts,
            ..placement
        });
        let texture = match &inp.texture {
            Some((uri, b)) => Some(
                imaging::decode_rgb_limited(b, "texture", uri, max_pixels)
                    .map_err(|e| image_err(e, s, uri))?,
            ),
            None => None,
        };
        let g = &gens[t.generator.as_str()];
        let (normal, mask) = match g.working_size(&t.settings) {
            Some((ww, wh)) if (ww, wh) != (w, h) => {
                let n = image::imageops::resize(
                    &normal,
                    ww,
                    wh,
                    image::imageops::FilterType::CatmullRom,
                );
                let m = imaging::resize_mask(&mask, ww, wh);
                if imaging::mask_stats(&m).area == 0 {
                    return Err(JobError::Permanent {
                        sample: Some((s.sample_id.clone(), s.index)),
                        input_uri: s.mask_uri.clone(),
                        cause: format!(
                            "sample {} (#{}): its mask vanishes when resized from {w}x{h} to the generator's {ww}x{wh}; use a coarser mask or full_resolution = true",
                            s.sample_id, s.index
                        ),
                    });
                }
                (n, m)
            }
            _ => (normal, mask),
        };
        normal_sizes.push((w, h));
        normals.push(normal);
        masks_v.push(mask);
        textures.push(texture);
    }
    // Batch per generator, keeping plan order in the result.
    let mut results: Vec<Option<(RgbImage, u64)>> = (0..msg.samples.len()).map(|_| None).collect();
    let mut by_gen: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, s) in msg.samples.iter().enumerate() {
        by_gen
            .entry(msg.types[s.type_idx as usize].generator.as_str())
            .or_default()
            .push(i);
    }
    for (gname, idx) in &by_gen {
        let g = &gens[gname];
        let batch: Vec<GenInput<'_>> = idx
            .iter()
            .map(|&i| GenInput {
                category: &msg.types[msg.samples[i].type_idx as usize].category,
                defect_type: &msg.types[msg.samples[i].type_idx as usize].defect_type,
                normal: &normals[i],
                mask: &masks_v[i],
                seed: msg.samples[i].seed,
                settings: &msg.types[msg.samples[i].type_idx as usize].settings,
                texture: textures[i].as_ref(),
            })
            .collect();
        let t = Instant::now();
        let out = g.generate(&batch).map_err(|e| match e {
            GenError::Input(c) => JobError::Permanent {
                sample: None,
                input_uri: None,
                cause: c,
            },
            GenError::Transient(c) => JobError::Transient(c),
        })?;
        let micros = t.elapsed().as_micros() as u64 / idx.len().max(1) as u64;
        if out.len() != idx.len() {
            return Err(JobError::Transient(format!(
                "generator {gname} returned {} images for {}",
                out.len(),
                idx.len()
            )));
        }
        for (&i, img) in idx.iter().zip(out) {
            if img.dimensions() != normals[i].dimensions() {
                return Err(JobError::Transient(format!(
                    "generator {gname} returned a {}x{} image for a {}x{} input",
                    img.width(),
                    img.height(),
                    normals[i].width(),
                    normals[i].height()
                )));
            }
            results[i] = Some((img, micros));
        }
    }
    let mut out = vec![];
    for (i, r) in results.into_iter().enumerate() {
        let (gen_img, micros) = r.expect("every sample generated");
        let t = &msg.types[msg.samples[i].type_idx as usize];
        let g = &gens[t.generator.as_str()];
        let final_img = if g.runner_composites(&t.settings) {
            composite(&normals[i], &gen_img, &masks_v[i])
        } else {
            gen_img
        };
        let change = imaging::change_inside_outside(&normals[i], &final_img, &masks_v[i]);
        let psnr = imaging::background_psnr(&normals[i], &final_img, &masks_v[i]);
        // encoding and hashing stay on this blocking thread, off the async runtime
        let image_png =
            imaging::encode_png_rgb(&final_img).map_err(|e| JobError::Transient(e.to_string()))?;
        let mask_png = imaging::encode_png_gray(&masks_v[i])
            .map_err(|e| JobError::Transient(e.to_string()))?;
        out.push(Computed {
            image_sha256: ids::sha256_hex(&image_png),
            mask_sha256: ids::sha256_hex(&mask_png),
            image_png: Bytes::from(image_png),
            mask_png: Bytes::from(mask_png),
            width: final_img.width(),
            height: final_img.height(),
            stats: imaging::mask_stats(&masks_v[i]),
            change,
            psnr,
            normal_size: normal_sizes[i],
            generator: g.name().to_string(),
            version: g.version().to_string(),
            info: g.describe(&t.settings),
            micros,
            placement: placements[i].clone(),
            latent_area: imaging::latent_mask_area(&masks_v[i]),
        });
    }
    Ok(out)
}
