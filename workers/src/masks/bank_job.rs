//! The worker's `mask_bank` handler: one chunk of a bank run, drawn, written under the
//! attempt's keys and committed with its chunk record last (see `bank`).

use std::sync::Arc;

use bytes::Bytes;
use defectforge::job::MaskBankJob;
use defectforge::retry::{retry, Backoff};
use defectforge::store::{ObjectStore, StoreError};
use defectforge::{ids, imaging};
use tracing::info;

use super::bank::{
    chunks_root, failure_key, is_commit, mask_seed, run_key, BankEntry, BankRun, ChunkCommit,
    ChunkFailure, RUN_FORMAT,
};
use super::learned::sample_accepted;
use super::DrawStats;
use crate::generators::GenError;
use crate::models::{ModelCache, ModelError};
use crate::protocol::{Failure, JobError, Outcome};

fn chunk_prefix(run_id: &str, type_name: &str, chunk: u64) -> String {
    format!("{}{type_name}/{chunk:06}/", chunks_root(run_id))
}

/// The committed attempts of one chunk (commit record keys, oldest attempt first).
async fn commits(
    root: &dyn ObjectStore,
    run_id: &str,
    type_name: &str,
    chunk: u64,
) -> Result<Vec<String>, StoreError> {
    let prefix = chunk_prefix(run_id, type_name, chunk);
    Ok(root
        .list(&prefix)
        .await?
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.strip_prefix(&prefix).is_some_and(is_commit))
        .collect())
}

/// Runs one bank job (the worker's `mask_bank` handler): draws the chunk's masks, writes them
/// under the attempt's keys and commits with the chunk record last.
pub(crate) async fn run_job(
    j: &MaskBankJob,
    root: Arc<dyn ObjectStore>,
    models: &ModelCache,
    worker_id: &str,
    policy: Backoff,
) -> Result<Outcome, JobError> {
    let t0 = std::time::Instant::now();
    let permanent = |cause: String| JobError::Permanent {
        sample: None,
        input_uri: None,
        cause,
    };
    let rkey = run_key(&j.run_id);
    let b = retry(policy, "reading the bank run", StoreError::is_transient, || {
        root.get(&rkey)
    })
    .await
    .map_err(|e| match e {
        StoreError::NotFound { uri } => permanent(format!(
            "bank run record {uri} does not exist (`defectforge masks generate` writes it before publishing; was the bank deleted?)"
        )),
        e => JobError::from_store(e, false),
    })?;
    let run: BankRun = serde_json::from_slice(&b).map_err(|e| {
        permanent(format!(
            "{}: not a bank run record: {e}",
            root.uri(&run_key(&j.run_id))
        ))
    })?;
    if run.format > RUN_FORMAT {
        return Err(permanent(format!(
            "bank run {} has format {} (this worker reads {RUN_FORMAT}): upgrade the worker",
            j.run_id, run.format
        )));
    }
    if run.digest_id() != j.run_id {
        return Err(permanent(format!(
            "{}: its contents do not match its id (edited by hand?); run `defectforge masks generate` again",
            root.uri(&rkey)
        )));
    }
    let t = run
        .run_type(&j.type_name)
        .ok_or_else(|| permanent(format!("bank run {} has no type {}", j.run_id, j.type_name)))?;
    let indices = t.chunk(run.chunk, j.chunk).to_vec();
    if indices.is_empty() {
        return Err(permanent(format!(
            "bank run {} has no chunk {} of {}",
            j.run_id, j.chunk, j.type_name
        )));
    }
    let done = retry(
        policy,
        "listing chunk commits",
        StoreError::is_transient,
        || commits(root.as_ref(), &j.run_id, &j.type_name, j.chunk),
    )
    .await
    .map_err(|e| JobError::from_store(e, false))?;
    if !done.is_empty() {
        return Ok(Outcome::Skipped {
            reason: "bank chunk already committed".into(),
        });
    }
    let model = models.get(&run.model).await.map_err(|e| match e {
        ModelError::Store(e) => JobError::from_store(e, true),
        e if e.is_transient() => JobError::Transient(e.to_string()),
        e => permanent(e.to_string()),
    })?;
    if model.manifest.digest != run.model_digest {
        return Err(permanent(format!(
            "model {} now has digest {} but bank run {} was planned with {}: it was replaced",
            run.model, model.manifest.digest, j.run_id, run.model_digest
        )));
    }
    let attempt = ids::new_attempt_id();
    let dir = format!(
        "{}{attempt}/",
        chunk_prefix(&j.run_id, &j.type_name, j.chunk)
    );
    let mut entries = vec![];
    let mut stats = DrawStats::default();
    let limit = std::time::Duration::from_secs(run.time_limit_s.max(1));
    for batch in indices.chunks(run.settings.batch.max(1) as usize) {
        let seeds: Vec<u64> = batch
            .iter()
            .map(|&i| mask_seed(run.seed, &j.type_name, i))
            .collect();
        let (m2, emb, settings, s2) = (
            model.clone(),
            t.embedding.clone(),
            run.settings.clone(),
            seeds.clone(),
        );
        let job = tokio::task::spawn_blocking(move || {
            let mut stats = DrawStats::default();
            sample_accepted(&m2.model, &emb, &s2, &settings, &mut stats, &mut |_| {})
                .map(|m| (m, stats))
        });
        let (masks, st) = match tokio::time::timeout(limit.saturating_sub(t0.elapsed()), job).await
        {
            Err(_) => return Err(JobError::TimedOut(run.time_limit_s)),
            Ok(Err(e)) => return Err(JobError::Transient(format!("sampling thread failed: {e}"))),
            Ok(Ok(r)) => r.map_err(|f| {
                let which = f
                    .index
                    .map(|k| format!("{} mask {}: ", j.type_name, batch[k]))
                    .unwrap_or_default();
                match f.error {
                    GenError::Input(m) => permanent(format!("{which}{m}")),
                    GenError::Transient(m) => JobError::Transient(format!("{which}{m}")),
                }
            })?,
        };
        stats.add(&st);
        for ((&index, &seed), lm) in batch.iter().zip(&seeds).zip(masks) {
            let png = imaging::encode_png_gray(&lm.mask)
                .map_err(|e| JobError::Transient(e.to_string()))?;
            let file = format!("{index:06}.png");
            let latent = imaging::latent_mask_area(&lm.mask);
            entries.push(BankEntry {
                file: file.clone(),
                index,
                seed,
                attempts: lm.attempts,
                prompt: lm.prompt,
                area: imaging::mask_stats(&lm.mask).area,
                latent_mask_area: latent,
                thin: latent == 0,
                sha256: ids::sha256_hex(&png),
            });
            let (key, body) = (format!("{dir}{file}"), Bytes::from(png));
            retry(
                policy,
                "uploading a bank mask",
                StoreError::is_transient,
                || root.put(&key, body.clone(), "image/png"),
            )
            .await
            .map_err(|e| JobError::from_store(e, false))?;
        }
    }
    if t0.elapsed() > limit {
        return Err(JobError::TimedOut(run.time_limit_s));
    }
    let n = entries.len();
    let commit = ChunkCommit {
        worker_id: worker_id.to_string(),
        masks: entries,
        stats,
        committed_at: chrono::Utc::now().to_rfc3339(),
    };
    let key = format!(
        "{}{attempt}.json",
        chunk_prefix(&j.run_id, &j.type_name, j.chunk)
    );
    let body = Bytes::from(serde_json::to_vec_pretty(&commit).expect("json"));
    retry(
        policy,
        "committing the bank chunk",
        StoreError::is_transient,
        || root.put(&key, body.clone(), "application/json"),
    )
    .await
    .map_err(|e| JobError::from_store(e, false))?;
    let _ = root
        .delete(&failure_key(&j.run_id, &j.type_name, j.chunk))
        .await;
    info!(r#type = %j.type_name, chunk = j.chunk, masks = n, drawn = stats.drawn, "mask bank chunk committed");
    Ok(Outcome::Committed { samples: n })
}

/// Writes the failure record of a dead-lettered bank job.
pub(crate) async fn record_failure(
    j: &MaskBankJob,
    root: Arc<dyn ObjectStore>,
    worker_id: &str,
    policy: Backoff,
    f: Failure,
) -> Result<(), StoreError> {
    let rec = ChunkFailure {
        type_name: j.type_name.clone(),
        chunk: j.chunk,
        cause: f.cause,
        class: f.class.to_string(),
        worker_id: worker_id.to_string(),
        deliveries: f.deliveries,
        at: chrono::Utc::now().to_rfc3339(),
    };
    let key = failure_key(&j.run_id, &j.type_name, j.chunk);
    let body = Bytes::from(serde_json::to_vec_pretty(&rec).expect("json"));
    retry(
        policy,
        "writing a bank failure record",
        StoreError::is_transient,
        || root.put(&key, body.clone(), "application/json"),
    )
    .await
}
