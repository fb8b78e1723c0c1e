//! `model.ckpt` (or its safetensors twin) and the mapping of diffusers names onto its keys.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};
use crate::weights::{RenameFn, Weights};

use super::*;

/// How the suffix after a mapped prefix is renamed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Kind {
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
pub(super) struct PrefixMap {
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

    pub(super) fn rename(&self, name: &str) -> String {
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

    pub(super) fn into_fn(self) -> RenameFn {
        Arc::new(move |n: &str| self.rename(n))
    }
}

pub(super) fn e(d: impl Into<String>, c: impl Into<String>, k: Kind) -> (String, String, Kind) {
    (d.into(), c.into(), k)
}

/// The UNet table (diffusers `convert_ldm_unet_checkpoint`, inverted).
pub(super) fn unet_map(cfg: &LdmConfig) -> PrefixMap {
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
pub(super) fn vae_map(cfg: &LdmConfig) -> PrefixMap {
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
