//! The detection and localisation metrics of AnomalyDiffusion's evaluation (reference §7.2),
//! with scikit-learn's definitions (`roc_auc_score`, `average_precision_score`, the F1 maximum
//! over `precision_recall_curve`) and the MVTec AU-PRO of the official `au_pro_util.py`.
//! Ties are handled as scikit-learn does: one curve point per distinct score.

/// Cumulative (true positives, false positives) at each distinct score, highest first.
fn curve(scores: &[f32], labels: &[bool]) -> Vec<(f64, f64)> {
    assert_eq!(scores.len(), labels.len(), "one label per score");
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut out = Vec::new();
    let (mut tp, mut fp) = (0f64, 0f64);
    for (k, &i) in idx.iter().enumerate() {
        if labels[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        let last = k + 1 == idx.len() || scores[idx[k + 1]] != scores[i];
        if last {
            out.push((tp, fp));
        }
    }
    out
}

fn counts(labels: &[bool]) -> (f64, f64) {
    let p = labels.iter().filter(|&&l| l).count() as f64;
    (p, labels.len() as f64 - p)
}

/// ROC curve points (fpr, tpr) from (0, 0); None unless both classes are present.
pub fn roc_curve(scores: &[f32], labels: &[bool]) -> Option<Vec<(f64, f64)>> {
    let (p, n) = counts(labels);
    if p == 0.0 || n == 0.0 {
        return None;
    }
    let mut pts = vec![(0.0, 0.0)];
    pts.extend(
        curve(scores, labels)
            .into_iter()
            .map(|(tp, fp)| (fp / n, tp / p)),
    );
    Some(pts)
}

/// Area under the ROC curve (trapezoidal, as `roc_auc_score`).
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let pts = roc_curve(scores, labels)?;
    Some(
        pts.windows(2)
            .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
            .sum(),
    )
}

/// Precision–recall points (recall, precision), one per distinct score, highest score first;
/// None without positives.
pub fn pr_curve(scores: &[f32], labels: &[bool]) -> Option<Vec<(f64, f64)>> {
    let (p, _) = counts(labels);
    if p == 0.0 {
        return None;
    }
    Some(
        curve(scores, labels)
            .into_iter()
            .map(|(tp, fp)| (tp / p, tp / (tp + fp)))
            .collect(),
    )
}

/// Average precision: Σ (Rₖ − Rₖ₋₁)·Pₖ over the distinct scores (`average_precision_score`).
pub fn average_precision(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let pts = pr_curve(scores, labels)?;
    let mut prev_r = 0.0;
    let mut ap = 0.0;
    for (r, pr) in pts {
        ap += (r - prev_r) * pr;
        prev_r = r;
    }
    Some(ap)
}

fn f1(p: f64, r: f64) -> f64 {
    if p + r > 0.0 {
        2.0 * p * r / (p + r)
    } else {
        0.0
    }
}

/// The maximum F1 over the precision–recall curve (the image-level F1-max).
pub fn f1_max(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let pts = pr_curve(scores, labels)?;
    Some(pts.into_iter().map(|(r, p)| f1(p, r)).fold(0.0, f64::max))
}

/// The pixel F1-max of the official script: F1 of `score ≥ t` at t = 0, 0.05, …, 1.0.
pub fn f1_max_at_thresholds(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let (p, _) = counts(labels);
    if p == 0.0 {
        return None;
    }
    // counts per 0.05 bin, so every threshold is one cumulative sum away
    let mut pos = [0f64; 22];
    let mut neg = [0f64; 22];
    for (&s, &l) in scores.iter().zip(labels) {
        // the number of thresholds t_k = k/20 with s ≥ t_k, minus one
        let k = (0..=20)
            .rev()
            .find(|&k| s >= k as f32 * 0.05)
            .map_or(21, |k| k);
        if l {
            pos[k] += 1.0;
        } else {
            neg[k] += 1.0;
        }
    }
    let mut best: f64 = 0.0;
    for t in 0..=20 {
        // predicted positive at t_k: every bin k' ≥ t (bin 21 = below every threshold)
        let tp: f64 = pos[t..=20].iter().sum();
        let fp: f64 = neg[t..=20].iter().sum();
        let prec = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
        best = best.max(f1(prec, tp / p));
    }
    Some(best)
}

/// Connected components (8-connectivity, scipy's `label` with a 3×3 structure of ones) of a
/// binary map; 0 = background, components numbered from 1.
pub fn label_components(gt: &[bool], w: usize, h: usize) -> (Vec<u32>, u32) {
    let mut lab = vec![0u32; w * h];
    let mut n = 0;
    let mut stack = vec![];
    for start in 0..w * h {
        if !gt[start] || lab[start] != 0 {
            continue;
        }
        n += 1;
        lab[start] = n;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = ((i % w) as isize, (i / w) as isize);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if gt[j] && lab[j] == 0 {
                        lab[j] = n;
                        stack.push(j);
                    }
                }
            }
        }
    }
    (lab, n)
}

/// The PRO curve (fpr ascending, pro) of the official `compute_pro`: thresholds at `n`
/// equidistant positions of the sorted anomaly-free pixel scores; PRO = mean over ground-truth
/// components of the fraction of the component scored above the threshold.
pub fn pro_curve(
    maps: &[&[f32]],
    gts: &[&[bool]],
    w: usize,
    h: usize,
    n: usize,
) -> Option<Vec<(f64, f64)>> {
    let mut ok = vec![];
    let mut comps: Vec<Vec<f32>> = vec![];
    for (m, g) in maps.iter().zip(gts) {
        let (lab, k) = label_components(g, w, h);
        let first = comps.len();
        comps.extend((0..k).map(|_| vec![]));
        for (i, &l) in lab.iter().enumerate() {
            if l == 0 {
                ok.push(m[i]);
            } else {
                comps[first + l as usize - 1].push(m[i]);
            }
        }
    }
    if comps.is_empty() || ok.is_empty() {
        return None;
    }
    ok.sort_by(f32::total_cmp);
    for c in &mut comps {
        c.sort_by(f32::total_cmp);
    }
    let mut idx = vec![0usize; comps.len()];
    let mut pts = vec![(1.0, 1.0)];
    let len = ok.len();
    for j in 0..n {
        // np.linspace(0, len − 1, n, dtype=int): computed in floats, truncated
        let pos = if n > 1 {
            ((len - 1) as f64 * j as f64 / (n - 1) as f64) as usize
        } else {
            0
        };
        let thr = ok[pos];
        let fpr = 1.0 - (pos + 1) as f64 / len as f64;
        let mut pro = 0.0;
        for (c, i) in comps.iter().zip(idx.iter_mut()) {
            while *i < c.len() && c[*i] <= thr {
                *i += 1;
            }
            pro += 1.0 - *i as f64 / c.len() as f64;
        }
        pts.push((fpr, pro / comps.len() as f64));
    }
    pts.reverse();
    Some(pts)
}

/// The trapezoidal integral of `pts` (x ascending) up to `x_max`, with the official code's
/// interpolated correction when `x_max` is not a sample point.
fn trapezoid_to(pts: &[(f64, f64)], x_max: f64) -> f64 {
    let mut correction = 0.0;
    if !pts.iter().any(|p| p.0 == x_max) {
        // bisect_right
        let ins = pts.partition_point(|p| p.0 <= x_max);
        if ins > 0 && ins < pts.len() {
            let (x0, y0) = pts[ins - 1];
            let (x1, y1) = pts[ins];
            let yi = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0);
            correction = 0.5 * (yi + y0) * (x_max - x0);
        }
    }
    let kept: Vec<_> = pts.iter().filter(|p| p.0 <= x_max).collect();
    kept.windows(2)
        .map(|w| 0.5 * (w[1].1 + w[0].1) * (w[1].0 - w[0].0))
        .sum::<f64>()
        + correction
}

/// AU-PRO up to FPR `limit` (0.3 in the paper), normalised by `limit`, 100 thresholds.
pub fn au_pro(maps: &[&[f32]], gts: &[&[bool]], w: usize, h: usize, limit: f64) -> Option<f64> {
    let pts = pro_curve(maps, gts, w, h, 100)?;
    Some(trapezoid_to(&pts, limit) / limit)
}

/// The image score: the maximum of the 21×21 average-pooled map (stride 1, zero padding 10;
/// `avg_pool2d` counts the padding, so the divisor is always 441).
pub fn image_score(map: &[f32], w: usize, h: usize) -> f32 {
    const K: isize = 21;
    const P: isize = 10;
    let mut sat = vec![0f64; (w + 1) * (h + 1)];
    for y in 0..h {
        let mut row = 0f64;
        for x in 0..w {
            row += map[y * w + x] as f64;
            sat[(y + 1) * (w + 1) + x + 1] = sat[y * (w + 1) + x + 1] + row;
        }
    }
    let at = |x: isize, y: isize| -> f64 {
        let x = x.clamp(0, w as isize) as usize;
        let y = y.clamp(0, h as isize) as usize;
        sat[y * (w + 1) + x]
    };
    let mut best = f64::MIN;
    for y in 0..h as isize {
        for x in 0..w as isize {
            let (x0, y0) = (x - P, y - P);
            let (x1, y1) = (x0 + K, y0 + K);
            let s = at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0);
            best = best.max(s / (K * K) as f64);
        }
    }
    best as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_and_inverted_rankings() {
        let s = [0.9, 0.8, 0.2, 0.1];
        let l = [true, true, false, false];
        assert_eq!(auroc(&s, &l), Some(1.0));
        assert_eq!(average_precision(&s, &l), Some(1.0));
        assert_eq!(f1_max(&s, &l), Some(1.0));
        let inv = [false, false, true, true];
        assert_eq!(auroc(&s, &inv), Some(0.0));
        assert_eq!(auroc(&s, &[true; 4]), None);
        // all tied: chance
        assert_eq!(auroc(&[0.5; 4], &l), Some(0.5));
    }

    #[test]
    fn image_score_pools_before_the_maximum() {
        let (w, h) = (32, 32);
        let mut m = vec![0f32; w * h];
        m[5 * w + 5] = 1.0; // a single hot pixel is diluted by the 21×21 window
        assert!((image_score(&m, w, h) - 1.0 / 441.0).abs() < 1e-7);
        let ones = vec![1f32; w * h];
        assert!((image_score(&ones, w, h) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn components_use_eight_connectivity() {
        // two diagonal pixels are one component; a far one is another
        let (w, h) = (4, 3);
        let mut g = vec![false; w * h];
        g[0] = true;
        g[w + 1] = true;
        g[2 * w + 3] = true;
        assert_eq!(label_components(&g, w, h).1, 2);
    }
}
