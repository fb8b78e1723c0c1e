//! CutPaste (reference/model_free_synthesis.md §5.2): a patch cut from another place of the same
//! image, colour-jittered (brightness, contrast, saturation, hue), pasted where the mask is set.
//! With rectangle or scar masks this is the paper's CutPaste / CutPaste-Scar; with any other mask
//! the mask's shape is filled from the displaced patch.

use super::{GenError, GenInput, Generator};
use image::RgbImage;
use rand::{Rng, SeedableRng};

pub struct CutPasteGenerator;

fn jitter(px: [u8; 3], b: f32, c: f32, s: f32, mean: f32) -> [u8; 3] {
    let v = px.map(|x| x as f32);
    let v = v.map(|x| x * b);
    let v = v.map(|x| (x - mean) * c + mean);
    let g = 0.299 * v[0] + 0.587 * v[1] + 0.114 * v[2];
    v.map(|x| ((x - g) * s + g).round().clamp(0.0, 255.0) as u8)
}

pub fn paint(inp: &GenInput<'_>) -> RgbImage {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(inp.seed ^ 0x4355_5450_4153);
    let (w, h) = inp.normal.dimensions();
    let st = defectforge::imaging::mask_stats(inp.mask);
    let (bx, by, bw, bh) = st.bbox;
    let j = inp.settings.cutpaste.jitter;
    let mean = {
        let s: u64 = inp
            .normal
            .pixels()
            .map(|p| p.0.iter().map(|&v| v as u64).sum::<u64>())
            .sum();
        s as f32 / (3 * w * h) as f32
    };
    for attempt in 0..8 {
        // source offset: the patch comes from elsewhere (wrap-around keeps it inside the image)
        // (bounded: an image too small for any far offset takes the last draw)
        let mut draw = (0, 0);
        for _ in 0..64 {
            let dx = rng.gen_range(0..w);
            let dy = rng.gen_range(0..h);
            draw = (dx, dy);
            let far =
                dx.min(w - dx) >= bw.min(w / 4).max(1) || dy.min(h - dy) >= bh.min(h / 4).max(1);
            if far || attempt > 4 {
                break;
            }
        }
        let (dx, dy) = draw;
        let b = 1.0 + rng.gen_range(-j..=j);
        let c = 1.0 + rng.gen_range(-j..=j);
        let s = 1.0 + rng.gen_range(-j..=j);
        let hue = rng.gen_range(-j..=j);
        let mut out = inp.normal.clone();
        let mut changed = false;
        for y in by..by + bh {
            for x in bx..bx + bw {
                if inp.mask.get_pixel(x, y).0[0] == 0 {
                    continue;
                }
                let src = inp.normal.get_pixel((x + dx) % w, (y + dy) % h).0;
                let mut v = jitter(src, b, c, s, mean);
                if hue != 0.0 {
                    // a small hue shift: rotate a fraction of each channel into the next
                    let k = hue.abs();
                    let (r, g, bl) = (v[0] as f32, v[1] as f32, v[2] as f32);
                    v = if hue > 0.0 {
                        [
                            (r * (1.0 - k) + bl * k) as u8,
                            (g * (1.0 - k) + r * k) as u8,
                            (bl * (1.0 - k) + g * k) as u8,
                        ]
                    } else {
                        [
                            (r * (1.0 - k) + g * k) as u8,
                            (g * (1.0 - k) + bl * k) as u8,
                            (bl * (1.0 - k) + r * k) as u8,
                        ]
                    };
                }
                let o = out.get_pixel_mut(x, y);
                changed |= o.0 != v;
                o.0 = v;
            }
        }
        if changed {
            return out;
        }
    }
    // a perfectly uniform image: nothing to displace, so darken the patch instead
    let mut out = inp.normal.clone();
    for (o, m) in out.pixels_mut().zip(inp.mask.pixels()) {
        if m.0[0] > 0 {
            o.0 = o.0.map(|v| if v > 127 { v / 2 } else { v / 2 + 128 });
        }
    }
    out
}

impl Generator for CutPasteGenerator {
    fn name(&self) -> &'static str {
        "cutpaste"
    }
    fn version(&self) -> &'static str {
        "1"
    }
    fn generate(&self, batch: &[GenInput<'_>]) -> Result<Vec<RgbImage>, GenError> {
        Ok(batch.iter().map(paint).collect())
    }
}
