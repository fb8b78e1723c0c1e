//! `UNet2DConditionModel` for the Stable-Diffusion-v1 family (SD 1.x, SD 2.x-style linear
//! projections, the paper's LDM-256 UNet once mapped), built from a diffusers `config.json` and
//! diffusers-layout weights. Differences from candle-transformers' UNet, which this adapts:
//! the group count reaches every block, timesteps are per batch element, GELU is exact, and an
//! [`AttentionController`] passed with each forward call sees every attention layer.
//!
//! Forward (diffusers `UNet2DConditionModel.forward`): sinusoidal timestep embedding →
//! `time_embedding` MLP → `conv_in` → down blocks (collecting skips) → mid block → up blocks
//! (concatenating skips) → GroupNorm → SiLU → `conv_out`.

use std::path::Path;

use crate::nn::{GroupNorm, Linear};
use candle_core::{DType, Device, Module, Result as CResult, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::attention::{Transformer2D, Transformer2DConfig};
use crate::control::{AttentionController, ControlState};
use crate::error::{EngineError, Result};
use crate::nn::{conv2d, silu, Conv2d};
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::weights::{find_file, read_json, Weights};

/// A config value that diffusers allows as a scalar or as one value per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Many(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, n: usize, field: &str) -> std::result::Result<Vec<usize>, String> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Many(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Many(v) => Err(format!("{field} has {} entries for {n} blocks", v.len())),
        }
    }
}

/// The fields of diffusers' UNet `config.json` this engine reads. Fields for features it does
/// not build (class/addition embeddings, other time embeddings) are validated to be off.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d4")]
    pub in_channels: usize,
    #[serde(default = "d4")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    pub layers_per_block: PerBlock,
    #[serde(default)]
    pub transformer_layers_per_block: Option<PerBlock>,
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: PerBlock,
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    #[serde(default = "eps5")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d1")]
    pub downsample_padding: usize,
    #[serde(default = "one")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default = "silu_s")]
    pub act_fn: String,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default = "default_s")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d3")]
    pub conv_in_kernel: usize,
    #[serde(default = "d3")]
    pub conv_out_kernel: usize,
    #[serde(default = "one")]
    pub resnet_out_scale_factor: f64,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
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
fn eps5() -> f64 {
    1e-5
}
fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn silu_s() -> String {
    "silu".into()
}
fn positional() -> String {
    "positional".into()
}
fn default_s() -> String {
    "default".into()
}

/// Per-block values resolved from a [`UNetConfig`].
#[derive(Debug, Clone)]
struct Resolved {
    layers: Vec<usize>,
    transformer_layers: Vec<usize>,
    heads: Vec<usize>,
    cross_dim: Vec<usize>,
}

impl UNetConfig {
    /// Stable Diffusion 1.5's UNet config.
    pub fn sd_v1_5() -> Self {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 768,
            "norm_num_groups": 32,
            "sample_size": 64
        }))
        .expect("static SD 1.5 config")
    }

    /// Reads a diffusers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.resolve().map_err(|message| EngineError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn resolve(&self) -> std::result::Result<Resolved, String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "{} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        let unsupported = |what: &str| Err(format!("unsupported: {what}"));
        if self.act_fn != "silu" {
            return unsupported(&format!("act_fn {:?}", self.act_fn));
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            return unsupported("class embeddings");
        }
        if self.addition_embed_type.is_some() || self.encoder_hid_dim.is_some() {
            return unsupported("addition embeddings / encoder_hid_dim (SDXL-style)");
        }
        if self.time_cond_proj_dim.is_some() || self.timestep_post_act.is_some() {
            return unsupported("time_cond_proj_dim / timestep_post_act");
        }
        if self.time_embedding_type != "positional" {
            return unsupported(&format!(
                "time_embedding_type {:?}",
                self.time_embedding_type
            ));
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported(&format!(
                "resnet_time_scale_shift {:?}",
                self.resnet_time_scale_shift
            ));
        }
        if self.dual_cross_attention || self.only_cross_attention.as_bool() == Some(true) {
            return unsupported("dual_cross_attention / only_cross_attention");
        }
        if self.center_input_sample || self.resnet_skip_time_act {
            return unsupported("center_input_sample / resnet_skip_time_act");
        }
        if self.conv_in_kernel != 3 || self.conv_out_kernel != 3 {
            return unsupported("conv_in/conv_out kernels other than 3");
        }
        if self.resnet_out_scale_factor != 1.0 {
            return unsupported("resnet_out_scale_factor != 1");
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return unsupported(&format!("down block {t:?}"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return unsupported(&format!("up block {t:?}"));
            }
        }
        match self.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2DCrossAttn") => {}
            Some(t) => return unsupported(&format!("mid block {t:?}")),
        }
        for &c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                return Err(format!(
                    "block_out_channels {c} is not divisible by norm_num_groups {}",
                    self.norm_num_groups
                ));
            }
        }
        let heads_src = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        Ok(Resolved {
            layers: self.layers_per_block.expand(n, "layers_per_block")?,
            transformer_layers: self
                .transformer_layers_per_block
                .clone()
                .unwrap_or(PerBlock::One(1))
                .expand(n, "transformer_layers_per_block")?,
            heads: heads_src.expand(n, "num_attention_heads/attention_head_dim")?,
            cross_dim: self.cross_attention_dim.expand(n, "cross_attention_dim")?,
        })
    }
}

/// A down block: resnets (each followed by a transformer in `CrossAttnDownBlock2D`) and an
/// optional downsampler.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

/// An up block: resnets over concatenated skips (each followed by a transformer in
/// `CrossAttnUpBlock2D`) and an optional upsampler.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
}

/// Intermediate activations of one forward pass ([`UNet2DConditionModel::forward_with_taps`]).
#[derive(Debug, Clone, Default)]
pub struct UNetTaps {
    /// The time-embedding MLP's output `[B, time_embed_dim]`.
    pub time_emb: Option<Tensor>,
    /// The mid block's output `[B, C_last, h, w]`.
    pub mid_block: Option<Tensor>,
}

/// The SD-v1-family conditional UNet.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the model from `config` with weights under `vb` (diffusers key names).
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> CResult<Self> {
        let r = config.resolve().map_err(candle_core::Error::Msg)?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let groups = config.norm_num_groups;
        let eps = config.norm_eps;
        let temb = config.time_embedding_dim.unwrap_or(4 * ch[0]);
        let resnet = |vb: VarBuilder, i: usize, o: usize, scale: f64| {
            ResnetBlock2D::new(
                vb,
                ResnetConfig {
                    in_channels: i,
                    out_channels: o,
                    temb_channels: Some(temb),
                    groups,
                    eps,
                    output_scale_factor: scale,
                },
            )
        };
        let transformer = |vb: VarBuilder, c: usize, b: usize, layers: usize| {
            Transformer2D::new(
                vb,
                Transformer2DConfig {
                    channels: c,
                    heads: r.heads[b],
                    layers,
                    context_dim: r.cross_dim[b],
                    groups,
                    linear_projection: config.use_linear_projection,
                },
            )
        };

        let conv_in = conv2d(config.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?;
        let time_linear_1 = crate::nn::linear(ch[0], temb, vb.pp("time_embedding.linear_1"))?;
        let time_linear_2 = crate::nn::linear(temb, temb, vb.pp("time_embedding.linear_2"))?;

        let mut down = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let vbb = vb.pp("down_blocks").pp(i);
            let in_c = out_c;
            out_c = ch[i];
            let cross = kind == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..r.layers[i] {
                let ic = if j == 0 { in_c } else { out_c };
                resnets.push(resnet(vbb.pp("resnets").pp(j), ic, out_c, 1.0)?);
                if cross {
                    attentions.push(transformer(
                        vbb.pp("attentions").pp(j),
                        out_c,
                        i,
                        r.transformer_layers[i],
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    vbb.pp("downsamplers").pp(0),
                    out_c,
                    out_c,
                    config.downsample_padding,
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let vbm = vb.pp("mid_block");
        let c_last = ch[n - 1];
        let mid = MidBlock {
            resnets: vec![
                resnet(
                    vbm.pp("resnets").pp(0),
                    c_last,
                    c_last,
                    config.mid_block_scale_factor,
                )?,
                resnet(
                    vbm.pp("resnets").pp(1),
                    c_last,
                    c_last,
                    config.mid_block_scale_factor,
                )?,
            ],
            attentions: vec![transformer(
                vbm.pp("attentions").pp(0),
                c_last,
                n - 1,
                r.transformer_layers[n - 1],
            )?],
        };

        let mut up = Vec::with_capacity(n);
        let rev = |v: &Vec<usize>, i: usize| v[n - 1 - i];
        let mut out_c = rev(ch, 0);
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let vbb = vb.pp("up_blocks").pp(i);
            let prev_out = out_c;
            out_c = rev(ch, i);
            let in_c = rev(ch, (i + 1).min(n - 1));
            let cross = kind == "CrossAttnUpBlock2D";
            let layers = rev(&r.layers, i) + 1;
            let b = n - 1 - i;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j + 1 == layers { in_c } else { out_c };
                let ic = if j == 0 { prev_out } else { out_c };
                resnets.push(resnet(vbb.pp("resnets").pp(j), ic + skip, out_c, 1.0)?);
                if cross {
                    attentions.push(transformer(
                        vbb.pp("attentions").pp(j),
                        out_c,
                        b,
                        r.transformer_layers[b],
                    )?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(vbb.pp("upsamplers").pp(0), out_c, out_c)?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            config: config.clone(),
            conv_in,
            time_linear_1,
            time_linear_2,
            down,
            mid,
            up,
            conv_norm_out: crate::nn::group_norm(groups, ch[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(ch[0], config.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model(.fp16).safetensors`, checking
    /// that the file holds exactly the tensors the config needs.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = UNetConfig::from_file(&dir.join("config.json"))?;
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
    pub fn from_weights(weights: &Weights, config: &UNetConfig) -> Result<Self> {
        weights.build("UNet2DConditionModel", |vb| Self::new(vb, config))
    }

    /// Every attention layer (self and cross) in execution order.
    pub fn attention_layers(&self) -> Vec<&crate::attention::CrossAttention> {
        self.down
            .iter()
            .flat_map(|d| d.attentions.iter())
            .chain(self.mid.attentions.iter())
            .chain(self.up.iter().flat_map(|u| u.attentions.iter()))
            .flat_map(|t| t.blocks().iter())
            .flat_map(|b| b.attentions())
            .collect()
    }

    /// The attention layer with this weight prefix (diffusers naming), if any.
    pub fn attention_layer(&self, name: &str) -> Option<&crate::attention::CrossAttention> {
        self.attention_layers()
            .into_iter()
            .find(|a| a.name() == name)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Sinusoidal timestep embedding (diffusers `get_timestep_embedding`, Vaswani et al. 2017
    /// §3.5): freq_i = exp(−ln(10⁴)·i/(half − shift)), emb = [sin(t·freq), cos(t·freq)],
    /// halves swapped when `flip_sin_to_cos`. Computed in f32 on the host as PyTorch does.
    pub fn timestep_embedding(&self, timesteps: &[f32], device: &Device) -> CResult<Tensor> {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let ln = -(10000f64.ln() as f32);
        let denom = half as f32 - self.config.freq_shift as f32;
        let freqs: Vec<f32> = (0..half).map(|i| (ln * i as f32 / denom).exp()).collect();
        let mut out = Vec::with_capacity(timesteps.len() * dim);
        for &t in timesteps {
            let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
            let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
            if self.config.flip_sin_to_cos {
                out.extend(cos);
                out.extend(sin);
            } else {
                out.extend(sin);
                out.extend(cos);
            }
            if dim % 2 == 1 {
                out.push(0.0);
            }
        }
        Tensor::from_vec(out, (timesteps.len(), dim), device)
    }

    /// Noise prediction for `sample` `[B, C, H, W]` at one timestep per batch element
    /// (`timesteps`: `[B]` or a scalar, any numeric dtype), conditioned on
    /// `encoder_hidden_states` `[B, M, D]`, with an optional attention controller.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        controller: Option<&mut dyn AttentionController>,
    ) -> CResult<Tensor> {
        self.forward_inner(
            sample,
            timesteps,
            encoder_hidden_states,
            controller,
            None,
            None,
        )
    }

    /// [`forward`](Self::forward) that also returns intermediate activations (the time
    /// embedding MLP's output and the mid block's output), for parity checks and debugging.
    pub fn forward_with_taps(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        controller: Option<&mut dyn AttentionController>,
    ) -> CResult<(Tensor, UNetTaps)> {
        let mut taps = UNetTaps::default();
        let out = self.forward_inner(
            sample,
            timesteps,
            encoder_hidden_states,
            controller,
            None,
            Some(&mut taps),
        )?;
        Ok((out, taps))
    }

    /// [`forward`](Self::forward) that also returns the wall time of each stage (time
    /// embedding, each block's resnets / transformers / resampler, output head), for profiling.
    /// candle's CPU ops are synchronous, so wall time per stage is meaningful there.
    pub fn forward_profiled(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> CResult<(Tensor, Vec<(String, f64)>)> {
        let mut prof = Vec::new();
        let out = self.forward_inner(
            sample,
            timesteps,
            encoder_hidden_states,
            None,
            Some(&mut prof),
            None,
        )?;
        Ok((out, prof))
    }

    fn forward_inner(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        controller: Option<&mut dyn AttentionController>,
        mut prof: Option<&mut Vec<(String, f64)>>,
        mut taps: Option<&mut UNetTaps>,
    ) -> CResult<Tensor> {
        let mut clock = std::time::Instant::now();
        let mut lap = |name: &dyn Fn() -> String| {
            if let Some(p) = prof.as_deref_mut() {
                let now = std::time::Instant::now();
                let dt = (now - clock).as_secs_f64();
                let n = name();
                match p.iter_mut().find(|(k, _)| *k == n) {
                    Some(e) => e.1 += dt,
                    None => p.push((n, dt)),
                }
                clock = now;
            }
        };
        let b = sample.dim(0)?;
        let ts: Vec<f32> = timesteps.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let ts = match ts.len() {
            1 => vec![ts[0]; b],
            n if n == b => ts,
            n => candle_core::bail!("UNet forward: {n} timesteps for batch {b}"),
        };
        let mut state = ControlState::new(controller);
        let dtype = sample.dtype();
        let t_emb = self
            .timestep_embedding(&ts, sample.device())?
            .to_dtype(dtype)?;
        let emb = self
            .time_linear_2
            .forward(&silu(&self.time_linear_1.forward(&t_emb)?)?)?;
        if let Some(t) = taps.as_deref_mut() {
            t.time_emb = Some(emb.clone());
        }
        let ctx = encoder_hidden_states;
        let mut x = self.conv_in.forward(sample)?;
        lap(&|| "time embedding + conv_in".into());

        let mut skips = vec![x.clone()];
        for (i, block) in self.down.iter().enumerate() {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(&x, Some(&emb))?;
                lap(&|| format!("down_blocks.{i} resnets"));
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, ctx, &mut state)?;
                    lap(&|| format!("down_blocks.{i} attentions"));
                }
                skips.push(x.clone());
            }
            if let Some(ds) = &block.downsampler {
                x = ds.forward(&x)?;
                lap(&|| format!("down_blocks.{i} downsampler"));
                skips.push(x.clone());
            }
        }

        x = self.mid.resnets[0].forward(&x, Some(&emb))?;
        lap(&|| "mid_block resnets".into());
        for (attn, resnet) in self.mid.attentions.iter().zip(&self.mid.resnets[1..]) {
            x = attn.forward(&x, ctx, &mut state)?;
            lap(&|| "mid_block attentions".into());
            x = resnet.forward(&x, Some(&emb))?;
            lap(&|| "mid_block resnets".into());
        }
        if let Some(t) = taps {
            t.mid_block = Some(x.clone());
        }

        for (i, block) in self.up.iter().enumerate() {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("UNet: skip stack underflow".into()))?;
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = resnet.forward(&x, Some(&emb))?;
                lap(&|| format!("up_blocks.{i} resnets"));
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, ctx, &mut state)?;
                    lap(&|| format!("up_blocks.{i} attentions"));
                }
            }
            if let Some(us) = &block.upsampler {
                // Upsample to the next skip's size (differs from ×2 when the input size is
                // not a multiple of 2^levels, as diffusers' `forward_upsample_size`).
                let size = match skips.last() {
                    Some(s) => Some((s.dim(2)?, s.dim(3)?)),
                    None => None,
                };
                x = us.forward(&x, size)?;
                lap(&|| format!("up_blocks.{i} upsampler"));
            }
        }

        let x = silu(&self.conv_norm_out.forward(&x)?)?;
        let out = self.conv_out.forward(&x)?;
        lap(&|| "conv_norm_out + conv_out".into());
        Ok(out)
    }

    /// [`forward`](Self::forward) with one scalar timestep for the whole batch.
    pub fn forward_t(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        controller: Option<&mut dyn AttentionController>,
    ) -> CResult<Tensor> {
        let t = Tensor::new(timestep as f32, sample.device())?;
        self.forward(sample, &t, encoder_hidden_states, controller)
    }
}
