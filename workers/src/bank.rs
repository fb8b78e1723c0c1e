//! Mask banks (`defectforge masks generate`): learned masks sampled ahead of time, stored per
//! defect type with their provenance, for campaigns with `mask = "bank"`.
//!
//! Layout under the bank root (a directory or s3:// prefix):
//! `<category>/<defect>/<index:06>.png` (256×256, 0/255, lossless PNG — the official code
//! writes lossy JPEG) and `<category>/<defect>/provenance.json` ([`TypeProvenance`]: the model,
//! its digest, the sampling settings, the bank seed, per-mask seed/draws/prompt/area/thin flag,
//! and the draw statistics with the rejection rate).
//!
//! Mask `i` of a type is drawn from a seed derived from (bank seed, type, i), so a bank is
//! reproducible, and generating again with a larger count only adds the missing masks: every
//! mask is uploaded as soon as it is accepted and the provenance after every batch, so an
//! interrupted run loses at most the batch in flight.

use std::sync::Arc;

use bytes::Bytes;
use defectforge::campaign::{is_safe_name, MaskModelSettings};
use defectforge::store::{self, ObjectStore, S3Config, StoreError};
use defectforge::{ids, imaging};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::generators::learned_masks::{
    embedding_name, require_mask_model, sample_accepted, DrawStats,
};
use crate::generators::GenError;
use crate::models::{LoadedModel, ModelCache, ModelError};

pub const PROVENANCE: &str = "provenance.json";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BankError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("mask sampling failed: {0}")]
    Sampling(String),
}

/// One mask of a bank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BankEntry {
    pub file: String,
    pub index: u64,
    pub seed: u64,
    /// draws until accepted
    pub attempts: u32,
    pub prompt: String,
    pub area: u64,
    pub latent_mask_area: u32,
    /// vanishes at AnomalyDiffusion's 32×32 latent grid
    pub thin: bool,
    pub sha256: String,
}

/// `<category>/<defect>/provenance.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeProvenance {
    pub format: u32,
    pub category: String,
    pub defect_type: String,
    pub embedding: String,
    pub model: String,
    pub model_id: String,
    pub model_digest: String,
    pub settings: MaskModelSettings,
    pub bank_seed: u64,
    pub created_at: String,
    pub updated_at: String,
    pub stats: DrawStats,
    pub rejection_rate: f64,
    pub masks: Vec<BankEntry>,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct BankRequest {
    pub model: String,
    /// `<category>+<defect>` per type
    pub types: Vec<String>,
    pub count: u64,
    pub seed: u64,
    pub settings: MaskModelSettings,
    pub dest: String,
}

/// Splits `<category>+<defect>`.
pub fn split_type(t: &str) -> Result<(String, String), BankError> {
    match t.split_once('+') {
        Some((c, d)) if is_safe_name(c) && is_safe_name(d) => Ok((c.to_string(), d.to_string())),
        _ => Err(BankError::Invalid(format!(
            "type {t:?}: expected <category>+<defect> (e.g. bottle+broken_large), each 1-64 of A-Z a-z 0-9 _ - ."
        ))),
    }
}

/// The seed of mask `index` of a type.
pub fn mask_seed(bank_seed: u64, name: &str, index: u64) -> u64 {
    let h = ids::sha256_hex(format!("{bank_seed}/{name}/{index}").as_bytes());
    u64::from_str_radix(&h[..16], 16).expect("hex")
}

/// Generates (or completes) a bank; `progress(type, done, total)` after every batch.
pub async fn generate(
    req: &BankRequest,
    models: &ModelCache,
    s3: &S3Config,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<Vec<TypeProvenance>, BankError> {
    let types = req
        .types
        .iter()
        .map(|t| split_type(t))
        .collect::<Result<Vec<_>, _>>()?;
    if types.is_empty() {
        return Err(BankError::Invalid(
            "no types given (--types <category>+<defect>,…)".into(),
        ));
    }
    let model = models.get(&req.model).await?;
    for (c, d) in &types {
        let name = embedding_name(c, d, &req.settings);
        require_mask_model(&model.manifest, &req.model, &name).map_err(BankError::Invalid)?;
    }
    let root = store::open(&req.dest, s3).await?;
    let mut out = vec![];
    for (c, d) in &types {
        out.push(generate_type(req, &model, root.as_ref(), c, d, progress).await?);
    }
    Ok(out)
}

async fn generate_type(
    req: &BankRequest,
    model: &Arc<LoadedModel>,
    root: &dyn ObjectStore,
    category: &str,
    defect: &str,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<TypeProvenance, BankError> {
    let type_name = format!("{category}+{defect}");
    let embedding = embedding_name(category, defect, &req.settings);
    let prefix = format!("{category}/{defect}/");
    let now = chrono::Utc::now().to_rfc3339();
    let mut prov = match root.get(&format!("{prefix}{PROVENANCE}")).await {
        Ok(b) => {
            let p: TypeProvenance = serde_json::from_slice(&b).map_err(|e| {
                BankError::Invalid(format!(
                    "{}: not a bank provenance file ({e}); delete it and run again (masks are re-sampled identically from the bank seed), or use another --to",
                    root.uri(&format!("{prefix}{PROVENANCE}"))
                ))
            })?;
            if p.format > FORMAT {
                return Err(BankError::Invalid(format!(
                    "{}: bank format {} is newer than this build reads ({FORMAT}): upgrade defectforge",
                    root.uri(&format!("{prefix}{PROVENANCE}")),
                    p.format
                )));
            }
            let same = p.model_digest == model.manifest.digest
                && p.embedding == embedding
                && p.bank_seed == req.seed
                && same_sampling(&p.settings, &req.settings);
            if !same {
                let diff = if p.model_digest != model.manifest.digest {
                    format!(
                        "model digest {} (now {})",
                        p.model_digest, model.manifest.digest
                    )
                } else if p.embedding != embedding {
                    format!("embedding {} (now {embedding})", p.embedding)
                } else if p.bank_seed != req.seed {
                    format!("seed {} (now {})", p.bank_seed, req.seed)
                } else {
                    format!(
                        "sampling settings {} (now {})",
                        serde_json::to_string(&p.settings).expect("json"),
                        serde_json::to_string(&req.settings).expect("json")
                    )
                };
                return Err(BankError::Invalid(format!(
                    "{} was generated with another {diff}; complete it with the same ones or write to another --to",
                    root.uri(&prefix)
                )));
            }
            p
        }
        Err(StoreError::NotFound { .. }) => TypeProvenance {
            format: FORMAT,
            category: category.to_string(),
            defect_type: defect.to_string(),
            embedding: embedding.clone(),
            model: req.model.clone(),
            model_id: model.manifest.id.clone(),
            model_digest: model.manifest.digest.clone(),
            settings: req.settings.clone(),
            bank_seed: req.seed,
            created_at: now.clone(),
            updated_at: now.clone(),
            stats: DrawStats::default(),
            rejection_rate: 0.0,
            masks: vec![],
        },
        Err(e) => return Err(e.into()),
    };
    let have: std::collections::BTreeSet<u64> = prov.masks.iter().map(|m| m.index).collect();
    let missing: Vec<u64> = (0..req.count).filter(|i| !have.contains(i)).collect();
    progress(&type_name, req.count - missing.len() as u64, req.count);
    let batch = req.settings.batch.max(1) as usize;
    for chunk in missing.chunks(batch) {
        let seeds: Vec<u64> = chunk
            .iter()
            .map(|&i| mask_seed(req.seed, &type_name, i))
            .collect();
        let m2 = model.clone();
        let (emb, settings, s2) = (embedding.clone(), req.settings.clone(), seeds.clone());
        let (masks, stats) = tokio::task::spawn_blocking(move || {
            let mut stats = DrawStats::default();
            sample_accepted(&m2.model, &emb, &s2, &settings, &mut stats, &mut |_| {})
                .map(|m| (m, stats))
        })
        .await
        .map_err(|e| BankError::Sampling(format!("sampling thread failed: {e}")))?
        .map_err(|f| {
            let which = f
                .index
                .map(|k| format!("{type_name} mask {}: ", chunk[k]))
                .unwrap_or_default();
            match f.error {
                GenError::Input(m) => BankError::Invalid(format!("{which}{m}")),
                GenError::Transient(m) => BankError::Sampling(format!("{which}{m}")),
            }
        })?;
        for ((&index, &seed), lm) in chunk.iter().zip(&seeds).zip(masks) {
            let png = imaging::encode_png_gray(&lm.mask)
                .map_err(|e| BankError::Sampling(e.to_string()))?;
            let file = format!("{index:06}.png");
            let latent = imaging::latent_mask_area(&lm.mask);
            let entry = BankEntry {
                file: file.clone(),
                index,
                seed,
                attempts: lm.attempts,
                prompt: lm.prompt,
                area: imaging::mask_stats(&lm.mask).area,
                latent_mask_area: latent,
                thin: latent == 0,
                sha256: ids::sha256_hex(&png),
            };
            root.put(&format!("{prefix}{file}"), Bytes::from(png), "image/png")
                .await?;
            prov.masks.push(entry);
        }
        prov.stats.add(&stats);
        prov.rejection_rate = prov.stats.rejection_rate();
        prov.updated_at = chrono::Utc::now().to_rfc3339();
        prov.masks.sort_by_key(|m| m.index);
        root.put(
            &format!("{prefix}{PROVENANCE}"),
            Bytes::from(serde_json::to_vec_pretty(&prov).expect("json")),
            "application/json",
        )
        .await?;
        let done = prov.masks.iter().filter(|m| m.index < req.count).count() as u64;
        info!(
            r#type = %type_name,
            done,
            total = req.count,
            drawn = prov.stats.drawn,
            rejection_rate = prov.rejection_rate,
            "mask bank batch stored"
        );
        progress(&type_name, done, req.count);
    }
    Ok(prov)
}

/// Whether two settings sample the same masks (the batch size and the draw limit do not change
/// an accepted mask, so a bank stuck on a hard seed can be completed with more draws).
fn same_sampling(a: &MaskModelSettings, b: &MaskModelSettings) -> bool {
    let norm = |s: &MaskModelSettings| MaskModelSettings {
        batch: 0,
        max_attempts: 0,
        model: None,
        ..s.clone()
    };
    norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_split_and_seeds_are_stable() {
        assert_eq!(
            split_type("bottle+broken_large").unwrap(),
            ("bottle".into(), "broken_large".into())
        );
        for bad in ["bottle", "+x", "a+../b", "a+"] {
            assert!(split_type(bad).is_err(), "{bad}");
        }
        assert_eq!(mask_seed(7, "a+b", 3), mask_seed(7, "a+b", 3));
        assert_ne!(mask_seed(7, "a+b", 3), mask_seed(7, "a+b", 4));
        assert_ne!(mask_seed(7, "a+b", 3), mask_seed(8, "a+b", 3));
        let a = MaskModelSettings::default();
        let b = MaskModelSettings {
            batch: 32,
            ..a.clone()
        };
        assert!(same_sampling(&a, &b));
        let c = MaskModelSettings {
            steps: 50,
            ..a.clone()
        };
        assert!(!same_sampling(&a, &c));
    }
}
