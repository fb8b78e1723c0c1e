//! Benchmark: the foreground constraint per sample — object estimation on a normal image and
//! placement of a mask that lies partly off the object — at 256×256 (the AnomalyDiffusion
//! working size) and 1024×1024 (a full-resolution MVTec image). Results go to
//! docs/benchmarks.md ("Learned masks").
//!
//! `cargo bench -p defectforge --bench foreground` (env: ITERS=50)

use std::time::Instant;

use defectforge::foreground::{estimate_foreground, place_on_foreground, ForegroundParams};
use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::{Rng, SeedableRng};

fn scene(side: u32, rng: &mut impl Rng) -> (RgbImage, GrayImage) {
    // A textured disk (the part) on a noisy light background, and a blob mask straddling its rim.
    let c = side as f32 / 2.0;
    let r = side as f32 * 0.36;
    let img = RgbImage::from_fn(side, side, |x, y| {
        let d = ((x as f32 - c).powi(2) + (y as f32 - c).powi(2)).sqrt();
        let n: f32 = rng.gen_range(-12.0..12.0);
        let v = if d < r {
            80.0 + 20.0 * ((x / 7 + y / 5) % 2) as f32
        } else {
            205.0
        } + n;
        Rgb([v as u8, v as u8, (v * 0.9) as u8])
    });
    let (mx, my, mr) = (c + r * 0.95, c, side as f32 * 0.08);
    let mask = GrayImage::from_fn(side, side, |x, y| {
        let d = ((x as f32 - mx).powi(2) + ((y as f32 - my) * 1.6).powi(2)).sqrt();
        Luma([if d < mr { 255 } else { 0 }])
    });
    (img, mask)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("foreground: run with `cargo bench` (skipped under `cargo test`)");
        return;
    }
    let iters: u32 = std::env::var("ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for side in [256u32, 1024] {
        let (img, mask) = scene(side, &mut rng);
        let p = ForegroundParams::default();
        let t = Instant::now();
        let mut fg = estimate_foreground(&img, &p);
        for _ in 1..iters {
            fg = estimate_foreground(&img, &p);
        }
        let est = t.elapsed().as_secs_f64() / iters as f64;
        let t = Instant::now();
        let mut placed = place_on_foreground(&mask, &fg.mask, 0.98, &mut rng);
        for _ in 1..iters {
            placed = place_on_foreground(&mask, &fg.mask, 0.98, &mut rng);
        }
        let place = t.elapsed().as_secs_f64() / iters as f64;
        println!(
            "{side}x{side}: estimate {:.2} ms (distinct {}, separation {:.2}), place {:.2} ms ({}, coverage {:.3}), {iters} iterations",
            est * 1e3,
            fg.distinct,
            fg.separation,
            place * 1e3,
            placed.placement.as_str(),
            placed.coverage
        );
    }
}
