//! The paper's base model: a CompVis latent-diffusion checkpoint (`txt2img-f8-large`, LDM-256)
//! in its original format, mapped onto the engine's UNet, VAE and the BERT-style encoder.
//!
//! * **Config** in the official YAML's terms (`model.target/params` with `unet_config`,
//!   `first_stage_config`, `cond_stage_config`), from the YAML file itself or a JSON
//!   equivalent; the architecture is translated into the diffusers-style configs the engine's
//!   modules take ([`LdmConfig`]).
//! * **Checkpoint**: `model.ckpt` (a PyTorch zip pickle `{"state_dict": …}`, read through
//!   candle's pickle reader, which silently returns nothing for a wrong key — counts are
//!   checked) or a safetensors twin with the same key names ([`open_checkpoint`]).
//! * **Key mapping**: the model asks for diffusers names; a per-model view translates them into
//!   checkpoint names (`model.diffusion_model.input_blocks.1.1.…`, `first_stage_model.encoder.
//!   down.0.block.0.…`) following diffusers' `convert_ldm_unet_checkpoint` /
//!   `convert_ldm_vae_checkpoint`, so every error names the checkpoint's own key.
//!
//! Layout correspondences (openaimodel `UNetModel` ↔ diffusers `UNet2DConditionModel`): level i
//! has attention iff 2^i ∈ `attention_resolutions`; `input_blocks` hold conv_in, then per
//! level `num_res_blocks` × [ResBlock (+ SpatialTransformer)] and a Downsample (`.0.op`);
//! `output_blocks` hold per level (deepest first) `num_res_blocks + 1` × [ResBlock
//! (+ SpatialTransformer)] with the Upsample as the last module of the level's last block;
//! ResBlock `in_layers.0/2`, `emb_layers.1`, `out_layers.0/3`, `skip_connection` ↔ `norm1`,
//! `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`. Heads per level are
//! `num_heads`, or `channels / num_head_channels`.

pub mod bert;
mod checkpoint;
mod config;
pub mod tokenizer;

pub use checkpoint::*;
pub use config::*;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::bert::BertEmbedder;
use crate::error::{EngineError, Result};
use crate::ldm_ddim::DdpmSchedule;
use crate::noise::NoiseSource;
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::weights::{ScopeFn, Weights};

/// Checkpoint key prefixes of the three models.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const BERT_PREFIX: &str = "cond_stage_model.transformer.";

/// Checkpoint keys that are not part of the sampling model and are skipped: EMA copies
/// (`use_ema: False` in the official config), the BERT LM head, training-only state and the
/// embeddings of a fine-tuned AnomalyDiffusion checkpoint (loaded separately).
const IGNORED_PREFIXES: &[&str] = &[
    "model_ema.",
    "embedding_manager.",
    "first_stage_model.loss.",
    "cond_stage_model.transformer.to_logits.",
    "logvar",
    "lvlb_weights",
];

/// Whether a checkpoint key is one of the documented keys the sampling model does not use.
pub fn is_ignored_key(key: &str) -> bool {
    IGNORED_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// The loaded LDM text-to-image model.
#[derive(Debug, Clone)]
pub struct LdmModel {
    config: LdmConfig,
    device: Device,
    dtype: DType,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub bert: BertEmbedder,
    pub schedule: DdpmSchedule,
}

fn prefix_scope(prefix: &'static str, ignored: &'static [&'static str]) -> ScopeFn {
    Arc::new(move |k: &str| k.starts_with(prefix) && !ignored.iter().any(|i| k.starts_with(i)))
}

impl LdmModel {
    /// Loads `config` (official YAML or its JSON equivalent) and `checkpoint` (`model.ckpt` or
    /// its safetensors twin).
    pub fn load(config: &Path, checkpoint: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = LdmConfig::from_file(config)?;
        let weights = open_checkpoint(checkpoint, dtype, device)?;
        Self::from_weights(&config, &weights)
    }

    /// Builds the three models from a checkpoint's weights: every model tensor must be present
    /// with the right shape, every checkpoint key must be used (or be one of the documented
    /// ignored ones), and stored schedule buffers must agree with the config's schedule.
    pub fn from_weights(config: &LdmConfig, weights: &Weights) -> Result<Self> {
        let unet_w = weights.view(
            unet_map(config).into_fn(),
            prefix_scope(UNET_PREFIX, IGNORED_PREFIXES),
            "UNet (model.diffusion_model.*)",
        );
        let unet = UNet2DConditionModel::from_weights(&unet_w, &config.unet)?;
        let vae_w = weights.view(
            vae_map(config).into_fn(),
            prefix_scope(VAE_PREFIX, IGNORED_PREFIXES),
            "first stage (first_stage_model.*)",
        );
        let vae = AutoencoderKL::from_weights(&vae_w, &config.vae)?;
        let bert_w = weights.view(
            Arc::new(|n: &str| format!("{BERT_PREFIX}{n}")),
            prefix_scope(BERT_PREFIX, IGNORED_PREFIXES),
            "text encoder (cond_stage_model.transformer.*)",
        );
        let bert = bert_w.build("BERTEmbedder", |vb| BertEmbedder::new(vb, &config.bert))?;
        let schedule = DdpmSchedule::new(config.schedule.clone())?;

        // Schedule buffers, when stored, must be the config's.
        let mut used: BTreeSet<String> = BTreeSet::new();
        for (name, want) in schedule.buffers() {
            let Some(t) = weights.source_tensor(name) else {
                continue;
            };
            used.insert(name.to_string());
            let got: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let worst = if got.len() == want.len() {
                got.iter()
                    .zip(&want)
                    .map(|(g, w)| ((g - w).abs() / w.abs().max(1e-6)) as f64)
                    .fold(0.0, f64::max)
            } else {
                f64::INFINITY
            };
            if worst > 1e-4 {
                return Err(EngineError::Invalid(format!(
                    "checkpoint buffer `{name}` disagrees with the config's schedule ({:?}, {} steps, {} → {}; worst relative difference {worst:.2e}): is this the right config for this checkpoint?",
                    config.schedule.beta_schedule,
                    config.schedule.timesteps,
                    config.schedule.linear_start,
                    config.schedule.linear_end
                )));
            }
        }
        let leftovers: Vec<String> = weights
            .source_names()
            .into_iter()
            .filter(|k| {
                !k.starts_with(UNET_PREFIX)
                    && !k.starts_with(VAE_PREFIX)
                    && !k.starts_with(BERT_PREFIX)
                    && !used.contains(k)
                    && !IGNORED_PREFIXES.iter().any(|i| k.starts_with(i))
            })
            .collect();
        if !leftovers.is_empty() {
            return Err(EngineError::UnexpectedTensors {
                model: "LDM checkpoint".into(),
                names: leftovers,
            });
        }
        Ok(Self {
            config: config.clone(),
            device: weights.device().clone(),
            dtype: weights.dtype(),
            unet,
            vae,
            bert,
            schedule,
        })
    }

    /// The architecture the model was built from.
    pub fn config(&self) -> &LdmConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `get_first_stage_encoding(encode_first_stage(x))`: the scaled posterior **sample**
    /// `scale_factor · (μ + σ·ε)` of an image in [−1, 1], with ε from `noise`.
    pub fn encode_first_stage(
        &self,
        image: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let z = self.vae.encode(image)?.sample(noise)?;
        Ok((z * self.config.scale_factor)?)
    }

    /// `decode_first_stage(z)`: `decoder(post_quant_conv(z / scale_factor))`, not clamped.
    pub fn decode_first_stage(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.vae.decode(&(z / self.config.scale_factor)?)?)
    }

    /// The conditioning for token ids `[B, L]`.
    pub fn encode_text(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.bert.forward(ids)?)
    }
}

/// Converts an image batch of `u8` HWC pixels `[B, H, W, 3]` to the model's input: NCHW float
/// in [−1, 1] as `u8/127.5 − 1` (computed in float64, then cast, as the official loader).
pub fn image_u8_to_input(pixels: &Tensor, dtype: DType) -> Result<Tensor> {
    let x = ((pixels.to_dtype(DType::F64)? / 127.5)? - 1.0)?;
    Ok(x.to_dtype(dtype)?.permute((0, 3, 1, 2))?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt2img_large_maps_like_diffusers_conversion() {
        let cfg = LdmConfig::txt2img_large();
        assert_eq!(cfg.unet.block_out_channels, vec![320, 640, 1280, 1280]);
        let m = unet_map(&cfg);
        let r = |n: &str| m.rename(n);
        assert_eq!(
            r("conv_in.weight"),
            "model.diffusion_model.input_blocks.0.0.weight"
        );
        assert_eq!(
            r("down_blocks.0.resnets.1.norm1.weight"),
            "model.diffusion_model.input_blocks.2.0.in_layers.0.weight"
        );
        assert_eq!(
            r("down_blocks.0.attentions.1.proj_in.weight"),
            "model.diffusion_model.input_blocks.2.1.proj_in.weight"
        );
        assert_eq!(
            r("down_blocks.0.downsamplers.0.conv.bias"),
            "model.diffusion_model.input_blocks.3.0.op.bias"
        );
        assert_eq!(
            r("down_blocks.3.resnets.1.conv2.weight"),
            "model.diffusion_model.input_blocks.11.0.out_layers.3.weight"
        );
        // Level 3 (ds 8) has no attention: its up block's upsampler sits at `.1`.
        assert_eq!(
            r("up_blocks.0.upsamplers.0.conv.weight"),
            "model.diffusion_model.output_blocks.2.1.conv.weight"
        );
        assert_eq!(
            r("up_blocks.1.upsamplers.0.conv.weight"),
            "model.diffusion_model.output_blocks.5.2.conv.weight"
        );
        assert_eq!(
            r("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"),
            "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"
        );
        assert_eq!(
            r("up_blocks.1.resnets.0.conv_shortcut.weight"),
            "model.diffusion_model.output_blocks.3.0.skip_connection.weight"
        );
        assert_eq!(
            r("time_embedding.linear_2.bias"),
            "model.diffusion_model.time_embed.2.bias"
        );
        let v = vae_map(&cfg);
        assert_eq!(
            v.rename("decoder.up_blocks.0.resnets.2.conv1.weight"),
            "first_stage_model.decoder.up.3.block.2.conv1.weight"
        );
        assert_eq!(
            v.rename("encoder.mid_block.attentions.0.to_out.0.weight"),
            "first_stage_model.encoder.mid.attn_1.proj_out.weight"
        );
        assert_eq!(
            v.rename("encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"
        );
        assert_eq!(
            v.rename("quant_conv.weight"),
            "first_stage_model.quant_conv.weight"
        );
    }

    #[test]
    fn config_problems_are_all_reported_with_key_paths() {
        let mut v = serde_json::json!({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
          "params": {"image_size": 32, "channels": 4, "conditioning_key": "concat",
            "parameterization": "x0",
            "unet_config": {"target": "x.UNetModel", "params": {"in_channels": 4, "out_channels": 4,
              "model_channels": 32, "attention_resolutions": [1], "num_res_blocks": 1,
              "channel_mult": [1, 2], "num_heads": 4, "context_dim": 32}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
              "params": {"embed_dim": 4, "ddconfig": {"double_z": true, "z_channels": 4,
                "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.BERTEmbedder",
              "params": {"n_embed": 40, "n_layer": 1}}}}});
        let err = LdmConfig::from_value(&v, "t").unwrap_err();
        for want in [
            "model.params.conditioning_key",
            "model.params.parameterization",
            "unet_config.target",
            "use_spatial_transformer",
            "cond_stage_config.params.n_embed 40",
        ] {
            assert!(err.contains(want), "{want} missing from: {err}");
        }
        v["model"]["params"]["conditioning_key"] = "crossattn".into();
        v["model"]["params"]["parameterization"] = "eps".into();
        v["model"]["params"]["unet_config"]["target"] =
            "ldm.modules.diffusionmodules.openaimodel.UNetModel".into();
        v["model"]["params"]["unet_config"]["params"]["use_spatial_transformer"] = true.into();
        v["model"]["params"]["cond_stage_config"]["params"]["n_embed"] = 32.into();
        let cfg = LdmConfig::from_value(&v, "t").unwrap();
        assert_eq!(cfg.unet.block_out_channels, vec![32, 64]);
        assert_eq!(cfg.bert.heads, 8);
    }
}
