//! Synthetic mask sources: DRAEM Perlin blobs, CutPaste rectangles and CutPaste scars
//! (reference/model_free_synthesis.md §5.1 steps 2–5 and §5.2). Every source returns a non-empty
//! binary mask at the normal image's own resolution.

use defectforge::campaign::{CutPasteSettings, PerlinSettings};
use image::{GrayImage, Luma};
use rand::Rng;
use std::f32::consts::PI;

/// Classic 2-D gradient Perlin noise over a `res.0`×`res.1` lattice with random gradient angles
/// and the quintic fade 6t⁵−15t⁴+10t³, scaled by √2 (≈ [−1, 1]). It is evaluated at continuous
/// coordinates, so any image size works and a rotation is a change of coordinates.
pub struct Perlin {
    res: (usize, usize),
    grads: Vec<(f32, f32)>,
}

impl Perlin {
    pub fn new(res: (usize, usize), rng: &mut impl Rng) -> Self {
        let grads = (0..(res.0 + 1) * (res.1 + 1))
            .map(|_| {
                let a = rng.gen_range(0.0..2.0 * PI);
                (a.cos(), a.sin())
            })
            .collect();
        Self { res, grads }
    }

    /// Noise at (u, v) in [0,1]² (lattice units are u·res.0, v·res.1).
    pub fn at(&self, u: f32, v: f32) -> f32 {
        let (x, y) = (u * self.res.0 as f32, v * self.res.1 as f32);
        let (x0, y0) = (
            (x.floor() as usize).min(self.res.0 - 1),
            (y.floor() as usize).min(self.res.1 - 1),
        );
        let (tx, ty) = (x - x0 as f32, y - y0 as f32);
        let g = |i: usize, j: usize| self.grads[j * (self.res.0 + 1) + i];
        let dot = |i: usize, j: usize, dx: f32, dy: f32| {
            let (gx, gy) = g(i, j);
            gx * dx + gy * dy
        };
        let fade = |t: f32| t * t * t * (t * (t * 6.0 - 15.0) + 10.0);
        let n00 = dot(x0, y0, tx, ty);
        let n10 = dot(x0 + 1, y0, tx - 1.0, ty);
        let n01 = dot(x0, y0 + 1, tx, ty - 1.0);
        let n11 = dot(x0 + 1, y0 + 1, tx - 1.0, ty - 1.0);
        let (fx, fy) = (fade(tx), fade(ty));
        let a = n00 + fx * (n10 - n00);
        let b = n01 + fx * (n11 - n01);
        std::f32::consts::SQRT_2 * (a + fy * (b - a))
    }
}

/// Draws Perlin noise rotated by U(−90°, 90°) (0 outside the rotated field), as in DRAEM.
pub fn perlin_field(w: u32, h: u32, s: &PerlinSettings, rng: &mut impl Rng) -> Vec<f32> {
    let kx = rng.gen_range(s.scale_exp[0]..=s.scale_exp[1]);
    let ky = rng.gen_range(s.scale_exp[0]..=s.scale_exp[1]);
    let p = Perlin::new((1 << kx, 1 << ky), rng);
    let t = rng.gen_range(-90.0f32..90.0).to_radians();
    let (c, sn) = (t.cos(), t.sin());
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let mut out = vec![0f32; (w * h) as usize];
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let sx = c * dx + sn * dy + cx;
            let sy = -sn * dx + c * dy + cy;
            if sx >= 0.0 && sy >= 0.0 && sx < w as f32 && sy < h as f32 {
                out[(y * w + x) as usize] = p.at(sx / w as f32, sy / h as f32);
            }
        }
    }
    out
}

/// A Perlin blob mask: noise > threshold, redrawn until non-empty. After 32 empty draws the
/// threshold is lowered to the field's 99th percentile so that a mask always exists.
pub fn perlin_mask(w: u32, h: u32, s: &PerlinSettings, rng: &mut impl Rng) -> GrayImage {
    let mut field = vec![];
    for _ in 0..32 {
        field = perlin_field(w, h, s, rng);
        if field.iter().any(|v| *v > s.threshold) {
            return to_mask(w, h, &field, s.threshold);
        }
    }
    let mut sorted = field.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let t = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
    let t = if sorted.last().copied().unwrap_or(0.0) > t {
        t
    } else {
        f32::NEG_INFINITY
    };
    to_mask(w, h, &field, t)
}

fn to_mask(w: u32, h: u32, field: &[f32], t: f32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        Luma([if field[(y * w + x) as usize] > t {
            255
        } else {
            0
        }])
    })
}

/// CutPaste patch size (w, h) for an image: area a ~ U(area), aspect r from [min,1) or [1,max].
pub fn cutpaste_size(w: u32, h: u32, s: &CutPasteSettings, rng: &mut impl Rng) -> (u32, u32) {
    let area = rng.gen_range(s.area[0]..=s.area[1]) * (w * h) as f32;
    let r = if rng.gen_bool(0.5) && s.aspect[0] < 1.0 {
        rng.gen_range(s.aspect[0]..1.0)
    } else {
        rng.gen_range(1.0f32..=s.aspect[1].max(1.0))
    };
    let pw = (area * r).sqrt().round().clamp(1.0, w as f32 - 1.0) as u32;
    let ph = (area / r).sqrt().round().clamp(1.0, h as f32 - 1.0) as u32;
    (pw.max(1), ph.max(1))
}

/// A CutPaste rectangle mask at a uniform position fully inside the image.
pub fn rect_mask(w: u32, h: u32, s: &CutPasteSettings, rng: &mut impl Rng) -> GrayImage {
    let (pw, ph) = cutpaste_size(w, h, s, rng);
    let x0 = rng.gen_range(0..=w - pw);
    let y0 = rng.gen_range(0..=h - ph);
    GrayImage::from_fn(w, h, |x, y| {
        Luma([if x >= x0 && x < x0 + pw && y >= y0 && y < y0 + ph {
            255
        } else {
            0
        }])
    })
}

/// A CutPaste scar: a thin rectangle (width U[2,16], length U[10,25] px at 256 px, scaled with
/// the shorter side) rotated by U(−45°, 45°) at a random position inside the image.
pub fn scar_mask(w: u32, h: u32, s: &CutPasteSettings, rng: &mut impl Rng) -> GrayImage {
    let scale = w.min(h) as f32 / 256.0;
    let sw = (rng.gen_range(s.scar_width[0]..=s.scar_width[1]) as f32 * scale).max(1.0);
    let sl = (rng.gen_range(s.scar_length[0]..=s.scar_length[1]) as f32 * scale).max(2.0);
    let t = rng.gen_range(-45.0f32..45.0).to_radians();
    let (c, sn) = (t.cos(), t.sin());
    // half extents of the rotated box, to keep it inside the image
    let ex = (sl / 2.0 * c.abs() + sw / 2.0 * sn.abs()).ceil();
    let ey = (sl / 2.0 * sn.abs() + sw / 2.0 * c.abs()).ceil();
    let cx = rng.gen_range(ex.min(w as f32 / 2.0)..=(w as f32 - ex).max(w as f32 / 2.0));
    let cy = rng.gen_range(ey.min(h as f32 / 2.0)..=(h as f32 - ey).max(h as f32 / 2.0));
    let mut m = GrayImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        let along = c * dx + sn * dy;
        let across = -sn * dx + c * dy;
        Luma([if along.abs() <= sl / 2.0 && across.abs() <= sw / 2.0 {
            255
        } else {
            0
        }])
    });
    if m.pixels().all(|p| p.0[0] == 0) {
        let (x, y) = ((cx as u32).min(w - 1), (cy as u32).min(h - 1));
        m.put_pixel(x, y, Luma([255]));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use defectforge::imaging::mask_stats;
    use rand::SeedableRng;

    #[test]
    fn masks_are_non_empty_at_any_size() {
        for seed in 0..40 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            for (w, h) in [(256, 256), (300, 171), (37, 64)] {
                let p = perlin_mask(w, h, &PerlinSettings::default(), &mut rng);
                assert_eq!(p.dimensions(), (w, h));
                assert!(mask_stats(&p).area > 0);
                let r = rect_mask(w, h, &CutPasteSettings::default(), &mut rng);
                let st = mask_stats(&r);
                assert!(st.area > 0 && st.bbox.0 + st.bbox.2 <= w && st.bbox.1 + st.bbox.3 <= h);
                let s = scar_mask(w, h, &CutPasteSettings::default(), &mut rng);
                assert!(mask_stats(&s).area > 0);
            }
        }
    }

    #[test]
    fn perlin_noise_is_bounded_and_zero_on_lattice() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let p = Perlin::new((4, 2), &mut rng);
        assert!(p.at(0.25, 0.5).abs() < 1e-6);
        for i in 0..100 {
            let v = p.at(i as f32 / 100.0, (i * 7 % 100) as f32 / 100.0);
            assert!(v.abs() <= 1.5, "{v}");
        }
    }
}
