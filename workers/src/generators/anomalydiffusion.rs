//! `generator = "anomalydiffusion"`: AnomalyDiffusion (Hu et al., AAAI 2024) through the
//! engine — spatial anomaly embedding, the blended DDIM sampler and adaptive attention
//! re-weighting — with a model imported by `defectforge models import`.
//!
//! The model works at 256×256. By default the runner resizes the normal image and the mask to
//! 256×256 (the manifest keeps the original size) and the output is the model's own image, as
//! the official code writes it (its background only approximates the normal image). Options:
//! `background_paste` pastes the normal image back outside the mask with a feathered edge;
//! `full_resolution` keeps the normal image's own size and composites the generated masked
//! region, upsampled, into the original. Samples may mix defect types within a batch; each
//! sample's noise comes from its own seed, so with the default `spatial_bn = "eval"` a sample
//! is the same whatever batch it lands in.

use std::sync::Arc;

use defectforge::campaign::{GeneratorSettings, Reweighting, SamplerKey, SpatialBn, ThinDefects};
use defectforge_engine::anomaly::{AarMode, SamplerOptions};
use defectforge_engine::spatial::BnMode;
use defectforge_engine::{candle, DType, PerSampleNoise, Tensor};
use image::{GrayImage, RgbImage};

use super::{GenError, GenInput, Generator, SampleInfo};
use crate::models::{LoadedModel, ModelCache};

/// The model's working resolution (one constant for core and worker).
pub const WORKING_SIZE: u32 = defectforge::imaging::AD_WORKING_SIZE;
/// Pixels per latent cell (the KL VAE's downsampling factor).
const LATENT_FACTOR: usize = 8;

pub struct AnomalyDiffusionGenerator {
    models: Arc<ModelCache>,
}

impl AnomalyDiffusionGenerator {
    pub fn new(models: Arc<ModelCache>) -> Self {
        Self { models }
    }
}

fn model_uri(model: Option<&str>) -> Result<&str, GenError> {
    model.ok_or_else(|| {
        GenError::Input("anomalydiffusion.model is not set (the campaign names no model)".into())
    })
}

/// The engine's re-weighting mode for a campaign's.
fn aar_mode(r: Reweighting) -> AarMode {
    match r {
        Reweighting::Off => AarMode::Off,
        Reweighting::Official => AarMode::Official,
        Reweighting::Legacy => AarMode::Legacy,
        Reweighting::Paper => AarMode::Paper,
    }
}

fn engine_err(e: defectforge_engine::EngineError) -> GenError {
    match e {
        defectforge_engine::EngineError::Invalid(m) => GenError::Input(m),
        e => GenError::Transient(e.to_string()),
    }
}

/// Distance (in pixels, chamfer 3-4 approximation) from every pixel to the nearest mask pixel.
fn distance_to_mask(mask: &GrayImage) -> Vec<f32> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let inf = f32::MAX / 4.0;
    let mut d: Vec<f32> = mask
        .pixels()
        .map(|p| if p.0[0] > 0 { 0.0 } else { inf })
        .collect();
    let (a, b) = (1.0f32, std::f32::consts::SQRT_2);
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let mut v = d[i];
            if x > 0 {
                v = v.min(d[i - 1] + a);
            }
            if y > 0 {
                v = v.min(d[i - w] + a);
                if x > 0 {
                    v = v.min(d[i - w - 1] + b);
                }
                if x + 1 < w {
                    v = v.min(d[i - w + 1] + b);
                }
            }
            d[i] = v;
        }
    }
    for y in (0..h).rev() {
        for x in (0..w).rev() {
            let i = y * w + x;
            let mut v = d[i];
            if x + 1 < w {
                v = v.min(d[i + 1] + a);
            }
            if y + 1 < h {
                v = v.min(d[i + w] + a);
                if x + 1 < w {
                    v = v.min(d[i + w + 1] + b);
                }
                if x > 0 {
                    v = v.min(d[i + w - 1] + b);
                }
            }
            d[i] = v;
        }
    }
    d
}

/// `generated` inside the mask, `normal` at `feather` pixels or more from it, a linear blend
/// in between (feather 0: an exact composite).
pub fn feathered_paste(
    normal: &RgbImage,
    generated: &RgbImage,
    mask: &GrayImage,
    feather: f32,
) -> RgbImage {
    let dist = distance_to_mask(mask);
    let mut out = normal.clone();
    for (i, (o, g)) in out.pixels_mut().zip(generated.pixels()).enumerate() {
        let a = if dist[i] == 0.0 {
            1.0
        } else if feather > 0.0 {
            (1.0 - dist[i] / feather).max(0.0)
        } else {
            0.0
        };
        if a > 0.0 {
            for c in 0..3 {
                let v = a * g.0[c] as f32 + (1.0 - a) * o.0[c] as f32;
                o.0[c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

fn to_tensors(
    normals: &[RgbImage],
    masks: &[GrayImage],
    model: &LoadedModel,
) -> Result<(Tensor, Tensor), GenError> {
    let dev = model.model.ldm.device().clone();
    let dtype = model.model.ldm.dtype();
    let n = WORKING_SIZE as usize;
    let mut px = Vec::with_capacity(normals.len() * n * n * 3);
    for img in normals {
        px.extend_from_slice(img.as_raw());
    }
    let mut mk = Vec::with_capacity(masks.len() * n * n);
    for m in masks {
        mk.extend(m.as_raw().iter().map(|&v| if v > 0 { 1f32 } else { 0.0 }));
    }
    let b = normals.len();
    let run = || -> candle::Result<(Tensor, Tensor)> {
        let x = Tensor::from_vec(px, (b, n, n, 3), &defectforge_engine::Device::Cpu)?;
        let x = defectforge_engine::ldm::image_u8_to_input(&x, dtype)
            .map_err(|e| candle::Error::Msg(e.to_string()))?
            .to_device(&dev)?;
        let m = Tensor::from_vec(mk, (b, 1, n, n), &defectforge_engine::Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(&dev)?;
        Ok((x, m))
    };
    run().map_err(|e| GenError::Transient(e.to_string()))
}

fn to_images(decoded: &Tensor) -> Result<Vec<RgbImage>, GenError> {
    let run = || -> candle::Result<Vec<RgbImage>> {
        let (b, _, h, w) = decoded.dims4()?;
        let px = ((decoded.to_dtype(DType::F32)? + 1.0)? * 127.5)?
            .clamp(0f32, 255f32)?
            .round()?
            .permute((0, 2, 3, 1))?
            .to_dtype(DType::U8)?
            .to_device(&defectforge_engine::Device::Cpu)?
            .flatten_all()?
            .to_vec1::<u8>()?;
        Ok(px
            .chunks_exact(h * w * 3)
            .take(b)
            .map(|c| RgbImage::from_raw(w as u32, h as u32, c.to_vec()).expect("sized"))
            .collect())
    };
    run().map_err(|e| GenError::Transient(e.to_string()))
}

#[async_trait::async_trait]
impl Generator for AnomalyDiffusionGenerator {
    fn name(&self) -> &'static str {
        "anomalydiffusion"
    }

    fn version(&self) -> &'static str {
        "1"
    }

    async fn prepare(&self, settings: &GeneratorSettings) -> Result<(), GenError> {
        let s = &settings.anomalydiffusion;
        let uri = model_uri(s.model.as_deref())?;
        let m = self.models.get(uri).await.map_err(|e| {
            if e.is_transient() {
                GenError::Transient(format!("loading model {uri}: {e}"))
            } else {
                GenError::Input(format!("model {uri}: {e}"))
            }
        })?;
        if let Some(e) = &s.embedding {
            if !m.manifest.defect_types.contains(e) {
                return Err(GenError::Input(format!(
                    "model {uri} has no anomaly embedding {e:?}; it knows: {}",
                    m.manifest.defect_types.join(", ")
                )));
            }
        }
        Ok(())
    }

    fn working_size(&self, settings: &GeneratorSettings) -> Option<(u32, u32)> {
        (!settings.anomalydiffusion.full_resolution).then_some((WORKING_SIZE, WORKING_SIZE))
    }

    fn runner_composites(&self, _settings: &GeneratorSettings) -> bool {
        false
    }

    fn describe(&self, settings: &GeneratorSettings) -> SampleInfo {
        let s = &settings.anomalydiffusion;
        SampleInfo {
            model_digest: s
                .model
                .as_deref()
                .and_then(|u| self.models.loaded(u))
                .map(|m| m.manifest.digest.clone()),
            diffusion_steps: Some(s.steps),
            reweighting: Some(s.reweighting.to_string()),
        }
    }

    fn generate(&self, batch: &[GenInput<'_>]) -> Result<Vec<RgbImage>, GenError> {
        // Sub-batches share one sampler call (the whole `SamplerKey`: model, steps, eta,
        // re-weighting, BatchNorm mode, thin-defect handling); everything else (embedding,
        // prompt, background paste, feather, full resolution) is each sample's own. The
        // results keep the input order.
        let mut groups: Vec<(SamplerKey, Vec<usize>)> = Vec::new();
        for (i, inp) in batch.iter().enumerate() {
            let key = inp.settings.anomalydiffusion.sampler_key();
            match groups.iter_mut().find(|(g, _)| *g == key) {
                Some((_, v)) => v.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        let mut out: Vec<Option<RgbImage>> = (0..batch.len()).map(|_| None).collect();
        for (key, idx) in groups {
            let uri = model_uri(key.model.as_deref())?;
            let model = self.models.loaded(uri).ok_or_else(|| {
                GenError::Transient(format!("model {uri} was not prepared before generating"))
            })?;
            let aar = aar_mode(key.reweighting);
            let bn = match key.spatial_bn {
                SpatialBn::Batch => BnMode::Batch,
                SpatialBn::Eval => BnMode::Eval,
            };
            let size = WORKING_SIZE;
            let mut normals = Vec::with_capacity(idx.len());
            let mut masks = Vec::with_capacity(idx.len());
            let mut prompts = Vec::with_capacity(idx.len());
            let mut names = Vec::with_capacity(idx.len());
            let mut seeds = Vec::with_capacity(idx.len());
            for &i in &idx {
                let inp = &batch[i];
                let s = &inp.settings.anomalydiffusion;
                let (n, m) = if inp.normal.dimensions() == (size, size) {
                    (inp.normal.clone(), inp.mask.clone())
                } else {
                    (
                        image::imageops::resize(
                            inp.normal,
                            size,
                            size,
                            image::imageops::FilterType::CatmullRom,
                        ),
                        defectforge::imaging::resize_mask(inp.mask, size, size),
                    )
                };
                if defectforge::imaging::mask_stats(&m).area == 0 {
                    return Err(GenError::Input(format!(
                        "a {}x{} mask of {}/{} vanishes at the model's {size}x{size}",
                        inp.mask.width(),
                        inp.mask.height(),
                        inp.category,
                        inp.defect_type
                    )));
                }
                normals.push(n);
                masks.push(m);
                prompts.push(s.prompt.render(&model.model.placeholder, || {
                    model.model.random_prompt(inp.seed)
                }));
                names.push(
                    s.embedding
                        .clone()
                        .unwrap_or_else(|| format!("{}+{}", inp.category, inp.defect_type)),
                );
                seeds.push(inp.seed);
            }
            let (x, m) = to_tensors(&normals, &masks, &model)?;
            let opts = SamplerOptions {
                steps: key.steps as usize,
                eta: key.eta() as f64,
                aar,
            };
            let mut noise = PerSampleNoise::new(&seeds);
            let dilate = key.thin_defects == ThinDefects::Dilate;
            let region = if dilate {
                Some(
                    defectforge_engine::anomaly::block_fill(&m, LATENT_FACTOR)
                        .map_err(engine_err)?,
                )
            } else {
                None
            };
            let decoded = model
                .model
                .generate_in_region(
                    &x,
                    &m,
                    region.as_ref(),
                    &prompts,
                    &names,
                    &opts,
                    bn,
                    &mut noise,
                )
                .map_err(engine_err)?;
            let images = to_images(&decoded)?;
            for ((k, &i), img) in idx.iter().enumerate().zip(images) {
                let inp = &batch[i];
                let s = &inp.settings.anomalydiffusion;
                let img = if s.full_resolution {
                    // full_resolution: upsample and composite into the original.
                    let (w, h) = inp.normal.dimensions();
                    let up = image::imageops::resize(
                        &img,
                        w,
                        h,
                        image::imageops::FilterType::CatmullRom,
                    );
                    feathered_paste(
                        inp.normal,
                        &up,
                        inp.mask,
                        s.feather_px * w.min(h) as f32 / size as f32,
                    )
                } else if s.background_paste || dilate {
                    // dilate samples whole latent cells around the mask: paste the normal
                    // image back outside it.
                    feathered_paste(&normals[k], &img, &masks[k], s.feather_px)
                } else {
                    img
                };
                out[i] = Some(img);
            }
        }
        Ok(out
            .into_iter()
            .map(|o| o.expect("every sample generated"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feathered_paste_is_exact_beyond_the_feather_and_blends_inside_it() {
        let normal = RgbImage::from_pixel(32, 32, image::Rgb([10, 20, 30]));
        let gen = RgbImage::from_pixel(32, 32, image::Rgb([210, 220, 230]));
        let mask = GrayImage::from_fn(32, 32, |x, y| {
            image::Luma([if (10..20).contains(&x) && (10..20).contains(&y) {
                255
            } else {
                0
            }])
        });
        let out = feathered_paste(&normal, &gen, &mask, 4.0);
        assert_eq!(
            out.get_pixel(15, 15).0,
            [210, 220, 230],
            "inside: generated"
        );
        assert_eq!(
            out.get_pixel(2, 2).0,
            [10, 20, 30],
            "far outside: exact normal"
        );
        assert_eq!(
            out.get_pixel(25, 15).0,
            [10, 20, 30],
            "6 px away: beyond the feather"
        );
        let band = out.get_pixel(21, 15).0[0];
        assert!(band > 10 && band < 210, "2 px away: blended ({band})");
        let hard = feathered_paste(&normal, &gen, &mask, 0.0);
        assert_eq!(hard, crate::generators::composite(&normal, &gen, &mask));
    }
}
