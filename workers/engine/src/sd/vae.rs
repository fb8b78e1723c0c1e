//! `AutoencoderKL` (Rombach et al. 2022, the KL-regularised first stage), built from a
//! diffusers `config.json`: encode to the posterior's mean and clamped log-variance, sample the
//! posterior from injected noise, decode. Both key namings of the mid-block attention are
//! accepted (current `to_q/to_k/to_v/to_out.0`, legacy `query/key/value/proj_attn`).
//!
//! Owned rather than taken from candle-transformers because candle's `encode` hides the
//! moments (only `.sample()` with its own RNG is public) and does not clamp the log-variance.

use std::path::Path;

use crate::nn::{GroupNorm, Linear};
use candle_core::{DType, Device, Module, Result as CResult, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::{EngineError, Result};
use crate::nn::{conv2d, silu, softmax_last_dim, Conv2d};
use crate::noise::NoiseSource;
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::weights::{find_file, read_json, Weights};

/// The fields of diffusers' AutoencoderKL `config.json` this engine reads.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d3")]
    pub in_channels: usize,
    #[serde(default = "d3")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d1")]
    pub layers_per_block: usize,
    #[serde(default = "d4")]
    pub latent_channels: usize,
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    #[serde(default = "scale")]
    pub scaling_factor: f64,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "silu_s")]
    pub act_fn: String,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
}

fn d1() -> usize {
    1
}
fn d3() -> usize {
    3
}
fn d4() -> usize {
    4
}
fn d32() -> usize {
    32
}
fn scale() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}
fn silu_s() -> String {
    "silu".into()
}

impl VaeConfig {
    /// Stable Diffusion 1.5's VAE config.
    pub fn sd_v1_5() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            act_fn: "silu".into(),
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        }
    }

    /// Reads a diffusers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|message| EngineError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.act_fn != "silu" {
            return Err(format!("unsupported act_fn {:?}", self.act_fn));
        }
        for (list, want) in [
            (&self.down_block_types, "DownEncoderBlock2D"),
            (&self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if !list.is_empty() && (list.len() != n || list.iter().any(|t| t != want)) {
                return Err(format!(
                    "block types {list:?}: only {n} × {want} are supported"
                ));
            }
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c % self.norm_num_groups != 0)
        {
            return Err(format!(
                "block_out_channels {c} is not divisible by norm_num_groups {}",
                self.norm_num_groups
            ));
        }
        Ok(())
    }
}

/// The VAE's single-head spatial self-attention (diffusers `Attention` with
/// `residual_connection=True`, GroupNorm eps 1e-6, biased q/k/v).
#[derive(Debug, Clone)]
struct VaeAttention {
    group_norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    channels: usize,
}

impl VaeAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> CResult<Self> {
        // Legacy SD-1.x files name the projections query/key/value/proj_attn.
        let legacy = vb.contains_tensor("query.weight");
        let (q, k, v, o) = if legacy {
            ("query", "key", "value", "proj_attn")
        } else {
            ("to_q", "to_k", "to_v", "to_out.0")
        };
        Ok(Self {
            group_norm: crate::nn::group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            q: crate::nn::linear(channels, channels, vb.pp(q))?,
            k: crate::nn::linear(channels, channels, vb.pp(k))?,
            v: crate::nn::linear(channels, channels, vb.pp(v))?,
            out: crate::nn::linear(channels, channels, vb.pp(o))?,
            channels,
        })
    }
}

impl Module for VaeAttention {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let xs = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.q.forward(&xs)?;
        let k = self.k.forward(&xs)?;
        let v = self.v.forward(&xs)?;
        let dtype = q.dtype();
        let scale = 1.0 / (self.channels as f64).sqrt();
        let logits = (q
            .to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?)?
            * scale)?;
        let probs = softmax_last_dim(&logits)?.to_dtype(dtype)?;
        let out = self.out.forward(&probs.matmul(&v)?)?;
        let out = out.transpose(D::Minus1, D::Minus2)?.reshape((b, c, h, w))?;
        out + x
    }
}

#[derive(Debug, Clone)]
struct VaeMid {
    resnet0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock2D,
}

impl VaeMid {
    fn new(vb: VarBuilder, c: usize, groups: usize, attention: bool) -> CResult<Self> {
        let rc = ResnetConfig {
            in_channels: c,
            out_channels: c,
            temb_channels: None,
            groups,
            eps: 1e-6,
            output_scale_factor: 1.0,
        };
        Ok(Self {
            resnet0: ResnetBlock2D::new(vb.pp("resnets.0"), rc)?,
            attention: if attention {
                Some(VaeAttention::new(vb.pp("attentions.0"), c, groups)?)
            } else {
                None
            },
            resnet1: ResnetBlock2D::new(vb.pp("resnets.1"), rc)?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let mut x = self.resnet0.forward(x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.resnet1.forward(&x, None)
    }
}

fn resnet(vb: VarBuilder, i: usize, o: usize, groups: usize) -> CResult<ResnetBlock2D> {
    ResnetBlock2D::new(
        vb,
        ResnetConfig {
            in_channels: i,
            out_channels: o,
            temb_channels: None,
            groups,
            eps: 1e-6,
            output_scale_factor: 1.0,
        },
    )
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: VaeMid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> CResult<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = ch.len();
        let mut blocks = Vec::new();
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let vbb = vb.pp("down_blocks").pp(i);
            let in_c = out_c;
            out_c = c;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    resnet(
                        vbb.pp("resnets").pp(j),
                        if j == 0 { in_c } else { out_c },
                        out_c,
                        g,
                    )
                })
                .collect::<CResult<Vec<_>>>()?;
            let ds = if i + 1 < n {
                Some(Downsample2D::new(
                    vbb.pp("downsamplers.0"),
                    out_c,
                    out_c,
                    0,
                )?)
            } else {
                None
            };
            blocks.push((resnets, ds));
        }
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?,
            blocks,
            mid: VaeMid::new(
                vb.pp("mid_block"),
                ch[n - 1],
                g,
                cfg.mid_block_add_attention,
            )?,
            norm_out: crate::nn::group_norm(g, ch[n - 1], 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(
                ch[n - 1],
                2 * cfg.latent_channels,
                3,
                1,
                1,
                vb.pp("conv_out"),
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for (resnets, ds) in &self.blocks {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(ds) = ds {
                x = ds.forward(&x)?;
            }
        }
        let x = self.mid.forward(&x)?;
        self.conv_out.forward(&silu(&self.norm_out.forward(&x)?)?)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: VaeMid,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> CResult<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = ch.len();
        let mut blocks = Vec::new();
        let mut out_c = ch[n - 1];
        for i in 0..n {
            let vbb = vb.pp("up_blocks").pp(i);
            let prev = out_c;
            out_c = ch[n - 1 - i];
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    resnet(
                        vbb.pp("resnets").pp(j),
                        if j == 0 { prev } else { out_c },
                        out_c,
                        g,
                    )
                })
                .collect::<CResult<Vec<_>>>()?;
            let us = if i + 1 < n {
                Some(Upsample2D::new(vbb.pp("upsamplers.0"), out_c, out_c)?)
            } else {
                None
            };
            blocks.push((resnets, us));
        }
        Ok(Self {
            conv_in: conv2d(cfg.latent_channels, ch[n - 1], 3, 1, 1, vb.pp("conv_in"))?,
            mid: VaeMid::new(
                vb.pp("mid_block"),
                ch[n - 1],
                g,
                cfg.mid_block_add_attention,
            )?,
            blocks,
            norm_out: crate::nn::group_norm(g, ch[0], 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(ch[0], cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> CResult<Tensor> {
        let mut x = self.mid.forward(&self.conv_in.forward(z)?)?;
        for (resnets, us) in &self.blocks {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(us) = us {
                x = us.forward(&x, None)?;
            }
        }
        self.conv_out.forward(&silu(&self.norm_out.forward(&x)?)?)
    }
}

/// The diagonal Gaussian posterior q(z|x) returned by [`AutoencoderKL::encode`].
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    /// Mean `[B, latent_channels, h, w]`.
    pub mean: Tensor,
    /// log σ², clamped to [−30, 20] as diffusers and CompVis do.
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// σ = exp(½·logvar).
    pub fn std(&self) -> CResult<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// A posterior sample z = μ + σ·ε with ε drawn from `noise`.
    pub fn sample(&self, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let eps = noise.randn(self.mean.shape(), self.mean.dtype(), self.mean.device())?;
        Ok((&self.mean + self.std()?.mul(&eps)?)?)
    }
}

/// diffusers `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Builds the model from `config` with weights under `vb` (diffusers key names).
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> CResult<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let l2 = 2 * config.latent_channels;
        let l = config.latent_channels;
        Ok(Self {
            config: config.clone(),
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            quant_conv: if config.use_quant_conv {
                Some(conv2d(l2, l2, 1, 1, 0, vb.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(conv2d(l, l, 1, 1, 0, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
        })
    }

    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model(.fp16).safetensors`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let file = find_file(
            dir,
            &[
                "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.fp16.safetensors",
            ],
        )?;
        let weights = Weights::from_safetensors(&[file], dtype, device)?;
        Self::from_weights(&weights, &config)
    }

    /// Builds the model from `weights` with full tensor accounting.
    pub fn from_weights(weights: &Weights, config: &VaeConfig) -> Result<Self> {
        weights.build("AutoencoderKL", |vb| Self::new(vb, config))
    }

    /// The config the model was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The raw moments `[B, 2·latent, h, w]` (mean and unclamped logvar, concatenated).
    pub fn moments(&self, image: &Tensor) -> CResult<Tensor> {
        let h = self.encoder.forward(image)?;
        match &self.quant_conv {
            Some(q) => q.forward(&h),
            None => Ok(h),
        }
    }

    /// Encodes an image in [−1, 1] to the posterior (mean, clamped logvar). Multiply a sample
    /// by `scaling_factor` to get the UNet's latent.
    pub fn encode(&self, image: &Tensor) -> CResult<LatentDistribution> {
        let m = self.moments(image)?;
        let l = self.config.latent_channels;
        Ok(LatentDistribution {
            mean: m.narrow(1, 0, l)?,
            logvar: m.narrow(1, l, l)?.clamp(-30f32, 20f32)?,
        })
    }

    /// Decodes a latent (already divided by `scaling_factor`) to an image in about [−1, 1].
    pub fn decode(&self, z: &Tensor) -> CResult<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }
}
