//! Training AnomalyDiffusion's learned parts: the anomaly embeddings e_a (one `[N, D]` per
//! defect type) and the spatial encoder, through the frozen UNet and BERT
//! (shared/reference/anomalydiffusion.md §4).
//!
//! * [`masked_training_loss`] is the official `LatentDiffusion.p_losses` with the context of
//!   `get_learned_conditioning` (§4.3), differentiable into every spliced token and every
//!   encoder parameter: the engine's softmax, LayerNorm, GELU and attention take composite
//!   (differentiable) ops whenever their input tracks a gradient, the encoder's
//!   `MaxPool2d(1, 2)` shortcut is an index selection and its align-corners upsampling two
//!   gathers, and its BatchNorm uses batch statistics. `tests/parity.rs` checks the loss and
//!   the gradients against the official code's (`ref_loss.safetensors`), `tests/train.rs`
//!   against float64 finite differences.
//! * [`mask_training_loss`]: the mask model's plain textual-inversion loss (§5.1).
//! * [`frozen`]: products with frozen weights that skip the frozen side's gradient.
//! * [`adam`]: torch's Adam/AdamW with per-parameter state and steps.
//! * [`augment`]: the official batch augmentation (flips, rotation, the mask-keeping crop).
//! * [`Trainable`]: the parameters being trained, installed into an
//!   [`AnomalyModel`](crate::ad_model::AnomalyModel).

pub mod adam;
pub mod augment;
pub mod frozen;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};

use crate::ad_model::AnomalyModel;
use crate::anomaly::masked_loss;
use crate::error::{EngineError, Result};
use crate::spatial::{BnMode, SpatialEncoder};

/// One batch of the masked noise-prediction loss, on the model's device.
pub struct LossBatch<'a> {
    /// Clean latents z `[B, 4, h, w]` (VAE sample × scale factor).
    pub latents: &'a Tensor,
    /// Soft masks `[B, 1, 256, 256]` in [0, 1]: the encoder input and the loss-mask source.
    pub masks: &'a Tensor,
    /// Prompts holding the placeholder, one per row.
    pub prompts: &'a [String],
    /// Embedding names (`<category>+<defect>`), one per row.
    pub names: &'a [String],
    /// Timesteps, one per row, in `[0, T)`.
    pub timesteps: &'a [usize],
    /// The noise ε `[B, 4, h, w]`.
    pub noise: &'a Tensor,
}

/// What [`masked_training_loss`] computed.
pub struct LossOutput {
    /// The scalar loss.
    pub loss: Tensor,
    /// The conditioning `[B, 77, D]`.
    pub context: Tensor,
    /// The UNet's prediction ε̂.
    pub eps_hat: Tensor,
}

/// The official masked loss: `x_t = q_sample(z, t, ε)`, `ε̂ = UNet(x_t, t, context)`,
/// `mean((m32·ε̂ − m32·ε)²)` over all elements, m32 the 32×32 binarised mask. `bn` is the
/// encoder's BatchNorm mode (official training: [`BnMode::Train`]; [`BnMode::Batch`] gives the
/// same value without touching the running statistics).
pub fn masked_training_loss(
    model: &AnomalyModel,
    batch: &LossBatch,
    bn: BnMode,
) -> Result<LossOutput> {
    let b = batch.latents.dim(0)?;
    if batch.noise.dims() != batch.latents.dims() || batch.timesteps.len() != b {
        return Err(EngineError::Invalid(format!(
            "training batch: latents {:?}, noise {:?}, {} timesteps",
            batch.latents.dims(),
            batch.noise.dims(),
            batch.timesteps.len()
        )));
    }
    let (context, _) = model.context(batch.prompts, batch.names, batch.masks, bn)?;
    let x_t = model
        .ldm
        .schedule
        .q_sample(batch.latents, batch.timesteps, batch.noise)?;
    let t: Vec<i64> = batch.timesteps.iter().map(|&t| t as i64).collect();
    let t = Tensor::new(t.as_slice(), batch.latents.device())?;
    let eps_hat = model.ldm.unet.forward(&x_t, &t, &context, None)?;
    let loss = masked_loss(&eps_hat, batch.noise, batch.masks)?;
    Ok(LossOutput {
        loss,
        context,
        eps_hat,
    })
}

/// One batch of the mask model's loss, on the model's device.
pub struct MaskLossBatch<'a> {
    /// Clean latents z `[B, 4, h, w]` of the masks read as RGB images (VAE sample × scale).
    pub latents: &'a Tensor,
    /// Prompts holding the placeholder, one per row.
    pub prompts: &'a [String],
    /// Mask-embedding names (`<category>+<defect>`), one per row.
    pub names: &'a [String],
    /// Timesteps, one per row, in `[0, T)`.
    pub timesteps: &'a [usize],
    /// The noise ε `[B, 4, h, w]`.
    pub noise: &'a Tensor,
}

/// The mask model's loss (shared/reference/anomalydiffusion.md §5.1): plain textual inversion,
/// `x_t = q_sample(z, t, ε)`, `ε̂ = UNet(x_t, t, BERT(splice(prompt, e_m(name))))`,
/// `mean((ε̂ − ε)²)` over all elements — no mask, no spatial encoder.
pub fn mask_training_loss(model: &AnomalyModel, batch: &MaskLossBatch) -> Result<LossOutput> {
    let b = batch.latents.dim(0)?;
    if batch.noise.dims() != batch.latents.dims()
        || batch.timesteps.len() != b
        || batch.names.len() != b
    {
        return Err(EngineError::Invalid(format!(
            "mask training batch: latents {:?}, noise {:?}, {} timesteps, {} names",
            batch.latents.dims(),
            batch.noise.dims(),
            batch.timesteps.len(),
            batch.names.len()
        )));
    }
    let context = model.mask_context(batch.prompts, batch.names)?;
    let x_t = model
        .ldm
        .schedule
        .q_sample(batch.latents, batch.timesteps, batch.noise)?;
    let t: Vec<i64> = batch.timesteps.iter().map(|&t| t as i64).collect();
    let t = Tensor::new(t.as_slice(), batch.latents.device())?;
    let eps_hat = model.ldm.unet.forward(&x_t, &t, &context, None)?;
    let loss = (&eps_hat - batch.noise)?.sqr()?.mean_all()?;
    Ok(LossOutput {
        loss,
        context,
        eps_hat,
    })
}

/// The parameters being trained, installed in a model: the embeddings of the types being
/// learned (the model's tensors for them are these `Var`s' tensors) and, unless frozen, the
/// spatial encoder's parameters.
pub struct Trainable {
    pub embeddings: BTreeMap<String, Var>,
    pub encoder: Vec<(String, Var)>,
}

impl Trainable {
    /// Makes `names` trainable in `model`: a name the model has keeps its embedding as the
    /// start, a new one starts from `init` `[N, D]` (e.g. [`init_embedding`]). With
    /// `encoder_file`, the encoder is reloaded from it with trainable parameters.
    pub fn install(
        model: &mut AnomalyModel,
        names: &[String],
        init: &Tensor,
        encoder_file: Option<&Path>,
    ) -> Result<Self> {
        let embeddings = install_vars(&mut model.embeddings, names, init, "embedding")?;
        let mut encoder = Vec::new();
        if let Some(path) = encoder_file {
            let dev = init.device().clone();
            let (enc, vars) = SpatialEncoder::load_trainable(
                path,
                Some(model.spatial.config()),
                model_dtype(model),
                &dev,
            )?;
            model.spatial = enc;
            encoder = vars;
        }
        Ok(Self {
            embeddings,
            encoder,
        })
    }

    /// Makes the mask embeddings of `names` trainable in `model` (the mask model: no encoder).
    /// A name the model has a mask embedding for continues from it; a new one starts from
    /// `init` `[K, D]` (official: 16 copies of "crack", [`init_embedding`]).
    pub fn install_masks(
        model: &mut AnomalyModel,
        names: &[String],
        init: &Tensor,
    ) -> Result<Self> {
        let embeddings = install_vars(&mut model.mask_embeddings, names, init, "mask embedding")?;
        Ok(Self {
            embeddings,
            encoder: Vec::new(),
        })
    }

    /// Every trainable parameter by name: `embedding.<name>` and `encoder.<official name>`.
    pub fn named(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self
            .embeddings
            .iter()
            .map(|(n, v)| (format!("embedding.{n}"), v.clone()))
            .collect();
        out.extend(
            self.encoder
                .iter()
                .map(|(n, v)| (format!("encoder.{n}"), v.clone())),
        );
        out
    }
}

/// Replaces each of `names` in `table` by a `Var` (its current tensor, or `init` for a name
/// the table lacks) and returns the `Var`s; every start must have `init`'s shape.
fn install_vars(
    table: &mut BTreeMap<String, Tensor>,
    names: &[String],
    init: &Tensor,
    what: &str,
) -> Result<BTreeMap<String, Var>> {
    let mut vars = BTreeMap::new();
    for n in names {
        let start = table.get(n).unwrap_or(init);
        if start.dims() != init.dims() {
            return Err(EngineError::Invalid(format!(
                "{what} {n:?} has shape {:?}, new ones {:?}",
                start.dims(),
                init.dims()
            )));
        }
        let var = Var::from_tensor(&start.detach().copy()?)?;
        table.insert(n.clone(), var.as_tensor().clone());
        vars.insert(n.clone(), var);
    }
    Ok(vars)
}

fn model_dtype(model: &AnomalyModel) -> DType {
    model
        .embeddings
        .values()
        .next()
        .map(|t| t.dtype())
        .unwrap_or(DType::F32)
}

/// The official initialisation of a new type's embedding: the raw token embedding of `word`
/// (before position embeddings) repeated `n` times. `word` must be one token.
pub fn init_embedding(model: &AnomalyModel, word: &str, n: usize) -> Result<Tensor> {
    let inner = model.tokenizer.tokenize(word)?;
    if inner.len() != 1 {
        return Err(EngineError::Invalid(format!(
            "the initialiser word {word:?} is {} tokens; it must be exactly one",
            inner.len()
        )));
    }
    let dev = model
        .embeddings
        .values()
        .next()
        .map(|t| t.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let id = Tensor::new(&[[inner[0]]], &dev)?;
    let e = model.ldm.bert.embed_tokens(&id)?.squeeze(0)?; // [1, D]
    Ok(e.repeat((n, 1))?.to_dtype(model_dtype(model))?)
}
