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

use image::{GrayImage, Luma, RgbImage};
use rand::Rng;

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
fn border_width(w: usize, h: usize, frac: f32) -> usize {
    let m = w.min(h);
    let b = (frac.max(0.0) * m as f32).round();
    let b = if b.is_finite() { b as usize } else { 0 };
    b.max(1).min(m.div_ceil(2).max(1))
}

/// Calls `f` with the linear index of every pixel in the frame of width `b`.
fn for_each_frame(w: usize, h: usize, b: usize, mut f: impl FnMut(usize)) {
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
fn box_blur3(src: &[u8], w: usize, h: usize) -> Vec<f32> {
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
fn otsu(hist: &[u64; 256], max: f32) -> (usize, f32) {
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
fn morph(src: &[u8], w: usize, h: usize, r: usize, erode: bool) -> Vec<u8> {
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
fn fill_holes(f: &mut [u8], w: usize, h: usize) {
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
fn keep_large_components(f: &mut [u8], w: usize, h: usize, ratio: f32) {
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

/// What [`place_on_foreground`] did to a mask. Recorded per sample so that interventions can be
/// counted and reviewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The mask already lay on the foreground (coverage ≥ the minimum); it is unchanged.
    Kept,
    /// The whole mask was translated (same pixels, same shape) to a place on the foreground.
    Moved,
    /// No translation fitted; the mask was shrunk about its centre and then translated.
    Scaled,
    /// Nothing fitted even shrunk; the mask at its best translation was cut to the foreground.
    Clipped,
    /// The mask could not be placed (empty foreground, empty mask, size mismatch, or nothing
    /// overlaps); it is returned unchanged.
    Unplaceable,
}

impl Placement {
    /// Lower-case name for manifests and logs: "kept", "moved", "scaled", "clipped",
    /// "unplaceable".
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Kept => "kept",
            Placement::Moved => "moved",
            Placement::Scaled => "scaled",
            Placement::Clipped => "clipped",
            Placement::Unplaceable => "unplaceable",
        }
    }

    /// Whether placement changed (or failed to place) the mask, i.e. everything but `Kept`.
    pub fn intervened(self) -> bool {
        self != Placement::Kept
    }
}

/// Result of [`place_on_foreground`].
#[derive(Debug, Clone)]
pub struct Placed {
    /// The placed 0/255 mask (the input unchanged for `Kept` and `Unplaceable`).
    pub mask: GrayImage,
    /// What was done.
    pub placement: Placement,
    /// Fraction of the returned mask's pixels that lie on the foreground (0 for an empty mask or
    /// a size mismatch; 1 for `Clipped`).
    pub coverage: f32,
    /// Translation (dx, dy) in pixels applied to the mask (after scaling, for `Scaled`).
    pub shift: (i32, i32),
    /// Scale factor applied about the mask's bounding-box centre (1 unless `Scaled`).
    pub scale: f32,
}

/// Makes a defect mask lie on the foreground `fg` (nonzero = object), trying in order:
///
/// 1. **Kept**: coverage |M ∩ F| / |M| ≥ `min_coverage` (clamped to 0..1; NaN counts as 1).
/// 2. **Moved**: among all translations of the whole mask that keep its bounding box inside the
///    image and reach `min_coverage`, one chosen uniformly at random with `rng`.
/// 3. **Scaled**: the same with the mask shrunk (nearest neighbour, about its bounding-box centre)
///    to each of [`PLACEMENT_SCALES`] in turn.
/// 4. **Clipped**: the full-size mask at a translation with the largest overlap (ties broken with
///    `rng`), intersected with `fg`, if that overlap is non-empty.
/// 5. **Unplaceable** otherwise, and also when the sizes differ, the mask is empty or `fg` is
///    empty: the mask is returned unchanged.
///
/// The translation search is exact: for every candidate shift the overlap is summed over the
/// mask's horizontal runs with per-row prefix counts of `fg` (O(1) per run), abandoning a shift
/// as soon as too many pixels have missed. A blob on a 256×256 image takes about a millisecond.
/// The result depends only on the inputs and the state of `rng`.
pub fn place_on_foreground(
    mask: &GrayImage,
    fg: &GrayImage,
    min_coverage: f32,
    rng: &mut impl Rng,
) -> Placed {
    let unplaceable = |coverage: f32| Placed {
        mask: mask.clone(),
        placement: Placement::Unplaceable,
        coverage,
        shift: (0, 0),
        scale: 1.0,
    };
    if mask.dimensions() != fg.dimensions() {
        return unplaceable(0.0);
    }
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let bits: Vec<bool> = mask.as_raw().iter().map(|&v| v != 0).collect();
    let Some(runs) = Runs::of(&bits, w, h) else {
        return unplaceable(0.0);
    };
    let fgp = FgPrefix::new(fg);
    let inter0 = fgp.overlap(&runs, 0, 0);
    let coverage0 = inter0 as f32 / runs.total as f32;
    let min_cov = if min_coverage.is_nan() {
        1.0
    } else {
        min_coverage.clamp(0.0, 1.0)
    };
    if fgp.total == 0 {
        return unplaceable(coverage0);
    }
    let need0 = needed(runs.total, min_cov);
    if inter0 >= need0 {
        return Placed {
            mask: mask.clone(),
            placement: Placement::Kept,
            coverage: coverage0,
            shift: (0, 0),
            scale: 1.0,
        };
    }
    let choose = |runs: &Runs, need: u64, rng: &mut dyn rand::RngCore| {
        let valid = fgp.valid_shifts(runs, w, h, need);
        if valid.is_empty() {
            None
        } else {
            Some(valid[rng.gen_range(0..valid.len())])
        }
    };
    if let Some(d) = choose(&runs, need0, rng) {
        return Placed {
            mask: runs.render(w, h, d, None),
            placement: Placement::Moved,
            coverage: fgp.overlap(&runs, d.0, d.1) as f32 / runs.total as f32,
            shift: d,
            scale: 1.0,
        };
    }
    for &s in &PLACEMENT_SCALES {
        let scaled = scale_mask(&bits, w, h, &runs, s);
        let Some(sr) = Runs::of(&scaled, w, h) else {
            continue;
        };
        if let Some(d) = choose(&sr, needed(sr.total, min_cov), rng) {
            return Placed {
                mask: sr.render(w, h, d, None),
                placement: Placement::Scaled,
                coverage: fgp.overlap(&sr, d.0, d.1) as f32 / sr.total as f32,
                shift: d,
                scale: s,
            };
        }
    }
    let (best, ties) = fgp.best_shifts(&runs, w, h);
    if best == 0 || ties.is_empty() {
        return unplaceable(coverage0);
    }
    let d = ties[rng.gen_range(0..ties.len())];
    Placed {
        mask: runs.render(w, h, d, Some(fg)),
        placement: Placement::Clipped,
        coverage: 1.0,
        shift: d,
        scale: 1.0,
    }
}

/// Smallest overlap count `k` with `k / n >= min_cov` in f32, so the search and the reported
/// coverage agree exactly on what "enough" means.
fn needed(n: u64, min_cov: f32) -> u64 {
    let mut k = ((min_cov as f64 * n as f64).floor() as u64).saturating_sub(1);
    while k < n && (k as f32 / n as f32) < min_cov {
        k += 1;
    }
    k
}

/// A binary mask as horizontal runs (y, x, len), with its bounding box and pixel count.
struct Runs {
    runs: Vec<(usize, usize, usize)>,
    total: u64,
    x0: usize,
    x1: usize,
    y0: usize,
    y1: usize,
}

impl Runs {
    /// Runs of `bits` (row-major `w`×`h`); `None` when no bit is set.
    fn of(bits: &[bool], w: usize, h: usize) -> Option<Runs> {
        let mut r = Runs {
            runs: Vec::new(),
            total: 0,
            x0: usize::MAX,
            x1: 0,
            y0: usize::MAX,
            y1: 0,
        };
        for y in 0..h {
            let row = &bits[y * w..(y + 1) * w];
            let mut x = 0;
            while x < w {
                if !row[x] {
                    x += 1;
                    continue;
                }
                let start = x;
                while x < w && row[x] {
                    x += 1;
                }
                r.runs.push((y, start, x - start));
                r.total += (x - start) as u64;
                r.x0 = r.x0.min(start);
                r.x1 = r.x1.max(x - 1);
                r.y0 = r.y0.min(y);
                r.y1 = r.y1.max(y);
            }
        }
        (r.total > 0).then_some(r)
    }

    /// Range of shifts that keep the bounding box inside a `w`×`h` image.
    fn shift_range(&self, w: usize, h: usize) -> (i64, i64, i64, i64) {
        (
            -(self.x0 as i64),
            (w - 1 - self.x1) as i64,
            -(self.y0 as i64),
            (h - 1 - self.y1) as i64,
        )
    }

    /// The runs drawn at shift `d` as a 0/255 mask, optionally intersected with `clip`.
    fn render(&self, w: usize, h: usize, d: (i32, i32), clip: Option<&GrayImage>) -> GrayImage {
        let mut out = vec![0u8; w * h];
        for &(y, x, len) in &self.runs {
            let (ny, nx) = (
                (y as i64 + d.1 as i64) as usize,
                (x as i64 + d.0 as i64) as usize,
            );
            let start = ny * w + nx;
            let dst = &mut out[start..start + len];
            match clip {
                None => dst.fill(255),
                Some(c) => {
                    for (o, &f) in dst.iter_mut().zip(&c.as_raw()[start..start + len]) {
                        *o = if f != 0 { 255 } else { 0 };
                    }
                }
            }
        }
        GrayImage::from_raw(w as u32, h as u32, out).expect("buffer has the mask's size")
    }
}

/// Per-row prefix counts of the foreground: the overlap of a run with it is one subtraction.
struct FgPrefix {
    stride: usize,
    p: Vec<u32>,
    total: u64,
}

impl FgPrefix {
    fn new(fg: &GrayImage) -> FgPrefix {
        let (w, h) = (fg.width() as usize, fg.height() as usize);
        let stride = w + 1;
        let mut p = vec![0u32; stride * h];
        let raw = fg.as_raw();
        let mut total = 0u64;
        for y in 0..h {
            for x in 0..w {
                let v = u32::from(raw[y * w + x] != 0);
                p[y * stride + x + 1] = p[y * stride + x] + v;
            }
            total += p[y * stride + w] as u64;
        }
        FgPrefix { stride, p, total }
    }

    /// Overlap of a run at absolute row `y`, columns `x..x + len` with the foreground.
    #[inline]
    fn run(&self, y: usize, x: usize, len: usize) -> u64 {
        let base = y * self.stride + x;
        (self.p[base + len] - self.p[base]) as u64
    }

    /// |M ∩ F| with the mask shifted by (dx, dy) (the caller keeps it inside the image).
    fn overlap(&self, r: &Runs, dx: i32, dy: i32) -> u64 {
        r.runs
            .iter()
            .map(|&(y, x, len)| {
                let (ny, nx) = (
                    (y as i64 + dy as i64) as usize,
                    (x as i64 + dx as i64) as usize,
                );
                self.run(ny, nx, len)
            })
            .sum()
    }

    /// All in-image shifts with overlap ≥ `need`, in row-major order of (dy, dx).
    fn valid_shifts(&self, r: &Runs, w: usize, h: usize, need: u64) -> Vec<(i32, i32)> {
        let allowed = r.total - need.min(r.total);
        let (dx0, dx1, dy0, dy1) = r.shift_range(w, h);
        let mut out = Vec::new();
        for dy in dy0..=dy1 {
            for dx in dx0..=dx1 {
                let mut missed = 0u64;
                let ok = r.runs.iter().all(|&(y, x, len)| {
                    let got = self.run((y as i64 + dy) as usize, (x as i64 + dx) as usize, len);
                    missed += len as u64 - got;
                    missed <= allowed
                });
                if ok {
                    out.push((dx as i32, dy as i32));
                }
            }
        }
        out
    }

    /// The largest overlap over all in-image shifts and every shift reaching it (branch and
    /// bound: a shift is abandoned once even a perfect rest could not reach the best so far).
    fn best_shifts(&self, r: &Runs, w: usize, h: usize) -> (u64, Vec<(i32, i32)>) {
        let (dx0, dx1, dy0, dy1) = r.shift_range(w, h);
        let (mut best, mut ties) = (0u64, Vec::new());
        for dy in dy0..=dy1 {
            for dx in dx0..=dx1 {
                let (mut got, mut left) = (0u64, r.total);
                let complete = r.runs.iter().all(|&(y, x, len)| {
                    got += self.run((y as i64 + dy) as usize, (x as i64 + dx) as usize, len);
                    left -= len as u64;
                    got + left >= best
                });
                if !complete || got == 0 {
                    continue;
                }
                if got > best {
                    best = got;
                    ties.clear();
                }
                ties.push((dx as i32, dy as i32));
            }
        }
        (best, ties)
    }
}

/// The mask shrunk by `s` about its bounding-box centre with nearest-neighbour sampling.
fn scale_mask(bits: &[bool], w: usize, h: usize, r: &Runs, s: f32) -> Vec<bool> {
    let cx = (r.x0 + r.x1) as f32 / 2.0;
    let cy = (r.y0 + r.y1) as f32 / 2.0;
    let mut out = vec![false; w * h];
    let lo = |c: f32, a: usize| ((c - (c - a as f32) * s).floor() as i64 - 1).max(0) as usize;
    let hi = |c: f32, b: usize, n: usize| ((c + (b as f32 - c) * s).ceil() as usize + 1).min(n - 1);
    for y in lo(cy, r.y0)..=hi(cy, r.y1, h) {
        let sy = (cy + (y as f32 - cy) / s).round();
        if sy < r.y0 as f32 || sy > r.y1 as f32 {
            continue;
        }
        for x in lo(cx, r.x0)..=hi(cx, r.x1, w) {
            let sx = (cx + (x as f32 - cx) / s).round();
            if sx < r.x0 as f32 || sx > r.x1 as f32 {
                continue;
            }
            out[y * w + x] = bits[sy as usize * w + sx as usize];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;
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
