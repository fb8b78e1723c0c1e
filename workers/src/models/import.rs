//! `defectforge models import`: the official files converted, checked and written as a model
//! directory (see the module above for the layout).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use defectforge::store::{self, S3Config};
use defectforge_engine::ad_files::{
    read_embeddings_pt, read_embeddings_safetensors, read_torch_state_dict,
    write_embeddings_safetensors, EmbeddingsFile,
};
use defectforge_engine::ad_model::{self, infer_spatial_config, AnomalyModel};
use defectforge_engine::ldm::{open_checkpoint, LdmConfig, LdmModel};
use defectforge_engine::spatial::{SpatialEncoder, SpatialEncoderConfig};
use defectforge_engine::tokenizer::WordPieceTokenizer;
use defectforge_engine::{DType, Device, EngineError, Tensor, Weights};
use tracing::info;

use super::*;

/// Reads the mask embeddings of an import into one named set.
fn read_mask_embeddings(
    list: &[(Option<String>, PathBuf)],
) -> Result<Option<EmbeddingsFile>, ModelError> {
    let mut merged: Option<EmbeddingsFile> = None;
    for (name, path) in list {
        let f = if is_torch_file(path) {
            read_embeddings_pt(path)?
        } else {
            read_embeddings_safetensors(path)?
        };
        let params: Vec<(String, Tensor)> = match name {
            Some(n) => {
                if f.params.len() != 1 {
                    return Err(ModelError::Invalid(format!(
                        "{}: holds {} embeddings ({}); a file given as {n}=<file> must hold exactly one",
                        path.display(),
                        f.params.len(),
                        f.params.keys().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                let t = f.params.values().next().cloned().expect("one");
                vec![(n.clone(), t)]
            }
            None => {
                let bad: Vec<&String> = f.params.keys().filter(|k| !k.contains('+')).collect();
                if !bad.is_empty() {
                    return Err(ModelError::Invalid(format!(
                        "{}: embedding {:?} is not named <category>+<defect>; give the file as <category>+<defect>={}",
                        path.display(),
                        bad[0],
                        path.display()
                    )));
                }
                f.params.clone().into_iter().collect()
            }
        };
        let m = merged.get_or_insert_with(|| EmbeddingsFile {
            params: BTreeMap::new(),
            placeholder_tokens: f.placeholder_tokens.clone(),
        });
        if m.placeholder_tokens != f.placeholder_tokens {
            return Err(ModelError::Invalid(format!(
                "{}: placeholder tokens {:?} differ from the other mask embeddings' {:?}",
                path.display(),
                f.placeholder_tokens,
                m.placeholder_tokens
            )));
        }
        for (n, t) in params {
            if m.params.insert(n.clone(), t).is_some() {
                return Err(ModelError::Invalid(format!(
                    "mask embedding {n:?} is given twice (again in {})",
                    path.display()
                )));
            }
        }
    }
    Ok(merged)
}

fn is_torch_file(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("pt" | "pth" | "ckpt" | "bin")
    )
}

fn save_tensors(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<(), ModelError> {
    let views: Vec<(String, Tensor)> = tensors.to_vec();
    defectforge_engine::weights::save_safetensors(&views, metadata, path)?;
    Ok(())
}

/// Converts and checks the official files into `out` (created if needed) and writes
/// `model.json`; returns the manifest. Blocking and memory-heavy for the full-size model
/// (the LDM is read once and written as safetensors).
pub fn build_model_dir(inputs: &ImportInputs, out: &Path) -> Result<ModelManifest, ModelError> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let dev = Device::Cpu;
    let mut sources = BTreeMap::new();
    let mut add_source = |role: &str, p: &Path| -> Result<(), ModelError> {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        sources.insert(role.to_string(), (name, file_digest(p)?));
        Ok(())
    };
    for (role, p) in [
        ("ldm_checkpoint", &inputs.ldm_checkpoint),
        ("ldm_config", &inputs.ldm_config),
        ("vocab", &inputs.vocab),
        ("embeddings", &inputs.embeddings),
        ("spatial_encoder", &inputs.spatial_encoder),
    ] {
        if !p.is_file() {
            return Err(ModelError::Invalid(format!(
                "{role}: {} does not exist",
                p.display()
            )));
        }
        add_source(role, p)?;
    }
    for (name, p) in &inputs.mask_embeddings {
        if !p.is_file() {
            return Err(ModelError::Invalid(format!(
                "mask embeddings: {} does not exist",
                p.display()
            )));
        }
        let role = match name {
            Some(n) => format!("mask_embeddings:{n}"),
            None => format!("mask_embeddings:{}", p.display()),
        };
        add_source(&role, p)?;
    }

    // The LDM: validate by building it, then store its tensors under their original names.
    info!(checkpoint = %inputs.ldm_checkpoint.display(), "reading the LDM checkpoint");
    let cfg = LdmConfig::from_file(&inputs.ldm_config)?;
    let weights = open_checkpoint(&inputs.ldm_checkpoint, DType::F32, &dev)?;
    let ldm = LdmModel::from_weights(&cfg, &weights)?;
    let mut parameters = BTreeMap::new();
    let kept: Vec<(String, Tensor)> = weights
        .source_tensors()?
        .into_iter()
        .filter(|(k, _)| !defectforge_engine::ldm::is_ignored_key(k))
        .collect();
    for (part, prefix) in [
        ("unet", defectforge_engine::ldm::UNET_PREFIX),
        ("vae", defectforge_engine::ldm::VAE_PREFIX),
        ("text_encoder", defectforge_engine::ldm::BERT_PREFIX),
    ] {
        let n: usize = kept
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, t)| t.elem_count())
            .sum();
        parameters.insert(part.to_string(), n as u64);
    }
    save_tensors(&kept, None, &out.join(ad_model::LDM_WEIGHTS))?;
    drop(kept);
    drop(weights);
    let cfg_json = defectforge_engine::ldm::read_config_value(&inputs.ldm_config)?;
    std::fs::write(
        out.join(ad_model::LDM_CONFIG),
        serde_json::to_vec_pretty(&cfg_json).expect("json"),
    )
    .map_err(io(out))?;

    // Tokenizer.
    let tok = WordPieceTokenizer::from_vocab(&inputs.vocab, ldm.bert.config().max_seq_len)?;
    std::fs::copy(&inputs.vocab, out.join(ad_model::VOCAB)).map_err(io(&inputs.vocab))?;

    // Anomaly embeddings.
    let emb = if is_torch_file(&inputs.embeddings) {
        read_embeddings_pt(&inputs.embeddings)?
    } else {
        read_embeddings_safetensors(&inputs.embeddings)?
    };
    write_embeddings_safetensors(&emb, &out.join(ad_model::EMBEDDINGS))?;

    // Spatial encoder: shape from the given JSON or inferred; validated by building it.
    let st: Vec<(String, Tensor)> = if is_torch_file(&inputs.spatial_encoder) {
        read_torch_state_dict(&inputs.spatial_encoder)?
    } else {
        Weights::from_safetensors(&[&inputs.spatial_encoder], DType::F32, &dev)?.source_tensors()?
    };
    let se_cfg: SpatialEncoderConfig = match &inputs.spatial_config {
        Some(p) => serde_json::from_slice(&std::fs::read(p).map_err(io(p))?).map_err(|e| {
            ModelError::Invalid(format!(
                "{}: not a spatial encoder config: {e}",
                p.display()
            ))
        })?,
        None => {
            let shapes: Vec<(String, Vec<usize>)> = st
                .iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect();
            infer_spatial_config(&shapes)?
        }
    };
    let se_weights = Weights::from_tensors(st.iter().cloned().collect(), DType::F32, &dev)
        .with_origin(&inputs.spatial_encoder.display().to_string());
    let spatial = SpatialEncoder::from_weights(&se_weights, &se_cfg)?;
    parameters.insert("spatial_encoder".into(), se_cfg.parameter_count()? as u64);
    let meta: HashMap<String, String> = [(
        "config".to_string(),
        serde_json::to_string(&se_cfg).expect("json"),
    )]
    .into();
    save_tensors(&st, Some(meta), &out.join(ad_model::SPATIAL_ENCODER))?;

    // The parts must fit together (widths, placeholder id).
    let mut model = AnomalyModel::assemble(ldm, spatial, emb.clone(), tok, DType::F32, &dev)?;
    let mut mask_embedding_shape = None;
    if let Some(me) = read_mask_embeddings(&inputs.mask_embeddings)? {
        model.set_mask_embeddings(me.clone())?;
        let first = model.mask_embeddings.values().next().expect("non-empty");
        mask_embedding_shape = Some([
            first.dim(0).map_err(EngineError::from)?,
            first.dim(1).map_err(EngineError::from)?,
        ]);
        write_embeddings_safetensors(&me, &out.join(ad_model::MASK_EMBEDDINGS))?;
    }
    let first = model
        .embeddings
        .values()
        .next()
        .ok_or_else(|| ModelError::Invalid("the embeddings file holds no embedding".into()))?;
    let embedding_shape = [
        first.dim(0).map_err(EngineError::from)?,
        first.dim(1).map_err(EngineError::from)?,
    ];
    let u = &cfg.unet;
    let base_model = format!(
        "CompVis LDM txt2img: UNet {:?} channels, {} res blocks, context {}; KL VAE f{}; BERT {}×{} layers; {} steps {:?} schedule",
        u.block_out_channels,
        match &u.layers_per_block {
            defectforge_engine::unet::PerBlock::One(n) => *n,
            defectforge_engine::unet::PerBlock::Many(v) => v[0],
        },
        cfg.bert.n_embed,
        1usize << (cfg.vae.block_out_channels.len() - 1),
        cfg.bert.n_embed,
        cfg.bert.n_layer,
        cfg.schedule.timesteps,
        cfg.schedule.beta_schedule
    );

    let mut files = BTreeMap::new();
    for name in [
        ad_model::LDM_WEIGHTS,
        ad_model::LDM_CONFIG,
        ad_model::VOCAB,
        ad_model::EMBEDDINGS,
        ad_model::SPATIAL_ENCODER,
    ] {
        files.insert(name.to_string(), file_digest(&out.join(name))?);
    }
    if mask_embedding_shape.is_some() {
        let name = ad_model::MASK_EMBEDDINGS;
        files.insert(name.to_string(), file_digest(&out.join(name))?);
    }
    let (digest, id) = content_id(&files);
    let manifest = ModelManifest {
        format: FORMAT,
        id,
        digest,
        kind: "anomalydiffusion".into(),
        base_model,
        created_at: chrono::Utc::now().to_rfc3339(),
        files,
        defect_types: model.defect_types(),
        placeholder: model.placeholder.clone(),
        placeholder_token: model.placeholder_token,
        embedding_shape,
        mask_types: model.mask_types(),
        mask_embedding_shape,
        spatial_encoder: se_cfg,
        parameters,
        sources,
        lineage: inputs.lineage.clone(),
    };
    std::fs::write(
        out.join(MANIFEST_FILE),
        serde_json::to_vec_pretty(&manifest).expect("json"),
    )
    .map_err(io(out))?;
    Ok(manifest)
}

/// Imports a model: converts the official files in a staging folder under `staging`, then
/// uploads them to `<dest>/models/<id>/` (manifest last). Returns the manifest and the model's
/// URI. Importing the same files again finds the existing model and uploads nothing.
pub async fn import(
    inputs: ImportInputs,
    dest: &str,
    s3: &S3Config,
    staging: &Path,
) -> Result<(ModelManifest, String), ModelError> {
    std::fs::create_dir_all(staging).map_err(io(staging))?;
    let tmp = tempfile::Builder::new()
        .prefix("import-")
        .tempdir_in(staging)
        .map_err(io(staging))?;
    let dir = tmp.path().to_path_buf();
    let manifest = tokio::task::spawn_blocking(move || build_model_dir(&inputs, &dir))
        .await
        .map_err(|e| ModelError::Invalid(format!("import thread failed: {e}")))??;
    let root = store::open(dest, s3).await?;
    let prefix = format!("models/{}/", manifest.id);
    let uri = root.uri(&format!("models/{}", manifest.id));
    if let Ok(existing) = root.get(&format!("{prefix}{MANIFEST_FILE}")).await {
        if let Ok(m) = serde_json::from_slice::<ModelManifest>(&existing) {
            if m.digest == manifest.digest {
                info!(%uri, "model already imported");
                return Ok((m, uri));
            }
        }
    }
    for name in manifest.files.keys() {
        let p = tmp.path().join(name);
        let body = tokio::fs::read(&p).await.map_err(io(&p))?;
        info!(file = %name, bytes = body.len(), "uploading");
        root.put(
            &format!("{prefix}{name}"),
            Bytes::from(body),
            "application/octet-stream",
        )
        .await?;
    }
    root.put(
        &format!("{prefix}{MANIFEST_FILE}"),
        Bytes::from(serde_json::to_vec_pretty(&manifest).expect("json")),
        "application/json",
    )
    .await?;
    Ok((manifest, uri))
}
