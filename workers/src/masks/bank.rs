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
//! reproducible, and generating again with a larger count only adds the missing masks.
//!
//! A bank is filled by `mask_bank` jobs on the shared queue (or in-process, embedded), like a
//! campaign: `prepare` writes the run record `.runs/<run_id>/run.json` (the masks still to
//! draw, per type, in chunks of whole sampling batches); each job draws one chunk, writes its
//! masks under attempt-unique keys and commits with `…/chunks/<type>/<chunk>/<attempt>.json`
//! last; `merge` copies one committed attempt per chunk into the bank and writes the
//! provenance. An interrupted run loses at most the chunks in flight, and the same command
//! continues it. Both ways run the same chunks, so they write the same masks.

use std::sync::Arc;

use bytes::Bytes;
use defectforge::campaign::{split_type_name, MaskModelSettings};
use defectforge::ids;
use defectforge::job::MaskBankJob;
use defectforge::store::{self, ObjectStore, S3Config, StoreError};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::masks::{embedding_name, require_mask_model, DrawStats};
use crate::models::ModelError;

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
    match split_type_name(t) {
        Some((c, d)) => Ok((c.to_string(), d.to_string())),
        None => Err(BankError::Invalid(format!(
            "type {t:?}: expected <category>+<defect> (e.g. bottle+broken_large), each 1-64 of A-Z a-z 0-9 _ - ."
        ))),
    }
}

/// The seed of mask `index` of a type.
pub fn mask_seed(bank_seed: u64, name: &str, index: u64) -> u64 {
    let h = ids::sha256_hex(format!("{bank_seed}/{name}/{index}").as_bytes());
    u64::from_str_radix(&h[..16], 16).expect("hex")
}

/// Masks per bank job, by default (rounded up to whole sampling batches).
pub const DEFAULT_CHUNK: u64 = 64;
/// Where a bank keeps its runs: `<bank>/.runs/<run_id>/…` (campaigns read only the types'
/// provenance files, so nothing here is mistaken for a mask).
pub const RUNS: &str = ".runs";
pub(crate) const RUN_FORMAT: u32 = 1;

/// One type of a bank run: the mask indices still to draw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunType {
    pub category: String,
    pub defect_type: String,
    pub embedding: String,
    /// mask indices to draw, in order; chunk k is `todo[k·chunk .. (k+1)·chunk]`
    pub todo: Vec<u64>,
}

impl RunType {
    /// `<category>+<defect>`
    pub fn name(&self) -> String {
        format!("{}+{}", self.category, self.defect_type)
    }

    pub fn chunks(&self, chunk: u64) -> u64 {
        (self.todo.len() as u64).div_ceil(chunk.max(1))
    }

    /// The mask indices of chunk `k`.
    pub fn chunk(&self, chunk: u64, k: u64) -> &[u64] {
        let c = chunk.max(1) as usize;
        let start = (k as usize).saturating_mul(c).min(self.todo.len());
        &self.todo[start..(start + c).min(self.todo.len())]
    }
}

/// `<bank>/.runs/<run_id>/run.json`: the committed record a bank run's jobs are read from,
/// written before any job is published. The id is a digest of everything that decides the
/// masks, so running the same command again continues the same run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BankRun {
    pub format: u32,
    pub run_id: String,
    pub model: String,
    pub model_id: String,
    pub model_digest: String,
    pub seed: u64,
    pub settings: MaskModelSettings,
    /// masks per job (a whole number of sampling batches)
    pub chunk: u64,
    pub time_limit_s: u64,
    pub count: u64,
    pub types: Vec<RunType>,
    pub created_at: String,
}

impl BankRun {
    /// The job of chunk `chunk` of type `type_name` (in the bank at `bank`).
    pub fn job(&self, bank: &str, type_name: &str, chunk: u64) -> MaskBankJob {
        MaskBankJob {
            bank: bank.to_string(),
            run_id: self.run_id.clone(),
            type_name: type_name.to_string(),
            chunk,
        }
    }

    /// The run id: a digest of everything that decides the masks (model digest, seed,
    /// settings, chunk size, the indices to draw), so that the same request is the same run
    /// and a record whose contents do not match its id is refused.
    pub fn digest_id(&self) -> String {
        let identity = serde_json::json!({
            "digest": self.model_digest,
            "seed": self.seed,
            "settings": self.settings,
            "chunk": self.chunk,
            "types": self.types,
        });
        let h = ids::sha256_hex(&serde_json::to_vec(&identity).expect("json"));
        format!("bank-{}", &h[..16])
    }

    pub fn total(&self) -> u64 {
        self.types.iter().map(|t| t.todo.len() as u64).sum()
    }

    pub fn run_type(&self, name: &str) -> Option<&RunType> {
        self.types.iter().find(|t| t.name() == name)
    }
}

pub(crate) fn run_key(run_id: &str) -> String {
    format!("{RUNS}/{run_id}/run.json")
}

/// `.runs/<run>/chunks/`: every chunk's attempts (`<type>/<chunk>/<attempt>/…`) and commit
/// records (`<type>/<chunk>/<attempt>.json`).
pub(crate) fn chunks_root(run_id: &str) -> String {
    format!("{RUNS}/{run_id}/chunks/")
}

pub fn failure_key(run_id: &str, type_name: &str, chunk: u64) -> String {
    format!("{RUNS}/{run_id}/failures/{type_name}-{chunk:06}.json")
}

/// The commit record of one chunk attempt, `…/chunks/<type>/<chunk>/<attempt>.json`, written
/// after every mask of the attempt (`…/<chunk>/<attempt>/<index>.png`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkCommit {
    pub worker_id: String,
    /// the masks, `file` relative to the attempt's folder
    pub masks: Vec<BankEntry>,
    pub stats: DrawStats,
    pub committed_at: String,
}

/// A dead-lettered bank job (`…/failures/<type>-<chunk>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkFailure {
    pub type_name: String,
    pub chunk: u64,
    pub cause: String,
    /// "permanent" (bad input) or "exhausted" (the delivery limit)
    pub class: String,
    pub worker_id: String,
    pub deliveries: u64,
    pub at: String,
}

/// Checks a request against the model and the bank, and writes (or finds) the run record of
/// the masks still to draw. Types whose provenance was written with other settings are
/// refused with the difference.
pub async fn prepare(
    req: &BankRequest,
    s3: &S3Config,
    chunk: u64,
    time_limit_s: u64,
) -> Result<(BankRun, Arc<dyn ObjectStore>), BankError> {
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
    let manifest = crate::models::manifest(&req.model, s3).await?;
    let root = store::open(&req.dest, s3).await?;
    let mut run_types = vec![];
    for (c, d) in &types {
        let name = embedding_name(c, d, &req.settings);
        require_mask_model(&manifest, &req.model, &name).map_err(BankError::Invalid)?;
        let prov = read_provenance(root.as_ref(), c, d).await?;
        if let Some(p) = &prov {
            check_same(p, root.as_ref(), &manifest.digest, &name, req)?;
        }
        let have: std::collections::BTreeSet<u64> = prov
            .iter()
            .flat_map(|p| p.masks.iter().map(|m| m.index))
            .collect();
        run_types.push(RunType {
            category: c.clone(),
            defect_type: d.clone(),
            embedding: name,
            todo: (0..req.count).filter(|i| !have.contains(i)).collect(),
        });
    }
    let batch = req.settings.batch.max(1) as u64;
    let chunk = chunk.max(1).div_ceil(batch) * batch;
    let mut run = BankRun {
        format: RUN_FORMAT,
        run_id: String::new(),
        model: req.model.clone(),
        model_id: manifest.id.clone(),
        model_digest: manifest.digest.clone(),
        seed: req.seed,
        settings: req.settings.clone(),
        chunk,
        time_limit_s,
        count: req.count,
        types: run_types,
        created_at: chrono::Utc::now().to_rfc3339(),
    };
    run.run_id = run.digest_id();
    if run.total() == 0 {
        return Ok((run, root));
    }
    match root.get(&run_key(&run.run_id)).await {
        // the same run (same digest): continue it with its own record
        Ok(b) => {
            let old: BankRun = serde_json::from_slice(&b).map_err(|e| {
                BankError::Invalid(format!(
                    "{}: not a bank run record ({e}); delete it and run again",
                    root.uri(&run_key(&run.run_id))
                ))
            })?;
            Ok((old, root))
        }
        Err(StoreError::NotFound { .. }) => {
            root.put(
                &run_key(&run.run_id),
                Bytes::from(serde_json::to_vec_pretty(&run).expect("json")),
                "application/json",
            )
            .await?;
            Ok((run, root))
        }
        Err(e) => Err(e.into()),
    }
}

async fn read_provenance(
    root: &dyn ObjectStore,
    category: &str,
    defect: &str,
) -> Result<Option<TypeProvenance>, BankError> {
    let key = format!("{category}/{defect}/{PROVENANCE}");
    match root.get(&key).await {
        Ok(b) => {
            let p: TypeProvenance = serde_json::from_slice(&b).map_err(|e| {
                BankError::Invalid(format!(
                    "{}: not a bank provenance file ({e}); delete it and run again (masks are re-sampled identically from the bank seed), or use another --to",
                    root.uri(&key)
                ))
            })?;
            if p.format > FORMAT {
                return Err(BankError::Invalid(format!(
                    "{}: bank format {} is newer than this build reads ({FORMAT}): upgrade defectforge",
                    root.uri(&key),
                    p.format
                )));
            }
            Ok(Some(p))
        }
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn check_same(
    p: &TypeProvenance,
    root: &dyn ObjectStore,
    digest: &str,
    embedding: &str,
    req: &BankRequest,
) -> Result<(), BankError> {
    let diff = if p.model_digest != digest {
        format!("model digest {} (now {digest})", p.model_digest)
    } else if p.embedding != embedding {
        format!("embedding {} (now {embedding})", p.embedding)
    } else if p.bank_seed != req.seed {
        format!("seed {} (now {})", p.bank_seed, req.seed)
    } else if !same_sampling(&p.settings, &req.settings) {
        format!(
            "sampling settings {} (now {})",
            serde_json::to_string(&p.settings).expect("json"),
            serde_json::to_string(&req.settings).expect("json")
        )
    } else {
        return Ok(());
    };
    Err(BankError::Invalid(format!(
        "{} was generated with another {diff}; complete it with the same ones or write to another --to",
        root.uri(&format!("{}/{}/", p.category, p.defect_type))
    )))
}

/// Whether a key below a chunk's folder is a commit record (`<attempt>.json`, not a staged
/// mask below `<attempt>/`).
pub(crate) fn is_commit(rest: &str) -> bool {
    rest.ends_with(".json") && !rest.contains('/')
}

/// The first committed attempt of every chunk of a run, from one listing
/// (`.runs/<run>/chunks/<type>/<chunk>/<attempt>.json`).
async fn first_commits(
    root: &dyn ObjectStore,
    run: &BankRun,
) -> Result<std::collections::BTreeMap<(String, u64), String>, StoreError> {
    let base = chunks_root(&run.run_id);
    let mut out = std::collections::BTreeMap::new();
    // keys are listed in order, so the first commit of a chunk is its oldest attempt
    for o in root.list(&base).await? {
        let mut parts = o.key[base.len()..].splitn(3, '/');
        let (Some(t), Some(k), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if let (Ok(k), true) = (k.parse::<u64>(), is_commit(rest)) {
            out.entry((t.to_string(), k)).or_insert(o.key);
        }
    }
    Ok(out)
}

/// Where a run stands: chunks committed and failures recorded, from the store.
#[derive(Debug, Clone, Default)]
pub struct RunProgress {
    /// masks in committed chunks
    pub masks: u64,
    pub committed: Vec<(String, u64)>,
    pub pending: Vec<(String, u64)>,
    pub failures: Vec<ChunkFailure>,
}

pub async fn progress(root: &dyn ObjectStore, run: &BankRun) -> Result<RunProgress, BankError> {
    let mut p = RunProgress::default();
    let commits = first_commits(root, run).await?;
    for t in &run.types {
        let name = t.name();
        for k in 0..t.chunks(run.chunk) {
            if commits.contains_key(&(name.clone(), k)) {
                p.masks += t.chunk(run.chunk, k).len() as u64;
                p.committed.push((name.clone(), k));
            } else {
                p.pending.push((name.clone(), k));
            }
        }
    }
    for o in root
        .list(&format!("{RUNS}/{}/failures/", run.run_id))
        .await?
    {
        let f: ChunkFailure = serde_json::from_slice(&root.get(&o.key).await?)
            .map_err(|e| BankError::Invalid(format!("{}: {e}", root.uri(&o.key))))?;
        // a chunk that failed once and was then committed is no longer failed
        if !p
            .committed
            .iter()
            .any(|(t, k)| *t == f.type_name && *k == f.chunk)
        {
            p.failures.push(f);
        }
    }
    Ok(p)
}

/// Moves a run's committed chunks into the bank: copies each chunk's first committed attempt
/// to `<category>/<defect>/<index>.png` and writes the types' provenance. Chunks not committed
/// (failed, or still running) are left out; running it again changes nothing.
pub async fn merge(
    root: &dyn ObjectStore,
    run: &BankRun,
) -> Result<Vec<TypeProvenance>, BankError> {
    let commits = first_commits(root, run).await?;
    let mut out = vec![];
    for t in &run.types {
        let name = t.name();
        let now = chrono::Utc::now().to_rfc3339();
        let mut prov = match read_provenance(root, &t.category, &t.defect_type).await? {
            Some(p) => p,
            None => TypeProvenance {
                format: FORMAT,
                category: t.category.clone(),
                defect_type: t.defect_type.clone(),
                embedding: t.embedding.clone(),
                model: run.model.clone(),
                model_id: run.model_id.clone(),
                model_digest: run.model_digest.clone(),
                settings: run.settings.clone(),
                bank_seed: run.seed,
                created_at: now.clone(),
                updated_at: now.clone(),
                stats: DrawStats::default(),
                rejection_rate: 0.0,
                masks: vec![],
            },
        };
        let have: std::collections::BTreeSet<u64> = prov.masks.iter().map(|m| m.index).collect();
        let prefix = format!("{}/{}/", t.category, t.defect_type);
        let mut changed = false;
        for k in 0..t.chunks(run.chunk) {
            let want = t.chunk(run.chunk, k);
            if want.iter().all(|i| have.contains(i)) {
                continue;
            }
            let Some(key) = commits.get(&(name.clone(), k)) else {
                continue;
            };
            let commit: ChunkCommit = serde_json::from_slice(&root.get(key).await?)
                .map_err(|e| BankError::Invalid(format!("{}: {e}", root.uri(key))))?;
            let dir = format!("{}/", key.trim_end_matches(".json"));
            for m in &commit.masks {
                if have.contains(&m.index) {
                    continue;
                }
                let png = root.get(&format!("{dir}{}", m.file)).await?;
                if ids::sha256_hex(&png) != m.sha256 {
                    return Err(BankError::Invalid(format!(
                        "{}: its digest differs from the commit record {} (the object was replaced)",
                        root.uri(&format!("{dir}{}", m.file)),
                        root.uri(key)
                    )));
                }
                let file = format!("{:06}.png", m.index);
                root.put(&format!("{prefix}{file}"), png, "image/png")
                    .await?;
                prov.masks.push(BankEntry { file, ..m.clone() });
            }
            prov.stats.add(&commit.stats);
            changed = true;
        }
        if changed {
            prov.rejection_rate = prov.stats.rejection_rate();
            prov.updated_at = now;
            prov.masks.sort_by_key(|m| m.index);
            root.put(
                &format!("{prefix}{PROVENANCE}"),
                Bytes::from(serde_json::to_vec_pretty(&prov).expect("json")),
                "application/json",
            )
            .await?;
            info!(r#type = %name, masks = prov.masks.len(), "mask bank type merged");
        }
        out.push(prov);
    }
    // The masks now live in the bank; the run's staged copies are no longer needed (its
    // records stay as the audit trail).
    for o in root.list(&chunks_root(&run.run_id)).await? {
        if o.key.ends_with(".png") {
            root.delete(&o.key).await?;
        }
    }
    Ok(out)
}

/// The current provenance of the request's types (for a request with nothing left to draw).
pub async fn provenances(
    root: &dyn ObjectStore,
    run: &BankRun,
) -> Result<Vec<TypeProvenance>, BankError> {
    let mut out = vec![];
    for t in &run.types {
        if let Some(p) = read_provenance(root, &t.category, &t.defect_type).await? {
            out.push(p);
        }
    }
    Ok(out)
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

    #[test]
    fn a_run_id_is_the_digest_of_what_decides_its_masks() {
        let t = RunType {
            category: "bottle".into(),
            defect_type: "broken_large".into(),
            embedding: "bottle+broken_large".into(),
            todo: vec![0, 1, 2, 3, 4],
        };
        assert_eq!(t.name(), "bottle+broken_large");
        assert_eq!(t.chunks(2), 3);
        assert_eq!(t.chunk(2, 2), &[4]);
        let run = BankRun {
            format: RUN_FORMAT,
            run_id: String::new(),
            model: "s3://b/models/ad-1".into(),
            model_id: "ad-1".into(),
            model_digest: "d".into(),
            seed: 3,
            settings: MaskModelSettings::default(),
            chunk: 2,
            time_limit_s: 60,
            count: 5,
            types: vec![t],
            created_at: "now".into(),
        };
        let id = run.digest_id();
        assert!(defectforge::ids::is_safe_campaign_id(&id), "{id}");
        // when it was made and how long a job may take do not change the masks
        let later = BankRun {
            created_at: "later".into(),
            time_limit_s: 600,
            ..run.clone()
        };
        assert_eq!(later.digest_id(), id);
        let mut fewer = run.clone();
        fewer.types[0].todo.pop();
        assert_ne!(fewer.digest_id(), id);
        let reseeded = BankRun { seed: 4, ..run };
        assert_ne!(reseeded.digest_id(), id);
    }
}
