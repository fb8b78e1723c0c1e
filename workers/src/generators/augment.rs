//! DRAEM's anomaly-source augmenters (reference/model_free_synthesis.md §5.1 step 6): three
//! distinct ones, drawn per sample, applied to the texture or to the self-augmented normal image.

use image::{Rgb, RgbImage};
use rand::seq::SliceRandom;
use rand::Rng;

type Aug = fn(&mut RgbImage, &mut dyn rand::RngCore);

fn gamma(img: &mut RgbImage, rng: &mut dyn rand::RngCore) {
    let g: [f32; 3] = [
        rng.gen_range(0.5..2.0),
        rng.gen_range(0.5..2.0),
        rng.gen_range(0.5..2.0),
    ];
    for p in img.pixels_mut() {
        for (v, g) in p.0.iter_mut().zip(g) {
            *v = (255.0 * (*v as f32 / 255.0).powf(g)).round() as u8;
        }
    }
}
fn brightness(img: &mut RgbImage, rng: &mut dyn rand::RngCore) {
    let m: f32 = rng.gen_range(0.8..1.2);
    let a: f32 = rng.gen_range(-30.0..30.0);
    for p in img.pixels_mut() {
        for c in 0..3 {
            p.0[c] = (p.0[c] as f32 * m + a).clamp(0.0, 255.0) as u8;
        }
    }
}
fn hue(img: &mut RgbImage, rng: &mut dyn rand::RngCore) {
    // rotate colours around the grey axis (a hue shift of up to ±50°)
    let t: f32 = rng.gen_range(-50.0f32..50.0).to_radians();
    let (c, s) = (t.cos(), t.sin());
    let k = (1.0 - c) / 3.0;
    let r3 = (1.0f32 / 3.0).sqrt() * s;
    let m = [
        [c + k, k - r3, k + r3],
        [k + r3, c + k, k - r3],
        [k - r3, k + r3, c + k],
    ];
    for p in img.pixels_mut() {
        let v = [p.0[0] as f32, p.0[1] as f32, p.0[2] as f32];
        for (i, row) in m.iter().enumerate() {
            p.0[i] = (row[0] * v[0] + row[1] * v[1] + row[2] * v[2]).clamp(0.0, 255.0) as u8;
        }
    }
}
fn solarize(img: &mut RgbImage, rng: &mut dyn rand::RngCore) {
    let t: u8 = rng.gen_range(32..=128);
    for p in img.pixels_mut() {
        for c in 0..3 {
            if p.0[c] >= t {
                p.0[c] = 255 - p.0[c];
            }
        }
    }
}
fn posterize(img: &mut RgbImage, rng: &mut dyn rand::RngCore) {
    let bits: u32 = rng.gen_range(2..=5);
    let mask = !((1u16 << (8 - bits)) - 1) as u8;
    for p in img.pixels_mut() {
        for c in 0..3 {
            p.0[c] &= mask;
        }
    }
}
fn invert(img: &mut RgbImage, _rng: &mut dyn rand::RngCore) {
    for p in img.pixels_mut() {
        for c in 0..3 {
            p.0[c] = 255 - p.0[c];
        }
    }
}
fn autocontrast(img: &mut RgbImage, _rng: &mut dyn rand::RngCore) {
    for c in 0..3 {
        let (mut lo, mut hi) = (255u8, 0u8);
        for p in img.pixels() {
            lo = lo.min(p.0[c]);
            hi = hi.max(p.0[c]);
        }
        if hi > lo {
            let s = 255.0 / (hi - lo) as f32;
            for p in img.pixels_mut() {
                p.0[c] = ((p.0[c] - lo) as f32 * s).round() as u8;
            }
        }
    }
}
fn sharpness(img: &mut RgbImage, rng: &mut dyn rand::RngCore) {
    let amount: f32 = rng.gen_range(0.5..2.0);
    let src = img.clone();
    let (w, h) = src.dimensions();
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let mut out = [0f32; 3];
            for (c, o) in out.iter_mut().enumerate() {
                let n = src.get_pixel(x - 1, y).0[c] as f32
                    + src.get_pixel(x + 1, y).0[c] as f32
                    + src.get_pixel(x, y - 1).0[c] as f32
                    + src.get_pixel(x, y + 1).0[c] as f32;
                let v = src.get_pixel(x, y).0[c] as f32;
                *o = v + amount * (v - n / 4.0);
            }
            img.put_pixel(x, y, Rgb(out.map(|v| v.clamp(0.0, 255.0) as u8)));
        }
    }
}
fn rotate(img: &mut RgbImage, rng: &mut dyn rand::RngCore) {
    let t: f32 = rng.gen_range(-45.0f32..45.0).to_radians();
    let src = img.clone();
    let (w, h) = src.dimensions();
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let (c, s) = (t.cos(), t.sin());
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        // sample with wrap-around so the whole patch stays textured
        let sx = (c * dx + s * dy + cx).rem_euclid(w as f32) as u32 % w;
        let sy = (-s * dx + c * dy + cy).rem_euclid(h as f32) as u32 % h;
        *p = *src.get_pixel(sx, sy);
    }
}

const AUGMENTERS: &[Aug] = &[
    gamma,
    brightness,
    sharpness,
    hue,
    solarize,
    posterize,
    invert,
    autocontrast,
    rotate,
];

/// Applies three distinct augmenters, chosen by `rng`.
pub fn augment3(img: &mut RgbImage, rng: &mut dyn rand::RngCore) {
    let mut idx: Vec<usize> = (0..AUGMENTERS.len()).collect();
    idx.shuffle(rng);
    for &i in &idx[..3] {
        AUGMENTERS[i](img, rng);
    }
}
