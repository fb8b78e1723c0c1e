//! The CLIP text encoder of Stable Diffusion 1.x (transformers `CLIPTextModel`, Radford et al.
//! 2021), built from its `config.json`, that accepts token *embeddings* as well as ids: learned
//! tokens (textual inversion, AnomalyDiffusion's anomaly and spatial tokens) are spliced into
//! the `[B, 77, D]` token embeddings before the position embeddings are added.
//!
//! Owned because candle-transformers' SD CLIP takes ids only, and its fused LayerNorm cuts the
//! gradient to injected embeddings (shared/reference/candle.md §2); this copy uses
//! [`crate::nn::LayerNorm`], which stays differentiable when gradients are tracked.
//!
//! Layer: x += Attn(LN1(x)) with a causal mask; x += fc2(act(fc1(LN2(x)))); act = QuickGELU
//! (x·σ(1.702x)) for SD 1.x; final LayerNorm.

use std::path::Path;

use crate::nn::Linear;
use candle_core::{DType, Device, Module, Result as CResult, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::error::{EngineError, Result};
use crate::nn::{gelu_erf, quick_gelu, softmax_last_dim, LayerNorm};
use crate::weights::{find_file, read_json, Weights};

/// The fields of transformers' `CLIPTextConfig` this engine reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "d77")]
    pub max_position_embeddings: usize,
    #[serde(default = "qg")]
    pub hidden_act: String,
    #[serde(default = "eps5")]
    pub layer_norm_eps: f64,
    #[serde(default = "d49406")]
    pub bos_token_id: i64,
    #[serde(default = "d49407")]
    pub eos_token_id: i64,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
}

fn d77() -> usize {
    77
}
fn qg() -> String {
    "quick_gelu".into()
}
fn eps5() -> f64 {
    1e-5
}
fn d49406() -> i64 {
    49406
}
fn d49407() -> i64 {
    49407
}

impl ClipConfig {
    /// openai/clip-vit-large-patch14's text tower (SD 1.x).
    pub fn sd_v1_5() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            bos_token_id: 49406,
            eos_token_id: 49407,
            pad_token_id: Some(49407),
        }
    }

    /// Reads a transformers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|message| EngineError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        match self.hidden_act.as_str() {
            "quick_gelu" | "gelu" => Ok(()),
            other => Err(format!("unsupported hidden_act {other:?}")),
        }
    }
}

#[derive(Debug, Clone)]
struct ClipLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    quick: bool,
}

impl ClipLayer {
    fn new(vb: VarBuilder, c: &ClipConfig) -> CResult<Self> {
        let d = c.hidden_size;
        let a = vb.pp("self_attn");
        Ok(Self {
            ln1: LayerNorm::new(d, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            q: crate::nn::linear(d, d, a.pp("q_proj"))?,
            k: crate::nn::linear(d, d, a.pp("k_proj"))?,
            v: crate::nn::linear(d, d, a.pp("v_proj"))?,
            o: crate::nn::linear(d, d, a.pp("out_proj"))?,
            ln2: LayerNorm::new(d, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: crate::nn::linear(d, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: crate::nn::linear(c.intermediate_size, d, vb.pp("mlp.fc2"))?,
            heads: c.num_attention_heads,
            quick: c.hidden_act == "quick_gelu",
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> CResult<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let h = self.ln1.forward(x)?;
        let split = |t: Tensor| -> CResult<Tensor> {
            t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(&h)?)?;
        let k = split(self.k.forward(&h)?)?;
        let v = split(self.v.forward(&h)?)?;
        let logits = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(mask)?;
        let probs = softmax_last_dim(&logits)?;
        let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        let x = (self.o.forward(&a)? + x)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?;
        let h = if self.quick {
            quick_gelu(&h)?
        } else {
            gelu_erf(&h)?
        };
        self.fc2.forward(&h)? + x
    }
}

/// transformers `CLIPTextModel` (text tower only; keys `text_model.*`).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    config: ClipConfig,
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
}

impl ClipTextModel {
    /// Builds the model under `vb` (the file root: `text_model.*` keys, or the un-prefixed keys
    /// that transformers 5 writes for a model built from a config).
    pub fn new(vb: VarBuilder, config: &ClipConfig) -> CResult<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let root = if vb.contains_tensor("embeddings.token_embedding.weight")
            && !vb.contains_tensor("text_model.embeddings.token_embedding.weight")
        {
            vb.clone()
        } else {
            vb.pp("text_model")
        };
        let d = config.hidden_size;
        let emb = root.pp("embeddings");
        // Older checkpoints carry the constant `position_ids` buffer; read it so that the
        // unexpected-tensor check accepts it.
        if emb.contains_tensor("position_ids") {
            let _ = emb.get_unchecked("position_ids")?;
        }
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipLayer::new(root.pp("encoder.layers").pp(i), config))
            .collect::<CResult<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            token_embedding: candle_nn::embedding(config.vocab_size, d, emb.pp("token_embedding"))?,
            position_embedding: emb.get(
                (config.max_position_embeddings, d),
                "position_embedding.weight",
            )?,
            layers,
            final_layer_norm: LayerNorm::new(
                d,
                config.layer_norm_eps,
                root.pp("final_layer_norm"),
            )?,
        })
    }

    /// Loads `dir/config.json` and `dir/model(.fp16).safetensors`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let file = find_file(dir, &["model.safetensors", "model.fp16.safetensors"])?;
        let weights = Weights::from_safetensors(&[file], dtype, device)?;
        Self::from_weights(&weights, &config)
    }

    /// Builds the model from `weights` with full tensor accounting.
    pub fn from_weights(weights: &Weights, config: &ClipConfig) -> Result<Self> {
        weights.build("CLIPTextModel", |vb| Self::new(vb, config))
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Token embeddings `[B, L, D]` of ids `[B, L]` (no position embeddings yet). Splice
    /// learned embeddings into this tensor, then call [`forward_embeds`](Self::forward_embeds).
    pub fn embed_tokens(&self, ids: &Tensor) -> CResult<Tensor> {
        self.token_embedding.forward(ids)
    }

    /// `last_hidden_state` `[B, L, D]` (after the final LayerNorm) from token embeddings.
    pub fn forward_embeds(&self, token_embeds: &Tensor) -> CResult<Tensor> {
        let (_b, n, _d) = token_embeds.dims3()?;
        if n > self.config.max_position_embeddings {
            candle_core::bail!(
                "CLIP: sequence of {n} tokens exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        let pos = self.position_embedding.narrow(0, 0, n)?;
        let mut x = token_embeds.broadcast_add(&pos)?;
        let mask = causal_mask(n, x.device())?.to_dtype(x.dtype())?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// `last_hidden_state` from token ids `[B, L]`.
    pub fn forward(&self, ids: &Tensor) -> CResult<Tensor> {
        self.forward_embeds(&self.embed_tokens(ids)?)
    }

    /// transformers' `pooler_output`: the hidden state at the end-of-text token — the first
    /// position whose id is `eos_token_id` (or the arg-max id for legacy configs whose
    /// eos_token_id is 2).
    pub fn pooled(&self, last_hidden: &Tensor, ids: &Tensor) -> CResult<Tensor> {
        let ids: Vec<Vec<i64>> = ids.to_dtype(DType::I64)?.to_vec2()?;
        let mut rows = Vec::with_capacity(ids.len());
        for (b, row) in ids.iter().enumerate() {
            let pos = if self.config.eos_token_id == 2 {
                row.iter()
                    .enumerate()
                    .max_by_key(|(_, &v)| v)
                    .map(|(i, _)| i)
                    .unwrap_or(0)
            } else {
                row.iter()
                    .position(|&v| v == self.config.eos_token_id)
                    .unwrap_or(row.len() - 1)
            };
            rows.push(last_hidden.get(b)?.get(pos)?);
        }
        Tensor::stack(&rows, 0)
    }
}

/// Additive causal mask `[L, L]`: 0 on and below the diagonal, −∞ above.
fn causal_mask(n: usize, device: &Device) -> CResult<Tensor> {
    let v: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (n, n), device)
}
