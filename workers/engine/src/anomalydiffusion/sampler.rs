//! AnomalyDiffusion (Hu et al., AAAI 2024) on the LDM base: the embedding-manager splice, the
//! latent mask, time-dependent mask dilation, adaptive attention re-weighting (AAR) and the
//! blended DDIM sampler of the official `generate_with_mask.py`, reproduced operation by
//! operation (shared/reference/anomalydiffusion.md §3, §6; fixture anomalydiffusion-tiny).
//!
//! **Splice** (`embedding_manager2.EmbeddingManager.forward`): in each row the placeholder
//! token (`*`) at column `col` is replaced by K vectors `[e_a(type) ; e_s(mask)]` after the
//! token embedding and before the position embedding; the row is truncated back to its length
//! (a placeholder near the end loses vectors and `[SEP]`), and `position = [col, col + K]` as
//! float32 (it may exceed the length).
//!
//! **Sampler** (`DDIMSampler.ddim_sampling` with `mask`/`x0`, eta 1): draws, in this order, the
//! posterior sample of the normal image, x_T, then per step the `q_sample` noise of the normal
//! latent and the DDIM noise. Each step blends `x ← x·M + (1 − M)·q_sample(z_y, t)` *before* the
//! UNet call; no background is pasted at the end.
//!
//! **AAR**, three variants:
//! * [`AarMode::Official`] (the code at HEAD, d8baf69+): M = dilate(m, r(t)),
//!   r(t) = ⌊(t + 100)·8/1000⌋ (·16 for a 50-step schedule); d = mean_c((M·(x − z_y))²) with
//!   d = 0 → −1; inv = M/d; w = ΣM·inv/Σinv, 0 → 1, clamped to [1, 1.5], w ≡ 1 when Σinv = 0;
//!   every cross-attention layer multiplies its pre-softmax logits of the `[CLS]` column and the
//!   spliced columns by w resized (bilinear, no antialias) to its grid.
//! * [`AarMode::Legacy`] (before d8baf69): no dilation, w = HW·inv/Σinv with no clamp (so −0
//!   outside the mask, which zeroes those logits).
//! * [`AarMode::Paper`] (the paper's formulation): w = ‖m‖₁·softmax_mask(1/‖m⊙y − m⊙x̂₀‖²) in
//!   pixel space from the decoded predicted x̂₀ of the previous step (one VAE decode per step),
//!   multiplying the *post*-softmax probabilities of the spliced columns only; no dilation.

use candle_core::{DType, Device, Tensor, D};

use crate::control::{AttentionController, AttentionSite};
use crate::error::{EngineError, Result};
use crate::ldm::LdmModel;
use crate::ldm_ddim::LdmDdim;
use crate::noise::NoiseSource;

/// Bilinear resize of `[B, C, H, W]` to `(oh, ow)` with `align_corners=False` and no
/// antialiasing — torchvision 0.13.1's tensor `Resize`, i.e. `F.interpolate(mode="bilinear")`,
/// which the official code uses for every mask and weight map. Computed in f32 with PyTorch's
/// source-index rule `max(scale·(dst + ½) − ½, 0)`, per plane by the kernel the core crate
/// uses too (`defectforge_kernels::resize_bilinear_f32`).
pub fn resize_bilinear(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    let v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(b * c * oh * ow);
    for plane in v.chunks_exact(h * w) {
        out.extend(defectforge_kernels::resize_bilinear_f32(
            plane, w as u32, h as u32, ow as u32, oh as u32,
        ));
    }
    Ok(Tensor::from_vec(out, (b, c, oh, ow), x.device())?.to_dtype(x.dtype())?)
}

/// The latent mask `(Resize((h, w))(mask) >= 0.5)` as 0/1 f32 `[B, 1, h, w]`.
pub fn latent_mask(mask: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let r = resize_bilinear(&mask.to_dtype(DType::F32)?, h, w)?;
    Ok(r.ge(0.5f32)?.to_dtype(DType::F32)?)
}

/// `Dilation2d(r)`: a (2r+1)² max filter padded with −1e9 (`utils.py`), on `[B, C, H, W]`.
pub fn dilate(mask: &Tensor, r: usize) -> Result<Tensor> {
    if r == 0 {
        return Ok(mask.clone());
    }
    let (b, c, h, w) = mask.dims4()?;
    let v: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(v.len());
    for plane in v.chunks_exact(h * w) {
        for y in 0..h {
            for x in 0..w {
                // The −1e9 padding only wins when the whole window is padding, which cannot
                // happen (the window always holds its centre).
                let mut m = -1e9f32;
                for yy in y.saturating_sub(r)..(y + r + 1).min(h) {
                    for xx in x.saturating_sub(r)..(x + r + 1).min(w) {
                        m = m.max(plane[yy * w + xx]);
                    }
                }
                out.push(m);
            }
        }
    }
    Ok(Tensor::from_vec(out, (b, c, h, w), mask.device())?.to_dtype(mask.dtype())?)
}

/// The official dilation radius r(t) = ⌊(t + 100)·k/1000⌋, k = 16 for a 50-step schedule,
/// else 8.
pub fn dilation_radius(t: usize, num_steps: usize) -> usize {
    let k = if num_steps == 50 { 16 } else { 8 };
    (t + 100) * k / 1000
}

/// Which adaptive attention re-weighting the sampler applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AarMode {
    /// No re-weighting; the blend uses the plain latent mask.
    Off,
    /// The official code at HEAD (d8baf69+): dilation schedule, clamped logit weights.
    Official,
    /// The official code before d8baf69: no dilation, unclamped HW-normalised weights.
    Legacy,
    /// The paper's formulation: pixel-space weights from the decoded x̂₀, post-softmax.
    Paper,
}

impl AarMode {
    /// The name used in campaigns and manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            AarMode::Off => "off",
            AarMode::Official => "official",
            AarMode::Legacy => "legacy",
            AarMode::Paper => "paper",
        }
    }
}

impl std::str::FromStr for AarMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" => Ok(AarMode::Off),
            "official" => Ok(AarMode::Official),
            "legacy" => Ok(AarMode::Legacy),
            "paper" => Ok(AarMode::Paper),
            other => Err(format!(
                "unknown re-weighting mode {other:?}: expected off, official, legacy or paper"
            )),
        }
    }
}

fn sum_hw(t: &Tensor) -> Result<Tensor> {
    // [B, H, W] → [B, 1, 1]
    Ok(t.sum_keepdim(D::Minus1)?.sum_keepdim(D::Minus2)?)
}

/// Both official variants' inverse distance: d = mean_c((M·(x − x0))²) with d = 0 → −1,
/// inv = M/d `[B, h, w]` (−0 outside the mask), and Σinv `[B, 1, 1]`. Always in float32,
/// whatever the model's dtype: 1/d of squared latent differences leaves f16's range and
/// bf16's precision.
fn inverse_distance(x: &Tensor, x0: &Tensor, m: &Tensor) -> Result<(Tensor, Tensor)> {
    let (x, x0, m) = (
        x.to_dtype(DType::F32)?,
        x0.to_dtype(DType::F32)?,
        m.to_dtype(DType::F32)?,
    );
    let d = m.broadcast_mul(&(x - x0)?)?.sqr()?.mean(1)?;
    let neg1 = Tensor::full(-1f32, d.shape(), d.device())?;
    let d = d.eq(0f32)?.where_cond(&neg1, &d)?;
    let inv = m.squeeze(1)?.mul(&d.recip()?)?;
    let isum = sum_hw(&inv)?;
    Ok((inv, isum))
}

/// The HEAD weight map: `(M, w)` for the current latent `x` (before blending), the clean normal
/// latent `x0` and the latent mask `[B, 1, h, w]` at timestep `t` of an `num_steps` schedule.
/// `w` is `[B, h, w]`.
pub fn aar_official(
    x: &Tensor,
    x0: &Tensor,
    mask: &Tensor,
    t: usize,
    num_steps: usize,
) -> Result<(Tensor, Tensor)> {
    let m = dilate(&mask.to_dtype(DType::F32)?, dilation_radius(t, num_steps))?;
    let (inv, isum) = inverse_distance(x, x0, &m)?;
    let msum = sum_hw(&m.squeeze(1)?)?;
    let w = msum.broadcast_mul(&inv)?.broadcast_div(&isum)?;
    let ones = Tensor::ones(w.shape(), w.dtype(), w.device())?;
    let w = w.eq(0f32)?.where_cond(&ones, &w)?;
    let w = w.lt(1f32)?.where_cond(&ones, &w)?;
    let cap = Tensor::full(1.5f32, w.shape(), w.device())?;
    let w = w.gt(1.5f32)?.where_cond(&cap, &w)?;
    // Rows whose Σinv is 0 get w ≡ 1 (this also replaces the NaNs of 0/0).
    Ok((m, ones_where_no_weight(&w, &isum)?))
}

/// The pre-d8baf69 weight map: `w = HW·inv/Σinv` on the undilated mask, unclamped (−0
/// outside the mask); w ≡ 1 for a row with Σinv = 0.
pub fn aar_legacy(x: &Tensor, x0: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = mask.dims4()?;
    let (inv, isum) = inverse_distance(x, x0, mask)?;
    let wmap = (inv * (h * w) as f64)?.broadcast_div(&isum)?;
    ones_where_no_weight(&wmap, &isum)
}

/// Replaces the rows whose Σinv is 0 (an empty mask: 0/0) by ones, as both official variants do.
fn ones_where_no_weight(w: &Tensor, isum: &Tensor) -> Result<Tensor> {
    let isum_v: Vec<f32> = isum.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (hh, ww) = (w.dim(1)?, w.dim(2)?);
    let rows = (0..isum_v.len())
        .map(|b| {
            if isum_v[b] == 0.0 {
                Tensor::ones((hh, ww), w.dtype(), w.device())
            } else {
                w.get(b)
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// The paper's weight map in pixel space: `w = ‖m‖₁ · softmax_{p∈m}(1/‖m⊙y − m⊙x̂₀‖²(p))`,
/// `[B, H, W]`, 0 outside the mask. `normal` and `pred` are images `[B, 3, H, W]`, `mask` is
/// `[B, 1, H, W]` in {0, 1}.
pub fn aar_paper(normal: &Tensor, pred: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, _, h, w) = mask.dims4()?;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let d = f32(mask)?
        .broadcast_mul(&(f32(normal)? - f32(pred)?)?)?
        .sqr()?
        .sum(1)?
        .flatten_from(1)?; // [B, HW]
    let m = f32(mask)?.flatten_from(1)?; // [B, HW]
    let mv: Vec<Vec<f32>> = m.to_vec2()?;
    let dv: Vec<Vec<f32>> = d.to_vec2()?;
    let mut out = Vec::with_capacity(b * h * w);
    for (mrow, drow) in mv.iter().zip(&dv) {
        let area: f32 = mrow.iter().sum();
        let logits: Vec<f32> = drow.iter().map(|&d| 1.0 / d.max(1e-12)).collect();
        let mx = mrow
            .iter()
            .zip(&logits)
            .filter(|(m, _)| **m > 0.5)
            .map(|(_, l)| *l)
            .fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = mrow
            .iter()
            .zip(&logits)
            .map(|(m, l)| if *m > 0.5 { (l - mx).exp() } else { 0.0 })
            .collect();
        let z: f32 = exps.iter().sum();
        out.extend(
            exps.iter()
                .map(|e| if z > 0.0 { area * e / z } else { 0.0 }),
        );
    }
    Ok(Tensor::from_vec(out, (b, h, w), mask.device())?.to_dtype(mask.dtype())?)
}

/// Re-weights every cross-attention layer for AAR: the weight map `[B, h, w]` is resized to the
/// layer's grid (bilinear, no antialias) and multiplies, per batch element, the columns
/// `j == 0 or pos0 ≤ j < pos1` of the logits (official / legacy) or the columns
/// `pos0 ≤ j < pos1` of the probabilities (paper).
pub struct AarController {
    weights: Tensor,
    positions: Vec<(f32, f32)>,
    post_softmax: bool,
    /// Factors already built in this forward, by (grid h, grid w, key tokens): layers on the
    /// same grid share one (the 32×32 level alone has several cross-attention layers).
    factors: Vec<((usize, usize, usize), Tensor)>,
}

impl AarController {
    /// A controller for a weight map `[B, h, w]` and per-row spliced spans (`position`).
    pub fn new(weights: Tensor, positions: Vec<(f32, f32)>, mode: AarMode) -> Self {
        Self {
            weights,
            positions,
            post_softmax: mode == AarMode::Paper,
            factors: Vec::new(),
        }
    }

    fn factor(&mut self, site: &AttentionSite<'_>, like: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, _, nk) = like.dims4()?;
        let key = (site.query_hw.0, site.query_hw.1, nk);
        if let Some((_, f)) = self.factors.iter().find(|(k, _)| *k == key) {
            return f.to_dtype(like.dtype());
        }
        let f = self.build_factor(site, like)?;
        self.factors.push((key, f.clone()));
        Ok(f)
    }

    fn build_factor(&self, site: &AttentionSite<'_>, like: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _h, nq, nk) = like.dims4()?;
        let (qh, qw) = site.query_hw;
        let ws = resize_bilinear(&self.weights.unsqueeze(1)?, qh, qw)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_device(like.device())?
            .to_dtype(DType::F32)?
            .reshape((b, nq, 1))?;
        let mut cols = Vec::with_capacity(b * nk);
        for bi in 0..b {
            let (p0, p1) = self.positions.get(bi).copied().unwrap_or((0.0, 0.0));
            // The official slices use `.int()` (truncation) of the float positions.
            let (p0, p1) = (p0 as i64, p1 as i64);
            for j in 0..nk as i64 {
                let on = if self.post_softmax {
                    j >= p0 && j < p1
                } else {
                    // W = w everywhere, then 1 on [1, pos0) and on [pos1, ∞).
                    !(j >= 1 && j < p0) && j < p1
                };
                cols.push(if on { 1f32 } else { 0.0 });
            }
        }
        let cols = Tensor::from_vec(cols, (b, 1, nk), like.device())?;
        let f = ((ws - 1.0)?.broadcast_mul(&cols)? + 1.0)?; // [B, nq, nk]
        f.unsqueeze(1)?.to_dtype(like.dtype())
    }
}

impl AttentionController for AarController {
    fn edit_logits(
        &mut self,
        site: &AttentionSite<'_>,
        logits: Tensor,
    ) -> candle_core::Result<Tensor> {
        if self.post_softmax {
            return Ok(logits);
        }
        logits.broadcast_mul(&self.factor(site, &logits)?)
    }
    fn edit_probs(
        &mut self,
        site: &AttentionSite<'_>,
        probs: Tensor,
    ) -> candle_core::Result<Tensor> {
        if !self.post_softmax {
            return Ok(probs);
        }
        probs.broadcast_mul(&self.factor(site, &probs)?)
    }
}

/// The result of splicing learned vectors at the placeholder.
#[derive(Debug, Clone)]
pub struct Splice {
    /// Token embeddings `[B, L, D]` after the splice, before position embeddings.
    pub embeds: Tensor,
    /// The token ids after the splice (the placeholder repeated K times).
    pub token_ids: Vec<Vec<u32>>,
    /// `[col, col + K]` per row (float32 as the official code; `[0, 0]` without placeholder).
    pub positions: Vec<(f32, f32)>,
}

/// Splices `inserts` `[B, K, D]` at every occurrence of `placeholder` in `ids` `[B, L]`
/// (token embeddings `embeds` `[B, L, D]`), processing occurrences from the rightmost column,
/// as `embedding_manager2` does; rows are truncated back to L.
pub fn splice(ids: &Tensor, embeds: &Tensor, placeholder: u32, inserts: &Tensor) -> Result<Splice> {
    let (b, l, d) = embeds.dims3()?;
    let (bi, k, di) = inserts.dims3()?;
    if bi != b || di != d {
        return Err(EngineError::Invalid(format!(
            "splice: inserts {:?} do not fit embeddings {:?}",
            inserts.dims(),
            embeds.dims()
        )));
    }
    let ids: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
    let mut rows = Vec::with_capacity(b);
    let mut token_ids = Vec::with_capacity(b);
    let mut positions = Vec::with_capacity(b);
    for (r, row_ids) in ids.iter().enumerate() {
        let mut emb = embeds.get(r)?;
        let mut tid = row_ids.clone();
        let mut pos = (0f32, 0f32);
        let mut cols: Vec<usize> = row_ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == placeholder)
            .map(|(c, _)| c)
            .collect();
        cols.sort_unstable_by(|a, b| b.cmp(a));
        let ins = inserts.get(r)?.to_dtype(emb.dtype())?;
        for col in cols {
            let mut parts = Vec::new();
            if col > 0 {
                parts.push(emb.narrow(0, 0, col)?);
            }
            parts.push(ins.clone());
            if col + 1 < l {
                parts.push(emb.narrow(0, col + 1, l - col - 1)?);
            }
            emb = Tensor::cat(&parts, 0)?.narrow(0, 0, l)?;
            let mut t = tid[..col].to_vec();
            t.extend(std::iter::repeat_n(placeholder, k));
            t.extend_from_slice(&tid[col + 1..]);
            t.truncate(l);
            tid = t;
            pos = (col as f32, (col + k) as f32);
        }
        rows.push(emb);
        token_ids.push(tid);
        positions.push(pos);
    }
    Ok(Splice {
        embeds: Tensor::stack(&rows, 0)?,
        token_ids,
        positions,
    })
}

/// Every `block`×`block` cell that any pixel of `mask` `[B, 1, H, W]` touches, filled (H and W
/// multiples of `block`). With `block` = the VAE factor (8), the latent mask of the result
/// holds exactly the latent cells the mask touches: no mask vanishes, however thin.
pub fn block_fill(mask: &Tensor, block: usize) -> Result<Tensor> {
    let (_, _, h, w) = mask.dims4()?;
    if block == 0 || h % block != 0 || w % block != 0 {
        return Err(EngineError::Invalid(format!(
            "block_fill: {h}x{w} is not a multiple of {block}"
        )));
    }
    let dtype = mask.dtype();
    let m = mask.to_dtype(DType::F32)?;
    let pooled = m.max_pool2d(block)?;
    Ok(pooled.upsample_nearest2d(h, w)?.to_dtype(dtype)?)
}

/// Options of the blended sampler.
#[derive(Debug, Clone)]
pub struct SamplerOptions {
    /// DDIM steps (official: 200).
    pub steps: usize,
    /// DDIM eta (official: 1).
    pub eta: f64,
    /// Adaptive attention re-weighting.
    pub aar: AarMode,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            steps: 200,
            eta: 1.0,
            aar: AarMode::Off,
        }
    }
}

/// One step of the sampler, recorded on request.
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub t: usize,
    /// The blending mask M `[B, 1, h, w]`.
    pub mask_used: Tensor,
    /// The weight map `[B, h, w]` (AAR on).
    pub weight_map: Option<Tensor>,
    /// The UNet input after blending.
    pub x_unet_in: Tensor,
    /// The UNet output.
    pub eps: Tensor,
}

/// The sampler's result.
#[derive(Debug, Clone)]
pub struct SampleOutput {
    /// The clean normal latent z_y (scaled posterior sample).
    pub z_y: Tensor,
    /// The latent mask m `[B, 1, h, w]`.
    pub mask_latent: Tensor,
    /// The final latent (no background paste).
    pub latent: Tensor,
    /// Per-step records when requested.
    pub steps: Vec<StepRecord>,
}

/// The official blended DDIM loop (`log_images(inpaint=True)` → `ddim_sampling` with `mask`,
/// `x0`): `normal` `[B, 3, H, W]` in [−1, 1], `mask` `[B, 1, H, W]` in {0, 1}, `context`
/// `[B, L, D]` with its spliced spans `positions`. Draws its noise from `noise` in the official
/// order. `record` keeps every step's tensors (tests; costs memory).
#[allow(clippy::too_many_arguments)]
pub fn sample(
    model: &LdmModel,
    normal: &Tensor,
    mask: &Tensor,
    context: &Tensor,
    positions: &[(f32, f32)],
    opts: &SamplerOptions,
    noise: &mut dyn NoiseSource,
    record: bool,
) -> Result<SampleOutput> {
    let b = normal.dim(0)?;
    if mask.dim(0)? != b || context.dim(0)? != b || positions.len() != b {
        return Err(EngineError::Invalid(format!(
            "sampler: batch sizes differ (images {b}, masks {}, contexts {}, positions {})",
            mask.dim(0)?,
            context.dim(0)?,
            positions.len()
        )));
    }
    let ddim = LdmDdim::new(&model.schedule, opts.steps, opts.eta)?;
    let z_y = model.encode_first_stage(normal, noise)?;
    let dt = z_y.dtype();
    let (_, _, h, w) = z_y.dims4()?;
    let mask_latent = latent_mask(mask, h, w)?.to_dtype(dt)?;
    // The loop state, the blend, the weight map and the DDIM step in float32 whatever the
    // model's dtype (no-ops for an f32 model); only the UNet (and the paper variant's decode)
    // runs in `dt`.
    let f32 = DType::F32;
    let (z32, mask32) = (z_y.to_dtype(f32)?, mask_latent.to_dtype(f32)?);
    let mut x = noise.randn(z_y.shape(), f32, z_y.device())?;
    let n_steps = ddim.timesteps().len();
    let mut steps = Vec::new();
    let mut prev_pred: Option<Tensor> = None;
    let normal_img = normal.to_dtype(dt)?;
    for (index, t) in ddim.sampling_order() {
        let ts = vec![t; b];
        let eps_q = noise.randn(z_y.shape(), f32, z_y.device())?;
        let y_t = model.schedule.q_sample(&z32, &ts, &eps_q)?;
        let (m, wmap) = match opts.aar {
            AarMode::Off => (mask32.clone(), None),
            AarMode::Official => {
                let (m, w) = aar_official(&x, &z32, &mask32, t, n_steps)?;
                (m, Some(w))
            }
            AarMode::Legacy => (mask32.clone(), Some(aar_legacy(&x, &z32, &mask32)?)),
            AarMode::Paper => {
                let w = match &prev_pred {
                    Some(pred) => {
                        let img = model.decode_first_stage(&pred.to_dtype(dt)?)?;
                        let wp = aar_paper(&normal_img, &img, &mask.to_dtype(img.dtype())?)?;
                        Some(
                            resize_bilinear(&wp.unsqueeze(1)?, h, w)?
                                .squeeze(1)?
                                .to_dtype(f32)?,
                        )
                    }
                    None => None,
                };
                (mask32.clone(), w)
            }
        };
        x = (x.broadcast_mul(&m)? + (1.0 - &m)?.broadcast_mul(&y_t)?)?;
        let t_tensor = Tensor::from_vec(ts.iter().map(|&t| t as f32).collect(), b, x.device())?;
        let xh = x.to_dtype(dt)?;
        let eps = match &wmap {
            Some(wm) => {
                let mut ctrl = AarController::new(wm.clone(), positions.to_vec(), opts.aar);
                model
                    .unet
                    .forward(&xh, &t_tensor, context, Some(&mut ctrl))?
            }
            None => model.unet.forward(&xh, &t_tensor, context, None)?,
        }
        .to_dtype(f32)?;
        if record {
            steps.push(StepRecord {
                t,
                mask_used: m.clone(),
                weight_map: wmap.clone(),
                x_unet_in: x.clone(),
                eps: eps.clone(),
            });
        }
        let out = ddim.step(index, &x, &eps, noise)?;
        x = out.x_prev;
        prev_pred = Some(out.pred_x0);
    }
    let x = x.to_dtype(dt)?;
    Ok(SampleOutput {
        z_y,
        mask_latent,
        latent: x,
        steps,
    })
}

/// The masked training loss (`p_losses` with logvar 0): mean over the batch of
/// mean_{c,h,w}((m·ε̂ − m·ε)²), with m the latent mask of `mask` (resized, ≥ 0.5).
pub fn masked_loss(eps_hat: &Tensor, eps: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = eps.dims4()?;
    let m = latent_mask(mask, h, w)?.to_dtype(eps.dtype())?;
    let diff = (eps_hat.broadcast_mul(&m)? - eps.broadcast_mul(&m)?)?;
    Ok(diff.sqr()?.flatten_from(1)?.mean(1)?.mean(0)?)
}

/// A 0/1 mask batch `[B, 1, H, W]` (f32) from `u8` masks `[B, H, W]` (any nonzero is 1).
pub fn masks_from_u8(masks: &Tensor, device: &Device) -> Result<Tensor> {
    Ok(masks
        .to_device(device)?
        .gt(0u8)?
        .to_dtype(DType::F32)?
        .unsqueeze(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_fill_keeps_thin_masks_on_the_latent_grid() {
        // A 1-px line at column 41 (off the sampled centre pixels 43/44) vanishes at 32x32;
        // block-filled it covers column block 5 exactly.
        let mut v = vec![0f32; 256 * 256];
        for y in 0..256 {
            v[y * 256 + 41] = 1.0;
        }
        let m = Tensor::from_vec(v, (1, 1, 256, 256), &Device::Cpu).unwrap();
        let sum = |t: &Tensor| t.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(sum(&latent_mask(&m, 32, 32).unwrap()), 0.0);
        let f = block_fill(&m, 8).unwrap();
        let lm = latent_mask(&f, 32, 32).unwrap();
        assert_eq!(sum(&lm), 32.0);
        let col: Vec<f32> = lm
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .get(7)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(col[5], 1.0);
        assert_eq!(col.iter().sum::<f32>(), 1.0);
        // The filled mask contains the original and stays within the touched blocks.
        assert_eq!(sum(&f), 256.0 * 8.0);
        assert!(block_fill(
            &Tensor::zeros((1, 1, 20, 20), DType::F32, &Device::Cpu).unwrap(),
            8
        )
        .is_err());
    }

    #[test]
    fn bilinear_256_to_32_averages_the_centre_pair() {
        // 256 → 32: scale 8, source 8d + 3.5 → the mean of pixels 8d+3 and 8d+4 per axis.
        let mut v = vec![0f32; 256 * 256];
        v[3 * 256 + 3] = 1.0;
        let x = Tensor::from_vec(v, (1, 1, 256, 256), &Device::Cpu).unwrap();
        let r: Vec<f32> = resize_bilinear(&x, 32, 32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(r[0], 0.25);
        assert!(r[1..].iter().all(|&a| a == 0.0));
    }

    #[test]
    fn dilation_is_a_square_max_filter() {
        let mut v = vec![0f32; 25];
        v[12] = 1.0;
        let x = Tensor::from_vec(v, (1, 1, 5, 5), &Device::Cpu).unwrap();
        let d: Vec<f32> = dilate(&x, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ones: Vec<usize> = (0..25).filter(|&i| d[i] == 1.0).collect();
        assert_eq!(ones, vec![6, 7, 8, 11, 12, 13, 16, 17, 18]);
        assert_eq!(dilation_radius(996, 200), 8);
        assert_eq!(dilation_radius(24, 200), 0);
        assert_eq!(dilation_radius(25, 200), 1);
        assert_eq!(dilation_radius(981, 50), 17);
    }

    #[test]
    fn splice_inserts_and_truncates() {
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[101u32, 5, 9, 102, 0], [101, 7, 8, 5, 9]], &dev).unwrap();
        let emb = Tensor::arange(0f32, 10.0, &dev)
            .unwrap()
            .reshape((2, 5, 1))
            .unwrap();
        let ins = Tensor::new(&[[[-1f32], [-2.0]], [[-3.0], [-4.0]]], &dev).unwrap();
        let s = splice(&ids, &emb, 9, &ins).unwrap();
        assert_eq!(s.token_ids[0], vec![101, 5, 9, 9, 102]);
        assert_eq!(s.token_ids[1], vec![101, 7, 8, 5, 9]);
        assert_eq!(s.positions, vec![(2.0, 4.0), (4.0, 6.0)]);
        let e: Vec<Vec<f32>> = s.embeds.squeeze(2).unwrap().to_vec2().unwrap();
        assert_eq!(e[0], vec![0.0, 1.0, -1.0, -2.0, 3.0]);
        assert_eq!(e[1], vec![5.0, 6.0, 7.0, 8.0, -3.0]);
    }
}
