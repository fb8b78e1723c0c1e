//! Object (foreground) estimation for normal images, and placement of defect masks onto it.
//!
//! Generated defect masks must lie on the *object* of a normal image (a screw, a nut, a pill),
//! not on the background it was photographed on: a scratch painted onto the white table next to
//! a screw is not a defect of the screw, and a dataset full of such samples teaches a detector the
//! wrong thing. This module gives (1) an estimate of where the object is ([`estimate_foreground`])
//! and (2) a placement step that keeps a mask that already lies on the object, or moves, shrinks
//! or clips it so that it does, and reports what it did ([`place_on_foreground`]).
//!
//! # How the foreground is estimated
//!
//! The method assumes the usual industrial-inspection photograph: one object in front of a fairly
//! uniform background that fills the image border. Step by step:
//!
//! 1. **Border colour.** The per-channel median of the pixels in a frame of width
//!    `max(1, round(border_frac · min(w, h)))` along the four image edges. The median (not the
//!    mean) ignores the part of the object that may touch an edge.
//! 2. **Distance image.** The image is smoothed with a 3×3 box blur to damp sensor noise; every
//!    pixel's value is then its Euclidean RGB distance to the border colour. Background pixels are
//!    near 0 whatever their texture or a faint shadow, object pixels are far.
//! 3. **Threshold.** Otsu's threshold on a 256-bin histogram of the distance over `[0, max]`. The
//!    *separation* η is the between-class variance divided by the total variance at that threshold
//!    (0..1): near 1 when the histogram has two well separated modes (object and background), low
//!    when it is one blurry mode (a texture, a uniform part).
//! 4. **Clean-up.** `F = distance > threshold`; a morphological opening (square of radius
//!    `open_radius`) removes speckles, a closing (radius `close_radius`) bridges small gaps; holes
//!    are filled (a background pixel that is not 4-connected to the image border through background
//!    becomes foreground, so dark spots, bores and printed labels on the object count as object);
//!    of the 8-connected components only those with an area ≥ 10 % of the largest are kept.
//! 5. **Is there a distinct object?** Not when η < `min_separation`, when `F` covers less than
//!    0.5 % or more than 97 % of the image, or when the thresholded pixels (before the clean-up)
//!    are about as dense in the border frame as in the whole image (their share of the frame is
//!    ≥ 5 % and ≥ 75 % of their share of the image): a texture, even a bimodal one such as
//!    stripes or a grid, continues across the edges, while an object sits inside them.
//!    Then `distinct = false` and the returned mask is all 255: the whole image counts as
//!    foreground (textures, uniform parts), so placement never intervenes.
//!
//! Every step is linear in the number of pixels (the morphology uses separable running-window
//! filters), so a 1024×1024 image takes a fraction of a second.
//!
//! # How a mask is placed
//!
//! [`place_on_foreground`] keeps the mask when enough of it lies on the foreground; otherwise it
//! searches *all* translations of the whole mask that keep it inside the image and picks one of
//! the good ones uniformly at random (so many masks do not pile up at one spot); failing that it
//! retries with the mask shrunk to 0.75, 0.5 and 0.35 of its size; failing that it clips the mask,
//! at its best translation, to the foreground. The [`Placement`] it reports says which of these
//! happened, so a manifest can record it and a reviewer can filter on it.

mod estimate;
mod place;

pub use estimate::*;
pub use place::*;

#[cfg(test)]
mod tests {
    use super::estimate::*;
    use super::place::*;
    use super::*;
    use image::Rgb;
    use image::{GrayImage, Luma, RgbImage};
    use rand::Rng;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Roughly Gaussian noise with standard deviation `sigma` (sum of three uniforms).
    fn noise(rng: &mut ChaCha8Rng, sigma: f32) -> f32 {
        (0..3).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>() * sigma
    }

    fn px(v: [f32; 3]) -> Rgb<u8> {
        Rgb(v.map(|c| c.round().clamp(0.0, 255.0) as u8))
    }

    /// Ellipse membership: centre (cx, cy), semi-axes (a, b), rotated by `t` radians.
    fn in_ellipse(x: f32, y: f32, e: (f32, f32, f32, f32, f32)) -> bool {
        let (cx, cy, a, b, t) = e;
        let (dx, dy) = (x - cx, y - cy);
        let (u, v) = (dx * t.cos() + dy * t.sin(), -dx * t.sin() + dy * t.cos());
        (u / a).powi(2) + (v / b).powi(2) <= 1.0
    }

    const ELLIPSE: (f32, f32, f32, f32, f32) = (150.0, 112.0, 70.0, 48.0, 0.4);

    fn truth_mask(w: u32, h: u32, e: (f32, f32, f32, f32, f32)) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| {
            Luma([if in_ellipse(x as f32, y as f32, e) {
                255
            } else {
                0
            }])
        })
    }

    /// A dark textured object on a light grey, noisy background with a shadow and a gradient.
    fn object_image(seed: u64) -> (RgbImage, GrayImage) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let shadow = (ELLIPSE.0 + 8.0, ELLIPSE.1 + 10.0, 74.0, 52.0, 0.4);
        let img = RgbImage::from_fn(256, 256, |x, y| {
            let (xf, yf) = (x as f32, y as f32);
            if in_ellipse(xf, yf, ELLIPSE) {
                let tex = 15.0 * ((xf * 0.3).sin() * (yf * 0.21).cos());
                let base = 80.0 + tex;
                px([base + 6.0, base, base - 8.0].map(|c| c + noise(&mut rng, 8.0)))
            } else {
                let mut v = 205.0 - 18.0 * xf / 256.0;
                if in_ellipse(xf, yf, shadow) {
                    v -= 25.0;
                }
                let n = noise(&mut rng, 6.0);
                px([v + n, v + n, v + n + 3.0].map(|c| c + noise(&mut rng, 3.0)))
            }
        });
        (img, truth_mask(256, 256, ELLIPSE))
    }

    /// The figures of a [`Foreground`] without its mask (for assertion messages).
    fn figs(f: &Foreground) -> String {
        format!(
            "distinct {} threshold {:.1} separation {:.3} fraction {:.4}",
            f.distinct, f.threshold, f.separation, f.fraction
        )
    }

    fn count(m: &GrayImage) -> u64 {
        m.as_raw().iter().filter(|&&v| v != 0).count() as u64
    }

    fn iou(a: &GrayImage, b: &GrayImage) -> f32 {
        let (mut i, mut u) = (0u64, 0u64);
        for (&p, &q) in a.as_raw().iter().zip(b.as_raw()) {
            i += u64::from(p != 0 && q != 0);
            u += u64::from(p != 0 || q != 0);
        }
        i as f32 / u as f32
    }

    fn outside(m: &GrayImage, fg: &GrayImage) -> u64 {
        m.as_raw()
            .iter()
            .zip(fg.as_raw())
            .filter(|(&a, &b)| a != 0 && b == 0)
            .count() as u64
    }

    fn shifted(m: &GrayImage, d: (i32, i32)) -> GrayImage {
        let mut out = GrayImage::new(m.width(), m.height());
        for (x, y, p) in m.enumerate_pixels() {
            if p.0[0] != 0 {
                out.put_pixel(
                    (x as i32 + d.0) as u32,
                    (y as i32 + d.1) as u32,
                    Luma([255]),
                );
            }
        }
        out
    }

    #[test]
    fn object_on_plain_background_is_found() {
        let (img, truth) = object_image(7);
        let t = std::time::Instant::now();
        let fg = estimate_foreground(&img, &ForegroundParams::default());
        eprintln!("estimate 256x256: {:?}", t.elapsed());
        let j = iou(&fg.mask, &truth);
        assert!(fg.distinct, "{}", figs(&fg));
        assert!(j > 0.95, "IoU {j}, {}", figs(&fg));
        assert!(fg.separation > 0.8, "{}", fg.separation);
        assert!((fg.fraction - count(&truth) as f32 / 65536.0).abs() < 0.01);
        assert!(fg.mask.as_raw().iter().all(|&v| v == 0 || v == 255));
    }

    #[test]
    fn dark_object_on_textured_gradient_background_is_found() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let e = (100.0, 140.0, 55.0, 40.0, -0.7);
        let img = RgbImage::from_fn(256, 256, |x, y| {
            let (xf, yf) = (x as f32, y as f32);
            if in_ellipse(xf, yf, e) {
                px([45.0, 40.0, 35.0].map(|c| c + noise(&mut rng, 10.0)))
            } else {
                let v =
                    150.0 + 35.0 * (xf + yf) / 512.0 + 10.0 * (xf * 0.5).sin() * (yf * 0.15).sin();
                px([v, v - 5.0, v + 5.0].map(|c| c + noise(&mut rng, 8.0)))
            }
        });
        let fg = estimate_foreground(&img, &ForegroundParams::default());
        let j = iou(&fg.mask, &truth_mask(256, 256, e));
        assert!(fg.distinct && j > 0.9, "IoU {j}, {}", figs(&fg));
    }

    #[test]
    fn textures_and_uniform_parts_have_no_distinct_object() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut cases: Vec<(&str, RgbImage)> = Vec::new();
        cases.push((
            "uniform noise",
            RgbImage::from_fn(256, 256, |_, _| Rgb([rng.gen(), rng.gen(), rng.gen()])),
        ));
        cases.push((
            "stripes",
            RgbImage::from_fn(256, 256, |x, _| {
                let v = if (x / 8) % 2 == 0 { 80.0 } else { 180.0 };
                px([v + noise(&mut rng, 5.0); 3])
            }),
        ));
        cases.push((
            "grid",
            RgbImage::from_fn(256, 256, |x, y| {
                let v = if x % 16 < 3 || y % 16 < 3 {
                    60.0
                } else {
                    170.0
                };
                px([v + noise(&mut rng, 5.0); 3])
            }),
        ));
        cases.push((
            "smooth blotches",
            RgbImage::from_fn(256, 256, |x, y| {
                let v = 128.0 + 60.0 * ((x as f32) * 0.09).sin() * ((y as f32) * 0.07).cos();
                px([v + noise(&mut rng, 4.0); 3])
            }),
        ));
        cases.push((
            "uniform part",
            RgbImage::from_fn(256, 256, |_, _| px([140.0 + noise(&mut rng, 3.0); 3])),
        ));
        cases.push(("flat", RgbImage::from_pixel(64, 48, Rgb([9, 9, 9]))));
        for (name, img) in cases {
            let fg = estimate_foreground(&img, &ForegroundParams::default());
            eprintln!("{name}: {}", figs(&fg));
            assert!(!fg.distinct, "{name}: {}", figs(&fg));
            assert!(fg.mask.as_raw().iter().all(|&v| v == 255), "{name}");
            assert_eq!(fg.mask.dimensions(), img.dimensions());
        }
        let empty = estimate_foreground(&RgbImage::new(0, 0), &ForegroundParams::default());
        assert!(!empty.distinct && empty.mask.dimensions() == (0, 0));
    }

    /// Random blob and rectangle masks of varied size and position (on the object, on the
    /// background, straddling the object's outline or the image edge, large).
    fn random_masks(seed: u64, n: usize) -> Vec<GrayImage> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let (cx, cy) = (
                    rng.gen_range(-10.0..266.0f32),
                    rng.gen_range(-10.0..266.0f32),
                );
                let big = i % 7 == 0;
                let s = if big { 25.0..45.0 } else { 3.0..20.0 };
                let (a, b) = (rng.gen_range(s.clone()), rng.gen_range(s));
                let t = rng.gen_range(0.0..std::f32::consts::PI);
                let rect = i % 3 == 0;
                GrayImage::from_fn(256, 256, |x, y| {
                    let (xf, yf) = (x as f32, y as f32);
                    let on = if rect {
                        (xf - cx).abs() <= a && (yf - cy).abs() <= b
                    } else {
                        let wob = 1.0 + 0.25 * ((yf - cy).atan2(xf - cx) * 3.0 + t).sin();
                        in_ellipse(xf, yf, (cx, cy, a * wob, b * wob, t))
                    };
                    Luma([if on { 255 } else { 0 }])
                })
            })
            .filter(|m| count(m) > 0)
            .collect()
    }

    #[test]
    fn placement_puts_masks_on_the_true_object() {
        let (_, truth) = object_image(7);
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let mut seen = std::collections::HashMap::new();
        let masks = random_masks(5, 80);
        let t = std::time::Instant::now();
        for m in &masks {
            let p = place_on_foreground(m, &truth, 1.0, &mut rng);
            *seen.entry(p.placement.as_str()).or_insert(0) += 1;
            if outside(m, &truth) == 0 {
                assert_eq!(p.placement, Placement::Kept);
            }
            match p.placement {
                Placement::Unplaceable => assert_eq!(&p.mask, m),
                Placement::Kept => {
                    assert_eq!(&p.mask, m);
                    assert!(!p.placement.intervened());
                }
                Placement::Moved => {
                    assert_eq!(count(&p.mask), count(m));
                    assert_eq!(p.mask, shifted(m, p.shift));
                }
                Placement::Scaled => assert!(PLACEMENT_SCALES.contains(&p.scale)),
                Placement::Clipped => {}
            }
            if p.placement != Placement::Unplaceable {
                assert_eq!(outside(&p.mask, &truth), 0, "{:?}", p.placement);
                assert!(count(&p.mask) > 0);
                assert_eq!(p.coverage, 1.0);
            }
        }
        eprintln!(
            "placed {} masks in {:?}: {seen:?}",
            masks.len(),
            t.elapsed()
        );
        assert!(seen.get("kept").copied().unwrap_or(0) > 3, "{seen:?}");
        assert!(seen.get("moved").copied().unwrap_or(0) > 20, "{seen:?}");
    }

    #[test]
    fn placement_on_estimated_foreground_lies_on_the_true_object() {
        let (img, truth) = object_image(21);
        let fg = estimate_foreground(&img, &ForegroundParams::default());
        assert!(fg.distinct);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for m in random_masks(8, 60) {
            let p = place_on_foreground(&m, &fg.mask, 1.0, &mut rng);
            if p.placement == Placement::Unplaceable {
                continue;
            }
            let on = 1.0 - outside(&p.mask, &truth) as f32 / count(&p.mask) as f32;
            assert!(on >= 0.98, "{:?}: {on}", p.placement);
        }
    }

    #[test]
    fn partial_coverage_threshold_is_respected() {
        let (_, truth) = object_image(7);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for m in random_masks(13, 40) {
            let p = place_on_foreground(&m, &truth, 0.7, &mut rng);
            if p.placement != Placement::Unplaceable {
                assert!(p.coverage >= 0.7, "{:?} {}", p.placement, p.coverage);
                let real = 1.0 - outside(&p.mask, &truth) as f32 / count(&p.mask) as f32;
                assert!((real - p.coverage).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn too_big_masks_are_scaled_or_clipped_onto_the_object() {
        let (_, truth) = object_image(7);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let square = |half: i32| {
            GrayImage::from_fn(256, 256, |x, y| {
                let on = (x as i32 - 128).abs() <= half && (y as i32 - 128).abs() <= half;
                Luma([if on { 255 } else { 0 }])
            })
        };
        let p = place_on_foreground(&square(60), &truth, 1.0, &mut rng);
        assert_eq!(p.placement, Placement::Scaled, "{}", p.scale);
        assert!(p.scale < 1.0 && p.placement.intervened());
        assert_eq!(outside(&p.mask, &truth), 0);
        let p = place_on_foreground(&square(127), &truth, 1.0, &mut rng);
        assert_eq!(p.placement, Placement::Clipped);
        assert_eq!(outside(&p.mask, &truth), 0);
        assert!(count(&p.mask) > 0 && p.coverage == 1.0);
    }

    #[test]
    fn unplaceable_inputs_come_back_unchanged() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut m = GrayImage::new(32, 32);
        m.put_pixel(3, 3, Luma([255]));
        let fg = GrayImage::from_pixel(16, 16, Luma([255]));
        let p = place_on_foreground(&m, &fg, 1.0, &mut rng);
        assert_eq!((p.placement, &p.mask), (Placement::Unplaceable, &m));
        let empty = GrayImage::new(32, 32);
        let full = GrayImage::from_pixel(32, 32, Luma([255]));
        let p = place_on_foreground(&empty, &full, 1.0, &mut rng);
        assert_eq!((p.placement, &p.mask), (Placement::Unplaceable, &empty));
        let p = place_on_foreground(&m, &empty, 1.0, &mut rng);
        assert_eq!((p.placement, &p.mask), (Placement::Unplaceable, &m));
        assert_eq!(Placement::Unplaceable.as_str(), "unplaceable");
        assert!(Placement::Unplaceable.intervened());
        // An all-255 foreground (no distinct object) never intervenes.
        let p = place_on_foreground(&m, &full, 1.0, &mut rng);
        assert_eq!((p.placement, &p.mask), (Placement::Kept, &m));
    }

    #[test]
    fn placement_is_deterministic_and_spreads_masks() {
        let (_, truth) = object_image(7);
        let mut m = GrayImage::new(256, 256);
        for y in 5..15 {
            for x in 5..15 {
                m.put_pixel(x, y, Luma([255]));
            }
        }
        let run = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..20)
                .map(|_| place_on_foreground(&m, &truth, 1.0, &mut rng).shift)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        let shifts = run(5);
        let distinct: std::collections::HashSet<_> = shifts.iter().collect();
        assert!(distinct.len() >= 18, "{shifts:?}");
    }

    #[test]
    fn large_images_are_estimated_and_placed() {
        let e = (600.0, 450.0, 300.0, 200.0, 0.3);
        let img = RgbImage::from_fn(1024, 1024, |x, y| {
            let v = if in_ellipse(x as f32, y as f32, e) {
                70
            } else {
                200
            };
            Rgb([v, v, v])
        });
        let fg = estimate_foreground(&img, &ForegroundParams::default());
        assert!(fg.distinct && iou(&fg.mask, &truth_mask(1024, 1024, e)) > 0.98);
        let mut m = GrayImage::new(1024, 1024);
        for y in 10..90 {
            for x in 10..70 {
                m.put_pixel(x, y, Luma([255]));
            }
        }
        let p = place_on_foreground(&m, &fg.mask, 1.0, &mut ChaCha8Rng::seed_from_u64(0));
        assert_eq!(p.placement, Placement::Moved);
        assert!(p
            .mask
            .enumerate_pixels()
            .all(|(x, y, v)| v.0[0] == 0 || fg.mask.get_pixel(x, y).0[0] > 0));
    }
}
