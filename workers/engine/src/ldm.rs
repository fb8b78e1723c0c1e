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

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::bert::{BertConfig, BertEmbedder};
use crate::error::{EngineError, Result};
use crate::ldm_ddim::{BetaSchedule, DdpmSchedule, ScheduleConfig};
use crate::noise::NoiseSource;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::{RenameFn, ScopeFn, Weights};

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

#[derive(Debug, Clone, Deserialize)]
struct Node<P> {
    target: String,
    params: P,
}

fn yes() -> bool {
    true
}
fn minus1() -> i64 {
    -1
}
fn one_usize() -> usize {
    1
}
fn two() -> usize {
    2
}

#[derive(Debug, Clone, Deserialize)]
struct UnetParams {
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
struct DdConfig {
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
struct FirstStageParams {
    embed_dim: usize,
    ddconfig: DdConfig,
}

#[derive(Debug, Clone, Deserialize)]
struct BertParams {
    n_embed: usize,
    n_layer: usize,
    #[serde(default = "vocab")]
    vocab_size: usize,
    #[serde(default = "seq")]
    max_seq_len: usize,
}

fn vocab() -> usize {
    30522
}
fn seq() -> usize {
    77
}
fn lin_start() -> f64 {
    1e-4
}
fn lin_end() -> f64 {
    2e-2
}
fn thousand() -> usize {
    1000
}
fn cos_s() -> f64 {
    8e-3
}
fn linear_s() -> String {
    "linear".into()
}
fn eps_s() -> String {
    "eps".into()
}
fn one_f() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
struct LdmParams {
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
    num_res_blocks: usize,
    /// Which UNet levels carry attention.
    attention_levels: Vec<bool>,
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

    fn from_value(v: &serde_json::Value, what: &str) -> std::result::Result<Self, String> {
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

/// How the suffix after a mapped prefix is renamed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    /// openaimodel ResBlock.
    UnetResnet,
    /// CompVis VAE ResnetBlock.
    VaeResnet,
    /// CompVis VAE AttnBlock (1×1 convs).
    VaeAttn,
}

impl Kind {
    fn rename_suffix(self, rest: &str) -> String {
        let table: &[(&str, &str)] = match self {
            Kind::Plain => &[],
            Kind::UnetResnet => &[
                ("norm1.", "in_layers.0."),
                ("conv1.", "in_layers.2."),
                ("time_emb_proj.", "emb_layers.1."),
                ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."),
                ("conv_shortcut.", "skip_connection."),
            ],
            Kind::VaeResnet => &[("conv_shortcut.", "nin_shortcut.")],
            Kind::VaeAttn => &[
                ("group_norm.", "norm."),
                ("to_q.", "q."),
                ("to_k.", "k."),
                ("to_v.", "v."),
                ("to_out.0.", "proj_out."),
            ],
        };
        for (from, to) in table {
            if let Some(tail) = rest.strip_prefix(from) {
                return format!("{to}{tail}");
            }
        }
        rest.to_string()
    }
}

/// A diffusers-name → checkpoint-name translation by prefix table.
#[derive(Debug, Clone)]
struct PrefixMap {
    /// (diffusers prefix, checkpoint prefix, suffix kind), longest diffusers prefix first.
    entries: Vec<(String, String, Kind)>,
    /// Prepended to every checkpoint name (the model's prefix in the state dict).
    root: String,
}

impl PrefixMap {
    fn new(root: &str, mut entries: Vec<(String, String, Kind)>) -> Self {
        entries.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
        Self {
            entries,
            root: root.to_string(),
        }
    }

    fn rename(&self, name: &str) -> String {
        for (d, c, kind) in &self.entries {
            if let Some(rest) = name
                .strip_prefix(d.as_str())
                .and_then(|r| r.strip_prefix('.'))
            {
                return format!("{}{c}.{}", self.root, kind.rename_suffix(rest));
            }
        }
        format!("{}{name}", self.root)
    }

    fn into_fn(self) -> RenameFn {
        Arc::new(move |n: &str| self.rename(n))
    }
}

fn e(d: impl Into<String>, c: impl Into<String>, k: Kind) -> (String, String, Kind) {
    (d.into(), c.into(), k)
}

/// The UNet table (diffusers `convert_ldm_unet_checkpoint`, inverted).
fn unet_map(cfg: &LdmConfig) -> PrefixMap {
    let n = cfg.attention_levels.len();
    let layers = cfg.num_res_blocks;
    let mut v = vec![
        e("conv_in", "input_blocks.0.0", Kind::Plain),
        e("time_embedding.linear_1", "time_embed.0", Kind::Plain),
        e("time_embedding.linear_2", "time_embed.2", Kind::Plain),
        e("conv_norm_out", "out.0", Kind::Plain),
        e("conv_out", "out.2", Kind::Plain),
        e("mid_block.resnets.0", "middle_block.0", Kind::UnetResnet),
        e("mid_block.attentions.0", "middle_block.1", Kind::Plain),
        e("mid_block.resnets.1", "middle_block.2", Kind::UnetResnet),
    ];
    let mut idx = 1;
    for (i, &attn) in cfg.attention_levels.iter().enumerate() {
        for j in 0..layers {
            v.push(e(
                format!("down_blocks.{i}.resnets.{j}"),
                format!("input_blocks.{idx}.0"),
                Kind::UnetResnet,
            ));
            if attn {
                v.push(e(
                    format!("down_blocks.{i}.attentions.{j}"),
                    format!("input_blocks.{idx}.1"),
                    Kind::Plain,
                ));
            }
            idx += 1;
        }
        if i + 1 < n {
            v.push(e(
                format!("down_blocks.{i}.downsamplers.0.conv"),
                format!("input_blocks.{idx}.0.op"),
                Kind::Plain,
            ));
            idx += 1;
        }
    }
    let mut idx = 0;
    for u in 0..n {
        let attn = cfg.attention_levels[n - 1 - u];
        for j in 0..=layers {
            v.push(e(
                format!("up_blocks.{u}.resnets.{j}"),
                format!("output_blocks.{idx}.0"),
                Kind::UnetResnet,
            ));
            let mut k = 1;
            if attn {
                v.push(e(
                    format!("up_blocks.{u}.attentions.{j}"),
                    format!("output_blocks.{idx}.1"),
                    Kind::Plain,
                ));
                k = 2;
            }
            if j == layers && u + 1 < n {
                v.push(e(
                    format!("up_blocks.{u}.upsamplers.0.conv"),
                    format!("output_blocks.{idx}.{k}.conv"),
                    Kind::Plain,
                ));
            }
            idx += 1;
        }
    }
    PrefixMap::new(UNET_PREFIX, v)
}

/// The VAE table (diffusers `convert_ldm_vae_checkpoint`, inverted).
fn vae_map(cfg: &LdmConfig) -> PrefixMap {
    let n = cfg.vae.block_out_channels.len();
    let mut v = Vec::new();
    for side in ["encoder", "decoder"] {
        v.push(e(
            format!("{side}.conv_norm_out"),
            format!("{side}.norm_out"),
            Kind::Plain,
        ));
        v.push(e(
            format!("{side}.mid_block.resnets.0"),
            format!("{side}.mid.block_1"),
            Kind::VaeResnet,
        ));
        v.push(e(
            format!("{side}.mid_block.resnets.1"),
            format!("{side}.mid.block_2"),
            Kind::VaeResnet,
        ));
        v.push(e(
            format!("{side}.mid_block.attentions.0"),
            format!("{side}.mid.attn_1"),
            Kind::VaeAttn,
        ));
    }
    for i in 0..n {
        for j in 0..cfg.vae.layers_per_block {
            v.push(e(
                format!("encoder.down_blocks.{i}.resnets.{j}"),
                format!("encoder.down.{i}.block.{j}"),
                Kind::VaeResnet,
            ));
        }
        v.push(e(
            format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
            format!("encoder.down.{i}.downsample.conv"),
            Kind::Plain,
        ));
        let level = n - 1 - i;
        for j in 0..=cfg.vae.layers_per_block {
            v.push(e(
                format!("decoder.up_blocks.{i}.resnets.{j}"),
                format!("decoder.up.{level}.block.{j}"),
                Kind::VaeResnet,
            ));
        }
        v.push(e(
            format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
            format!("decoder.up.{level}.upsample.conv"),
            Kind::Plain,
        ));
    }
    PrefixMap::new(VAE_PREFIX, v)
}

/// Opens an LDM checkpoint: `.ckpt`/`.pt`/`.pth` (PyTorch zip pickle; the tensors under
/// `state_dict`, or a bare state dict) or `.safetensors` (the same key names). Tensors keep
/// their stored dtype until a model reads them.
pub fn open_checkpoint(path: &Path, dtype: DType, device: &Device) -> Result<Weights> {
    if !path.is_file() {
        return Err(EngineError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such checkpoint file"),
        });
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "safetensors" {
        return Weights::from_safetensors(&[path], dtype, device);
    }
    let read = |key: Option<&str>| {
        candle_core::pickle::read_all_with_key(path, key).map_err(|e| {
            EngineError::Invalid(format!(
                "{}: cannot read as a PyTorch checkpoint: {e}",
                path.display()
            ))
        })
    };
    // candle's reader returns Ok with nothing for a wrong key: try `state_dict`, then a bare
    // state dict, and fail loudly when both are empty.
    let mut tensors = read(Some("state_dict"))?;
    if tensors.is_empty() {
        tensors = read(None)?;
    }
    if tensors.is_empty() {
        return Err(EngineError::Invalid(format!(
            "{}: no tensors found (expected a PyTorch checkpoint whose `state_dict` holds model.diffusion_model.*, first_stage_model.*, cond_stage_model.*)",
            path.display()
        )));
    }
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    Ok(Weights::from_tensors(map, dtype, device).with_origin(&path.display().to_string()))
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
