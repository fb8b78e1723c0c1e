//! The downstream detector of AnomalyDiffusion's evaluation (reference §7.2): DRAEM's
//! `DiscriminativeSubNetwork(in 3, out 2, base 64)` — a six-level U-Net of 3×3 convs, batch
//! norm and ReLU, max-pool down, bilinear (align_corners) up — trained from scratch with the
//! focal loss on the softmax output, and scored as the softmax probability of channel 1.
//!
//! Parameter names follow the PyTorch module's `state_dict` (`encoder_segment.block1.0.weight`,
//! `…1.running_mean`, `decoder_segment.fin_out.0.bias`), so a checkpoint maps one to one.
//! Initialisation is DRAEM's `weights_init`: conv weights N(0, 0.02), batch-norm weights
//! N(1, 0.02) and biases 0; conv biases keep PyTorch's default U(±1/√fan_in).
//!
//! On CPU a convolution is one GEMM over an im2col matrix (both directions of the backward pass
//! are then GEMMs too: candle's CPU `conv_transpose2d`, which its conv2d backward uses, is a
//! direct loop); elsewhere candle's conv2d (cuDNN on CUDA).

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{EngineError, Result};
use crate::noise::SplitMix64;

/// Batch-norm epsilon and momentum (PyTorch's defaults).
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
/// The focal loss's smoothing (DRAEM's `FocalLoss(smooth=1e-5)`) and focusing parameter.
pub const FOCAL_SMOOTH: f64 = 1e-5;
pub const FOCAL_GAMMA: f64 = 2.0;

struct Conv {
    w: Var,
    b: Var,
    cin: usize,
    cout: usize,
}

struct BatchNorm {
    gamma: Var,
    beta: Var,
    /// running statistics, updated by training-mode forwards
    stats: Mutex<(Tensor, Tensor)>,
}

/// conv 3×3 (padding 1) → batch norm → ReLU, as `nn.Sequential` entries `i`, `i+1`.
struct Unit {
    conv: Conv,
    bn: BatchNorm,
    name: String,
}

/// The discriminative U-Net.
pub struct Detector {
    /// encoder blocks 1..=6, two units each
    enc: Vec<[Unit; 2]>,
    /// decoder: (up unit, [two units]) for up_b/db_b, up1/db1 … up4/db4
    dec: Vec<(Unit, [Unit; 2])>,
    fin: Conv,
    device: Device,
    base: usize,
}

fn init_conv(rng: &mut SplitMix64, cin: usize, cout: usize, dev: &Device) -> Result<Conv> {
    let n = cout * cin * 9;
    let w: Vec<f32> = rng.normals(n).into_iter().map(|z| 0.02 * z).collect();
    let bound = 1.0 / ((cin * 9) as f64).sqrt();
    let b: Vec<f32> = (0..cout)
        .map(|_| ((rng.next_open01() * 2.0 - 1.0) * bound) as f32)
        .collect();
    Ok(Conv {
        w: Var::from_tensor(&Tensor::from_vec(w, (cout, cin, 3, 3), dev)?)?,
        b: Var::from_tensor(&Tensor::from_vec(b, cout, dev)?)?,
        cin,
        cout,
    })
}

fn init_bn(rng: &mut SplitMix64, c: usize, dev: &Device) -> Result<BatchNorm> {
    let g: Vec<f32> = rng.normals(c).into_iter().map(|z| 1.0 + 0.02 * z).collect();
    Ok(BatchNorm {
        gamma: Var::from_tensor(&Tensor::from_vec(g, c, dev)?)?,
        beta: Var::zeros(c, DType::F32, dev)?,
        stats: Mutex::new((
            Tensor::zeros(c, DType::F32, dev)?,
            Tensor::ones(c, DType::F32, dev)?,
        )),
    })
}

fn unit(rng: &mut SplitMix64, name: String, cin: usize, cout: usize, dev: &Device) -> Result<Unit> {
    Ok(Unit {
        conv: init_conv(rng, cin, cout, dev)?,
        bn: init_bn(rng, cout, dev)?,
        name,
    })
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let wt = self.w.as_tensor();
        let y = if x.device().is_cpu() {
            let (cols, _, _) = crate::nn::im2col(x, 3, 1, 1)?;
            // the im2col rows are in (kh, kw, c) order
            let packed = wt
                .permute((0, 2, 3, 1))?
                .reshape((self.cout, 9 * self.cin))?;
            packed
                .broadcast_left(b)?
                .matmul(&cols)?
                .reshape((b, self.cout, h, w))?
        } else {
            x.conv2d(wt, 1, 1, 1, 1)?
        };
        Ok(y.broadcast_add(&self.b.as_tensor().reshape((1, self.cout, 1, 1))?)?)
    }
}

impl BatchNorm {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (mean, var) = if train {
            let flat = x.transpose(0, 1)?.reshape((c, n * h * w))?;
            let mean = flat.mean_keepdim(1)?;
            let var = flat.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?;
            let count = (n * h * w) as f64;
            let mut st = self.stats.lock().expect("batch-norm statistics");
            let unbiased = if count > 1.0 {
                (var.detach().flatten_all()? * (count / (count - 1.0)))?
            } else {
                var.detach().flatten_all()?
            };
            st.0 =
                ((&st.0 * (1.0 - BN_MOMENTUM))? + (mean.detach().flatten_all()? * BN_MOMENTUM)?)?;
            st.1 = ((&st.1 * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?;
            (mean.reshape((1, c, 1, 1))?, var.reshape((1, c, 1, 1))?)
        } else {
            let st = self.stats.lock().expect("batch-norm statistics");
            (st.0.reshape((1, c, 1, 1))?, st.1.reshape((1, c, 1, 1))?)
        };
        let xn = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
        Ok(xn
            .broadcast_mul(&self.gamma.as_tensor().reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.beta.as_tensor().reshape((1, c, 1, 1))?)?)
    }
}

impl Unit {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.bn.forward(&self.conv.forward(x)?, train)?.relu()?)
    }
}

/// The `[out, in]` matrix of a 1-D linear interpolation with align_corners=True.
fn interp_matrix(n_in: usize, n_out: usize, dev: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        let src = if n_out > 1 {
            o as f64 * (n_in - 1) as f64 / (n_out - 1) as f64
        } else {
            0.0
        };
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let t = (src - i0 as f64) as f32;
        m[o * n_in + i0] += 1.0 - t;
        m[o * n_in + i1] += t;
    }
    Ok(Tensor::from_vec(m, (n_out, n_in), dev)?)
}

/// `nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)` as two matrix products
/// (candle's bilinear upsampling has no gradient).
pub fn upsample2x_bilinear(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let dev = x.device();
    let mw = interp_matrix(w, 2 * w, dev)?.t()?; // [w, 2w]
    let mh = interp_matrix(h, 2 * h, dev)?; // [2h, h]
    let y = x.reshape((b * c * h, w))?.matmul(&mw)?; // [bch, 2w]
    let y = y.reshape((b * c, h, 2 * w))?;
    let y = mh.broadcast_left(b * c)?.matmul(&y)?; // [bc, 2h, 2w]
    Ok(y.reshape((b, c, 2 * h, 2 * w))?)
}

impl Detector {
    /// A freshly initialised network (`base` channels at the first level; the paper's 64).
    pub fn new(base: usize, seed: u64, device: &Device) -> Result<Self> {
        if base == 0 {
            return Err(EngineError::Invalid(
                "detector: base channels must be ≥ 1".into(),
            ));
        }
        let mut rng = SplitMix64::new(seed);
        let b = base;
        let widths = [
            (3, b),
            (b, 2 * b),
            (2 * b, 4 * b),
            (4 * b, 8 * b),
            (8 * b, 8 * b),
            (8 * b, 8 * b),
        ];
        let mut enc = vec![];
        for (i, (cin, cout)) in widths.into_iter().enumerate() {
            let p = format!("encoder_segment.block{}", i + 1);
            enc.push([
                unit(&mut rng, format!("{p}.0"), cin, cout, device)?,
                unit(&mut rng, format!("{p}.3"), cout, cout, device)?,
            ]);
        }
        // (up name, up in → out, db name, skip channels)
        let dec_spec = [
            ("up_b", 8 * b, 8 * b, "db_b", 8 * b),
            ("up1", 8 * b, 4 * b, "db1", 8 * b),
            ("up2", 4 * b, 2 * b, "db2", 4 * b),
            ("up3", 2 * b, b, "db3", 2 * b),
            ("up4", b, b, "db4", b),
        ];
        let mut dec = vec![];
        for (up, cin, cout, db, skip) in dec_spec {
            let u = unit(
                &mut rng,
                format!("decoder_segment.{up}.1"),
                cin,
                cout,
                device,
            )?;
            let d0 = unit(
                &mut rng,
                format!("decoder_segment.{db}.0"),
                cout + skip,
                cout,
                device,
            )?;
            let d1 = unit(
                &mut rng,
                format!("decoder_segment.{db}.3"),
                cout,
                cout,
                device,
            )?;
            dec.push((u, [d0, d1]));
        }
        let fin = init_conv(&mut rng, b, 2, device)?;
        Ok(Self {
            enc,
            dec,
            fin,
            device: device.clone(),
            base,
        })
    }

    pub fn base(&self) -> usize {
        self.base
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits `[N, 2, H, W]` of images `[N, 3, H, W]` in [0, 1]; H and W multiples of 32.
    /// `train` uses batch statistics (and updates the running ones), otherwise the running ones.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 || h % 32 != 0 || w % 32 != 0 || h == 0 || w == 0 {
            return Err(EngineError::Invalid(format!(
                "detector: input must be [N, 3, H, W] with H, W multiples of 32 (got {:?})",
                x.dims()
            )));
        }
        let mut skips = vec![];
        let mut y = x.clone();
        for (i, [a, b]) in self.enc.iter().enumerate() {
            if i > 0 {
                y = y.max_pool2d(2)?;
            }
            y = b.forward(&a.forward(&y, train)?, train)?;
            skips.push(y.clone());
        }
        // y = b6; skips[4] = b5 … skips[0] = b1
        for (j, (up, [d0, d1])) in self.dec.iter().enumerate() {
            let u = up.forward(&upsample2x_bilinear(&y)?, train)?;
            let cat = Tensor::cat(&[&u, &skips[4 - j]], 1)?;
            y = d1.forward(&d0.forward(&cat, train)?, train)?;
        }
        self.fin.forward(&y)
    }

    /// Anomaly maps `[N, H, W]`: the softmax probability of channel 1 (inference mode).
    pub fn predict(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self.forward(x, false)?;
        let p = candle_nn::ops::softmax(&logits, 1)?;
        Ok(p.narrow(1, 1, 1)?.squeeze(1)?)
    }

    /// Every trainable parameter with its PyTorch name.
    pub fn named_params(&self) -> Vec<(String, Var)> {
        let mut out = vec![];
        let push_unit = |u: &Unit, out: &mut Vec<(String, Var)>| {
            let n = &u.name;
            out.push((format!("{n}.weight"), u.conv.w.clone()));
            out.push((format!("{n}.bias"), u.conv.b.clone()));
            let bn = bn_name(n);
            out.push((format!("{bn}.weight"), u.bn.gamma.clone()));
            out.push((format!("{bn}.bias"), u.bn.beta.clone()));
        };
        for [a, b] in &self.enc {
            push_unit(a, &mut out);
            push_unit(b, &mut out);
        }
        for (u, [a, b]) in &self.dec {
            push_unit(u, &mut out);
            push_unit(a, &mut out);
            push_unit(b, &mut out);
        }
        out.push((
            "decoder_segment.fin_out.0.weight".into(),
            self.fin.w.clone(),
        ));
        out.push(("decoder_segment.fin_out.0.bias".into(), self.fin.b.clone()));
        out
    }

    fn units(&self) -> Vec<&Unit> {
        let mut v = vec![];
        for [a, b] in &self.enc {
            v.push(a);
            v.push(b);
        }
        for (u, [a, b]) in &self.dec {
            v.push(u);
            v.push(a);
            v.push(b);
        }
        v
    }

    /// The full state (parameters and batch-norm running statistics), PyTorch names.
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut m: BTreeMap<String, Tensor> = self
            .named_params()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        for u in self.units() {
            let st = u.bn.stats.lock().expect("batch-norm statistics");
            let bn = bn_name(&u.name);
            m.insert(format!("{bn}.running_mean"), st.0.clone());
            m.insert(format!("{bn}.running_var"), st.1.clone());
        }
        Ok(m)
    }

    /// Restores a state written by [`Detector::state`] (every tensor must be present).
    pub fn load_state(&self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let get = |k: &str, like: &Tensor| -> Result<Tensor> {
            let t = state
                .get(k)
                .ok_or_else(|| EngineError::Invalid(format!("detector state lacks {k}")))?;
            if t.dims() != like.dims() {
                return Err(EngineError::Invalid(format!(
                    "detector state: {k} has shape {:?}, the network {:?}",
                    t.dims(),
                    like.dims()
                )));
            }
            Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?)
        };
        for (n, v) in self.named_params() {
            v.set(&get(&n, v.as_tensor())?)?;
        }
        for u in self.units() {
            let mut st = u.bn.stats.lock().expect("batch-norm statistics");
            let bn = bn_name(&u.name);
            let m = get(&format!("{bn}.running_mean"), &st.0)?;
            let v = get(&format!("{bn}.running_var"), &st.1)?;
            *st = (m, v);
        }
        Ok(())
    }
}

/// `…block1.0` (the conv) → `…block1.1` (its batch norm): the next `nn.Sequential` index.
fn bn_name(conv: &str) -> String {
    let (p, i) = conv.rsplit_once('.').expect("unit names end in an index");
    format!("{p}.{}", i.parse::<usize>().expect("index") + 1)
}

/// DRAEM's `FocalLoss(apply_nonlin=None, alpha=None, gamma=2, smooth=1e-5)` applied to the
/// softmax of `logits` `[N, 2, H, W]` against a binary `mask` `[N, 1, H, W]` (0/1): the one-hot
/// target clamped to [smooth, 1 − smooth], pt = Σ onehot·p + smooth, loss = mean(−(1 − pt)^γ ·
/// log pt) over pixels.
pub fn focal_loss(logits: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let p = candle_nn::ops::softmax(logits, 1)?;
    let t = mask.to_dtype(DType::F32)?;
    let hi = 1.0 - FOCAL_SMOOTH;
    let lo = FOCAL_SMOOTH; // smooth / (num_class − 1) with two classes
                           // one-hot of class 1 = t, class 0 = 1 − t, clamped
    let oh1 = t.clamp(lo, hi)?;
    let oh0 = (1.0 - &t)?.clamp(lo, hi)?;
    let pt = ((p.narrow(1, 0, 1)? * oh0)? + (p.narrow(1, 1, 1)? * oh1)?)?;
    let pt = (pt + FOCAL_SMOOTH)?;
    let w = (1.0 - &pt)?.powf(FOCAL_GAMMA)?;
    let loss = (w * pt.log()?)?.neg()?;
    Ok(loss.mean_all()?)
}
