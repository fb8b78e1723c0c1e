//! Learned defect masks: the official `generate_mask.py` path.
//!
//! A mask model is the LDM base with a per-type textual-inversion embedding (16 vectors in the
//! official files) spliced at the placeholder, sampled like an ordinary text-to-image model:
//!
//! * the conditioning is `c = BERT(splice(prompt with "*", e_m))`, the unconditional context
//!   `uc = BERT("")` (`[CLS][SEP]` and padding, no placeholder);
//! * DDIM (official: 100 uniform steps, eta 1) from `x_T ~ N(0, I)` in the latent shape, with
//!   classifier-free guidance `e = e_u + s·(e_c − e_u)` (official s = 5), both predictions from
//!   one UNet call on `cat([x, x])` with `cat([uc, c])`;
//! * the VAE decodes the final latent (values about [−1, 1], not clamped);
//! * post-processing: `m = mean_RGB(decoded) > 0.8`, and a mask is rejected when any of its
//!   four border lines (first/last row, first/last column) holds more than a third of its
//!   pixels (`count_nonzero > 256/3` at 256×256) — a mask spilling over the frame.
//!
//! The random draws are `x_T` then one eta noise per step, in that order (the official
//! `log_images` also VAE-encodes its input batch first, a draw whose result is unused).

use candle_core::{DType, Tensor};

use crate::error::{EngineError, Result};
use crate::ldm::LdmModel;
use crate::ldm_ddim::LdmDdim;
use crate::noise::NoiseSource;

/// Options of the guided mask sampler; the defaults are the official `generate_mask.py` ones.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskSamplerOptions {
    /// DDIM steps (official: 100).
    pub steps: usize,
    /// DDIM eta (official: 1).
    pub eta: f64,
    /// Classifier-free guidance scale (official: 5).
    pub guidance: f64,
    /// Binarisation threshold on the RGB mean of the decoded image in [−1, 1] (official: 0.8).
    pub threshold: f32,
}

impl Default for MaskSamplerOptions {
    fn default() -> Self {
        Self {
            steps: 100,
            eta: 1.0,
            guidance: 5.0,
            threshold: 0.8,
        }
    }
}

/// One guided step, recorded on request.
#[derive(Debug, Clone)]
pub struct GuidedStepRecord {
    pub t: usize,
    pub eps_uncond: Tensor,
    pub eps_cond: Tensor,
    /// The latent after the step.
    pub x_prev: Tensor,
}

/// The guided sampler's result.
#[derive(Debug, Clone)]
pub struct GuidedOutput {
    /// The final latent `[B, C, h, w]`.
    pub latent: Tensor,
    pub steps: Vec<GuidedStepRecord>,
}

/// Classifier-free-guided DDIM from pure noise (`log_images(sample=True)` with
/// `unconditional_guidance_scale`): `cond` and `uncond` `[B, L, D]`. Draws `x_T`, then one eta
/// noise per step. `record` keeps every step's tensors (tests; costs memory).
pub fn sample_guided(
    model: &LdmModel,
    cond: &Tensor,
    uncond: &Tensor,
    opts: &MaskSamplerOptions,
    noise: &mut dyn NoiseSource,
    record: bool,
) -> Result<GuidedOutput> {
    let b = cond.dim(0)?;
    if uncond.dims() != cond.dims() {
        return Err(EngineError::Invalid(format!(
            "guided sampler: conditional context {:?} and unconditional {:?} differ",
            cond.dims(),
            uncond.dims()
        )));
    }
    let ddim = LdmDdim::new(&model.schedule, opts.steps, opts.eta)?;
    let cfg = model.config();
    let shape = (b, cfg.latent_channels, cfg.latent_size, cfg.latent_size);
    let dtype = model.dtype();
    let dev = model.device();
    // The loop state, the guidance and the DDIM step in float32 whatever the model's dtype:
    // the guidance multiplies the UNet's rounding by |1−s| + |s| (9 at s = 5), and 100 steps
    // of half-precision updates would accumulate theirs. Only the UNet runs in `dtype`.
    let mut x = noise.randn(&shape.into(), DType::F32, dev)?;
    let ctx = Tensor::cat(&[uncond, cond], 0)?.to_dtype(dtype)?;
    let mut steps = Vec::new();
    for (index, t) in ddim.sampling_order() {
        let xh = x.to_dtype(dtype)?;
        let x_in = Tensor::cat(&[&xh, &xh], 0)?;
        let t_in = Tensor::from_vec(vec![t as f32; 2 * b], 2 * b, dev)?;
        let e = model
            .unet
            .forward(&x_in, &t_in, &ctx, None)?
            .to_dtype(DType::F32)?;
        let e_u = e.narrow(0, 0, b)?;
        let e_c = e.narrow(0, b, b)?;
        let guided = (&e_u + ((&e_c - &e_u)? * opts.guidance)?)?;
        let out = ddim.step(index, &x, &guided, noise)?;
        x = out.x_prev;
        if record {
            steps.push(GuidedStepRecord {
                t,
                eps_uncond: e_u,
                eps_cond: e_c,
                x_prev: x.clone(),
            });
        }
    }
    let x = x.to_dtype(dtype)?;
    Ok(GuidedOutput { latent: x, steps })
}

/// The official binarisation: `(decoded.mean over RGB > threshold)` for decoded images
/// `[B, 3, H, W]`; returns `[B, H, W]` `u8` in {0, 1}.
pub fn binarize(decoded: &Tensor, threshold: f32) -> Result<Tensor> {
    let m = decoded.to_dtype(DType::F32)?.mean(1)?;
    Ok(m.gt(threshold as f64)?.to_dtype(DType::U8)?)
}

/// The official `check_mask`: false when the first or last row or column of the `w`×`h`
/// mask (row-major, nonzero = set) holds more than a third of that line's pixels.
pub fn border_ok(mask: &[u8], w: usize, h: usize) -> bool {
    if w == 0 || h == 0 || mask.len() != w * h {
        return false;
    }
    let row = |y: usize| mask[y * w..(y + 1) * w].iter().filter(|&&v| v != 0).count();
    let col = |x: usize| (0..h).filter(|&y| mask[y * w + x] != 0).count();
    let over = |n: usize, len: usize| n as f64 > len as f64 / 3.0;
    !(over(row(0), w) || over(row(h - 1), w) || over(col(0), h) || over(col(w - 1), h))
}

/// Masks sampled in one batch, post-processed.
#[derive(Debug, Clone)]
pub struct MaskSamples {
    /// The decoded images `[B, 3, H, W]` (about [−1, 1]).
    pub decoded: Tensor,
    /// Binary masks, row-major `H·W` bytes in {0, 1}, one per row.
    pub masks: Vec<Vec<u8>>,
    pub width: usize,
    pub height: usize,
    /// Whether each mask passed the border rule and is non-empty.
    pub accepted: Vec<bool>,
    /// Why each rejected mask was rejected (`None` when accepted).
    pub rejection: Vec<Option<Rejection>>,
}

/// Why a sampled mask was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No pixel above the threshold (the official script keeps those; a defect needs pixels).
    Empty,
    /// A border line holds more than a third of its pixels.
    Border,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::Border => "border",
        }
    }
}

/// Decodes latents and post-processes them into masks.
pub fn postprocess(model: &LdmModel, latent: &Tensor, threshold: f32) -> Result<MaskSamples> {
    let decoded = model.decode_first_stage(latent)?;
    let (_, _, h, w) = decoded.dims4()?;
    let bin: Vec<Vec<Vec<u8>>> = binarize(&decoded, threshold)?.to_vec3()?;
    let mut masks = Vec::with_capacity(bin.len());
    let mut accepted = Vec::with_capacity(bin.len());
    let mut rejection = Vec::with_capacity(bin.len());
    for rows in bin {
        let flat: Vec<u8> = rows.into_iter().flatten().collect();
        let r = if !border_ok(&flat, w, h) {
            Some(Rejection::Border)
        } else if !flat.iter().any(|&v| v != 0) {
            Some(Rejection::Empty)
        } else {
            None
        };
        accepted.push(r.is_none());
        rejection.push(r);
        masks.push(flat);
    }
    Ok(MaskSamples {
        decoded,
        masks,
        width: w,
        height: h,
        accepted,
        rejection,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn border_rule_counts_more_than_a_third_of_a_line() {
        let (w, h) = (9, 6);
        let mut m = vec![0u8; w * h];
        // 3 of 9 pixels on the top row is exactly a third: kept.
        m[..3].fill(1);
        assert!(border_ok(&m, w, h));
        m[3] = 1;
        assert!(!border_ok(&m, w, h));
        // Left column: 2 of 6 is a third (kept), 3 of 6 rejects.
        let mut m = vec![0u8; w * h];
        m[0] = 1;
        m[w] = 1;
        assert!(border_ok(&m, w, h));
        m[2 * w] = 1;
        assert!(!border_ok(&m, w, h));
        // Interior pixels never matter; a wrong length is never ok.
        let mut m = vec![0u8; w * h];
        for y in 1..h - 1 {
            m[y * w + 1..y * w + w - 1].fill(1);
        }
        assert!(border_ok(&m, w, h));
        assert!(!border_ok(&m[1..], w, h));
    }
}
