//! The UNet's attention path, owned by the project (adapted from candle-transformers'
//! `stable_diffusion/attention.rs`, MIT/Apache-2.0) so that an [`AttentionController`] can read
//! and re-weight logits and probabilities, and so that GEGLU uses exact erf-GELU as diffusers
//! does. Mirrors diffusers' `Attention` (AttnProcessor), `BasicTransformerBlock`, `GEGLU`/
//! `FeedForward` and `Transformer2DModel` for SD-v1 configs.
//!
//! Attention: softmax(Q·Kᵀ·d^−½)·V per head (Vaswani et al. 2017, eq. 1).

use crate::nn::{GroupNorm, Linear};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::control::{AttentionSite, ControlState};
use crate::nn::{conv2d, softmax_last_dim, LayerNorm};

/// diffusers `Attention` as used by SD-v1: bias-free q/k/v, `to_out.0` with bias.
#[derive(Debug, Clone)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    dim_head: usize,
    scale: f64,
    name: String,
    is_cross: bool,
}

impl CrossAttention {
    /// `query_dim` → `heads`·`dim_head`; keys/values from `context_dim` (cross) or the query.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let cdim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: crate::nn::linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: crate::nn::linear_no_bias(cdim, inner, vb.pp("to_k"))?,
            to_v: crate::nn::linear_no_bias(cdim, inner, vb.pp("to_v"))?,
            to_out: crate::nn::linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            dim_head,
            scale: 1.0 / (dim_head as f64).sqrt(),
            name: vb.prefix(),
            is_cross: context_dim.is_some(),
        })
    }

    /// The layer's weight prefix (e.g. `mid_block.attentions.0.transformer_blocks.0.attn2`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// `to_q(x)` and `to_k(context)` split into heads, `[B, heads, N, d]` each.
    pub fn project_qk(&self, x: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let ctx = context.unwrap_or(x);
        Ok((
            self.split_heads(&self.to_q.forward(x)?)?,
            self.split_heads(&self.to_k.forward(ctx)?)?,
        ))
    }

    /// This layer alone on `x` `[B, N, C]` (already normalised) with a query grid `hw`, with
    /// an optional controller (parity checks of one layer, attention studies).
    pub fn forward_with(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        hw: (usize, usize),
        controller: Option<&mut dyn crate::control::AttentionController>,
    ) -> Result<Tensor> {
        let mut state = ControlState::new(controller);
        self.forward(x, context, hw, &mut state)
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        x.reshape((b, n, self.heads, self.dim_head))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `x`: `[B, N, C]`; `context`: `[B, M, C_ctx]` for cross-attention; `hw`: the query grid.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        hw: (usize, usize),
        state: &mut ControlState<'_>,
    ) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let ctx = context.unwrap_or(x);
        let index = if self.is_cross {
            state.cross_index += 1;
            state.cross_index - 1
        } else {
            state.self_index += 1;
            state.self_index - 1
        };
        let site = AttentionSite {
            name: &self.name,
            index,
            is_cross: self.is_cross,
            heads: self.heads,
            query_hw: hw,
            key_len: ctx.dim(1)?,
        };
        let mut ctrl = match state.ctrl.as_deref_mut() {
            Some(c) if c.wants(&site) => Some(c),
            _ => None,
        };
        if let Some(c) = ctrl.as_deref_mut() {
            c.on_input(&site, x)?;
        }
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(ctx)?)?;
        let v = self.split_heads(&self.to_v.forward(ctx)?)?;
        let in_dtype = q.dtype();
        // Half precision: logits and softmax in f32 (as diffusers' upcast paths do).
        let (q, k) = match in_dtype {
            DType::F16 | DType::BF16 => (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?),
            _ => (q, k),
        };
        // Scale q (Nq·d values) rather than the logits (Nq·Nk values): one pass fewer over
        // the largest tensor of the layer.
        let mut logits = (q * self.scale)?.matmul(&k.t()?)?;
        if let Some(c) = ctrl.as_deref_mut() {
            logits = c.edit_logits(&site, logits)?;
        }
        let mut probs = softmax_last_dim(&logits)?;
        if let Some(c) = ctrl.as_deref_mut() {
            probs = c.edit_probs(&site, probs)?;
        }
        let out = probs.to_dtype(in_dtype)?.matmul(&v)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.dim_head))?;
        let out = self.to_out.forward(&out)?;
        if let Some(c) = ctrl {
            c.on_output(&site, &out)?;
        }
        Ok(out)
    }
}

/// GEGLU feed-forward (Shazeer 2020): `net.0.proj` → (h, g) halves → h·GELU(g) → `net.2`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    /// `dim` → 4·`dim` (GEGLU) → `dim`.
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: crate::nn::linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            out: crate::nn::linear(inner, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out
            .forward(&crate::cpu_ops::geglu(&self.proj.forward(x)?)?)
    }
}

/// diffusers `BasicTransformerBlock`: self-attention, cross-attention, GEGLU, each pre-norm
/// with a residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    /// The self-attention (`attn1`) and cross-attention (`attn2`) layers.
    pub fn attentions(&self) -> [&CrossAttention; 2] {
        [&self.attn1, &self.attn2]
    }

    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        dim_head: usize,
        context_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(vb.pp("attn1"), dim, None, heads, dim_head)?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(vb.pp("attn2"), dim, Some(context_dim), heads, dim_head)?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        hw: (usize, usize),
        state: &mut ControlState<'_>,
    ) -> Result<Tensor> {
        let x = (self
            .attn1
            .forward(&self.norm1.forward(x)?, None, hw, state)?
            + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context), hw, state)?
            + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// Input/output projection of [`Transformer2D`]: 1×1 conv (SD 1.x) or linear (SD 2.x).
#[derive(Debug, Clone)]
enum Proj {
    Conv(crate::nn::Conv2d),
    Linear(Linear),
}

/// diffusers `Transformer2DModel` (continuous input): GroupNorm(eps 1e-6) → proj_in →
/// transformer blocks over the h·w tokens → proj_out → + residual.
#[derive(Debug, Clone)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
    inner: usize,
}

/// Hyper-parameters of one [`Transformer2D`].
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl Transformer2D {
    /// The transformer blocks.
    pub fn blocks(&self) -> &[BasicTransformerBlock] {
        &self.blocks
    }

    pub fn new(vb: VarBuilder, cfg: Transformer2DConfig) -> Result<Self> {
        let c = cfg.channels;
        if cfg.heads == 0 || !c.is_multiple_of(cfg.heads) {
            candle_core::bail!(
                "{}: {} channels are not divisible into {} heads",
                vb.prefix(),
                c,
                cfg.heads
            );
        }
        let dim_head = c / cfg.heads;
        let inner = cfg.heads * dim_head;
        let proj = |vb: VarBuilder, i: usize, o: usize| -> Result<Proj> {
            Ok(if cfg.linear_projection {
                Proj::Linear(crate::nn::linear(i, o, vb)?)
            } else {
                Proj::Conv(conv2d(i, o, 1, 1, 0, vb)?)
            })
        };
        let blocks = (0..cfg.layers)
            .map(|k| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(k),
                    inner,
                    cfg.heads,
                    dim_head,
                    cfg.context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: crate::nn::group_norm(cfg.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: proj(vb.pp("proj_in"), c, inner)?,
            blocks,
            proj_out: proj(vb.pp("proj_out"), inner, c)?,
            inner,
        })
    }

    /// `x`: `[B, C, H, W]`, `context`: `[B, M, C_ctx]`.
    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        state: &mut ControlState<'_>,
    ) -> Result<Tensor> {
        let (b, _c, h, w) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(x)?;
        let to_tokens = |x: Tensor, ch: usize| -> Result<Tensor> {
            x.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
        };
        let mut x = match &self.proj_in {
            Proj::Conv(conv) => to_tokens(conv.forward(&x)?, self.inner)?,
            Proj::Linear(lin) => lin.forward(&to_tokens(x, residual.dim(1)?)?)?,
        };
        for block in &self.blocks {
            x = block.forward(&x, context, (h, w), state)?;
        }
        let to_map = |x: Tensor, ch: usize| -> Result<Tensor> {
            x.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let x = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&to_map(x, self.inner)?)?,
            Proj::Linear(lin) => to_map(lin.forward(&x)?, residual.dim(1)?)?,
        };
        x + residual
    }
}
