//! Placing a defect mask onto the object: keep, move, scale or clip, with the coverage reached.

use image::GrayImage;
use rand::Rng;

use super::estimate::*;

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
pub(super) fn needed(n: u64, min_cov: f32) -> u64 {
    let mut k = ((min_cov as f64 * n as f64).floor() as u64).saturating_sub(1);
    while k < n && (k as f32 / n as f32) < min_cov {
        k += 1;
    }
    k
}

/// A binary mask as horizontal runs (y, x, len), with its bounding box and pixel count.
pub(super) struct Runs {
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
pub(super) struct FgPrefix {
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
pub(super) fn scale_mask(bits: &[bool], w: usize, h: usize, r: &Runs, s: f32) -> Vec<bool> {
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
