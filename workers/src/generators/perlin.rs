//! DRAEM-style texture blending (reference/model_free_synthesis.md §5.1 steps 6–7) inside a mask:
//! I′ = (1−β)·A + β·I on mask pixels, with anomaly opacity 1−β drawn from the campaign's
//! `opacity` range and the anomaly source A either a texture (resized, three distinct
//! augmenters) or the normal image itself, shifted and augmented ("self-augmentation"). The
//! normal image is never rotated; the generator never returns a clean image.

use super::{augment, GenError, GenInput, Generator};
use image::{imageops, RgbImage};
use rand::{Rng, SeedableRng};

pub struct PerlinGenerator;

/// The anomaly source for one sample.
fn anomaly_source(inp: &GenInput<'_>, rng: &mut impl Rng) -> RgbImage {
    let (w, h) = inp.normal.dimensions();
    let mut a = match inp.texture {
        Some(t) => imageops::resize(t, w, h, imageops::FilterType::Triangle),
        None => {
            // self-augmentation: the normal image shifted by a random offset (wrap-around)
            let (ox, oy) = (
                rng.gen_range(w / 4..=w.max(4) * 3 / 4),
                rng.gen_range(h / 4..=h.max(4) * 3 / 4),
            );
            RgbImage::from_fn(w, h, |x, y| {
                *inp.normal.get_pixel((x + ox) % w, (y + oy) % h)
            })
        }
    };
    augment::augment3(&mut a, rng);
    a
}

pub fn paint(inp: &GenInput<'_>) -> RgbImage {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(inp.seed ^ 0x5045_524c_494e);
    let [omin, omax] = inp.settings.perlin.opacity;
    for _ in 0..8 {
        let a = anomaly_source(inp, &mut rng);
        let opacity = if omax > omin {
            rng.gen_range(omin..=omax)
        } else {
            omax
        };
        let beta = 1.0 - opacity;
        let mut out = inp.normal.clone();
        let mut changed = false;
        for ((o, av), m) in out.pixels_mut().zip(a.pixels()).zip(inp.mask.pixels()) {
            if m.0[0] > 0 {
                for c in 0..3 {
                    let v = opacity * av.0[c] as f32 + beta * o.0[c] as f32;
                    let v = v.round().clamp(0.0, 255.0) as u8;
                    changed |= v != o.0[c];
                    o.0[c] = v;
                }
            }
        }
        if changed {
            return out;
        }
    }
    // The source matched the image everywhere under the mask eight times: invert it there.
    let mut out = inp.normal.clone();
    for (o, m) in out.pixels_mut().zip(inp.mask.pixels()) {
        if m.0[0] > 0 {
            o.0 = o.0.map(|v| 255 - v);
            if o.0 == [127, 127, 127] || o.0 == [128, 128, 128] {
                o.0 = [0, 0, 0];
            }
        }
    }
    out
}

impl Generator for PerlinGenerator {
    fn name(&self) -> &'static str {
        "perlin"
    }
    fn version(&self) -> &'static str {
        "1"
    }
    fn generate(&self, batch: &[GenInput<'_>]) -> Result<Vec<RgbImage>, GenError> {
        Ok(batch.iter().map(paint).collect())
    }
}
