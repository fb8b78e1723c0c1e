//! Imaging shared by generators and checks: decoding inputs with errors that name them, binary
//! masks, PNG encoding, mask statistics and the quality figures recorded in manifest rows.

use image::{GrayImage, ImageEncoder, RgbImage};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what} {uri} cannot be decoded ({reason}); replace or remove the file")]
    Decode {
        what: &'static str,
        uri: String,
        reason: String,
    },
    #[error("mask {mask_uri} is {mw}x{mh} but the normal image {image_uri} is {iw}x{ih}; masks must have the image's size")]
    SizeMismatch {
        mask_uri: String,
        image_uri: String,
        mw: u32,
        mh: u32,
        iw: u32,
        ih: u32,
    },
    #[error(
        "mask {uri} is empty (no pixel above 127); a defect mask needs at least one defect pixel"
    )]
    EmptyMask { uri: String },
    #[error("{what} {uri} is {w}x{h} = {} pixels, over the limit of {limit} decoded pixels per input (raise --max-input-pixels / DEFECTFORGE_MAX_INPUT_PIXELS if it is a real input)", *w as u64 * *h as u64)]
    TooManyPixels {
        what: &'static str,
        uri: String,
        w: u32,
        h: u32,
        limit: u64,
    },
    #[error("encoding PNG failed: {0}")]
    Encode(String),
}

/// Decoded pixels one input may have unless configured otherwise (40 MP: 6300x6300, far above
/// MVTec's 1024x1024 and VisA's 1500x1000; a 20000x20000 PNG of a few hundred KB is refused
/// before anything is allocated).
pub const DEFAULT_MAX_INPUT_PIXELS: u64 = 40_000_000;

/// The width and height an encoded image declares in its header, read without decoding it.
pub fn dimensions(bytes: &[u8], what: &'static str, uri: &str) -> Result<(u32, u32), ImageError> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())
        .and_then(|r| r.into_dimensions().map_err(|e| e.to_string()))
        .map_err(|reason| ImageError::Decode {
            what,
            uri: uri.to_string(),
            reason,
        })
}

/// Decodes an image whose header declares at most `max_pixels` pixels, with the decoder's own
/// allocation limit set to match (so a lying header cannot allocate more either).
pub fn decode_limited(
    bytes: &[u8],
    what: &'static str,
    uri: &str,
    max_pixels: u64,
) -> Result<image::DynamicImage, ImageError> {
    let (w, h) = dimensions(bytes, what, uri)?;
    if w as u64 * h as u64 > max_pixels {
        return Err(ImageError::TooManyPixels {
            what,
            uri: uri.to_string(),
            w,
            h,
            limit: max_pixels,
        });
    }
    let decode_err = |reason: String| ImageError::Decode {
        what,
        uri: uri.to_string(),
        reason,
    };
    let mut r = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(e.to_string()))?;
    let mut limits = image::Limits::default();
    // 8 bytes per pixel covers 16-bit RGBA, the widest layout decoded here
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    r.limits(limits);
    r.decode().map_err(|e| decode_err(e.to_string()))
}

/// Decodes any supported image into 8-bit RGB (grey images are replicated to three channels;
/// 16-bit images are reduced to 8 bits).
pub fn decode_rgb(bytes: &[u8], what: &'static str, uri: &str) -> Result<RgbImage, ImageError> {
    decode_rgb_limited(bytes, what, uri, DEFAULT_MAX_INPUT_PIXELS)
}

/// [`decode_rgb`] with a decoded-pixel limit.
pub fn decode_rgb_limited(
    bytes: &[u8],
    what: &'static str,
    uri: &str,
    max_pixels: u64,
) -> Result<RgbImage, ImageError> {
    Ok(decode_limited(bytes, what, uri, max_pixels)?.to_rgb8())
}

/// Decodes a mask and binarises it: pixels > 127 (of the luma) become 255, others 0.
pub fn decode_mask(bytes: &[u8], uri: &str) -> Result<GrayImage, ImageError> {
    decode_mask_limited(bytes, uri, DEFAULT_MAX_INPUT_PIXELS)
}

/// [`decode_mask`] with a decoded-pixel limit.
pub fn decode_mask_limited(
    bytes: &[u8],
    uri: &str,
    max_pixels: u64,
) -> Result<GrayImage, ImageError> {
    let g = decode_limited(bytes, "mask", uri, max_pixels)?.to_luma8();
    Ok(binarize(&g))
}

pub fn binarize(g: &GrayImage) -> GrayImage {
    let mut out = g.clone();
    for p in out.pixels_mut() {
        p.0[0] = if p.0[0] > 127 { 255 } else { 0 };
    }
    out
}

/// PNG-encodes RGB with fast settings (the pipeline's hot path).
pub fn encode_png_rgb(img: &RgbImage) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::with_capacity(img.as_raw().len() / 2);
    image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Sub,
    )
    .write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| ImageError::Encode(e.to_string()))?;
    Ok(out)
}

pub fn encode_png_gray(img: &GrayImage) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Sub,
    )
    .write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::L8,
    )
    .map_err(|e| ImageError::Encode(e.to_string()))?;
    Ok(out)
}

/// Area and bounding box (x, y, w, h) of the non-zero pixels of a mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MaskStats {
    pub area: u64,
    pub bbox: (u32, u32, u32, u32),
}

pub fn mask_stats(m: &GrayImage) -> MaskStats {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    let mut area = 0;
    for (x, y, p) in m.enumerate_pixels() {
        if p.0[0] > 0 {
            area += 1;
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
    }
    if area == 0 {
        return MaskStats::default();
    }
    MaskStats {
        area,
        bbox: (x0, y0, x1 - x0 + 1, y1 - y0 + 1),
    }
}

/// Mean absolute change per channel value (0..255) inside and outside the mask.
pub fn change_inside_outside(normal: &RgbImage, out: &RgbImage, mask: &GrayImage) -> (f32, f32) {
    let (mut si, mut ni, mut so, mut no) = (0u64, 0u64, 0u64, 0u64);
    for ((a, b), m) in normal.pixels().zip(out.pixels()).zip(mask.pixels()) {
        let d: u64 = (0..3).map(|c| a.0[c].abs_diff(b.0[c]) as u64).sum();
        if m.0[0] > 0 {
            si += d;
            ni += 3;
        } else {
            so += d;
            no += 3;
        }
    }
    let f = |s: u64, n: u64| if n == 0 { 0.0 } else { s as f32 / n as f32 };
    (f(si, ni), f(so, no))
}

/// PSNR (dB, peak 255) of `out` against `normal` over the pixels outside the mask; infinite when
/// they are identical (or when the mask covers everything).
pub fn background_psnr(normal: &RgbImage, out: &RgbImage, mask: &GrayImage) -> f32 {
    let (mut se, mut n) = (0u64, 0u64);
    for ((a, b), m) in normal.pixels().zip(out.pixels()).zip(mask.pixels()) {
        if m.0[0] == 0 {
            for c in 0..3 {
                let d = a.0[c].abs_diff(b.0[c]) as u64;
                se += d * d;
            }
            n += 3;
        }
    }
    if se == 0 || n == 0 {
        return f32::INFINITY;
    }
    let mse = se as f64 / n as f64;
    (10.0 * (255.0f64 * 255.0 / mse).log10()) as f32
}

/// Resizes a binary mask the way the official AnomalyDiffusion loader does (bicubic resize,
/// then binarised at one half): 0/255 out.
pub fn resize_mask(mask: &GrayImage, w: u32, h: u32) -> GrayImage {
    binarize(&image::imageops::resize(
        mask,
        w,
        h,
        image::imageops::FilterType::CatmullRom,
    ))
}

pub use defectforge_kernels::{resize_bilinear_f32, AD_LATENT_SIZE, AD_WORKING_SIZE};

/// Cells set in AnomalyDiffusion's latent mask of `mask`: the mask at the 256×256 working size
/// (resized as the loader does when it is another size), then bilinear to 32×32 and ≥ 0.5.
/// Zero means the defect vanishes at the latent grid (thinner than about 8 px).
pub fn latent_mask_area(mask: &GrayImage) -> u32 {
    let s = AD_WORKING_SIZE;
    let m = if mask.dimensions() == (s, s) {
        binarize(mask)
    } else {
        resize_mask(mask, s, s)
    };
    let f: Vec<f32> = m.pixels().map(|p| (p.0[0] > 0) as u8 as f32).collect();
    resize_bilinear_f32(&f, s, s, AD_LATENT_SIZE, AD_LATENT_SIZE)
        .iter()
        .filter(|&&v| v >= 0.5)
        .count() as u32
}

/// Number of pixels outside the mask that differ from the normal image (must be 0).
pub fn changed_outside(normal: &RgbImage, out: &RgbImage, mask: &GrayImage) -> u64 {
    normal
        .pixels()
        .zip(out.pixels())
        .zip(mask.pixels())
        .filter(|((a, b), m)| m.0[0] == 0 && a != b)
        .count() as u64
}

/// Inputs for tests of the limits.
#[doc(hidden)]
pub mod testing {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    /// A few-byte PNG whose header declares a `w`x`h` 8-bit greyscale image (the pixel data
    /// is cut off): what a decompression bomb looks like to a header check.
    pub fn png_declaring(w: u32, h: u32) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            out.extend((data.len() as u32).to_be_bytes());
            let mut body = kind.to_vec();
            body.extend(data);
            out.extend(&body);
            out.extend(crc32(&body).to_be_bytes());
        };
        let mut ihdr = vec![];
        ihdr.extend(w.to_be_bytes());
        ihdr.extend(h.to_be_bytes());
        ihdr.extend([8, 0, 0, 0, 0]);
        chunk(b"IHDR", &ihdr);
        chunk(b"IDAT", &[0x78, 0x01]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Luma;

    #[test]
    fn inputs_over_the_pixel_limit_are_refused_from_their_header() {
        let bomb = testing::png_declaring(20_000, 20_000);
        assert!(bomb.len() < 100);
        assert_eq!(
            dimensions(&bomb, "normal image", "x.png").unwrap(),
            (20_000, 20_000)
        );
        let e = decode_rgb(&bomb, "normal image", "/d/x.png").unwrap_err();
        assert!(
            matches!(e, ImageError::TooManyPixels { w: 20_000, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("/d/x.png"), "{e}");
        let e = decode_mask_limited(&bomb, "/d/m.png", 1000).unwrap_err();
        assert!(e.to_string().contains("--max-input-pixels"), "{e}");
        // a small image still decodes under a small limit
        let ok = encode_png_gray(&GrayImage::new(10, 10)).unwrap();
        assert_eq!(
            decode_mask_limited(&ok, "m", 100).unwrap().dimensions(),
            (10, 10)
        );
        assert!(decode_mask_limited(&ok, "m", 99).is_err());
    }

    #[test]
    fn thin_masks_vanish_at_the_latent_grid_and_blobs_do_not() {
        let mk = |f: &dyn Fn(u32, u32) -> bool| {
            GrayImage::from_fn(256, 256, |x, y| Luma([if f(x, y) { 255 } else { 0 }]))
        };
        // A 2-px vertical line at columns 0-1 of every 8-px block misses the sampled centre
        // pixels (3 and 4 of each block), so it vanishes.
        let thin = mk(&|x, _| x == 40 || x == 41);
        assert_eq!(latent_mask_area(&thin), 0);
        // The same line through the centre pixels survives as one column of cells.
        let centred = mk(&|x, _| x == 43 || x == 44);
        assert_eq!(latent_mask_area(&centred), 32);
        // A 64×64 square covers 8×8 cells.
        let square = mk(&|x, y| (64..128).contains(&x) && (64..128).contains(&y));
        assert_eq!(latent_mask_area(&square), 64);
        // Masks of other sizes are resized to 256 first: the square at 512 is the same.
        let big = GrayImage::from_fn(512, 512, |x, y| {
            Luma([if (128..256).contains(&x) && (128..256).contains(&y) {
                255
            } else {
                0
            }])
        });
        assert_eq!(latent_mask_area(&big), 64);
    }

    #[test]
    fn stats_and_quality() {
        let mut m = GrayImage::new(8, 6);
        m.put_pixel(2, 1, image::Luma([255]));
        m.put_pixel(5, 3, image::Luma([255]));
        assert_eq!(
            mask_stats(&m),
            MaskStats {
                area: 2,
                bbox: (2, 1, 4, 3)
            }
        );
        let n = RgbImage::from_pixel(8, 6, image::Rgb([10, 10, 10]));
        let mut o = n.clone();
        o.put_pixel(2, 1, image::Rgb([40, 10, 10]));
        let (i, out) = change_inside_outside(&n, &o, &m);
        assert!((i - 5.0).abs() < 1e-6 && out == 0.0, "{i} {out}");
        assert_eq!(changed_outside(&n, &o, &m), 0);
        o.put_pixel(0, 0, image::Rgb([0, 0, 0]));
        assert_eq!(changed_outside(&n, &o, &m), 1);
    }

    #[test]
    fn png_round_trip_and_decode_errors() {
        let n = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 9, y as u8 * 7, 3]));
        let b = encode_png_rgb(&n).unwrap();
        assert_eq!(decode_rgb(&b, "normal image", "x.png").unwrap(), n);
        let e = decode_rgb(b"garbage", "normal image", "bad.png").unwrap_err();
        assert!(
            e.to_string()
                .contains("normal image bad.png cannot be decoded"),
            "{e}"
        );
        let g = GrayImage::from_fn(4, 4, |x, _| image::Luma([if x > 1 { 200 } else { 100 }]));
        let m = decode_mask(&encode_png_gray(&g).unwrap(), "m.png").unwrap();
        assert_eq!(mask_stats(&m).area, 8);
    }
}
