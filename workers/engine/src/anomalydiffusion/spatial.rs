//! AnomalyDiffusion's spatial encoder E: a mask `[B,1,256,256]` in [0,1] becomes `text_num`
//! token vectors `[B,text_num,out_dim]` (e_s, spliced after the anomaly embedding e_a; spec
//! `shared/reference/anomalydiffusion.md` §3.3). It is pSp's `GradualStyleEncoder` with an IR-50
//! backbone in `'ir'` mode (no squeeze-excitation), randomly initialised by the authors and
//! trained jointly with the anomaly embeddings.
//!
//! Architecture (official widths in brackets; the config scales them for test fixtures):
//! - input `x = 2·mask − 1`, repeated to 3 channels when the mask has one;
//! - stem `input_layer`: conv3×3 (3→stem [64], no bias) → BatchNorm → PReLU;
//! - body: four stages of `bottleneck_IR` units ([3, 4, 14, 3] units, widths [64, 128, 256,
//!   512]); the first unit of each stage has stride 2 (256 → 128 → 64 → 32 → 16). A unit is
//!   `shortcut(x) + res(x)` with
//!   - shortcut: `MaxPool2d(1, s)` (plain subsampling `x[:, :, ::s, ::s]`) when in == out, else
//!     conv1×1 (stride s, no bias) → BatchNorm;
//!   - res: BatchNorm(in) → conv3×3 (s1, p1, no bias) → PReLU → conv3×3 (stride s, p1, no bias)
//!     → BatchNorm(out);
//! - taps at the stage ends: c1 (stage 2, unit 6, @64²), c2 (stage 3, unit 20, @32²), c3 (stage
//!   4, unit 23, @16²). The official code hard-codes the indices 6/20/23, which are exactly the
//!   IR-50 stage ends; this implementation derives them from `units`;
//! - FPN: `p2 = up(c3) + latlayer1(c2)`, `p1 = up(p2) + latlayer2(c1)` with bilinear
//!   upsampling, **align_corners=True** (`latlayer*` are biased 1×1 convs to `fpn_dim` [512]);
//! - heads `styles.{i}`: heads `i < coarse_ind` read c3, `i < middle_ind` read p2, the rest read
//!   p1 (AnomalyDiffusion: coarse_ind = middle_ind = 0, so all four read p1). A head
//!   (`GradualStyleBlock`) is log2(s) × [conv3×3 stride 2 p1 with bias → LeakyReLU(0.01)] down
//!   to 1×1 (s = its input size: `spatial` [64] for p1, `spatial/2` for p2, `spatial/4` for c3,
//!   the official 64/32/16), then flatten and stylegan2's `EqualLinear(out_dim, out_dim,
//!   lr_mul=1)`: `y = x·(W·(lr_mul/√in))ᵀ + b·lr_mul`, with the scale applied at run time;
//! - the heads' outputs are stacked to `[B, text_num, out_dim]`.
//!
//! The full-size model has 356,019,392 parameters (+24,372 BatchNorm buffer elements), about
//! 1.4 GB in f32: each head holds 81.3 M of them.
//!
//! **BatchNorm modes.** [`BnMode::Eval`] (the default) normalises with the running statistics.
//! [`BnMode::Train`] reproduces what the official `generate_with_mask.py` actually does: it never
//! calls `.eval()` on the encoder, so BatchNorm normalises with the statistics of the current
//! batch (biased variance) and updates the running buffers as torch does (momentum 0.1, the
//! *unbiased* variance, `num_batches_tracked += 1`). The running buffers therefore live behind
//! a mutex: a train-mode forward changes the model's state (later eval-mode outputs included),
//! while the model stays `Send + Sync` so workers can share it. Concurrent train-mode forwards
//! update the buffers in an unspecified interleaving, as two torch threads would.
//!
//! Numerics follow torch's CPU kernels where it matters for parity: batch statistics and the
//! running-stat update are computed in f64 (torch accumulates in double), BatchNorm is applied
//! as `x·α + β` with `α = γ/√(σ²+ε)`, `β = b − μ·α`, and the align-corners interpolation taps
//! are computed in f32 exactly like `upsample_bilinear2d` (`src = i·(in−1)/(out−1)`).
//!
//! Weights: the official `spatial_encoder.pt` state dict (read through
//! [`crate::ad_files::read_torch_state_dict`]) or a safetensors copy with the same key names,
//! loaded with full tensor accounting by [`crate::weights::Weights`], BatchNorm buffers
//! (`running_mean`, `running_var`, I64 `num_batches_tracked`) included.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Result as CResult, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Conv2d, Conv2dConfig, Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::weights::Weights;

/// BatchNorm's epsilon (torch's default, used by every BatchNorm2d of the encoder).
const BN_EPS: f64 = 1e-5;
/// BatchNorm's running-statistics momentum (torch's default).
const BN_MOMENTUM: f64 = 0.1;
/// `nn.LeakyReLU()`'s default negative slope, used by the heads.
const LEAKY_SLOPE: f64 = 0.01;
/// `EqualLinear(..., lr_mul=1)` in `GradualStyleBlock`.
const LR_MUL: f64 = 1.0;

/// The shape of a spatial encoder. `Default` is the official full-size AnomalyDiffusion encoder
/// (`GradualStyleEncoder(50, 'ir', text_num=4)`); the reduced fixtures store theirs as JSON in
/// the safetensors metadata key `config`. Missing JSON fields take the official values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpatialEncoderConfig {
    /// Number of output tokens (heads), official 4.
    pub text_num: usize,
    /// Stem width (`input_layer` conv output), official 64.
    pub stem: usize,
    /// Output width of the four IR stages, official [64, 128, 256, 512].
    pub widths: Vec<usize>,
    /// Units per IR stage, official [3, 4, 14, 3] (IR-50).
    pub units: Vec<usize>,
    /// Width of the FPN maps p1/p2 (`latlayer*` outputs), official 512. Must equal `widths[3]`
    /// because c3 is added to the upsampled lateral map.
    pub fpn_dim: usize,
    /// Token dimension (head width), official 1280 (the LDM-BERT context width).
    pub out_dim: usize,
    /// Input size of the p1 heads, official 64: log2(spatial) stride-2 convs reach 1×1.
    pub spatial: usize,
    /// Heads `0..coarse_ind` read c3 (official 0).
    pub coarse_ind: usize,
    /// Heads `coarse_ind..middle_ind` read p2 (official 0); the rest read p1.
    pub middle_ind: usize,
}

impl Default for SpatialEncoderConfig {
    fn default() -> Self {
        Self {
            text_num: 4,
            stem: 64,
            widths: vec![64, 128, 256, 512],
            units: vec![3, 4, 14, 3],
            fpn_dim: 512,
            out_dim: 1280,
            spatial: 64,
            coarse_ind: 0,
            middle_ind: 0,
        }
    }
}

/// Where a head reads its features from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadInput {
    C3,
    P2,
    P1,
}

impl SpatialEncoderConfig {
    /// Checks that the config describes a buildable encoder.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Invalid(format!("spatial encoder config: {m}")));
        if self.widths.len() != 4 || self.units.len() != 4 {
            return bad(format!(
                "widths and units must have 4 entries (IR stages), got {:?} and {:?}",
                self.widths, self.units
            ));
        }
        if self.units.contains(&0) || self.widths.contains(&0) || self.stem == 0 {
            return bad(format!(
                "stem, widths and units must be > 0 (stem {}, widths {:?}, units {:?})",
                self.stem, self.widths, self.units
            ));
        }
        if self.fpn_dim != self.widths[3] {
            return bad(format!(
                "fpn_dim ({}) must equal widths[3] ({}): p2 = up(c3) + latlayer1(c2)",
                self.fpn_dim, self.widths[3]
            ));
        }
        if self.text_num == 0 || self.out_dim == 0 {
            return bad("text_num and out_dim must be > 0".into());
        }
        if !self.spatial.is_power_of_two() || self.spatial < 8 {
            return bad(format!(
                "spatial must be a power of two >= 8 (the coarse heads use spatial/4), got {}",
                self.spatial
            ));
        }
        if self.coarse_ind > self.middle_ind || self.middle_ind > self.text_num {
            return bad(format!(
                "need coarse_ind <= middle_ind <= text_num, got {} / {} / {}",
                self.coarse_ind, self.middle_ind, self.text_num
            ));
        }
        Ok(())
    }

    fn head_input(&self, i: usize) -> HeadInput {
        if i < self.coarse_ind {
            HeadInput::C3
        } else if i < self.middle_ind {
            HeadInput::P2
        } else {
            HeadInput::P1
        }
    }

    /// Reads the config stored as JSON in a safetensors file's metadata key `config` (how the
    /// project stores non-default encoders); `Ok(None)` when the file has no such key.
    pub fn from_safetensors_metadata(path: &Path) -> Result<Option<Self>> {
        let io = |source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |m: String| EngineError::Invalid(format!("{}: {m}", path.display()));
        let mut f = std::fs::File::open(path).map_err(io)?;
        let file_len = f.metadata().map_err(io)?.len();
        let mut n = [0u8; 8];
        std::io::Read::read_exact(&mut f, &mut n).map_err(io)?;
        let n = u64::from_le_bytes(n);
        if n.saturating_add(8) > file_len {
            return Err(invalid(format!(
                "not a safetensors file (header length {n} exceeds the file size {file_len})"
            )));
        }
        let mut header = vec![0u8; n as usize];
        std::io::Read::read_exact(&mut f, &mut header).map_err(io)?;
        let header: serde_json::Value = serde_json::from_slice(&header)
            .map_err(|e| invalid(format!("safetensors header is not JSON: {e}")))?;
        let Some(cfg) = header.get("__metadata__").and_then(|m| m.get("config")) else {
            return Ok(None);
        };
        let text = cfg
            .as_str()
            .ok_or_else(|| invalid("metadata `config` is not a string".into()))?;
        let cfg: Self = serde_json::from_str(text).map_err(|e| {
            invalid(format!(
                "metadata `config` is not a spatial encoder config: {e}"
            ))
        })?;
        cfg.validate()?;
        Ok(Some(cfg))
    }

    /// Every tensor the encoder reads, in construction order (the official module
    /// registration order: input_layer, body, styles, latlayer1, latlayer2). Built by running the real
    /// constructor against a recorder that hands out zero-stride tensors, so nothing
    /// model-sized is allocated even for the full size.
    pub fn tensor_shapes(&self) -> Result<Vec<TensorSpec>> {
        self.validate()?;
        let rec = std::sync::Arc::new(Mutex::new(Vec::new()));
        let vb = VarBuilder::from_backend(
            Box::new(ShapeRecorder(rec.clone())),
            DType::F32,
            Device::Cpu,
        );
        SpatialEncoder::new(vb, self)?;
        let v = rec.lock().expect("shape recorder lock").clone();
        Ok(v)
    }

    /// The number of trainable parameters (BatchNorm buffers excluded); 356,019,392 for the
    /// official full-size encoder.
    pub fn parameter_count(&self) -> Result<usize> {
        Ok(self
            .tensor_shapes()?
            .iter()
            .filter(|t| !t.is_buffer)
            .map(|t| t.shape.iter().product::<usize>())
            .sum())
    }

    /// The number of BatchNorm buffer elements (running mean/var and `num_batches_tracked`).
    pub fn buffer_count(&self) -> Result<usize> {
        Ok(self
            .tensor_shapes()?
            .iter()
            .filter(|t| t.is_buffer)
            .map(|t| t.shape.iter().product::<usize>())
            .sum())
    }
}

/// One tensor of the encoder's state dict, as [`SpatialEncoderConfig::tensor_shapes`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The official state-dict key, e.g. `body.3.shortcut_layer.0.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    /// A BatchNorm buffer (`running_mean`, `running_var`, `num_batches_tracked`), not a
    /// trainable parameter.
    pub is_buffer: bool,
}

/// Records the names and shapes a constructor asks for; hands out zero-stride zeros.
struct ShapeRecorder(std::sync::Arc<Mutex<Vec<TensorSpec>>>);

fn is_bn_buffer(name: &str) -> bool {
    name.ends_with(".running_mean")
        || name.ends_with(".running_var")
        || name.ends_with(".num_batches_tracked")
}

impl SimpleBackend for ShapeRecorder {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> CResult<Tensor> {
        self.0
            .lock()
            .expect("shape recorder lock")
            .push(TensorSpec {
                name: name.to_string(),
                shape: s.dims().to_vec(),
                is_buffer: is_bn_buffer(name),
            });
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> CResult<Tensor> {
        candle_core::bail!("shape recorder: unchecked read of {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// How BatchNorm layers normalise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BnMode {
    /// Running statistics (torch `.eval()`); the model is not modified.
    #[default]
    Eval,
    /// Batch statistics with the biased variance, and the running buffers are updated
    /// (momentum 0.1, unbiased variance, `num_batches_tracked += 1`): torch `.train()`, which is
    /// what the official generation script runs.
    Train,
    /// Batch statistics like [`BnMode::Train`] (same output), leaving the running buffers
    /// untouched: the official generation behaviour for a model shared by many batches.
    Batch,
}

/// A BatchNorm layer's running buffers (f32, on the model's device).
#[derive(Debug, Clone)]
pub struct RunningStats {
    pub mean: Tensor,
    pub var: Tensor,
    pub num_batches_tracked: i64,
}

/// `BatchNorm2d` with torch's eval/train semantics; the running buffers sit behind a mutex so
/// a train-mode forward can update them through `&self`.
#[derive(Debug)]
struct BatchNorm {
    name: String,
    weight: Tensor,
    bias: Tensor,
    stats: Mutex<RunningStats>,
}

impl BatchNorm {
    fn new(c: usize, vb: VarBuilder) -> CResult<Self> {
        let weight = vb.get_with_hints(c, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(c, "bias", Init::Const(0.0))?;
        let mean = vb.get_with_hints_dtype(c, "running_mean", Init::Const(0.0), DType::F32)?;
        let var = vb.get_with_hints_dtype(c, "running_var", Init::Const(1.0), DType::F32)?;
        let nbt =
            vb.get_with_hints_dtype((), "num_batches_tracked", Init::Const(0.0), DType::I64)?;
        Ok(Self {
            name: vb.prefix(),
            weight,
            bias,
            stats: Mutex::new(RunningStats {
                mean,
                var,
                num_batches_tracked: nbt.to_scalar::<i64>()?,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunningStats> {
        // A panic while holding the lock cannot leave the stats half-written (they are
        // replaced whole), so a poisoned lock is still usable.
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forward(&self, x: &Tensor, mode: BnMode) -> CResult<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (mean, var) = match mode {
            BnMode::Eval => {
                let s = self.lock();
                (s.mean.to_dtype(DType::F64)?, s.var.to_dtype(DType::F64)?)
            }
            BnMode::Train | BnMode::Batch => {
                let n = b * h * w;
                if n < 2 {
                    candle_core::bail!(
                        "{}: train-mode BatchNorm needs more than 1 value per channel (input {:?})",
                        self.name,
                        x.dims()
                    );
                }
                // Per-channel statistics in f64, as torch's CPU kernel accumulates in double.
                let xc = x.to_dtype(DType::F64)?.transpose(0, 1)?.reshape((c, n))?;
                let mean = xc.mean(1)?;
                let sq = xc.broadcast_sub(&mean.unsqueeze(1)?)?.sqr()?.sum(1)?;
                let var_biased = (&sq / n as f64)?;
                if mode == BnMode::Batch {
                    return self.normalize(x, mean, var_biased);
                }
                let var_unbiased = (&sq / (n - 1) as f64)?;
                let mut s = self.lock();
                let m = BN_MOMENTUM;
                let new_mean =
                    ((mean.detach() * m)? + (s.mean.to_dtype(DType::F64)? * (1.0 - m))?)?;
                let new_var =
                    ((var_unbiased.detach() * m)? + (s.var.to_dtype(DType::F64)? * (1.0 - m))?)?;
                s.mean = new_mean.to_dtype(DType::F32)?;
                s.var = new_var.to_dtype(DType::F32)?;
                s.num_batches_tracked += 1;
                (mean, var_biased)
            }
        };
        self.normalize(x, mean, var)
    }

    /// `(x − mean)/√(var + eps)·γ + β` with f64 per-channel statistics.
    fn normalize(&self, x: &Tensor, mean: Tensor, var: Tensor) -> CResult<Tensor> {
        let c = x.dim(1)?;
        let alpha = ((var + BN_EPS)?.sqrt()?.recip()? * self.weight.to_dtype(DType::F64)?)?;
        let beta = (self.bias.to_dtype(DType::F64)? - (mean * &alpha)?)?;
        let alpha = alpha.to_dtype(x.dtype())?.reshape((1, c, 1, 1))?;
        let beta = beta.to_dtype(x.dtype())?.reshape((1, c, 1, 1))?;
        x.broadcast_mul(&alpha)?.broadcast_add(&beta)
    }
}

/// Per-channel PReLU: `x` where positive, `a_c·x` elsewhere.
#[derive(Debug, Clone)]
struct PRelu {
    weight: Tensor,
}

impl PRelu {
    fn new(c: usize, vb: VarBuilder) -> CResult<Self> {
        Ok(Self {
            weight: vb.get_with_hints(c, "weight", Init::Const(0.25))?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let c = self.weight.dim(0)?;
        let neg = x
            .minimum(0.0)?
            .broadcast_mul(&self.weight.reshape((1, c, 1, 1))?)?;
        x.relu()? + neg
    }
}

fn leaky_relu(x: &Tensor) -> CResult<Tensor> {
    x.maximum(&(x * LEAKY_SLOPE)?)
}

/// `MaxPool2d(kernel_size=1, stride=s)`: keeps every s-th row and column.
fn subsample(x: &Tensor, s: usize) -> CResult<Tensor> {
    if s == 1 {
        return Ok(x.clone());
    }
    let (_, _, h, w) = x.dims4()?;
    let rows: Vec<u32> = (0..h).step_by(s).map(|i| i as u32).collect();
    let cols: Vec<u32> = (0..w).step_by(s).map(|i| i as u32).collect();
    let x = x.index_select(&Tensor::new(rows.as_slice(), x.device())?, 2)?;
    x.index_select(&Tensor::new(cols.as_slice(), x.device())?, 3)
}

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    bias: bool,
    vb: VarBuilder,
) -> CResult<Conv2d> {
    let cfg = Conv2dConfig {
        padding: k / 2,
        stride,
        ..Default::default()
    };
    if bias {
        candle_nn::conv2d(cin, cout, k, cfg, vb)
    } else {
        candle_nn::conv2d_no_bias(cin, cout, k, cfg, vb)
    }
}

/// Bilinear resize of `[B,C,H,W]` to `[B,C,out_h,out_w]` with `align_corners=True`, as torch's
/// `F.interpolate(..., mode='bilinear', align_corners=True)`: separable two-tap gathers, the
/// width pass first, taps and weights computed in f32 exactly like torch's CPU kernel.
/// Differentiable (index_select + elementwise ops).
pub fn upsample_bilinear_align_corners(x: &Tensor, out_h: usize, out_w: usize) -> CResult<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let xw = lerp_axis(x, 3, w, out_w)?;
    lerp_axis(&xw, 2, h, out_h)
}

/// One axis of the align-corners linear interpolation: `out[i] = l0·x[i0] + l1·x[i1]` with
/// `src = i·(n_in−1)/(n_out−1)`, `i0 = ⌊src⌋`, `i1 = min(i0+1, n_in−1)`, `l1 = src − i0`.
fn lerp_axis(x: &Tensor, dim: usize, n_in: usize, n_out: usize) -> CResult<Tensor> {
    if n_in == 0 || n_out == 0 {
        candle_core::bail!("bilinear upsample: empty axis ({n_in} -> {n_out})");
    }
    let scale: f32 = if n_out > 1 {
        (n_in - 1) as f32 / (n_out - 1) as f32
    } else {
        0.0
    };
    let (mut i0s, mut i1s, mut l0s, mut l1s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..n_out {
        let src = scale * i as f32;
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = if i0 < n_in - 1 { i0 + 1 } else { i0 };
        let l1 = (src - i0 as f32).clamp(0.0, 1.0);
        i0s.push(i0 as u32);
        i1s.push(i1 as u32);
        l0s.push(1.0 - l1);
        l1s.push(l1);
    }
    let dev = x.device();
    let mut wshape = vec![1usize; x.rank()];
    wshape[dim] = n_out;
    let weights = |v: Vec<f32>| -> CResult<Tensor> {
        Tensor::from_vec(v, wshape.clone(), dev)?.to_dtype(x.dtype())
    };
    let a = x
        .index_select(&Tensor::new(i0s.as_slice(), dev)?, dim)?
        .broadcast_mul(&weights(l0s)?)?;
    let b = x
        .index_select(&Tensor::new(i1s.as_slice(), dev)?, dim)?
        .broadcast_mul(&weights(l1s)?)?;
    a + b
}

/// The shortcut branch of a `bottleneck_IR` unit.
#[derive(Debug)]
enum Shortcut {
    /// `MaxPool2d(1, stride)`.
    Subsample(usize),
    /// conv1×1 (stride, no bias) → BatchNorm.
    Project { conv: Conv2d, bn: BatchNorm },
}

/// `bottleneck_IR(in, depth, stride)`.
#[derive(Debug)]
struct BottleneckIr {
    shortcut: Shortcut,
    bn_in: BatchNorm,
    conv1: Conv2d,
    prelu: PRelu,
    conv2: Conv2d,
    bn_out: BatchNorm,
}

impl BottleneckIr {
    fn new(cin: usize, depth: usize, stride: usize, vb: VarBuilder) -> CResult<Self> {
        let shortcut = if cin == depth {
            Shortcut::Subsample(stride)
        } else {
            let s = vb.pp("shortcut_layer");
            Shortcut::Project {
                conv: conv(cin, depth, 1, stride, false, s.pp("0"))?,
                bn: BatchNorm::new(depth, s.pp("1"))?,
            }
        };
        let r = vb.pp("res_layer");
        Ok(Self {
            shortcut,
            bn_in: BatchNorm::new(cin, r.pp("0"))?,
            conv1: conv(cin, depth, 3, 1, false, r.pp("1"))?,
            prelu: PRelu::new(depth, r.pp("2"))?,
            conv2: conv(depth, depth, 3, stride, false, r.pp("3"))?,
            bn_out: BatchNorm::new(depth, r.pp("4"))?,
        })
    }

    fn forward(&self, x: &Tensor, mode: BnMode) -> CResult<Tensor> {
        // Same order as torch (shortcut first) so that train-mode running-stat updates happen
        // in the same sequence.
        let shortcut = match &self.shortcut {
            Shortcut::Subsample(s) => subsample(x, *s)?,
            Shortcut::Project { conv, bn } => bn.forward(&conv.forward(x)?, mode)?,
        };
        let r = self.bn_in.forward(x, mode)?;
        let r = self.prelu.forward(&self.conv1.forward(&r)?)?;
        let r = self.bn_out.forward(&self.conv2.forward(&r)?, mode)?;
        r + shortcut
    }

    fn batch_norms(&self) -> Vec<&BatchNorm> {
        let mut v = Vec::with_capacity(3);
        if let Shortcut::Project { bn, .. } = &self.shortcut {
            v.push(bn);
        }
        v.push(&self.bn_in);
        v.push(&self.bn_out);
        v
    }
}

/// stylegan2's `EqualLinear` without activation: the He-style scale is applied at run time.
#[derive(Debug, Clone)]
struct EqualLinear {
    weight: Tensor,
    bias: Tensor,
    scale: f64,
}

impl EqualLinear {
    fn new(din: usize, dout: usize, vb: VarBuilder) -> CResult<Self> {
        Ok(Self {
            weight: vb.get_with_hints(
                (dout, din),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0 / LR_MUL,
                },
            )?,
            bias: vb.get_with_hints(dout, "bias", Init::Const(0.0))?,
            scale: LR_MUL / (din as f64).sqrt(),
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let w = (&self.weight * self.scale)?;
        let b = if LR_MUL == 1.0 {
            self.bias.clone()
        } else {
            (&self.bias * LR_MUL)?
        };
        x.matmul(&w.t()?)?.broadcast_add(&b)
    }
}

/// `GradualStyleBlock(in, out, spatial)`: log2(spatial) × (conv3×3 s2 + LeakyReLU), flatten,
/// EqualLinear.
#[derive(Debug)]
struct StyleHead {
    convs: Vec<Conv2d>,
    linear: EqualLinear,
    out_dim: usize,
}

impl StyleHead {
    fn new(cin: usize, out_dim: usize, spatial: usize, vb: VarBuilder) -> CResult<Self> {
        let n = spatial.trailing_zeros() as usize;
        let c = vb.pp("convs");
        // Sequential indices: convs at even positions, LeakyReLU (no parameters) at odd ones.
        let convs = (0..n)
            .map(|k| {
                let i = if k == 0 { cin } else { out_dim };
                conv(i, out_dim, 3, 2, true, c.pp(2 * k))
            })
            .collect::<CResult<Vec<_>>>()?;
        Ok(Self {
            convs,
            linear: EqualLinear::new(out_dim, out_dim, vb.pp("linear"))?,
            out_dim,
        })
    }

    fn forward(&self, x: &Tensor, index: usize) -> CResult<Tensor> {
        let mut x = x.clone();
        for c in &self.convs {
            x = leaky_relu(&c.forward(&x)?)?;
        }
        let (b, _, h, w) = x.dims4()?;
        if (h, w) != (1, 1) {
            // The official `x.view(-1, out_c)` would silently turn the leftover pixels into
            // extra rows; refuse instead.
            candle_core::bail!(
                "spatial encoder head styles.{index} ends at {h}x{w}, not 1x1: the input mask has the wrong size (the official encoder takes 256x256 masks)"
            );
        }
        self.linear.forward(&x.reshape((b, self.out_dim))?)
    }
}

/// The intermediate maps of a forward pass (for parity checks and debugging).
#[derive(Debug, Clone)]
pub struct SpatialTaps {
    /// Output of stage 2 (official unit 6): `[B, widths[1], 64, 64]`.
    pub c1: Tensor,
    /// Output of stage 3 (official unit 20): `[B, widths[2], 32, 32]`.
    pub c2: Tensor,
    /// Output of stage 4 (official unit 23): `[B, widths[3], 16, 16]`.
    pub c3: Tensor,
    /// `up(c3) + latlayer1(c2)`: `[B, fpn_dim, 32, 32]`.
    pub p2: Tensor,
    /// `up(p2) + latlayer2(c1)`: `[B, fpn_dim, 64, 64]`.
    pub p1: Tensor,
    /// The encoder output `[B, text_num, out_dim]`.
    pub tokens: Tensor,
}

/// The AnomalyDiffusion spatial encoder (see the module documentation).
#[derive(Debug)]
pub struct SpatialEncoder {
    config: SpatialEncoderConfig,
    stem_conv: Conv2d,
    stem_bn: BatchNorm,
    stem_prelu: PRelu,
    body: Vec<BottleneckIr>,
    /// Body indices of the c1, c2, c3 taps (stage ends).
    taps: [usize; 3],
    latlayer1: Conv2d,
    latlayer2: Conv2d,
    heads: Vec<StyleHead>,
}

impl SpatialEncoder {
    /// Builds the encoder from a `VarBuilder` rooted at the state dict's root (official names).
    pub fn new(vb: VarBuilder, config: &SpatialEncoderConfig) -> CResult<Self> {
        config
            .validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let c = config;
        let input = vb.pp("input_layer");
        let stem_conv = conv(3, c.stem, 3, 1, false, input.pp("0"))?;
        let stem_bn = BatchNorm::new(c.stem, input.pp("1"))?;
        let stem_prelu = PRelu::new(c.stem, input.pp("2"))?;
        let mut body = Vec::new();
        let mut taps = [0usize; 3];
        let mut cin = c.stem;
        for (stage, (&depth, &n)) in c.widths.iter().zip(&c.units).enumerate() {
            for u in 0..n {
                let (i, stride) = if u == 0 { (cin, 2) } else { (depth, 1) };
                body.push(BottleneckIr::new(
                    i,
                    depth,
                    stride,
                    vb.pp("body").pp(body.len()),
                )?);
            }
            cin = depth;
            if stage >= 1 {
                taps[stage - 1] = body.len() - 1;
            }
        }
        // Heads before the lateral convs: the official registration (state-dict) order.
        let heads = (0..c.text_num)
            .map(|i| {
                let (cin, spatial) = match c.head_input(i) {
                    HeadInput::C3 => (c.widths[3], c.spatial / 4),
                    HeadInput::P2 => (c.fpn_dim, c.spatial / 2),
                    HeadInput::P1 => (c.fpn_dim, c.spatial),
                };
                StyleHead::new(cin, c.out_dim, spatial, vb.pp("styles").pp(i))
            })
            .collect::<CResult<Vec<_>>>()?;
        let latlayer1 = conv(c.widths[2], c.fpn_dim, 1, 1, true, vb.pp("latlayer1"))?;
        let latlayer2 = conv(c.widths[1], c.fpn_dim, 1, 1, true, vb.pp("latlayer2"))?;
        Ok(Self {
            config: c.clone(),
            stem_conv,
            stem_bn,
            stem_prelu,
            body,
            taps,
            latlayer1,
            latlayer2,
            heads,
        })
    }

    /// Builds the encoder from `weights` with full tensor accounting: a missing, misshapen or
    /// unexpected tensor is an error naming it.
    pub fn from_weights(weights: &Weights, config: &SpatialEncoderConfig) -> Result<Self> {
        config.validate()?;
        weights.build("SpatialEncoder", |vb| Self::new(vb, config))
    }

    /// Loads an encoder file: a safetensors file (config from `config`, else from the
    /// metadata key `config`, else the official full size) or a torch state dict
    /// (`.pt`/`.pth`/`.ckpt`, e.g. the official `spatial_encoder.pt`; config from `config`, else
    /// the official full size).
    pub fn load(
        path: &Path,
        config: Option<&SpatialEncoderConfig>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let is_torch = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("pt" | "pth" | "ckpt" | "bin")
        );
        if is_torch {
            let tensors = crate::ad_files::read_torch_state_dict(path)?;
            let weights = Weights::from_tensors(tensors.into_iter().collect(), dtype, device)
                .with_origin(&path.display().to_string());
            let cfg = config.cloned().unwrap_or_default();
            Self::from_weights(&weights, &cfg)
        } else {
            let cfg = match config {
                Some(c) => c.clone(),
                None => SpatialEncoderConfig::from_safetensors_metadata(path)?.unwrap_or_default(),
            };
            let weights = Weights::from_safetensors(&[path], dtype, device)?;
            Self::from_weights(&weights, &cfg)
        }
    }

    /// The config the encoder was built from.
    pub fn config(&self) -> &SpatialEncoderConfig {
        &self.config
    }

    /// Encodes masks `[B,1,H,W]` (or already 3-channel `[B,3,H,W]`) with values in [0,1] —
    /// 256×256 for the official encoder — into tokens `[B, text_num, out_dim]`.
    /// `BnMode::Train` updates the running statistics (see the module documentation).
    pub fn forward(&self, mask: &Tensor, mode: BnMode) -> Result<Tensor> {
        Ok(self.forward_with_taps(mask, mode)?.tokens)
    }

    /// [`Self::forward`], also returning the backbone taps and FPN maps.
    pub fn forward_with_taps(&self, mask: &Tensor, mode: BnMode) -> Result<SpatialTaps> {
        let (_, ch, _, _) = mask.dims4().map_err(|_| {
            EngineError::Invalid(format!(
                "spatial encoder: mask must be [B,1,H,W] (or [B,3,H,W]), got {:?}",
                mask.dims()
            ))
        })?;
        if ch != 1 && ch != 3 {
            return Err(EngineError::Invalid(format!(
                "spatial encoder: mask must have 1 or 3 channels, got {:?}",
                mask.dims()
            )));
        }
        let dtype = self.stem_bn.weight.dtype();
        let x = mask.to_dtype(dtype)?.affine(2.0, -1.0)?;
        let x = if ch == 1 { x.repeat((1, 3, 1, 1))? } else { x };
        let x = self.stem_conv.forward(&x)?;
        let mut x = self.stem_prelu.forward(&self.stem_bn.forward(&x, mode)?)?;
        let mut feats: [Option<Tensor>; 3] = [None, None, None];
        for (i, unit) in self.body.iter().enumerate() {
            x = unit.forward(&x, mode)?;
            if let Some(k) = self.taps.iter().position(|&t| t == i) {
                feats[k] = Some(x.clone());
            }
        }
        let [Some(c1), Some(c2), Some(c3)] = feats else {
            unreachable!("the taps are body indices by construction");
        };
        let mut tokens = Vec::with_capacity(self.heads.len());
        let run_heads = |src: HeadInput, feat: &Tensor, tokens: &mut Vec<Tensor>| -> CResult<()> {
            for (i, head) in self.heads.iter().enumerate() {
                if self.config.head_input(i) == src {
                    tokens.push(head.forward(feat, i)?);
                }
            }
            Ok(())
        };
        run_heads(HeadInput::C3, &c3, &mut tokens)?;
        let lat1 = self.latlayer1.forward(&c2)?;
        let (_, _, h2, w2) = lat1.dims4()?;
        let p2 = (upsample_bilinear_align_corners(&c3, h2, w2)? + lat1)?;
        run_heads(HeadInput::P2, &p2, &mut tokens)?;
        let lat2 = self.latlayer2.forward(&c1)?;
        let (_, _, h1, w1) = lat2.dims4()?;
        let p1 = (upsample_bilinear_align_corners(&p2, h1, w1)? + lat2)?;
        run_heads(HeadInput::P1, &p1, &mut tokens)?;
        let tokens = Tensor::stack(&tokens, 1)?;
        Ok(SpatialTaps {
            c1,
            c2,
            c3,
            p2,
            p1,
            tokens,
        })
    }

    fn batch_norms(&self) -> Vec<&BatchNorm> {
        let mut v = vec![&self.stem_bn];
        for u in &self.body {
            v.extend(u.batch_norms());
        }
        v
    }

    /// The official names of the BatchNorm layers (e.g. `input_layer.1`,
    /// `body.3.shortcut_layer.1`, `body.23.res_layer.4`).
    pub fn batch_norm_names(&self) -> Vec<String> {
        self.batch_norms().iter().map(|b| b.name.clone()).collect()
    }

    /// The current running statistics of the BatchNorm layer with official name `name`.
    pub fn running_stats(&self, name: &str) -> Result<RunningStats> {
        self.batch_norms()
            .into_iter()
            .find(|b| b.name == name)
            .map(|b| b.lock().clone())
            .ok_or_else(|| {
                EngineError::Invalid(format!(
                    "spatial encoder: no BatchNorm layer named `{name}` (e.g. `input_layer.1`, `body.23.res_layer.4`)"
                ))
            })
    }

    /// Every BatchNorm buffer under its state-dict key (`<layer>.running_mean`,
    /// `.running_var`, `.num_batches_tracked` as an I64 scalar), e.g. to save the state a
    /// train-mode forward left behind.
    pub fn running_buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for bn in self.batch_norms() {
            let s = bn.lock().clone();
            let nbt = Tensor::new(s.num_batches_tracked, s.mean.device())?;
            out.push((format!("{}.running_mean", bn.name), s.mean));
            out.push((format!("{}.running_var", bn.name), s.var));
            out.push((format!("{}.num_batches_tracked", bn.name), nbt));
        }
        Ok(out)
    }

    /// Loads an encoder file (as [`Self::load`], which checks every tensor) and rebuilds the
    /// encoder with its parameters as [`Var`]s for training; BatchNorm buffers stay constants.
    /// Returns the encoder and its parameters by official name, sorted.
    pub fn load_trainable(
        path: &Path,
        config: Option<&SpatialEncoderConfig>,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, Vec<(String, Var)>)> {
        let checked = Self::load(path, config, dtype, device)?;
        let cfg = checked.config().clone();
        drop(checked);
        let is_torch = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("pt" | "pth" | "ckpt" | "bin")
        );
        let tensors: Vec<(String, Tensor)> = if is_torch {
            crate::ad_files::read_torch_state_dict(path)?
        } else {
            candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| EngineError::Invalid(format!("{}: {e}", path.display())))?
                .into_iter()
                .collect()
        };
        let mut map = std::collections::HashMap::new();
        let mut vars = Vec::new();
        for (name, t) in tensors {
            if is_bn_buffer(&name) {
                map.insert(name, t.to_device(device)?);
            } else {
                let var = Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?;
                map.insert(name.clone(), var.as_tensor().clone());
                vars.push((name, var));
            }
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let vb = VarBuilder::from_tensors(map, dtype, device);
        let enc = Self::new(vb, &cfg)?;
        Ok((enc, vars))
    }

    /// Every tensor of the encoder under its official name (parameters from `params`, the
    /// trainable copies [`Self::load_trainable`] returned, plus the running BatchNorm
    /// buffers), ready for [`crate::weights::save_safetensors`].
    pub fn state_dict(&self, params: &[(String, Var)]) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        out.extend(self.running_buffers()?);
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_size_has_the_published_parameter_count() {
        let cfg = SpatialEncoderConfig::default();
        assert_eq!(cfg.parameter_count().unwrap(), 356_019_392);
        // The official state dict has 397 entries and 24,372 buffer elements.
        assert_eq!(cfg.tensor_shapes().unwrap().len(), 397);
        assert_eq!(cfg.buffer_count().unwrap(), 24_372);
    }

    #[test]
    fn model_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<SpatialEncoder>();
    }

    #[test]
    fn align_corners_upsample_matches_hand_values() {
        // 2 -> 3 along each axis: the middle sample is the exact midpoint.
        let x = Tensor::new(&[[[[0f32, 2.], [4., 6.]]]], &Device::Cpu).unwrap();
        let y = upsample_bilinear_align_corners(&x, 3, 3).unwrap();
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, vec![0., 1., 2., 2., 3., 4., 4., 5., 6.]);
        // Same size is the identity; corners are kept for any size.
        let z = upsample_bilinear_align_corners(&x, 2, 2).unwrap();
        assert_eq!(
            z.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0., 2., 4., 6.]
        );
        let big = upsample_bilinear_align_corners(&x, 7, 5).unwrap();
        let v = big
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!((v[0][0], v[0][4], v[6][0], v[6][4]), (0., 2., 4., 6.));
    }

    #[test]
    fn maxpool_1_is_strided_subsampling() {
        let x = Tensor::arange(0f32, 25., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 5, 5))
            .unwrap();
        let y = subsample(&x, 2).unwrap();
        assert_eq!(y.dims(), &[1, 1, 3, 3]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0., 2., 4., 10., 12., 14., 20., 22., 24.]
        );
    }

    #[test]
    fn configs_that_cannot_be_built_are_refused() {
        let mut c = SpatialEncoderConfig {
            fpn_dim: 256,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("fpn_dim"));
        c.fpn_dim = 512;
        c.spatial = 48;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("power of two"));
        c.spatial = 64;
        c.coarse_ind = 3;
        c.middle_ind = 1;
        assert!(c.validate().unwrap_err().to_string().contains("coarse_ind"));
        let json = r#"{"text_num": 4, "stem": 4, "widths": [4, 8, 16, 32], "fpn_dim": 32, "out_dim": 32, "bogus": 1}"#;
        assert!(serde_json::from_str::<SpatialEncoderConfig>(json).is_err());
    }
}
