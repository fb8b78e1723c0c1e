//! The official training data path after loading (shared/reference/anomalydiffusion.md §4.2,
//! `utils.py::random_transform` and `LatentDiffusion.get_input`), on CPU planes.
//!
//! Input: per sample a 512×512 RGB image in [−1, 1] (planar, `3·512·512`) and its binary mask
//! (`512·512`, 0/1). Output: a batch at 256×256, the images and the *soft* masks (bilinear,
//! not re-binarised), ready for the VAE and the loss.
//!
//! With probability ½ per batch (the official `random.random() < 0.5` in `get_input`):
//! 1. per sample, in the official order (all vertical flips, then all horizontal flips, then
//!    all rotations): vertical flip (p ½), horizontal flip (p ½), rotation by an integer angle
//!    in [0, 20] degrees counter-clockwise about the centre, nearest neighbour, fill 0
//!    (torchvision's tensor `rotate`: inverse map `src = R(−θ)·(dst − c) + c`,
//!    `c = ((w−1)/2, (h−1)/2)`, round half to even);
//! 2. the bounding box of every mask pixel > 0.5 over the whole batch;
//! 3. one crop for the whole batch: top ∈ [0, y_min], left ∈ [0, x_min], bottom ∈ (y_max, H],
//!    right ∈ (x_max, W] (uniform integers). The official code draws bottom/right in
//!    [y_max, H] and slices exclusively, so one time in (H − y_max + 1) it cuts the mask's last
//!    row or column; here the crop always contains every mask pixel;
//! 4. both resized to 256×256 (bilinear, align_corners=False, no antialias).
//!
//! Otherwise both are resized 512 → 256. Every draw comes from the caller's [`SplitMix64`].

use crate::noise::SplitMix64;

/// One loaded sample at the working size `size`×`size`.
#[derive(Debug, Clone)]
pub struct LoadedSample {
    /// `3·size·size`, planar RGB in [−1, 1].
    pub image: Vec<f32>,
    /// `size·size`, 0/1.
    pub mask: Vec<f32>,
}

/// A prepared batch at `out`×`out`.
#[derive(Debug, Clone)]
pub struct PreparedBatch {
    /// `B·3·out·out`.
    pub images: Vec<f32>,
    /// `B·out·out`, soft.
    pub masks: Vec<f32>,
    /// Whether the random transform was applied (for the training log).
    pub augmented: bool,
}

fn uniform_int(rng: &mut SplitMix64, lo: usize, hi: usize) -> usize {
    // inclusive [lo, hi]
    lo + (rng.next_u64() % (hi - lo + 1) as u64) as usize
}

fn flip_v(plane: &mut [f32], w: usize, h: usize) {
    for y in 0..h / 2 {
        let (a, b) = plane.split_at_mut((h - 1 - y) * w);
        a[y * w..y * w + w].swap_with_slice(&mut b[..w]);
    }
}

fn flip_h(plane: &mut [f32], w: usize, h: usize) {
    for y in 0..h {
        plane[y * w..y * w + w].reverse();
    }
}

/// torchvision `rotate(angle)` (counter-clockwise, nearest, fill 0) of one plane.
fn rotate(plane: &[f32], w: usize, h: usize, degrees: f64) -> Vec<f32> {
    if degrees == 0.0 {
        return plane.to_vec();
    }
    let r = (-degrees).to_radians();
    let (c, s) = (r.cos(), r.sin());
    let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
    let mut out = vec![0f32; w * h];
    for oy in 0..h {
        let y = oy as f64 - cy;
        for ox in 0..w {
            let x = ox as f64 - cx;
            let sx = (c * x + s * y + cx).round_ties_even();
            let sy = (-s * x + c * y + cy).round_ties_even();
            if sx >= 0.0 && sy >= 0.0 && (sx as usize) < w && (sy as usize) < h {
                out[oy * w + ox] = plane[sy as usize * w + sx as usize];
            }
        }
    }
    out
}

fn crop(
    plane: &[f32],
    w: usize,
    (top, left, bottom, right): (usize, usize, usize, usize),
) -> Vec<f32> {
    let mut out = Vec::with_capacity((bottom - top) * (right - left));
    for y in top..bottom {
        out.extend_from_slice(&plane[y * w + left..y * w + right]);
    }
    out
}

/// Prepares one batch (see the module documentation). `size` is the loaded size (512
/// official), `out` the training size (256). Samples must have the loaded size.
pub fn prepare_batch(
    samples: &[LoadedSample],
    size: usize,
    out: usize,
    augment: bool,
    rng: &mut SplitMix64,
) -> PreparedBatch {
    let n = size * size;
    let mut imgs: Vec<Vec<f32>> = samples.iter().map(|s| s.image.clone()).collect();
    let mut masks: Vec<Vec<f32>> = samples.iter().map(|s| s.mask.clone()).collect();
    for (i, m) in imgs.iter().zip(&masks) {
        assert_eq!(
            (i.len(), m.len()),
            (3 * n, n),
            "samples must be {size}x{size}"
        );
    }
    let augmented = augment && rng.next_open01() < 0.5;
    let mut window = (0, 0, size, size);
    if augmented {
        for k in 0..samples.len() {
            if rng.next_open01() < 0.5 {
                for c in 0..3 {
                    flip_v(&mut imgs[k][c * n..(c + 1) * n], size, size);
                }
                flip_v(&mut masks[k], size, size);
            }
        }
        for k in 0..samples.len() {
            if rng.next_open01() < 0.5 {
                for c in 0..3 {
                    flip_h(&mut imgs[k][c * n..(c + 1) * n], size, size);
                }
                flip_h(&mut masks[k], size, size);
            }
        }
        for k in 0..samples.len() {
            let angle = uniform_int(rng, 0, 20) as f64;
            let mut rotated = Vec::with_capacity(3 * n);
            for c in 0..3 {
                rotated.extend(rotate(&imgs[k][c * n..(c + 1) * n], size, size, angle));
            }
            imgs[k] = rotated;
            masks[k] = rotate(&masks[k], size, size, angle);
        }
        let (mut y0, mut x0, mut y1, mut x1) = (usize::MAX, usize::MAX, 0usize, 0usize);
        for m in &masks {
            for (p, &v) in m.iter().enumerate() {
                if v > 0.5 {
                    let (y, x) = (p / size, p % size);
                    y0 = y0.min(y);
                    x0 = x0.min(x);
                    y1 = y1.max(y);
                    x1 = x1.max(x);
                }
            }
        }
        if y0 != usize::MAX {
            let top = uniform_int(rng, 0, y0);
            let left = uniform_int(rng, 0, x0);
            let bottom = uniform_int(rng, y1 + 1, size);
            let right = uniform_int(rng, x1 + 1, size);
            window = (top, left, bottom, right);
        }
    }
    let (ch, cw) = (window.2 - window.0, window.3 - window.1);
    let resize = |plane: &[f32]| -> Vec<f32> {
        let p = if window == (0, 0, size, size) {
            plane.to_vec()
        } else {
            crop(plane, size, window)
        };
        defectforge_kernels::resize_bilinear_f32(&p, cw as u32, ch as u32, out as u32, out as u32)
    };
    let mut images = Vec::with_capacity(samples.len() * 3 * out * out);
    let mut soft = Vec::with_capacity(samples.len() * out * out);
    for (img, m) in imgs.iter().zip(&masks) {
        for c in 0..3 {
            images.extend(resize(&img[c * n..(c + 1) * n]));
        }
        soft.extend(resize(m));
    }
    PreparedBatch {
        images,
        masks: soft,
        augmented,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(size: usize, rect: (usize, usize, usize, usize)) -> LoadedSample {
        let n = size * size;
        let mut mask = vec![0f32; n];
        for y in rect.0..rect.2 {
            for x in rect.1..rect.3 {
                mask[y * size + x] = 1.0;
            }
        }
        let image = (0..3 * n).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect();
        LoadedSample { image, mask }
    }

    #[test]
    fn rotation_is_counter_clockwise_about_the_centre_with_zero_fill() {
        // a dot right of the centre moves up by a quarter turn
        let (w, h) = (9, 9);
        let mut p = vec![0f32; 81];
        p[4 * 9 + 7] = 1.0;
        let r = rotate(&p, w, h, 90.0);
        assert_eq!(r[9 + 4], 1.0, "{r:?}");
        assert_eq!(r.iter().sum::<f32>(), 1.0);
        // corners leave the image at 45°: zero fill there
        let ones = vec![1f32; 81];
        let r = rotate(&ones, w, h, 45.0);
        assert_eq!(r[0], 0.0);
        assert_eq!(r[4 * 9 + 4], 1.0);
    }

    #[test]
    fn the_crop_keeps_every_mask_pixel_and_masks_come_out_soft() {
        let size = 64;
        let batch = [
            sample(size, (10, 12, 30, 20)),
            sample(size, (40, 44, 50, 60)),
        ];
        let mut seen_aug = 0;
        let mut seen_soft = false;
        for seed in 0..40 {
            let mut rng = SplitMix64::new(seed);
            let b = prepare_batch(&batch, size, 32, true, &mut rng);
            assert_eq!(b.images.len(), 2 * 3 * 32 * 32);
            assert_eq!(b.masks.len(), 2 * 32 * 32);
            // every mask survives (some mass in each row of the batch)
            for m in b.masks.chunks(32 * 32) {
                assert!(m.iter().sum::<f32>() > 1.0, "seed {seed}: a mask vanished");
            }
            seen_soft |= b.masks.iter().any(|&v| v > 0.0 && v < 1.0);
            seen_aug += b.augmented as u32;
            // the same seed, the same batch
            let mut rng2 = SplitMix64::new(seed);
            let again = prepare_batch(&batch, size, 32, true, &mut rng2);
            assert_eq!(b.images, again.images);
            assert_eq!(b.masks, again.masks);
        }
        assert!(
            (8..=32).contains(&seen_aug),
            "p 0.5 per batch: {seen_aug}/40"
        );
        assert!(seen_soft);
        // without augmentation: a plain resize, the same every time
        let mut rng = SplitMix64::new(1);
        let plain = prepare_batch(&batch, size, 32, false, &mut rng);
        assert!(!plain.augmented);
        let direct = defectforge_kernels::resize_bilinear_f32(&batch[0].mask, 64, 64, 32, 32);
        assert_eq!(plain.masks[..1024], direct[..]);
    }
}
