//! The LDM text encoder (CompVis `ldm.modules.encoders.modules.BERTEmbedder`): an
//! `x_transformer.TransformerWrapper` around a pre-LayerNorm `Encoder`. Despite the name it is
//! not Hugging Face BERT: no token types, no attention mask (padding id 0 is attended to), no
//! pooler; q/k/v are bias-free with a fixed 8 heads × 64 dims, the feed-forward is
//! Linear(D, 4D) → exact GELU → Linear(4D, D), and a final LayerNorm follows the layers.
//!
//! Forward: `token_emb(ids)` → (learned tokens are spliced in here, see
//! [`BertEmbedder::forward_embeds`]) → `+ pos_emb(0..n)` → n_layer × [x + Attn(LN x);
//! x + FF(LN x)] → LayerNorm.
//!
//! Key layout (under `cond_stage_model.transformer.` in an LDM checkpoint): `token_emb.weight`,
//! `pos_emb.emb.weight`, `attn_layers.layers.{2i}.0` (LayerNorm) / `.1` (`to_q`, `to_k`, `to_v`,
//! `to_out`), `attn_layers.layers.{2i+1}.0` (LayerNorm) / `.1.net.0.0`, `.1.net.2` (Linears),
//! `norm`; `to_logits` exists in checkpoints but is unused for conditioning.

use crate::nn::Linear;
use candle_core::{Module, Result as CResult, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::nn::{gelu_erf, softmax_last_dim, LayerNorm};

/// BERTEmbedder hyper-parameters (the official YAML's `cond_stage_config.params`, plus the
/// values the module fixes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Model width D (`n_embed`; 1280 for LDM-256 txt2img-large).
    pub n_embed: usize,
    /// Number of attention + feed-forward layer pairs (`n_layer`; 32 for txt2img-large).
    pub n_layer: usize,
    #[serde(default = "vocab")]
    pub vocab_size: usize,
    #[serde(default = "seq")]
    pub max_seq_len: usize,
    /// Fixed by x_transformer's `Attention` defaults.
    #[serde(default = "heads")]
    pub heads: usize,
    #[serde(default = "dim_head")]
    pub dim_head: usize,
    #[serde(default = "ff_mult")]
    pub ff_mult: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

fn vocab() -> usize {
    30522
}
fn seq() -> usize {
    77
}
fn heads() -> usize {
    8
}
fn dim_head() -> usize {
    64
}
fn ff_mult() -> usize {
    4
}
fn eps() -> f64 {
    1e-5
}

impl BertConfig {
    /// A config with the module's fixed heads, head width, feed-forward ratio and eps.
    pub fn new(n_embed: usize, n_layer: usize, vocab_size: usize, max_seq_len: usize) -> Self {
        Self {
            n_embed,
            n_layer,
            vocab_size,
            max_seq_len,
            heads: heads(),
            dim_head: dim_head(),
            ff_mult: ff_mult(),
            layer_norm_eps: eps(),
        }
    }
}

#[derive(Debug, Clone)]
struct SelfAttention {
    norm: LayerNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    dim_head: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, c: &BertConfig) -> CResult<Self> {
        let inner = c.heads * c.dim_head;
        let d = c.n_embed;
        let a = vb.pp("1");
        Ok(Self {
            norm: LayerNorm::new(d, c.layer_norm_eps, vb.pp("0"))?,
            to_q: crate::nn::linear_no_bias(d, inner, a.pp("to_q"))?,
            to_k: crate::nn::linear_no_bias(d, inner, a.pp("to_k"))?,
            to_v: crate::nn::linear_no_bias(d, inner, a.pp("to_v"))?,
            to_out: crate::nn::linear(inner, d, a.pp("to_out"))?,
            heads: c.heads,
            dim_head: c.dim_head,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let (b, n, _) = x.dims3()?;
        let h = self.norm.forward(x)?;
        let split = |t: Tensor| -> CResult<Tensor> {
            t.reshape((b, n, self.heads, self.dim_head))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.to_q.forward(&h)?)?;
        let k = split(self.to_k.forward(&h)?)?;
        let v = split(self.to_v.forward(&h)?)?;
        let scale = 1.0 / (self.dim_head as f64).sqrt();
        let logits = (q.matmul(&k.transpose(D::Minus1, D::Minus2)?.contiguous()?)? * scale)?;
        let probs = softmax_last_dim(&logits)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.dim_head))?;
        x + self.to_out.forward(&out)?
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    norm: LayerNorm,
    lin1: Linear,
    lin2: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, c: &BertConfig) -> CResult<Self> {
        let d = c.n_embed;
        let inner = d * c.ff_mult;
        let net = vb.pp("1").pp("net");
        Ok(Self {
            norm: LayerNorm::new(d, c.layer_norm_eps, vb.pp("0"))?,
            lin1: crate::nn::linear(d, inner, net.pp("0").pp("0"))?,
            lin2: crate::nn::linear(inner, d, net.pp("2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let h = self.lin1.forward(&self.norm.forward(x)?)?;
        x + self.lin2.forward(&gelu_erf(&h)?)?
    }
}

/// The LDM BERT-style text encoder.
#[derive(Debug, Clone)]
pub struct BertEmbedder {
    config: BertConfig,
    token_emb: Embedding,
    pos_emb: Tensor,
    layers: Vec<(SelfAttention, FeedForward)>,
    norm: LayerNorm,
}

impl BertEmbedder {
    /// Builds the encoder under `vb` (the `TransformerWrapper` root: `token_emb.weight`, …).
    pub fn new(vb: VarBuilder, config: &BertConfig) -> CResult<Self> {
        let d = config.n_embed;
        let layers = (0..config.n_layer)
            .map(|i| {
                let l = vb.pp("attn_layers").pp("layers");
                Ok((
                    SelfAttention::new(l.pp(2 * i), config)?,
                    FeedForward::new(l.pp(2 * i + 1), config)?,
                ))
            })
            .collect::<CResult<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            token_emb: candle_nn::embedding(config.vocab_size, d, vb.pp("token_emb"))?,
            pos_emb: vb.get((config.max_seq_len, d), "pos_emb.emb.weight")?,
            layers,
            norm: LayerNorm::new(d, config.layer_norm_eps, vb.pp("norm"))?,
        })
    }

    /// The config the encoder was built from.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Token embeddings `[B, L, D]` of ids `[B, L]`, before position embeddings. Splice learned
    /// embeddings into this tensor, then call [`forward_embeds`](Self::forward_embeds).
    pub fn embed_tokens(&self, ids: &Tensor) -> CResult<Tensor> {
        self.token_emb.forward(ids)
    }

    /// The conditioning `[B, L, D]` from token embeddings: positions added, layers, final
    /// LayerNorm. No attention mask: every position (padding included) is attended to.
    pub fn forward_embeds(&self, token_embeds: &Tensor) -> CResult<Tensor> {
        let (_b, n, _d) = token_embeds.dims3()?;
        if n > self.config.max_seq_len {
            candle_core::bail!(
                "BERTEmbedder: sequence of {n} tokens exceeds max_seq_len {}",
                self.config.max_seq_len
            );
        }
        let pos = self.pos_emb.narrow(0, 0, n)?;
        let mut x = token_embeds.broadcast_add(&pos)?;
        for (attn, ff) in &self.layers {
            x = attn.forward(&x)?;
            x = ff.forward(&x)?;
        }
        self.norm.forward(&x)
    }

    /// The conditioning from token ids `[B, L]` (`[CLS] words [SEP]` and 0-padding).
    pub fn forward(&self, ids: &Tensor) -> CResult<Tensor> {
        self.forward_embeds(&self.embed_tokens(ids)?)
    }
}
