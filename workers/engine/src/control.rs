//! The attention-control interface of the UNet. A controller is passed explicitly with each
//! forward call (never through thread-local state, which silently stops working when the
//! forward runs on another thread) and sees every attention layer it asks for: its input, its
//! pre-softmax logits, its probabilities and its output. It may return re-weighted logits or
//! probabilities, per layer and per batch element — AnomalyDiffusion's adaptive attention
//! re-weighting multiplies the logits of the anomaly-token columns by a mask-derived map
//! (shared/reference/anomalydiffusion.md, "AAR").
//!
//! Tensor layouts: logits and probabilities are `[batch, heads, query tokens, key tokens]`;
//! query tokens run over the layer's latent grid in row-major order (`h·W + w`, `query_hw`),
//! key tokens are the text tokens for cross-attention. Input and output are
//! `[batch, query tokens, channels]`.

use std::ops::Range;

use candle_core::{DType, Result, Tensor};

/// Where an attention call happens.
#[derive(Debug, Clone)]
pub struct AttentionSite<'a> {
    /// The layer's weight prefix, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2`.
    pub name: &'a str,
    /// Running index among the layers of the same kind (cross or self) in this forward call,
    /// in execution order (0 = the first cross-attention of the down path).
    pub index: usize,
    /// Cross-attention (`attn2`, keys from the text) or self-attention (`attn1`).
    pub is_cross: bool,
    /// Number of heads.
    pub heads: usize,
    /// Spatial grid `(h, w)` of the query tokens.
    pub query_hw: (usize, usize),
    /// Number of key tokens.
    pub key_len: usize,
}

/// Reads and re-weights attention inside a UNet forward call. Every method has a neutral
/// default, so a controller implements only what it needs.
pub trait AttentionController {
    /// Whether this controller wants `site`; for the others the UNet does not call it at all.
    /// Default: cross-attention layers only.
    fn wants(&self, site: &AttentionSite<'_>) -> bool {
        site.is_cross
    }
    /// The layer's input hidden states `[B, Nq, C]` (after the block's LayerNorm).
    fn on_input(&mut self, _site: &AttentionSite<'_>, _hidden: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Pre-softmax logits `Q·Kᵀ/√d`, `[B, heads, Nq, Nk]`; returns the logits to use.
    fn edit_logits(&mut self, _site: &AttentionSite<'_>, logits: Tensor) -> Result<Tensor> {
        Ok(logits)
    }
    /// Probabilities `[B, heads, Nq, Nk]`; returns the probabilities to use.
    fn edit_probs(&mut self, _site: &AttentionSite<'_>, probs: Tensor) -> Result<Tensor> {
        Ok(probs)
    }
    /// The layer's output after `to_out`, `[B, Nq, C]` (before the residual add).
    fn on_output(&mut self, _site: &AttentionSite<'_>, _out: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// Per-forward state threaded through the UNet: the optional controller and the running
/// layer counters.
pub struct ControlState<'c> {
    pub(crate) ctrl: Option<&'c mut dyn AttentionController>,
    pub(crate) cross_index: usize,
    pub(crate) self_index: usize,
}

impl<'c> ControlState<'c> {
    pub(crate) fn new(ctrl: Option<&'c mut dyn AttentionController>) -> Self {
        Self {
            ctrl,
            cross_index: 0,
            self_index: 0,
        }
    }
}

/// Which attention quantity a re-weighting multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReweightTarget {
    /// Pre-softmax logits (AnomalyDiffusion).
    Logits,
    /// Post-softmax probabilities (prompt-to-prompt style).
    Probs,
}

/// The factor applied to a token span: a constant, or a spatial map `[H, W]` that is resized
/// (nearest) to each layer's query grid.
#[derive(Debug, Clone)]
pub enum SpanWeight {
    Scalar(f64),
    Map(Tensor),
}

/// One re-weighting rule: multiply the columns `tokens` of batch element `batch` by `weight`.
#[derive(Debug, Clone)]
pub struct SpanRule {
    pub batch: usize,
    pub tokens: Range<usize>,
    pub weight: SpanWeight,
}

/// A ready-made controller that multiplies chosen token spans of every cross-attention layer's
/// logits or probabilities, per batch element.
#[derive(Debug, Clone)]
pub struct TokenSpanReweight {
    pub target: ReweightTarget,
    pub rules: Vec<SpanRule>,
}

impl TokenSpanReweight {
    /// The multiplicative factor `[B, 1, Nq, Nk]` for this site (1 outside the spans).
    pub fn factor(&self, site: &AttentionSite<'_>, like: &Tensor) -> Result<Tensor> {
        let (b, _h, nq, nk) = like.dims4()?;
        let dev = like.device();
        let mut per_batch = Vec::with_capacity(b);
        for bi in 0..b {
            let mut f = Tensor::ones((nq, nk), DType::F32, dev)?;
            for rule in self.rules.iter().filter(|r| r.batch == bi) {
                let end = rule.tokens.end.min(nk);
                if rule.tokens.start >= end {
                    continue;
                }
                let mut col = vec![0f32; nk];
                col[rule.tokens.start..end]
                    .iter_mut()
                    .for_each(|c| *c = 1.0);
                let col = Tensor::from_vec(col, (1, nk), dev)?;
                let w = match &rule.weight {
                    SpanWeight::Scalar(s) => Tensor::full(*s as f32, (nq, 1), dev)?,
                    SpanWeight::Map(m) => {
                        let (qh, qw) = site.query_hw;
                        m.to_dtype(DType::F32)?
                            .to_device(dev)?
                            .unsqueeze(0)?
                            .unsqueeze(0)?
                            .upsample_nearest2d(qh, qw)?
                            .reshape((nq, 1))?
                    }
                };
                // f ← f · (1 + (w − 1)·col): the span's columns get w, the rest keep f.
                let g = ((w - 1.0)?.broadcast_mul(&col)? + 1.0)?;
                f = (f * g)?;
            }
            per_batch.push(f);
        }
        Tensor::stack(&per_batch, 0)?
            .unsqueeze(1)?
            .to_dtype(like.dtype())
    }
}

impl AttentionController for TokenSpanReweight {
    fn edit_logits(&mut self, site: &AttentionSite<'_>, logits: Tensor) -> Result<Tensor> {
        if self.target != ReweightTarget::Logits {
            return Ok(logits);
        }
        logits.broadcast_mul(&self.factor(site, &logits)?)
    }
    fn edit_probs(&mut self, site: &AttentionSite<'_>, probs: Tensor) -> Result<Tensor> {
        if self.target != ReweightTarget::Probs {
            return Ok(probs);
        }
        probs.broadcast_mul(&self.factor(site, &probs)?)
    }
}

/// What [`AttentionRecorder`] captured at one layer.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub name: String,
    pub index: usize,
    pub is_cross: bool,
    pub input: Tensor,
    pub logits: Tensor,
    pub probs: Tensor,
    pub output: Tensor,
}

/// Records input, logits, probabilities and output of the layers whose names satisfy a filter
/// (tests, debugging, visualising attention maps).
pub struct AttentionRecorder {
    filter: Box<dyn Fn(&AttentionSite<'_>) -> bool + Send>,
    pending: Option<Recorded>,
    /// Everything recorded so far, in execution order.
    pub records: Vec<Recorded>,
}

impl AttentionRecorder {
    /// Records the layers for which `filter` returns true.
    pub fn new(filter: impl Fn(&AttentionSite<'_>) -> bool + Send + 'static) -> Self {
        Self {
            filter: Box::new(filter),
            pending: None,
            records: Vec::new(),
        }
    }
}

impl AttentionController for AttentionRecorder {
    fn wants(&self, site: &AttentionSite<'_>) -> bool {
        (self.filter)(site)
    }
    fn on_input(&mut self, site: &AttentionSite<'_>, hidden: &Tensor) -> Result<()> {
        self.pending = Some(Recorded {
            name: site.name.to_string(),
            index: site.index,
            is_cross: site.is_cross,
            input: hidden.clone(),
            logits: hidden.clone(),
            probs: hidden.clone(),
            output: hidden.clone(),
        });
        Ok(())
    }
    fn edit_logits(&mut self, _site: &AttentionSite<'_>, logits: Tensor) -> Result<Tensor> {
        if let Some(p) = self.pending.as_mut() {
            p.logits = logits.clone();
        }
        Ok(logits)
    }
    fn edit_probs(&mut self, _site: &AttentionSite<'_>, probs: Tensor) -> Result<Tensor> {
        if let Some(p) = self.pending.as_mut() {
            p.probs = probs.clone();
        }
        Ok(probs)
    }
    fn on_output(&mut self, _site: &AttentionSite<'_>, out: &Tensor) -> Result<()> {
        if let Some(mut p) = self.pending.take() {
            p.output = out.clone();
            self.records.push(p);
        }
        Ok(())
    }
}
