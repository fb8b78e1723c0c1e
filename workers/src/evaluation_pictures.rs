//! The pictures of an evaluation a person looks at: ROC and PR curves (image and pixel level)
//! and a grid of the worst misses and false alarms with their anomaly maps.

use anyhow::{Context, Result};
use bytes::Bytes;
use defectforge::evaluation::metrics::{image_score, pr_curve, roc_curve};
use defectforge::evaluation::TestImage;
use defectforge::store::ObjectStore;
use image::{Rgb, RgbImage};

use crate::evaluation::Prepared;

const PLOT: u32 = 240;
const MARGIN: u32 = 20;

fn line(img: &mut RgbImage, a: (f32, f32), b: (f32, f32), c: Rgb<u8>) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f32 / n as f32;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, c);
        }
    }
}

/// One panel: a frame, the diagonal (ROC) and the curves, x and y in [0, 1].
fn panel(img: &mut RgbImage, ox: u32, curves: &[(Vec<(f64, f64)>, Rgb<u8>)], diagonal: bool) {
    let to = |x: f64, y: f64| -> (f32, f32) {
        (
            (ox + MARGIN) as f32 + x as f32 * PLOT as f32,
            (MARGIN + PLOT) as f32 - y as f32 * PLOT as f32,
        )
    };
    let grey = Rgb([170, 170, 170]);
    for (a, b) in [
        ((0.0, 0.0), (1.0, 0.0)),
        ((1.0, 0.0), (1.0, 1.0)),
        ((1.0, 1.0), (0.0, 1.0)),
        ((0.0, 1.0), (0.0, 0.0)),
    ] {
        line(img, to(a.0, a.1), to(b.0, b.1), Rgb([0, 0, 0]));
    }
    if diagonal {
        line(img, to(0.0, 0.0), to(1.0, 1.0), grey);
    }
    for (pts, c) in curves {
        for w in pts.windows(2) {
            line(img, to(w[0].0, w[0].1), to(w[1].0, w[1].1), *c);
        }
    }
}

/// Blue→red heat colour of a score in [0, 1].
fn heat(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    [
        255.0 * v,
        255.0 * (1.0 - (2.0 * v - 1.0).abs()),
        255.0 * (1.0 - v),
    ]
}

fn tile(p: &Prepared, map: &[f32], size: u32) -> RgbImage {
    let n = (size * size) as usize;
    let mut t = RgbImage::new(size * 2, size);
    for i in 0..n {
        let (x, y) = (i as u32 % size, i as u32 / size);
        let px = [p.rgb[i], p.rgb[n + i], p.rgb[2 * n + i]].map(|v| v * 255.0);
        // left: the image with the ground truth's border in green
        let edge = p.mask[i] > 0.5
            && [(-1i32, 0i32), (1, 0), (0, -1), (0, 1)]
                .iter()
                .any(|(dx, dy)| {
                    let (nx, ny) = (x as i32 + dx, y as i32 + dy);
                    nx < 0
                        || ny < 0
                        || nx >= size as i32
                        || ny >= size as i32
                        || p.mask[(ny as u32 * size + nx as u32) as usize] <= 0.5
                });
        let left = if edge { [0.0, 255.0, 0.0] } else { px };
        t.put_pixel(x, y, Rgb(left.map(|v| v as u8)));
        // right: the anomaly map over the image
        let h = heat(map[i]);
        let blend = |k: usize| (0.45 * px[k] + 0.55 * h[k]) as u8;
        t.put_pixel(size + x, y, Rgb([blend(0), blend(1), blend(2)]));
    }
    t
}

/// Writes `curves-<category>-<campaign>.png` and `worst-<category>-<campaign>.png`.
pub async fn write(
    out: &dyn ObjectStore,
    category: &str,
    campaign_id: &str,
    test: &[Prepared],
    info: &[TestImage],
    maps: &[Vec<f32>],
    size: u32,
) -> Result<()> {
    let s = size as usize;
    let img_scores: Vec<f32> = maps.iter().map(|m| image_score(m, s, s)).collect();
    let img_labels: Vec<bool> = info.iter().map(|t| t.mask_uri.is_some()).collect();
    let px: Vec<f32> = maps.iter().flat_map(|m| m.iter().copied()).collect();
    let pl: Vec<bool> = test
        .iter()
        .flat_map(|p| p.mask.iter().map(|&v| v > 0.5))
        .collect();
    let (red, blue) = (Rgb([200, 30, 30]), Rgb([30, 60, 200]));
    let w = 2 * (PLOT + 2 * MARGIN);
    let mut plot = RgbImage::from_pixel(w, PLOT + 2 * MARGIN, Rgb([255, 255, 255]));
    let mut roc = vec![];
    let mut pr = vec![];
    if let Some(c) = roc_curve(&img_scores, &img_labels) {
        roc.push((c, red));
    }
    if let Some(c) = roc_curve(&px, &pl) {
        roc.push((c, blue));
    }
    if let Some(c) = pr_curve(&img_scores, &img_labels) {
        pr.push((c, red));
    }
    if let Some(c) = pr_curve(&px, &pl) {
        pr.push((c, blue));
    }
    panel(&mut plot, 0, &roc, true);
    panel(&mut plot, PLOT + 2 * MARGIN, &pr, false);
    let png = defectforge::imaging::encode_png_rgb(&plot)?;
    out.put(
        &format!("curves-{category}-{campaign_id}.png"),
        Bytes::from(png),
        "image/png",
    )
    .await
    .context("cannot write the curves picture")?;

    // worst misses: defects with the lowest image score; false alarms: good images with the
    // highest; up to four of each, one row each
    let mut defects: Vec<usize> = (0..info.len()).filter(|&i| img_labels[i]).collect();
    defects.sort_by(|&a, &b| img_scores[a].total_cmp(&img_scores[b]));
    let mut goods: Vec<usize> = (0..info.len()).filter(|&i| !img_labels[i]).collect();
    goods.sort_by(|&a, &b| img_scores[b].total_cmp(&img_scores[a]));
    let rows: Vec<usize> = defects
        .iter()
        .take(4)
        .chain(goods.iter().take(4))
        .copied()
        .collect();
    let mut grid = RgbImage::from_pixel(2 * size, size * rows.len().max(1) as u32, Rgb([0, 0, 0]));
    for (r, &i) in rows.iter().enumerate() {
        image::imageops::replace(
            &mut grid,
            &tile(&test[i], &maps[i], size),
            0,
            (r as u32 * size) as i64,
        );
    }
    let png = defectforge::imaging::encode_png_rgb(&grid)?;
    out.put(
        &format!("worst-{category}-{campaign_id}.png"),
        Bytes::from(png),
        "image/png",
    )
    .await
    .context("cannot write the worst-cases picture")?;
    Ok(())
}
