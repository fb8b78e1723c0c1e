//! Estimating the object of a normal image (steps 1–5 of the module documentation).

use image::{GrayImage, Luma, RgbImage};

/// Share of the border frame the thresholded pixels may cover before the image is suspected of
/// being a texture (step 5). An object whose tip touches an edge covers far less; a grid or
/// stripe texture covers more.
pub const TEXTURE_BORDER_FLOOR: f32 = 0.05;

/// Ratio of the thresholded pixels' share of the border frame to their share of the whole image
/// at or above which they are taken for a texture rather than an object (step 5). For a
/// stationary texture the two shares are about equal (ratio ≈ 1); for an object inside the frame
/// the frame share is small.
pub const TEXTURE_BORDER_RATIO: f32 = 0.75;

/// Smallest share of the image an object may cover (step 5); below it `F` is noise.
pub const MIN_OBJECT_FRACTION: f32 = 0.005;

/// Largest share of the image an object may cover (step 5); above it there is no background.
pub const MAX_OBJECT_FRACTION: f32 = 0.97;

/// Components smaller than this share of the largest one are dropped (step 4): dust, reflections
/// and shadow fragments, not the object.
pub const COMPONENT_KEEP_RATIO: f32 = 0.1;

/// Scale factors tried, in order, when no translation of the full-size mask fits.
pub const PLACEMENT_SCALES: [f32; 3] = [0.75, 0.5, 0.35];

/// Tuning of [`estimate_foreground`]. The defaults suit photographs of one object on a plain
/// background at 256–1024 pixels; see the module documentation for what each step does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForegroundParams {
    /// Width of the border frame that defines the background colour, as a fraction of the
    /// shorter image side (at least one pixel is used). Default 0.03.
    pub border_frac: f32,
    /// Minimum Otsu separation η (0..1) for the image to count as having a distinct object.
    /// Lower it to accept low-contrast objects, raise it to treat more images as textures.
    /// Default 0.6.
    pub min_separation: f32,
    /// Radius of the square opening that removes speckles (0 disables). Default 2.
    pub open_radius: u32,
    /// Radius of the square closing that bridges gaps in the object (0 disables). Default 5.
    pub close_radius: u32,
}

impl Default for ForegroundParams {
    fn default() -> Self {
        ForegroundParams {
            border_frac: 0.03,
            min_separation: 0.6,
            open_radius: 2,
            close_radius: 5,
        }
    }
}

/// Result of [`estimate_foreground`]: the object mask and the figures that justify it, so a
/// caller can log why an image was (or was not) treated as having a distinct object.
#[derive(Debug, Clone)]
pub struct Foreground {
    /// 0/255 mask of the image's size; 255 = object. All 255 when `distinct` is false.
    pub mask: GrayImage,
    /// Otsu threshold on the distance to the border colour (RGB units, 0..≈441).
    pub threshold: f32,
    /// Otsu separation η: between-class over total variance at the threshold (0..1).
    pub separation: f32,
    /// Share of the image covered by the cleaned-up region `F` (step 4), reported even when
    /// `distinct` is false so the reason can be seen; not the share of `mask` in that case.
    pub fraction: f32,
    /// Whether a distinct object was found; when false `mask` is all 255.
    pub distinct: bool,
}

/// Estimates the object of a normal image as a 0/255 mask by thresholding the colour distance to
/// the border (see the module documentation for the method). Never fails: an image without a
/// distinct object (or an empty image) yields `distinct = false` and an all-255 mask.
pub fn estimate_foreground(img: &RgbImage, p: &ForegroundParams) -> Foreground {
    let (w, h) = img.dimensions();
    let (wu, hu) = (w as usize, h as usize);
    let n = wu * hu;
    let whole = |threshold: f32, separation: f32, fraction: f32| Foreground {
        mask: GrayImage::from_pixel(w, h, Luma([255])),
        threshold,
        separation,
        fraction,
        distinct: false,
    };
    if n == 0 {
        return whole(0.0, 0.0, 0.0);
    }
    let b = border_width(wu, hu, p.border_frac);

    // 1. Border colour: per-channel median of the frame.
    let mut hist = [[0u64; 256]; 3];
    let mut frame_n = 0u64;
    for_each_frame(wu, hu, b, |i| {
        let px = &img.as_raw()[3 * i..3 * i + 3];
        for c in 0..3 {
            hist[c][px[c] as usize] += 1;
        }
        frame_n += 1;
    });
    let half = frame_n.div_ceil(2);
    let bg: [f32; 3] = std::array::from_fn(|c| {
        let mut acc = 0;
        hist[c]
            .iter()
            .position(|&k| {
                acc += k;
                acc >= half
            })
            .unwrap_or(0) as f32
    });

    // 2. Distance of the blurred image to the border colour.
    let blurred = box_blur3(img.as_raw(), wu, hu);
    let dist: Vec<f32> = blurred
        .chunks_exact(3)
        .map(|c| {
            let (r, g, bl) = (c[0] - bg[0], c[1] - bg[1], c[2] - bg[2]);
            (r * r + g * g + bl * bl).sqrt()
        })
        .collect();
    let max = dist.iter().fold(0f32, |a, &d| a.max(d));
    if max <= 0.0 {
        return whole(0.0, 0.0, 0.0);
    }

    // 3. Otsu on a 256-bin histogram over [0, max].
    let to_bin = 256.0 / max;
    let bin = |d: f32| ((d * to_bin) as usize).min(255);
    let mut dh = [0u64; 256];
    for &d in &dist {
        dh[bin(d)] += 1;
    }
    let (k, separation) = otsu(&dh, max);
    let threshold = (k + 1) as f32 * max / 256.0;

    // 4. Threshold and clean up.
    let mut f: Vec<u8> = dist.iter().map(|&d| u8::from(bin(d) > k)).collect();
    drop(dist);
    // Stationarity figures for step 5, taken before the clean-up reshapes the interior.
    let raw_fraction = f.iter().map(|&v| v as u64).sum::<u64>() as f32 / n as f32;
    let mut raw_on_frame = 0u64;
    for_each_frame(wu, hu, b, |i| raw_on_frame += u64::from(f[i]));
    let border_cover = raw_on_frame as f32 / frame_n as f32;
    let (ro, rc) = (p.open_radius as usize, p.close_radius as usize);
    if ro > 0 {
        f = morph(&f, wu, hu, ro, true);
        f = morph(&f, wu, hu, ro, false);
    }
    if rc > 0 {
        f = morph(&f, wu, hu, rc, false);
        f = morph(&f, wu, hu, rc, true);
    }
    fill_holes(&mut f, wu, hu);
    keep_large_components(&mut f, wu, hu, COMPONENT_KEEP_RATIO);

    // 5. Decide whether this is a distinct object.
    let count = f.iter().filter(|&&v| v != 0).count();
    let fraction = count as f32 / n as f32;
    let textured = border_cover >= TEXTURE_BORDER_FLOOR.max(TEXTURE_BORDER_RATIO * raw_fraction);
    let distinct = separation >= p.min_separation
        && (MIN_OBJECT_FRACTION..=MAX_OBJECT_FRACTION).contains(&fraction)
        && !textured;
    if !distinct {
        return whole(threshold, separation, fraction);
    }
    for v in f.iter_mut() {
        *v = if *v != 0 { 255 } else { 0 };
    }
    Foreground {
        mask: GrayImage::from_raw(w, h, f).expect("buffer has the image's size"),
        threshold,
        separation,
        fraction,
        distinct: true,
    }
}

/// Width of the border frame in pixels: `max(1, round(frac · min(w, h)))`, at most half the
/// shorter side so the frame never overlaps itself into nonsense.
pub(super) fn border_width(w: usize, h: usize, frac: f32) -> usize {
    let m = w.min(h);
    let b = (frac.max(0.0) * m as f32).round();
    let b = if b.is_finite() { b as usize } else { 0 };
    b.max(1).min(m.div_ceil(2).max(1))
}

/// Calls `f` with the linear index of every pixel in the frame of width `b`.
pub(super) fn for_each_frame(w: usize, h: usize, b: usize, mut f: impl FnMut(usize)) {
    for y in 0..h {
        let row = y * w;
        if y < b || y + b >= h {
            (0..w).for_each(|x| f(row + x));
        } else {
            let left = b.min(w);
            (0..left).for_each(|x| f(row + x));
            (w.saturating_sub(b).max(left)..w).for_each(|x| f(row + x));
        }
    }
}

/// 3×3 box blur of an interleaved RGB buffer (edges replicated), as f32.
pub(super) fn box_blur3(src: &[u8], w: usize, h: usize) -> Vec<f32> {
    let mut tmp = vec![0f32; src.len()];
    for y in 0..h {
        for x in 0..w {
            let (a, c) = (x.saturating_sub(1), (x + 1).min(w - 1));
            for ch in 0..3 {
                let at = |xx: usize| src[3 * (y * w + xx) + ch] as f32;
                tmp[3 * (y * w + x) + ch] = (at(a) + at(x) + at(c)) / 3.0;
            }
        }
    }
    let mut out = vec![0f32; src.len()];
    for y in 0..h {
        let (a, c) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for i in 0..3 * w {
            out[3 * y * w + i] =
                (tmp[3 * a * w + i] + tmp[3 * y * w + i] + tmp[3 * c * w + i]) / 3.0;
        }
    }
    out
}

/// Otsu's method on a histogram over `[0, max]` (bin centres as values). Returns the last bin of
/// the lower class and the separation η = between-class / total variance (0 for a flat image).
pub(super) fn otsu(hist: &[u64; 256], max: f32) -> (usize, f32) {
    let total: u64 = hist.iter().sum();
    let bw = max as f64 / 256.0;
    let centre = |i: usize| (i as f64 + 0.5) * bw;
    let p: Vec<f64> = hist.iter().map(|&c| c as f64 / total as f64).collect();
    let mu: f64 = (0..256).map(|i| p[i] * centre(i)).sum();
    let var: f64 = (0..256).map(|i| p[i] * (centre(i) - mu).powi(2)).sum();
    let (mut w0, mut s0) = (0f64, 0f64);
    let (mut best_k, mut best) = (0usize, -1f64);
    for (i, &pi) in p.iter().enumerate().take(255) {
        w0 += pi;
        s0 += pi * centre(i);
        let w1 = 1.0 - w0;
        if w0 <= 0.0 || w1 <= 1e-12 {
            continue;
        }
        let (m0, m1) = (s0 / w0, (mu - s0) / w1);
        let sb = w0 * w1 * (m0 - m1).powi(2);
        if sb > best {
            best = sb;
            best_k = i;
        }
    }
    let eta = if var > 0.0 && best > 0.0 {
        (best / var).min(1.0)
    } else {
        0.0
    };
    (best_k, eta as f32)
}

/// Binary erosion (`erode`) or dilation with a (2r+1)² square, separably with running-window
/// counts: O(pixels) whatever `r`. Windows are clipped at the image edge, so an object touching
/// the edge is not eaten from that side.
pub(super) fn morph(src: &[u8], w: usize, h: usize, r: usize, erode: bool) -> Vec<u8> {
    let mut tmp = vec![0u8; src.len()];
    let mut prefix = vec![0u32; w.max(h) + 1];
    let mut line = |get: &dyn Fn(usize) -> u8, len: usize, put: &mut dyn FnMut(usize, u8)| {
        for i in 0..len {
            prefix[i + 1] = prefix[i] + u32::from(get(i));
        }
        for i in 0..len {
            let (a, b) = (i.saturating_sub(r), (i + r + 1).min(len));
            let s = prefix[b] - prefix[a];
            let v = if erode { s as usize == b - a } else { s > 0 };
            put(i, u8::from(v));
        }
    };
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        let out = &mut tmp[y * w..(y + 1) * w];
        line(&|x| row[x], w, &mut |x, v| out[x] = v);
    }
    let mut out = vec![0u8; src.len()];
    for x in 0..w {
        line(&|y| tmp[y * w + x], h, &mut |y, v| out[y * w + x] = v);
    }
    out
}

/// Turns every background pixel that is not 4-connected to the image border through background
/// into foreground.
pub(super) fn fill_holes(f: &mut [u8], w: usize, h: usize) {
    let mut reached = vec![false; f.len()];
    let mut stack: Vec<usize> = Vec::new();
    let seed = |i: usize, reached: &mut Vec<bool>, stack: &mut Vec<usize>| {
        if f[i] == 0 && !reached[i] {
            reached[i] = true;
            stack.push(i);
        }
    };
    for x in 0..w {
        seed(x, &mut reached, &mut stack);
        seed((h - 1) * w + x, &mut reached, &mut stack);
    }
    for y in 0..h {
        seed(y * w, &mut reached, &mut stack);
        seed(y * w + w - 1, &mut reached, &mut stack);
    }
    while let Some(i) = stack.pop() {
        let (x, y) = (i % w, i / w);
        let mut visit = |j: usize| {
            if f[j] == 0 && !reached[j] {
                reached[j] = true;
                stack.push(j);
            }
        };
        if x > 0 {
            visit(i - 1);
        }
        if x + 1 < w {
            visit(i + 1);
        }
        if y > 0 {
            visit(i - w);
        }
        if y + 1 < h {
            visit(i + w);
        }
    }
    for (v, r) in f.iter_mut().zip(reached) {
        if !r {
            *v = 1;
        }
    }
}

/// Keeps the 8-connected components whose area is at least `ratio` times the largest one's.
pub(super) fn keep_large_components(f: &mut [u8], w: usize, h: usize, ratio: f32) {
    let mut label = vec![0u32; f.len()];
    let mut areas: Vec<u64> = vec![0];
    let mut stack: Vec<usize> = Vec::new();
    for start in 0..f.len() {
        if f[start] == 0 || label[start] != 0 {
            continue;
        }
        let id = areas.len() as u32;
        let mut area = 0u64;
        label[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            area += 1;
            let (x, y) = (i % w, i / w);
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    let j = ny * w + nx;
                    if f[j] != 0 && label[j] == 0 {
                        label[j] = id;
                        stack.push(j);
                    }
                }
            }
        }
        areas.push(area);
    }
    let largest = areas.iter().copied().max().unwrap_or(0);
    let min_area = ratio as f64 * largest as f64;
    for (v, &l) in f.iter_mut().zip(&label) {
        if l != 0 && (areas[l as usize] as f64) < min_area {
            *v = 0;
        }
    }
}
