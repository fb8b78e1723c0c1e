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

/// Softmax over the last dimension; fused kernel for inference, composite (differentiable)
/// ops when the input tracks gradients.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() || x.dtype() == DType::F64 {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Exact GELU: x·Φ(x) = 0.5·x·(1 + erf(x/√2)) (torch.nn.functional.gelu default).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
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
pub fn conv2d(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<candle_nn::Conv2d> {
    let cfg = candle_nn::Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    candle_nn::conv2d(cin, cout, k, cfg, vb)
}
