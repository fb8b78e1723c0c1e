//! Fused CPU kernels for the two element-wise hot spots of the UNet on CPU (profile in
//! docs/benchmarks.md): the attention softmax and GEGLU's erf-GELU. candle's versions call a
//! scalar libm `exp`/`erf` per element (≈7 ns and ≈20 ns per element here); these use
//! polynomial approximations that the compiler vectorises (AVX2+FMA when the CPU has them),
//! within ~5e-7 of the exact functions — far inside the parity tolerances.
//!
//! Forward-only (candle `CustomOp1` without a backward): callers use them only when the input
//! does not track gradients, and fall back to candle's ops on other devices and dtypes.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// e^x for f32 (Cephes `expf`: x = n·ln2 + r, |r| ≤ ln2/2, degree-5 polynomial for e^r,
/// scaled by 2^n through the exponent bits). Max relative error ≈ 1.2e-7.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// erf(x) (Abramowitz & Stegun 7.1.26, the form PyTorch's vectorised CPU `erf` uses):
/// erf(|x|) = 1 − (a1·t + … + a5·t⁵)·e^{−x²}, t = 1/(1 + p·|x|). Absolute error ≤ 1.5e-7
/// (≤ 5e-7 after f32 rounding).
#[inline(always)]
fn erf_approx(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_approx(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

#[inline(always)]
fn softmax_row(src: &[f32], dst: &mut [f32]) {
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = src.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let mut max = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in rest {
        max = max.max(v);
    }
    if max == f32::NEG_INFINITY {
        // A fully masked row: torch gives NaN, so do we.
        dst.iter_mut().for_each(|d| *d = f32::NAN);
        return;
    }
    // Three simple passes the compiler vectorises: exp, an 8-lane sum, the scale.
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = exp_approx(s - max);
    }
    let mut acc = [0f32; 8];
    let chunks = dst.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let sum = acc.iter().sum::<f32>() + rest;
    let inv = 1.0 / sum;
    dst.iter_mut().for_each(|d| *d *= inv);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(src: &[f32], dst: &mut [f32], n: usize) {
    for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
        softmax_row(s, d);
    }
}

fn softmax_rows(src: &[f32], dst: &mut [f32], n: usize) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function was compiled for.
        unsafe { softmax_rows_avx2(src, dst, n) };
        return;
    }
    for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
        softmax_row(s, d);
    }
}

#[inline(always)]
fn gelu_slice(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = 0.5 * x * (1.0 + erf_approx(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_slice_avx2(src: &[f32], dst: &mut [f32]) {
    gelu_slice(src, dst)
}

fn gelu_chunk(src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function was compiled for.
        unsafe { gelu_slice_avx2(src, dst) };
        return;
    }
    gelu_slice(src, dst)
}

#[inline(always)]
fn geglu_rows(src: &[f32], dst: &mut [f32], inner: usize) {
    for (s, d) in src.chunks_exact(2 * inner).zip(dst.chunks_exact_mut(inner)) {
        let (h, g) = s.split_at(inner);
        for ((d, &h), &x) in d.iter_mut().zip(h).zip(g) {
            *d = h * 0.5 * x * (1.0 + erf_approx(x * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn geglu_rows_avx2(src: &[f32], dst: &mut [f32], inner: usize) {
    geglu_rows(src, dst, inner)
}

fn geglu_chunk(src: &[f32], dst: &mut [f32], inner: usize) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function was compiled for.
        unsafe { geglu_rows_avx2(src, dst, inner) };
        return;
    }
    geglu_rows(src, dst, inner)
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("fast CPU op: f32 only");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fast CPU op: input must be contiguous"),
    }
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "defectforge-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(s, l)?;
        let n = *l.shape().dims().last().unwrap_or(&1);
        let mut dst = vec![0f32; src.len()];
        // Rows per task: enough work per task to amortise scheduling.
        let rows = (16384 / n.max(1)).max(1);
        src.par_chunks(rows * n)
            .zip(dst.par_chunks_mut(rows * n))
            .for_each(|(s, d)| softmax_rows(s, d, n));
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "defectforge-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(s, l)?;
        let mut dst = vec![0f32; src.len()];
        src.par_chunks(16384)
            .zip(dst.par_chunks_mut(16384))
            .for_each(|(s, d)| gelu_chunk(s, d));
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }
}

/// GEGLU's gate: `[.., 2I]` → `[.., I]`, h·GELU(g) for the halves (h, g) of the last dim.
struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "defectforge-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(s, l)?;
        let mut dims = l.shape().dims().to_vec();
        let last = dims.pop().unwrap_or(0);
        if !last.is_multiple_of(2) {
            candle_core::bail!("geglu: odd last dimension {last}");
        }
        let inner = last / 2;
        dims.push(inner);
        let mut dst = vec![0f32; src.len() / 2];
        let rows = (16384 / last.max(1)).max(1);
        src.par_chunks(rows * last)
            .zip(dst.par_chunks_mut(rows * inner))
            .for_each(|(s, d)| geglu_chunk(s, d, inner));
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }
}

/// GEGLU (Shazeer 2020): splits the last dimension into (h, g) and returns h·GELU(g) with
/// exact-form GELU; one fused pass on CPU for untracked f32 tensors.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) {
        return x.contiguous()?.apply_op1_no_bwd(&Geglu);
    }
    let inner = x.dim(candle_core::D::Minus1)? / 2;
    let h = x.narrow(candle_core::D::Minus1, 0, inner)?;
    let g = x.narrow(candle_core::D::Minus1, inner, inner)?;
    h * g.gelu_erf()?
}

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op() && x.rank() > 0
}

/// Softmax over the last dimension; the fused CPU kernel for untracked f32 tensors.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) {
        x.contiguous()?.apply_op1_no_bwd(&SoftmaxLastDim)
    } else if x.track_op() || x.dtype() == DType::F64 {
        candle_nn::ops::softmax(x, candle_core::D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Exact-form GELU x·Φ(x); the fused CPU kernel for untracked f32 tensors.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) {
        x.contiguous()?.apply_op1_no_bwd(&GeluErf)
    } else {
        x.gelu_erf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approximations_match_libm() {
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in -20000..=20000 {
            let x = i as f32 * 0.004;
            let e = (exp_approx(x) as f64 - (x as f64).exp()).abs() / (x as f64).exp();
            worst_exp = worst_exp.max(e);
            let x = i as f32 * 0.0005;
            let want = libm_erf(x as f64);
            worst_erf = worst_erf.max((erf_approx(x) as f64 - want).abs());
        }
        assert!(worst_exp < 3e-7, "exp rel err {worst_exp}");
        assert!(worst_erf < 6e-7, "erf abs err {worst_erf}");
    }

    fn libm_erf(x: f64) -> f64 {
        // erf through candle's exact op, evaluated in f64.
        Tensor::new(&[x], &candle_core::Device::Cpu)
            .and_then(|t| t.erf())
            .and_then(|t| t.to_vec1::<f64>())
            .map(|v| v[0])
            .unwrap()
    }

    #[test]
    fn fused_ops_match_candle() {
        let dev = candle_core::Device::Cpu;
        let x = (Tensor::arange(0f32, 3000., &dev).unwrap() * 0.37)
            .unwrap()
            .sin()
            .unwrap()
            .affine(6.0, 0.5)
            .unwrap()
            .reshape((30, 100))
            .unwrap();
        let a = softmax_last_dim(&x).unwrap();
        let b = candle_nn::ops::softmax(&x, candle_core::D::Minus1).unwrap();
        let d: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-7, "softmax {d}");
        let a = gelu_erf(&x).unwrap();
        let b = x.gelu_erf().unwrap();
        let d: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 2e-6, "gelu {d}");
    }
}
