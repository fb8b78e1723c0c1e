//! The LDM config in the official YAML's terms, translated into the engine's module configs.

use std::path::Path;

use serde::Deserialize;

use crate::bert::BertConfig;
use crate::error::{EngineError, Result};
use crate::ldm_ddim::{BetaSchedule, ScheduleConfig};
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;

#[derive(Debug, Clone, Deserialize)]
pub(super) struct Node<P> {
    target: String,
    params: P,
}

pub(super) fn yes() -> bool {
    true
}
pub(super) fn minus1() -> i64 {
    -1
}
pub(super) fn one_usize() -> usize {
    1
}
pub(super) fn two() -> usize {
    2
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct UnetParams {
    in_channels: usize,
    out_channels: usize,
    model_channels: usize,
    attention_resolutions: Vec<usize>,
    num_res_blocks: usize,
    channel_mult: Vec<usize>,
    #[serde(default = "yes")]
    conv_resample: bool,
    #[serde(default = "two")]
    dims: usize,
    #[serde(default)]
    num_classes: Option<serde_json::Value>,
    #[serde(default = "minus1")]
    num_heads: i64,
    #[serde(default = "minus1")]
    num_head_channels: i64,
    #[serde(default = "minus1")]
    num_heads_upsample: i64,
    #[serde(default)]
    use_scale_shift_norm: bool,
    #[serde(default)]
    resblock_updown: bool,
    #[serde(default)]
    use_spatial_transformer: bool,
    #[serde(default = "one_usize")]
    transformer_depth: usize,
    #[serde(default)]
    context_dim: Option<usize>,
    #[serde(default)]
    n_embed: Option<usize>,
    #[serde(default)]
    use_linear_in_transformer: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct DdConfig {
    double_z: bool,
    z_channels: usize,
    in_channels: usize,
    out_ch: usize,
    ch: usize,
    ch_mult: Vec<usize>,
    num_res_blocks: usize,
    #[serde(default)]
    attn_resolutions: Vec<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct FirstStageParams {
    embed_dim: usize,
    ddconfig: DdConfig,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct BertParams {
    n_embed: usize,
    n_layer: usize,
    #[serde(default = "vocab")]
    vocab_size: usize,
    #[serde(default = "seq")]
    max_seq_len: usize,
}

pub(super) fn vocab() -> usize {
    30522
}
pub(super) fn seq() -> usize {
    77
}
pub(super) fn lin_start() -> f64 {
    1e-4
}
pub(super) fn lin_end() -> f64 {
    2e-2
}
pub(super) fn thousand() -> usize {
    1000
}
pub(super) fn cos_s() -> f64 {
    8e-3
}
pub(super) fn linear_s() -> String {
    "linear".into()
}
pub(super) fn eps_s() -> String {
    "eps".into()
}
pub(super) fn one_f() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct LdmParams {
    #[serde(default = "lin_start")]
    linear_start: f64,
    #[serde(default = "lin_end")]
    linear_end: f64,
    #[serde(default = "thousand")]
    timesteps: usize,
    #[serde(default = "linear_s")]
    beta_schedule: String,
    #[serde(default = "cos_s")]
    cosine_s: f64,
    #[serde(default)]
    given_betas: Option<serde_json::Value>,
    #[serde(default)]
    v_posterior: f64,
    #[serde(default = "eps_s")]
    parameterization: String,
    #[serde(default = "one_f")]
    scale_factor: f64,
    #[serde(default)]
    scale_by_std: bool,
    image_size: usize,
    channels: usize,
    #[serde(default)]
    conditioning_key: Option<String>,
    unet_config: Node<UnetParams>,
    first_stage_config: Node<FirstStageParams>,
    cond_stage_config: Node<BertParams>,
}

/// The LDM text-to-image model's architecture, translated from the official config.
#[derive(Debug, Clone)]
pub struct LdmConfig {
    /// The UNet as a diffusers-style config.
    pub unet: UNetConfig,
    /// The first stage as a diffusers-style config (`scaling_factor` = `scale_factor`).
    pub vae: VaeConfig,
    /// The BERT-style text encoder.
    pub bert: BertConfig,
    /// The DDPM noise schedule.
    pub schedule: ScheduleConfig,
    /// Latent side length (`image_size`; 32 for 256 px at factor 8).
    pub latent_size: usize,
    /// Latent channels (`channels`).
    pub latent_channels: usize,
    /// The latent scale (`scale_factor`, 0.18215).
    pub scale_factor: f64,
    /// UNet `num_res_blocks` (needed by the key mapping).
    pub(super) num_res_blocks: usize,
    /// Which UNet levels carry attention.
    pub(super) attention_levels: Vec<bool>,
}

impl LdmConfig {
    /// The txt2img-f8-large (LDM-256) architecture of the official
    /// `configs/latent-diffusion/txt2img-1p4B-eval.yaml`.
    pub fn txt2img_large() -> Self {
        let v = serde_json::json!({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
          "params": {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000,
            "image_size": 32, "channels": 4, "conditioning_key": "crossattn",
            "scale_factor": 0.18215,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
              "params": {"image_size": 32, "in_channels": 4, "out_channels": 4,
                "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
                "channel_mult": [1, 2, 4, 4], "num_heads": 8, "use_spatial_transformer": true,
                "transformer_depth": 1, "context_dim": 1280, "use_checkpoint": true,
                "legacy": false}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
              "params": {"embed_dim": 4, "ddconfig": {"double_z": true, "z_channels": 4,
                "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.BERTEmbedder",
              "params": {"n_embed": 1280, "n_layer": 32}}}}});
        Self::from_value(&v, "txt2img-1p4B-eval.yaml (built in)").expect("static LDM config")
    }

    /// Reads the official YAML (`.yaml`/`.yml`) or a JSON file holding the same structure,
    /// at the top level or under `official_yaml_equivalent` (the fixtures' `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let v = read_config_value(path)?;
        Self::from_value(&v, &path.display().to_string()).map_err(|message| EngineError::Config {
            path: path.to_path_buf(),
            message,
        })
    }

    pub(super) fn from_value(
        v: &serde_json::Value,
        what: &str,
    ) -> std::result::Result<Self, String> {
        let model = v
            .get("model")
            .or_else(|| v.get("official_yaml_equivalent").and_then(|o| o.get("model")))
            .ok_or_else(|| {
                format!("{what}: no `model` section (expected the official LDM YAML layout: model.target/params)")
            })?;
        let node: Node<LdmParams> = serde_json::from_value(model.clone())
            .map_err(|e| format!("model: {e} (expected the official LDM YAML layout)"))?;
        let p = node.params;
        let mut problems = Vec::new();
        let mut need = |ok: bool, msg: String| {
            if !ok {
                problems.push(msg);
            }
        };
        need(
            node.target.ends_with("LatentDiffusion"),
            format!(
                "model.target {:?}: only ldm.models.diffusion.ddpm.LatentDiffusion is supported",
                node.target
            ),
        );
        need(
            p.parameterization == "eps",
            format!(
                "model.params.parameterization {:?}: only \"eps\" is supported",
                p.parameterization
            ),
        );
        need(
            p.conditioning_key.as_deref() == Some("crossattn"),
            format!(
                "model.params.conditioning_key {:?}: only \"crossattn\" is supported",
                p.conditioning_key
            ),
        );
        need(
            p.given_betas.as_ref().is_none_or(|b| b.is_null()),
            "model.params.given_betas: explicit betas are not supported".into(),
        );
        need(
            p.v_posterior == 0.0,
            "model.params.v_posterior: only 0 is supported".into(),
        );
        need(
            !p.scale_by_std,
            "model.params.scale_by_std: set scale_factor explicitly instead".into(),
        );
        let beta_schedule = match p.beta_schedule.as_str() {
            "linear" => Some(BetaSchedule::Linear),
            "sqrt_linear" => Some(BetaSchedule::SqrtLinear),
            "sqrt" => Some(BetaSchedule::Sqrt),
            "cosine" => Some(BetaSchedule::Cosine),
            other => {
                need(false, format!("model.params.beta_schedule {other:?}: expected linear, sqrt_linear, sqrt or cosine"));
                None
            }
        };

        // UNet.
        let u = &p.unet_config.params;
        let up = "model.params.unet_config";
        need(
            p.unet_config.target.ends_with("openaimodel.UNetModel"),
            format!(
                "{up}.target {:?}: only ldm.modules.diffusionmodules.openaimodel.UNetModel is supported",
                p.unet_config.target
            ),
        );
        need(
            u.use_spatial_transformer,
            format!("{up}.params.use_spatial_transformer: must be true (text-conditioned UNet)"),
        );
        need(
            u.dims == 2,
            format!("{up}.params.dims {}: only 2 is supported", u.dims),
        );
        need(
            u.num_classes.as_ref().is_none_or(|c| c.is_null()),
            format!("{up}.params.num_classes: class conditioning is not supported"),
        );
        need(
            !u.use_scale_shift_norm,
            format!("{up}.params.use_scale_shift_norm: not supported"),
        );
        need(
            !u.resblock_updown,
            format!("{up}.params.resblock_updown: not supported"),
        );
        need(
            u.conv_resample,
            format!("{up}.params.conv_resample: must be true"),
        );
        need(
            u.num_heads_upsample == -1 || u.num_heads_upsample == u.num_heads,
            format!("{up}.params.num_heads_upsample: must equal num_heads"),
        );
        need(
            u.n_embed.is_none(),
            format!("{up}.params.n_embed: VQ-predicting UNets are not supported"),
        );
        need(
            u.num_heads != -1 || u.num_head_channels != -1,
            format!("{up}.params: set num_heads or num_head_channels"),
        );
        need(
            !u.channel_mult.is_empty(),
            format!("{up}.params.channel_mult: empty"),
        );
        need(
            u.in_channels == p.channels && u.out_channels == p.channels,
            format!(
                "{up}.params.in_channels/out_channels ({}/{}) must equal model.params.channels ({})",
                u.in_channels, u.out_channels, p.channels
            ),
        );
        let ch: Vec<usize> = u
            .channel_mult
            .iter()
            .map(|m| m * u.model_channels)
            .collect();
        let attention_levels: Vec<bool> = (0..ch.len())
            .map(|i| u.attention_resolutions.contains(&(1usize << i)))
            .collect();
        let mut heads = Vec::new();
        for &c in &ch {
            if u.num_head_channels > 0 {
                let nhc = u.num_head_channels as usize;
                need(
                    c % nhc == 0,
                    format!("{up}.params.num_head_channels {nhc} does not divide {c} channels"),
                );
                heads.push((c / nhc).max(1));
            } else if u.num_heads > 0 {
                let nh = u.num_heads as usize;
                need(
                    c % nh == 0,
                    format!("{up}.params.num_heads {nh} does not divide {c} channels"),
                );
                heads.push(nh);
            } else {
                heads.push(1);
            }
        }
        let context_dim = u.context_dim.unwrap_or(0);
        need(
            context_dim > 0,
            format!("{up}.params.context_dim: required for a text-conditioned UNet"),
        );
        let unet: Option<UNetConfig> = serde_json::from_value(serde_json::json!({
            "in_channels": u.in_channels,
            "out_channels": u.out_channels,
            "block_out_channels": ch,
            "down_block_types": attention_levels.iter().map(|&a| if a { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect::<Vec<_>>(),
            "up_block_types": attention_levels.iter().rev().map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect::<Vec<_>>(),
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "layers_per_block": u.num_res_blocks,
            "transformer_layers_per_block": u.transformer_depth,
            "attention_head_dim": heads.clone(),
            "num_attention_heads": heads,
            "cross_attention_dim": context_dim,
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "use_linear_projection": u.use_linear_in_transformer,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "downsample_padding": 1,
            "time_embedding_dim": 4 * u.model_channels,
        }))
        .map_err(|e| problems.push(format!("{up}: {e}")))
        .ok();
        if let Some(c) = ch.iter().find(|&&c| c % 32 != 0) {
            problems.push(format!(
                "{up}.params: {c} channels are not divisible by GroupNorm's 32 groups"
            ));
        }

        // First stage.
        let fp = "model.params.first_stage_config";
        let f = &p.first_stage_config.params;
        let dd = &f.ddconfig;
        if !p
            .first_stage_config
            .target
            .ends_with("autoencoder.AutoencoderKL")
        {
            problems.push(format!(
                "{fp}.target {:?}: only ldm.models.autoencoder.AutoencoderKL is supported",
                p.first_stage_config.target
            ));
        }
        if !dd.double_z {
            problems.push(format!(
                "{fp}.params.ddconfig.double_z: must be true (KL autoencoder)"
            ));
        }
        if f.embed_dim != dd.z_channels {
            problems.push(format!(
                "{fp}.params.embed_dim {} must equal ddconfig.z_channels {}",
                f.embed_dim, dd.z_channels
            ));
        }
        if f.embed_dim != p.channels {
            problems.push(format!(
                "{fp}.params.embed_dim {} must equal model.params.channels {}",
                f.embed_dim, p.channels
            ));
        }
        if !dd.attn_resolutions.is_empty() {
            problems.push(format!(
                "{fp}.params.ddconfig.attn_resolutions {:?}: attention outside the mid block is not supported",
                dd.attn_resolutions
            ));
        }
        let vae_ch: Vec<usize> = dd.ch_mult.iter().map(|m| m * dd.ch).collect();
        if let Some(c) = vae_ch.iter().find(|&&c| c % 32 != 0) {
            problems.push(format!(
                "{fp}.params.ddconfig: {c} channels are not divisible by GroupNorm's 32 groups"
            ));
        }
        let vae = VaeConfig {
            in_channels: dd.in_channels,
            out_channels: dd.out_ch,
            block_out_channels: vae_ch,
            layers_per_block: dd.num_res_blocks,
            latent_channels: dd.z_channels,
            norm_num_groups: 32,
            scaling_factor: p.scale_factor,
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            act_fn: "silu".into(),
            down_block_types: vec!["DownEncoderBlock2D".into(); dd.ch_mult.len()],
            up_block_types: vec!["UpDecoderBlock2D".into(); dd.ch_mult.len()],
        };

        // Text encoder.
        let cp = "model.params.cond_stage_config";
        if !p.cond_stage_config.target.ends_with("BERTEmbedder") {
            problems.push(format!(
                "{cp}.target {:?}: only ldm.modules.encoders.modules.BERTEmbedder is supported",
                p.cond_stage_config.target
            ));
        }
        let b = &p.cond_stage_config.params;
        if b.n_embed != context_dim {
            problems.push(format!(
                "{cp}.params.n_embed {} must equal the UNet's context_dim {context_dim}",
                b.n_embed
            ));
        }
        let bert = BertConfig::new(b.n_embed, b.n_layer, b.vocab_size, b.max_seq_len);

        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Self {
            unet: unet.expect("checked above"),
            vae,
            bert,
            schedule: ScheduleConfig {
                beta_schedule: beta_schedule.expect("checked above"),
                timesteps: p.timesteps,
                linear_start: p.linear_start,
                linear_end: p.linear_end,
                cosine_s: p.cosine_s,
            },
            latent_size: p.image_size,
            latent_channels: p.channels,
            scale_factor: p.scale_factor,
            num_res_blocks: u.num_res_blocks,
            attention_levels,
        })
    }
}

/// Reads the official YAML (`.yaml`/`.yml`) or a JSON file holding the same structure, at the
/// top level or under `official_yaml_equivalent` (the fixtures' `config.json`), and returns
/// `{"model": …}` — what a model directory stores as `ldm.json`.
pub fn read_config_value(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let cfg_err = |message: String| EngineError::Config {
        path: path.to_path_buf(),
        message,
    };
    let is_yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    );
    let v: serde_json::Value = if is_yaml {
        serde_yaml::from_str(&text).map_err(|e| cfg_err(format!("not valid YAML: {e}")))?
    } else {
        serde_json::from_str(&text).map_err(|e| cfg_err(format!("not valid JSON: {e}")))?
    };
    let model = v
        .get("model")
        .or_else(|| {
            v.get("official_yaml_equivalent")
                .and_then(|o| o.get("model"))
        })
        .cloned()
        .ok_or_else(|| {
            cfg_err(
                "no `model` section (expected the official LDM YAML layout: model.target/params)"
                    .into(),
            )
        })?;
    Ok(serde_json::json!({ "model": model }))
}
