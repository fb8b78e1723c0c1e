//! Small layers the engine owns instead of taking candle-nn's, each for a stated reason:
//!
//! * [`LayerNorm`]: candle-nn's `LayerNorm::forward` takes a fused kernel that has no backward
//!   pass (the gradient is silently cut, see shared/reference/candle.md §2) and no f64 CPU
//!   kernel. Ours uses the fused kernel only when no gradient is being tracked.
//! * [`softmax_last_dim`]: the same trap for candle-nn's fused softmax.
//! * [`gelu_erf`]: diffusers and transformers use exact erf-GELU; candle's `gelu()` is the tanh
//!   approximation.
//!
//! GroupNorm, Conv2d, Linear and Embedding come from candle-nn unchanged (they are composite
//! ops with gradients and match PyTorch).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// LayerNorm over the last dimension: y = (x − E[x]) / sqrt(Var[x] + eps) · γ + β
/// (biased variance, as torch.nn.LayerNorm).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of size `dim` under `vb`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fused_ok = !x.track_op() && x.is_contiguous() && x.dtype() != DType::F64;
        if fused_ok {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        let dtype = x.dtype();
        let internal = match dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let x = x.to_dtype(internal)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Softmax over the last dimension: fused kernels for inference (the project's CPU kernel
/// for f32), composite (differentiable) ops when the input tracks gradients.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    crate::cpu_ops::softmax_last_dim(x)
}

/// Exact GELU: x·Φ(x) = 0.5·x·(1 + erf(x/√2)) (torch.nn.functional.gelu default).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    crate::cpu_ops::gelu_erf(x)
}

/// CLIP's QuickGELU: x·σ(1.702·x) (transformers `quick_gelu`).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * 1.702f64)?)?
}

/// SiLU: x·σ(x).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(x)
}

/// 2-D convolution with bias, PyTorch weight layout `[out, in, k, k]`.
///
/// On CPU, stride-1 convolutions run as one GEMM over an im2col matrix built from shifted
/// views, with the kernel packed once at load time as `[out, k·k·in]`. candle's CPU conv2d
/// re-packs the kernel single-threaded on every call and parallelises only over 512-pixel
/// tiles, which dominated the SD-1.5 profile at low resolutions (docs/benchmarks.md). Other
/// devices and strides use candle's conv2d (cuDNN on GPU). The packed kernel is derived from
/// the loaded weight once: fine for frozen weights, stale if the weight is trained in place.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// `[out, in, k, k]`, kept where candle's conv2d is used.
    weight: Option<Tensor>,
    /// `[out, k·k·in]` in (kh, kw, in) order, kept for the CPU GEMM path.
    packed: Option<Tensor>,
    bias: Tensor,
    k: usize,
    stride: usize,
    padding: usize,
    cout: usize,
}

/// Loads a [`Conv2d`] (`weight`, `bias`) under `vb`.
pub fn conv2d(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let weight = vb.get_with_hints(
        (cout, cin, k, k),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let bound = 1.0 / ((cin * k * k) as f64).sqrt();
    let bias = vb.get_with_hints(
        cout,
        "bias",
        candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let gemm_path = weight.device().is_cpu() && stride == 1;
    let (weight, packed) = if gemm_path {
        let packed = weight
            .permute((0, 2, 3, 1))?
            .reshape((cout, k * k * cin))?
            .contiguous()?;
        (None, Some(packed))
    } else {
        (Some(weight), None)
    };
    Ok(Conv2d {
        weight,
        packed,
        bias,
        k,
        stride,
        padding,
        cout,
    })
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let y = match (&self.packed, &self.weight) {
            (Some(packed), _) if x.device().is_cpu() => {
                let p = self.padding;
                let (oh, ow) = (h + 2 * p + 1 - self.k, w + 2 * p + 1 - self.k);
                let cols = if self.k == 1 && p == 0 {
                    x.contiguous()?.reshape((b, c, h * w))?
                } else {
                    let xp = if p > 0 {
                        x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?
                    } else {
                        x.clone()
                    };
                    let mut views = Vec::with_capacity(self.k * self.k);
                    for kh in 0..self.k {
                        for kw in 0..self.k {
                            views.push(xp.narrow(2, kh, oh)?.narrow(3, kw, ow)?.contiguous()?);
                        }
                    }
                    Tensor::cat(&views, 1)?.reshape((b, self.k * self.k * c, oh * ow))?
                };
                let y = if b == 1 {
                    packed.matmul(&cols.squeeze(0)?)?.unsqueeze(0)?
                } else {
                    packed.broadcast_left(b)?.matmul(&cols)?
                };
                y.reshape((b, self.cout, oh, ow))?
            }
            (_, Some(weight)) => x.conv2d(weight, self.padding, self.stride, 1, 1)?,
            _ => candle_core::bail!("conv2d: packed CPU kernel used on a non-CPU input"),
        };
        y.broadcast_add(&self.bias.reshape((1, self.cout, 1, 1))?)
    }
}
