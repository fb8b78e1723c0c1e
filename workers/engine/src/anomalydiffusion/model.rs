//! A complete AnomalyDiffusion model ready to generate: the LDM base, the spatial encoder, the
//! learned per-type anomaly embeddings and the WordPiece tokenizer, loaded from the model
//! directory that `defectforge models import` writes (or from the official files directly).
//!
//! Files of a model directory: `ldm.safetensors` (the LDM checkpoint's tensors under their
//! original names), `ldm.json` (the official YAML's content as JSON), `vocab.txt`,
//! `spatial_encoder.safetensors` (its config in the metadata key `config`),
//! `embeddings.safetensors` (`string_to_param.<name>`, `string_to_token.<placeholder>`), and
//! optionally `mask_embeddings.safetensors` (the per-type mask-model embeddings, same layout,
//! `string_to_param.<name>` `[16, D]` in the official files; see [`crate::maskgen`]).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::ad_files::{read_embeddings_safetensors, EmbeddingsFile};
use crate::anomaly::{sample, splice, SamplerOptions};
use crate::error::{EngineError, Result};
use crate::ldm::LdmModel;
use crate::maskgen::{postprocess, sample_guided, MaskSamplerOptions, MaskSamples};
use crate::noise::NoiseSource;
use crate::spatial::{BnMode, SpatialEncoder, SpatialEncoderConfig};
use crate::tokenizer::WordPieceTokenizer;

/// File names inside a model directory.
pub const LDM_WEIGHTS: &str = "ldm.safetensors";
pub const LDM_CONFIG: &str = "ldm.json";
pub const VOCAB: &str = "vocab.txt";
pub const SPATIAL_ENCODER: &str = "spatial_encoder.safetensors";
pub const EMBEDDINGS: &str = "embeddings.safetensors";
pub const MASK_EMBEDDINGS: &str = "mask_embeddings.safetensors";

/// The official prompt templates (`imagenet_templates_small` of `ldm/data/personalized.py`, 81
/// entries with repeats, as the official sampler draws from them), `{}` being the placeholder.
pub const PROMPT_TEMPLATES: &[&str] = &[
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
    "an illustration of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "an illustration of a clean {}",
    "an illustration of a dirty {}",
    "a dark photo of the {}",
    "an illustration of my {}",
    "an illustration of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "an illustration of the {}",
    "a good photo of the {}",
    "an illustration of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "an illustration of the clean {}",
    "a rendition of a {}",
    "an illustration of a nice {}",
    "a good photo of a {}",
    "an illustration of the nice {}",
    "an illustration of the small {}",
    "an illustration of the weird {}",
    "an illustration of the large {}",
    "an illustration of a cool {}",
    "an illustration of a small {}",
    "a depiction of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a depiction of a clean {}",
    "a depiction of a dirty {}",
    "a dark photo of the {}",
    "a depiction of my {}",
    "a depiction of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a depiction of the {}",
    "a good photo of the {}",
    "a depiction of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a depiction of the clean {}",
    "a rendition of a {}",
    "a depiction of a nice {}",
    "a good photo of a {}",
    "a depiction of the nice {}",
    "a depiction of the small {}",
    "a depiction of the weird {}",
    "a depiction of the large {}",
    "a depiction of a cool {}",
    "a depiction of a small {}",
];

/// The loaded AnomalyDiffusion model.
pub struct AnomalyModel {
    pub ldm: LdmModel,
    pub spatial: SpatialEncoder,
    /// Embedding name (`"<category>+<defect>"`) → e_a `[N, D]`.
    pub embeddings: BTreeMap<String, Tensor>,
    /// Embedding name → the mask model's e_m `[K, D]` (empty when the model has none).
    pub mask_embeddings: BTreeMap<String, Tensor>,
    /// The placeholder string (`*`) and its token id.
    pub placeholder: String,
    pub placeholder_token: u32,
    pub tokenizer: WordPieceTokenizer,
}

impl AnomalyModel {
    /// Loads a model directory (see the module documentation).
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let ldm = LdmModel::load(&dir.join(LDM_CONFIG), &dir.join(LDM_WEIGHTS), dtype, device)?;
        let spatial = SpatialEncoder::load(&dir.join(SPATIAL_ENCODER), None, dtype, device)?;
        let emb = read_embeddings_safetensors(&dir.join(EMBEDDINGS))?;
        let tokenizer =
            WordPieceTokenizer::from_vocab(&dir.join(VOCAB), ldm.bert.config().max_seq_len)?;
        let mut model = Self::assemble(ldm, spatial, emb, tokenizer, dtype, device)?;
        let masks = dir.join(MASK_EMBEDDINGS);
        if masks.exists() {
            model.set_mask_embeddings(read_embeddings_safetensors(&masks)?)?;
        }
        Ok(model)
    }

    /// Installs the mask-model embeddings, checking that they use this model's placeholder and
    /// text-encoder width.
    pub fn set_mask_embeddings(&mut self, emb: EmbeddingsFile) -> Result<()> {
        let d = self.ldm.bert.config().n_embed;
        for (p, t) in &emb.placeholder_tokens {
            if *p != self.placeholder || *t != self.placeholder_token as i64 {
                return Err(EngineError::Invalid(format!(
                    "the mask embeddings use placeholder {p:?} = token {t}, the anomaly model {:?} = {}",
                    self.placeholder, self.placeholder_token
                )));
            }
        }
        let mut out = BTreeMap::new();
        for (name, t) in emb.params {
            if t.rank() != 2 || t.dim(1)? != d {
                return Err(EngineError::Invalid(format!(
                    "mask embedding {name:?} has shape {:?}, expected [K, {d}]",
                    t.dims()
                )));
            }
            out.insert(
                name,
                t.to_dtype(self.ldm.dtype())?.to_device(self.ldm.device())?,
            );
        }
        self.mask_embeddings = out;
        Ok(())
    }

    /// The names that have a mask model (sorted).
    pub fn mask_types(&self) -> Vec<String> {
        self.mask_embeddings.keys().cloned().collect()
    }

    /// Token ids `[B, L]` of prompts that must each hold the placeholder.
    fn prompt_ids(&self, prompts: &[String], dev: &Device) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * self.tokenizer.max_len());
        for p in prompts {
            let row = self.tokenizer.encode(p)?;
            if !row.contains(&self.placeholder_token) {
                return Err(EngineError::Invalid(format!(
                    "prompt {p:?} has no placeholder {:?} (or it was truncated away)",
                    self.placeholder
                )));
            }
            ids.extend(row);
        }
        Ok(Tensor::from_vec(
            ids,
            (prompts.len(), self.tokenizer.max_len()),
            dev,
        )?)
    }

    /// The mask model's conditioning `[B, L, D]`: `BERT(splice(prompt, e_m(name)))`.
    pub fn mask_context(&self, prompts: &[String], names: &[String]) -> Result<Tensor> {
        if names.len() != prompts.len() {
            return Err(EngineError::Invalid(format!(
                "mask context: {} prompts, {} names",
                prompts.len(),
                names.len()
            )));
        }
        let dev = self.ldm.device();
        let ids = self.prompt_ids(prompts, dev)?;
        let e_m = names
            .iter()
            .map(|n| {
                self.mask_embeddings.get(n).cloned().ok_or_else(|| {
                    EngineError::Invalid(format!(
                        "the model has no mask embedding {n:?}; it has mask models for: {}",
                        if self.mask_embeddings.is_empty() {
                            "none (import them with `defectforge models import --mask-embeddings`)"
                                .to_string()
                        } else {
                            self.mask_types().join(", ")
                        }
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let e_m = Tensor::stack(&e_m, 0)?;
        let tok = self.ldm.bert.embed_tokens(&ids)?;
        let sp = splice(&ids, &tok, self.placeholder_token, &e_m)?;
        Ok(self.ldm.bert.forward_embeds(&sp.embeds)?)
    }

    /// The unconditional context `BERT("")` repeated `b` times.
    pub fn uncond_context(&self, b: usize) -> Result<Tensor> {
        let row = self.tokenizer.encode("")?;
        let l = row.len();
        let ids = Tensor::from_vec(row.repeat(b), (b, l), self.ldm.device())?;
        self.ldm.encode_text(&ids)
    }

    /// Samples one mask per row with the guided sampler and post-processes them
    /// (see [`crate::maskgen`]).
    pub fn sample_masks(
        &self,
        prompts: &[String],
        names: &[String],
        opts: &MaskSamplerOptions,
        noise: &mut dyn NoiseSource,
    ) -> Result<MaskSamples> {
        // Detached: sampling never needs gradients, and while a mask embedding is being
        // trained (a `Var`) a tracked context would make every step's UNet keep the graph of
        // all the steps before it (out of memory within a few steps).
        let c = self.mask_context(prompts, names)?.detach();
        let uc = self.uncond_context(prompts.len())?;
        let out = sample_guided(&self.ldm, &c, &uc, opts, noise, false)?;
        postprocess(&self.ldm, &out.latent, opts.threshold)
    }

    /// Builds the model from its parts, checking that they fit together (token widths, the
    /// placeholder being one vocabulary token with the id the embeddings were trained with).
    pub fn assemble(
        ldm: LdmModel,
        spatial: SpatialEncoder,
        emb: EmbeddingsFile,
        tokenizer: WordPieceTokenizer,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let d = ldm.bert.config().n_embed;
        if spatial.config().out_dim != d {
            return Err(EngineError::Invalid(format!(
                "the spatial encoder makes {}-wide tokens but the text encoder is {d} wide",
                spatial.config().out_dim
            )));
        }
        let (placeholder, token) = match emb.placeholder_tokens.iter().next() {
            Some((p, t)) if emb.placeholder_tokens.len() == 1 => (p.clone(), *t),
            _ => {
                return Err(EngineError::Invalid(format!(
                    "the embeddings must name exactly one placeholder token, found {:?}",
                    emb.placeholder_tokens.keys().collect::<Vec<_>>()
                )))
            }
        };
        match tokenizer.token_id(&placeholder) {
            Some(id) if id as i64 == token => {}
            other => {
                return Err(EngineError::Invalid(format!(
                    "the embeddings were trained with placeholder {placeholder:?} = token {token}, but the vocabulary maps it to {other:?}: wrong vocab.txt?"
                )))
            }
        }
        let mut embeddings = BTreeMap::new();
        for (name, t) in emb.params {
            if t.dim(1)? != d {
                return Err(EngineError::Invalid(format!(
                    "embedding {name:?} is {} wide, the text encoder {d}",
                    t.dim(1)?
                )));
            }
            embeddings.insert(name, t.to_dtype(dtype)?.to_device(device)?);
        }
        Ok(Self {
            ldm,
            spatial,
            embeddings,
            mask_embeddings: BTreeMap::new(),
            placeholder,
            placeholder_token: token as u32,
            tokenizer,
        })
    }

    /// The embedding names this model knows (sorted).
    pub fn defect_types(&self) -> Vec<String> {
        self.embeddings.keys().cloned().collect()
    }

    /// The official prompt for a sample: template `seed % n` with the placeholder filled in.
    pub fn random_prompt(&self, seed: u64) -> String {
        let t = PROMPT_TEMPLATES[(seed % PROMPT_TEMPLATES.len() as u64) as usize];
        t.replace("{}", &self.placeholder)
    }

    /// The conditioning `[B, 77, D]` and spliced spans for prompts holding the placeholder,
    /// per-row embedding names and masks `[B, 1, 256, 256]` in {0, 1}:
    /// `BERT(splice(token_emb(ids), [e_a(name) ; E(mask)]))`.
    pub fn context(
        &self,
        prompts: &[String],
        names: &[String],
        masks: &Tensor,
        bn: BnMode,
    ) -> Result<(Tensor, Vec<(f32, f32)>)> {
        let b = prompts.len();
        if names.len() != b || masks.dim(0)? != b {
            return Err(EngineError::Invalid(format!(
                "context: {b} prompts, {} names, {} masks",
                names.len(),
                masks.dim(0)?
            )));
        }
        let ids = self.prompt_ids(prompts, masks.device())?;
        let e_a = names
            .iter()
            .map(|n| {
                self.embeddings.get(n).cloned().ok_or_else(|| {
                    EngineError::Invalid(format!(
                        "the model has no anomaly embedding {n:?}; it knows: {}",
                        self.defect_types().join(", ")
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let e_a = Tensor::stack(&e_a, 0)?;
        let e_s = self.spatial.forward(masks, bn)?.to_dtype(e_a.dtype())?;
        let inserts = Tensor::cat(&[&e_a, &e_s], 1)?;
        let tok = self.ldm.bert.embed_tokens(&ids)?;
        let sp = splice(&ids, &tok, self.placeholder_token, &inserts)?;
        Ok((self.ldm.bert.forward_embeds(&sp.embeds)?, sp.positions))
    }

    /// Generates defects: `normal` `[B, 3, 256, 256]` in [−1, 1], `masks` `[B, 1, 256, 256]` in
    /// {0, 1}; returns the decoded images `[B, 3, 256, 256]` (about [−1, 1], unclamped, no
    /// background paste — the official output).
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        normal: &Tensor,
        masks: &Tensor,
        prompts: &[String],
        names: &[String],
        opts: &SamplerOptions,
        bn: BnMode,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        self.generate_in_region(normal, masks, None, prompts, names, opts, bn, noise)
    }

    /// [`generate`](Self::generate) with a separate sampling region: the spatial encoder sees
    /// `masks`, while the blended sampler's latent mask comes from `region` (same shape), e.g.
    /// [`crate::anomaly::block_fill`] of the masks so that thin masks do not vanish at the
    /// latent grid.
    #[allow(clippy::too_many_arguments)]
    pub fn generate_in_region(
        &self,
        normal: &Tensor,
        masks: &Tensor,
        region: Option<&Tensor>,
        prompts: &[String],
        names: &[String],
        opts: &SamplerOptions,
        bn: BnMode,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        // Detached, as in sample_masks: no gradient is needed, and a context tracked through
        // trained parameters would make the loop keep every step's graph.
        let (ctx, positions) = self.context(prompts, names, masks, bn)?;
        let ctx = ctx.detach();
        let region = region.unwrap_or(masks);
        if region.dims() != masks.dims() {
            return Err(EngineError::Invalid(format!(
                "sampling region {:?} does not match the masks {:?}",
                region.dims(),
                masks.dims()
            )));
        }
        let out = sample(
            &self.ldm, normal, region, &ctx, &positions, opts, noise, false,
        )?;
        self.ldm.decode_first_stage(&out.latent)
    }
}

/// Infers a spatial encoder's shape from its state-dict tensor shapes (official key names), so
/// that an official `spatial_encoder.pt` of any width imports without a config.
pub fn infer_spatial_config(shapes: &[(String, Vec<usize>)]) -> Result<SpatialEncoderConfig> {
    let get = |n: &str| -> Result<&Vec<usize>> {
        shapes
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, s)| s)
            .ok_or_else(|| EngineError::Invalid(format!("spatial encoder: no tensor {n}")))
    };
    let stem = get("input_layer.0.weight")?[0];
    // Units: body.{i}.res_layer.1.weight is [depth, in, 3, 3]; stages are runs of equal depth.
    let mut depths = Vec::new();
    for i in 0.. {
        match shapes
            .iter()
            .find(|(k, _)| *k == format!("body.{i}.res_layer.1.weight"))
        {
            Some((_, s)) => depths.push(s[0]),
            None => break,
        }
    }
    if depths.is_empty() {
        return Err(EngineError::Invalid(
            "spatial encoder: no body.*.res_layer.1.weight tensors".into(),
        ));
    }
    let mut widths: Vec<usize> = Vec::new();
    let mut units: Vec<usize> = Vec::new();
    for d in depths {
        if widths.last() == Some(&d) {
            *units.last_mut().expect("non-empty") += 1;
        } else {
            widths.push(d);
            units.push(1);
        }
    }
    let mut text_num = 0;
    while shapes
        .iter()
        .any(|(k, _)| *k == format!("styles.{text_num}.linear.weight"))
    {
        text_num += 1;
    }
    let out_dim = get("styles.0.linear.weight")?[0];
    let convs = shapes
        .iter()
        .filter(|(k, _)| k.starts_with("styles.0.convs.") && k.ends_with(".weight"))
        .count();
    let fpn_dim = get("latlayer1.weight")?[0];
    let defaults = SpatialEncoderConfig::default();
    let cfg = SpatialEncoderConfig {
        text_num,
        stem,
        widths,
        units,
        fpn_dim,
        out_dim,
        spatial: 1usize << convs,
        coarse_ind: defaults.coarse_ind,
        middle_ind: defaults.middle_ind,
    };
    cfg.validate()?;
    Ok(cfg)
}
