//! Small layers the engine owns instead of taking candle-nn's, each for a stated reason:
//!
//! * [`LayerNorm`]: candle-nn's `LayerNorm::forward` takes a fused kernel that has no backward
//!   pass (the gradient is silently cut, see shared/reference/candle.md §2) and no f64 CPU
//!   kernel. Ours uses the fused kernel only when no gradient is being tracked.
//! * [`softmax_last_dim`]: the same trap for candle-nn's fused softmax.
//! * [`gelu_erf`]: diffusers and transformers use exact erf-GELU; candle's `gelu()` is the tanh
//!   approximation.
//!
//! * [`Linear`], [`GroupNorm`]: candle-nn's arithmetic, but on the gradient path their frozen
//!   weights go through [`crate::train::frozen`], so candle does not compute and store a
//!   gradient for every frozen weight (and an activation-sized one for every frozen bias).
//!
//! Embedding comes from candle-nn unchanged.

use candle_core::{DType, Module, Result, Tensor, D};

use crate::train::frozen::{
    add_frozen, frozen_weight, matmul_frozen_lhs, matmul_frozen_rhs, mul_frozen,
};
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
        let y = mul_frozen(&xn.to_dtype(dtype)?, &self.weight)?;
        add_frozen(&y, &self.bias)
    }
}

/// `y = x·Wᵀ + b` (torch.nn.Linear), candle-nn's arithmetic.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer from its weight `[out, in]` and optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = match *x.dims() {
            [b1, b2, _, _] => self.weight.broadcast_left((b1, b2))?.t()?,
            [b, _, _] => self.weight.broadcast_left(b)?.t()?,
            _ => self.weight.t()?,
        };
        let y = matmul_frozen_rhs(x, &w)?;
        match &self.bias {
            None => Ok(y),
            Some(b) => add_frozen(&y, b),
        }
    }
}

/// Loads a biased [`Linear`] (`weight`, `bias`) under `vb`, initialised as candle-nn's.
pub fn linear(din: usize, dout: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear(din, dout, vb)?;
    Ok(Linear::new(l.weight().clone(), l.bias().cloned()))
}

/// Loads an unbiased [`Linear`] under `vb`.
pub fn linear_no_bias(din: usize, dout: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear_no_bias(din, dout, vb)?;
    Ok(Linear::new(l.weight().clone(), None))
}

/// GroupNorm (torch.nn.GroupNorm), candle-nn's arithmetic with frozen affine parameters on
/// the gradient path.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    num_channels: usize,
    num_groups: usize,
}

/// Loads a [`GroupNorm`] (`weight`, `bias`) under `vb`.
pub fn group_norm(
    num_groups: usize,
    num_channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
        candle_core::bail!("GroupNorm: {num_channels} channels in {num_groups} groups");
    }
    Ok(GroupNorm {
        weight: vb.get_with_hints(num_channels, "weight", candle_nn::Init::Const(1.0))?,
        bias: vb.get_with_hints(num_channels, "bias", candle_nn::Init::Const(0.0))?,
        eps,
        num_channels,
        num_groups,
    })
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x_shape = x.dims();
        if x_shape.len() <= 2 || x_shape[1] != self.num_channels {
            candle_core::bail!(
                "GroupNorm of {} channels applied to {:?}",
                self.num_channels,
                x_shape
            );
        }
        let x_dtype = x.dtype();
        let internal = match x_dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let b = x_shape[0];
        let hidden = x_shape[2..].iter().product::<usize>() * self.num_channels / self.num_groups;
        let xg = x
            .reshape((b, self.num_groups, hidden))?
            .to_dtype(internal)?;
        let mean = (xg.sum_keepdim(2)? / hidden as f64)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(2)? / hidden as f64)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut w_dims = vec![1; x_shape.len()];
        w_dims[1] = self.num_channels;
        let y = xn.to_dtype(x_dtype)?.reshape(x_shape)?;
        let y = mul_frozen(&y, &self.weight.reshape(w_dims.clone())?)?;
        add_frozen(&y, &self.bias.reshape(w_dims)?)
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

/// The im2col matrix of `x` `[B, C, H, W]` for a `k`×`k` kernel: `[B, k·k·C, OH·OW]` in
/// (kh, kw, c) row order, built from shifted (and, for stride > 1, subsampled) views.
pub(crate) fn im2col(
    x: &Tensor,
    k: usize,
    stride: usize,
    p: usize,
) -> Result<(Tensor, usize, usize)> {
    let (b, c, h, w) = x.dims4()?;
    if h + 2 * p < k || w + 2 * p < k {
        candle_core::bail!("conv2d: {k}x{k} kernel on a {h}x{w} input with padding {p}");
    }
    let (oh, ow) = ((h + 2 * p - k) / stride + 1, (w + 2 * p - k) / stride + 1);
    if k == 1 && p == 0 && stride == 1 {
        return Ok((x.contiguous()?.reshape((b, c, h * w))?, oh, ow));
    }
    let xp = if p > 0 {
        x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?
    } else {
        x.clone()
    };
    let every = |n: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..n).map(|i| (i * stride) as u32).collect();
        Tensor::new(idx.as_slice(), x.device())
    };
    let (rows, cols) = if stride > 1 {
        (Some(every(oh)?), Some(every(ow)?))
    } else {
        (None, None)
    };
    let (sh, sw) = (stride * (oh - 1) + 1, stride * (ow - 1) + 1);
    let mut views = Vec::with_capacity(k * k);
    for kh in 0..k {
        for kw in 0..k {
            let mut v = xp.narrow(2, kh, sh)?.narrow(3, kw, sw)?;
            if let (Some(r), Some(c)) = (&rows, &cols) {
                v = v.contiguous()?.index_select(r, 2)?.index_select(c, 3)?;
            }
            views.push(v.contiguous()?);
        }
    }
    Ok((
        Tensor::cat(&views, 1)?.reshape((b, k * k * c, oh * ow))?,
        oh,
        ow,
    ))
}

/// `packed` `[out, K]` times `cols` `[B, K, N]`, the packed kernel frozen.
fn packed_gemm(packed: &Tensor, cols: &Tensor) -> Result<Tensor> {
    let b = cols.dim(0)?;
    if b == 1 {
        matmul_frozen_lhs(packed, &cols.squeeze(0)?)?.unsqueeze(0)
    } else {
        matmul_frozen_lhs(&packed.broadcast_left(b)?, cols)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let y = match (&self.packed, &self.weight) {
            (Some(packed), _) if x.device().is_cpu() => {
                let (cols, oh, ow) = im2col(x, self.k, 1, self.padding)?;
                packed_gemm(packed, &cols)?.reshape((b, self.cout, oh, ow))?
            }
            // On the gradient path, a frozen kernel: im2col + GEMM without its gradient.
            (_, Some(weight)) if frozen_weight(x, weight) => {
                let packed = weight
                    .permute((0, 2, 3, 1))?
                    .reshape((self.cout, ()))?
                    .contiguous()?;
                let (cols, oh, ow) = im2col(x, self.k, self.stride, self.padding)?;
                packed_gemm(&packed, &cols)?.reshape((b, self.cout, oh, ow))?
            }
            (_, Some(weight)) => x.conv2d(weight, self.padding, self.stride, 1, 1)?,
            _ => candle_core::bail!("conv2d: packed CPU kernel used on a non-CPU input"),
        };
        add_frozen(&y, &self.bias.reshape((1, self.cout, 1, 1))?)
    }
}
