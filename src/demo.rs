//! The built-in demo dataset: procedural, deterministic, MVTec-layout images generated at run
//! time (nothing binary ships in the repository). Two textures (carpet, wood) and one object
//! (bottle, a bright disc on a dark background), each with normal training images, a few defect
//! images and their ground-truth masks.

use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::Path;

/// Side length of demo images.
pub const SIZE: u32 = 256;

fn hash(x: i64, y: i64, s: u64) -> f32 {
    let mut h = (x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (y as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ s.wrapping_mul(0x1656_67B1_9E37_79F9);
    h ^= h >> 31;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 29;
    (h & 0xFFFF) as f32 / 65535.0
}

/// Smooth value noise in [0, 1] at a lattice cell size of `cell` pixels.
fn value_noise(x: f32, y: f32, cell: f32, s: u64) -> f32 {
    let (fx, fy) = (x / cell, y / cell);
    let (x0, y0) = (fx.floor() as i64, fy.floor() as i64);
    let (tx, ty) = (fx - x0 as f32, fy - y0 as f32);
    let sm = |t: f32| t * t * (3.0 - 2.0 * t);
    let (sx, sy) = (sm(tx), sm(ty));
    let a = hash(x0, y0, s) * (1.0 - sx) + hash(x0 + 1, y0, s) * sx;
    let b = hash(x0, y0 + 1, s) * (1.0 - sx) + hash(x0 + 1, y0 + 1, s) * sx;
    a * (1.0 - sy) + b * sy
}

fn carpet(seed: u64) -> RgbImage {
    RgbImage::from_fn(SIZE, SIZE, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        let weave = ((xf * 0.8).sin() * (yf * 0.8).cos()) * 0.5 + 0.5;
        let n = value_noise(xf, yf, 6.0, seed) * 0.6 + value_noise(xf, yf, 23.0, seed + 1) * 0.4;
        let v = 0.55 * n + 0.45 * weave;
        Rgb([
            (90.0 + 80.0 * v) as u8,
            (60.0 + 50.0 * v) as u8,
            (50.0 + 40.0 * v) as u8,
        ])
    })
}

fn wood(seed: u64) -> RgbImage {
    RgbImage::from_fn(SIZE, SIZE, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        let warp = value_noise(xf, yf, 40.0, seed) * 18.0;
        let ring = ((yf + warp) * 0.35).sin() * 0.5 + 0.5;
        let grain = value_noise(xf * 0.2, yf * 4.0, 3.0, seed + 7);
        let v = 0.7 * ring + 0.3 * grain;
        Rgb([
            (150.0 + 70.0 * v) as u8,
            (100.0 + 55.0 * v) as u8,
            (55.0 + 30.0 * v) as u8,
        ])
    })
}

fn bottle(seed: u64) -> RgbImage {
    let c = SIZE as f32 / 2.0 + (hash(1, 2, seed) - 0.5) * 6.0;
    RgbImage::from_fn(SIZE, SIZE, |x, y| {
        let (dx, dy) = (x as f32 - c, y as f32 - c);
        let r = (dx * dx + dy * dy).sqrt();
        let n = value_noise(x as f32, y as f32, 9.0, seed) * 20.0;
        if r < 92.0 {
            let rim = if r > 80.0 { 40.0 } else { 0.0 };
            let v = 150.0 + rim + n - r * 0.3;
            Rgb([v as u8, (v * 0.95) as u8, (v * 0.8) as u8])
        } else {
            let v = 18.0 + n * 0.5;
            Rgb([v as u8, v as u8, v as u8])
        }
    })
}

/// A defect mask: a blob (ellipse) or a thin line, by kind.
fn mask(kind: &str, seed: u64) -> GrayImage {
    let h = |i: i64| hash(i, 99, seed);
    let (cx, cy) = (70.0 + h(1) * 116.0, 70.0 + h(2) * 116.0);
    match kind {
        "line" => {
            let ang = h(3) * std::f32::consts::PI;
            let (ux, uy) = (ang.cos(), ang.sin());
            let len = 30.0 + h(4) * 40.0;
            GrayImage::from_fn(SIZE, SIZE, |x, y| {
                let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                let along = dx * ux + dy * uy;
                let across = -dx * uy + dy * ux;
                Luma([if along.abs() < len && across.abs() < 2.5 {
                    255
                } else {
                    0
                }])
            })
        }
        _ => {
            let (rx, ry) = (10.0 + h(5) * 20.0, 8.0 + h(6) * 16.0);
            GrayImage::from_fn(SIZE, SIZE, |x, y| {
                let (dx, dy) = ((x as f32 - cx) / rx, (y as f32 - cy) / ry);
                Luma([if dx * dx + dy * dy <= 1.0 { 255 } else { 0 }])
            })
        }
    }
}

/// (category, maker, [(defect type, mask kind)])
type Cat = (
    &'static str,
    fn(u64) -> RgbImage,
    &'static [(&'static str, &'static str)],
);
const CATEGORIES: &[Cat] = &[
    ("carpet", carpet, &[("color", "blob"), ("cut", "line")]),
    ("wood", wood, &[("scratch", "line")]),
    ("bottle", bottle, &[("broken_large", "blob")]),
];

/// Writes the demo dataset (MVTec layout) under `root`: per category 8 normal training images,
/// 6 good test images, and per defect type 6 defect images with their masks (so the few-shot
/// split takes 2 of them and 4 are left for evaluation).
pub fn materialise(root: &Path) -> std::io::Result<()> {
    let save = |img: &RgbImage, p: &Path| -> std::io::Result<()> {
        std::fs::create_dir_all(p.parent().expect("parent"))?;
        img.save(p).map_err(std::io::Error::other)
    };
    for (ci, (cat, make, defects)) in CATEGORIES.iter().enumerate() {
        let cseed = 1000 * ci as u64;
        for i in 0..8u64 {
            save(
                &make(cseed + i),
                &root.join(format!("{cat}/train/good/{i:03}.png")),
            )?;
        }
        // good test images (the evaluation's negatives), never in train/good
        for i in 0..6u64 {
            save(
                &make(cseed + 50 + i),
                &root.join(format!("{cat}/test/good/{i:03}.png")),
            )?;
        }
        for (di, (defect, kind)) in defects.iter().enumerate() {
            for i in 0..6u64 {
                let s = cseed + 100 * (di as u64 + 1) + i;
                let m = mask(kind, s);
                let mut img = make(s);
                for (x, y, p) in m.enumerate_pixels() {
                    if p.0[0] > 0 {
                        let q = img.get_pixel_mut(x, y);
                        q.0 = [q.0[0] / 3, q.0[1] / 3 + 60, q.0[2] / 2];
                    }
                }
                save(&img, &root.join(format!("{cat}/test/{defect}/{i:03}.png")))?;
                let mp = root.join(format!("{cat}/ground_truth/{defect}/{i:03}_mask.png"));
                std::fs::create_dir_all(mp.parent().expect("parent"))?;
                m.save(&mp).map_err(std::io::Error::other)?;
            }
        }
    }
    std::fs::write(
        root.join("README.txt"),
        "defectforge procedural demo dataset (MVTec AD layout), generated deterministically.\n",
    )
}

/// Materialises the demo dataset unless `root` already holds it; safe to call concurrently.
pub fn ensure(root: &Path) -> std::io::Result<()> {
    if root.join("README.txt").exists() {
        return Ok(());
    }
    let parent = root.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(".demo-{:08x}", rand::random::<u32>()));
    materialise(&tmp)?;
    match std::fs::rename(&tmp, root) {
        Ok(()) => Ok(()),
        Err(_) if root.join("README.txt").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn demo_is_deterministic_and_complete() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        materialise(a.path()).unwrap();
        materialise(b.path()).unwrap();
        for rel in [
            "carpet/train/good/003.png",
            "wood/ground_truth/scratch/005_mask.png",
            "bottle/test/broken_large/000.png",
        ] {
            assert_eq!(
                std::fs::read(a.path().join(rel)).unwrap(),
                std::fs::read(b.path().join(rel)).unwrap(),
                "{rel}"
            );
        }
        let m = image::open(a.path().join("carpet/ground_truth/cut/000_mask.png"))
            .unwrap()
            .to_luma8();
        assert!(crate::imaging::mask_stats(&m).area > 50);
    }
}
