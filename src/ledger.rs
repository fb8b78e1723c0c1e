//! The campaign ledger in the object store, which is the single source of truth: the campaign
//! record, committed shard fragments, failure records and the cancel marker. Status, finalize
//! (exactly one committed attempt per shard → manifest parts) and gc are computed from it.

use crate::campaign::Campaign;
use crate::dataset::DatasetInputs;
use crate::ids;
use crate::layout;
use crate::manifest::{self, ManifestError};
use crate::plan::Plan;
use crate::store::{ObjectMeta, ObjectStore, StoreError};
use arrow::array::{Array, RecordBatch, StringArray};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Rows per finalized manifest part file (a few tens of MB with zstd).
pub const ROWS_PER_PART: usize = 1_000_000;
/// Concurrent fragment reads during finalize and gc.
const READ_CONCURRENCY: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("campaign {id} not found in {store}: check the campaign id and --output (`defectforge submit` prints the id)")]
    UnknownCampaign { id: String, store: String },
    #[error("campaign record {uri} is corrupt: {reason}")]
    CorruptRecord { uri: String, reason: String },
    #[error("campaign {id} is incomplete: {missing} of {planned} shards have no valid commit ({}); no manifest was written. Run `defectforge resume {id} --output {store}` to regenerate them (dead-lettered ones: `requeue-dead`), or finalize with --allow-partial to publish what is there", first.join(", "))]
    Incomplete {
        id: String,
        store: String,
        missing: usize,
        planned: u64,
        /// the first missing shards, with why
        first: Vec<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CampaignRecord {
    pub campaign_id: String,
    pub plan_digest: String,
    pub plan_version: u32,
    pub total_samples: u64,
    pub shard_count: u64,
    pub shard_size: u32,
    pub shard_time_limit_s: u64,
    pub seed: u64,
    pub created_at: DateTime<Utc>,
    /// (category, defect type, count)
    pub counts: Vec<(String, String, u64)>,
    pub spec: Campaign,
    /// the dataset listing the plan was made from: with `spec` it determines every sample, so
    /// workers derive a shard's work from the record alone (records before it have none)
    #[serde(default)]
    pub inputs: Option<DatasetInputs>,
}

impl CampaignRecord {
    /// The record of a plan.
    pub fn of(plan: &Plan, inputs: &DatasetInputs) -> CampaignRecord {
        CampaignRecord {
            campaign_id: plan.campaign_id.clone(),
            plan_digest: plan.digest.clone(),
            plan_version: crate::plan::PLAN_VERSION,
            total_samples: plan.total_samples,
            shard_count: plan.shard_count,
            shard_size: plan.campaign.shard_size,
            shard_time_limit_s: plan.campaign.shard_time_limit_s,
            seed: plan.campaign.seed,
            created_at: Utc::now(),
            counts: plan.counts(),
            spec: plan.campaign.clone(),
            inputs: Some(inputs.clone()),
        }
    }

    /// Re-plans the campaign from the record and checks that it is the plan the record names
    /// (its digest, its id, its sizes) and that every input lies under the campaign's input
    /// roots: what a worker trusts before it reads any input.
    pub fn plan(&self, uri: &str) -> Result<Plan, LedgerError> {
        let corrupt = |reason: String| LedgerError::CorruptRecord {
            uri: uri.to_string(),
            reason,
        };
        if self.plan_version != crate::plan::PLAN_VERSION {
            return Err(corrupt(format!(
                "plan version {} is not this build's {}: run the campaign with a matching defectforge",
                self.plan_version,
                crate::plan::PLAN_VERSION
            )));
        }
        let inputs = self.inputs.as_ref().ok_or_else(|| {
            corrupt("it predates records that carry their dataset listing; resubmit the campaign with this version".into())
        })?;
        let plan = Plan::new(self.spec.clone(), inputs);
        if plan.digest != self.plan_digest
            || plan.campaign_id != self.campaign_id
            || plan.total_samples != self.total_samples
            || plan.shard_count != self.shard_count
            || self.shard_time_limit_s != self.spec.shard_time_limit_s
        {
            return Err(corrupt(
                "its contents do not hash to its plan digest (edited by hand?)".into(),
            ));
        }
        let roots = self.spec.input_roots();
        if let Some(u) = plan
            .input_uris()
            .find(|u| !roots.iter().any(|r| crate::store::is_within(u, r)))
        {
            return Err(corrupt(format!(
                "input {u} lies outside the campaign's inputs ({})",
                roots.join(", ")
            )));
        }
        Ok(plan)
    }

    pub fn shard_len(&self, shard: u64) -> u64 {
        let s = self.shard_size as u64;
        ((shard + 1) * s).min(self.total_samples) - (shard * s).min(self.total_samples)
    }
    pub fn shard_sample_ids(&self, shard: u64) -> Vec<String> {
        let s = self.shard_size as u64;
        ((shard * s).min(self.total_samples)..((shard + 1) * s).min(self.total_samples))
            .map(|i| ids::sample_id(self.seed, i))
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FailureRecord {
    pub campaign_id: String,
    pub shard_id: String,
    /// the sample that failed, when the failure belongs to one sample
    pub sample_id: Option<String>,
    pub sample_index: Option<u64>,
    /// the input that caused it, if any
    pub input_uri: Option<String>,
    pub cause: String,
    /// "permanent" (bad input) or "exhausted" (transient failures past the delivery limit)
    pub class: String,
    pub worker_id: String,
    pub deliveries: u64,
    pub at: DateTime<Utc>,
}

pub async fn read_record(
    store: &dyn ObjectStore,
    cid: &str,
) -> Result<CampaignRecord, LedgerError> {
    if !ids::is_safe_campaign_id(cid) {
        return Err(LedgerError::UnknownCampaign {
            id: cid.to_string(),
            store: store.root_uri(),
        });
    }
    let key = layout::campaign_record(cid);
    let bytes = match store.get(&key).await {
        Ok(b) => b,
        Err(StoreError::NotFound { .. }) => {
            return Err(LedgerError::UnknownCampaign {
                id: cid.to_string(),
                store: store.root_uri(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&bytes).map_err(|e| LedgerError::CorruptRecord {
        uri: store.uri(&key),
        reason: e.to_string(),
    })
}

pub async fn write_record(
    store: &dyn ObjectStore,
    rec: &CampaignRecord,
) -> Result<(), LedgerError> {
    let body = serde_json::to_vec_pretty(rec).expect("record serializes");
    store
        .put(
            &layout::campaign_record(&rec.campaign_id),
            Bytes::from(body),
            "application/json",
        )
        .await?;
    Ok(())
}

/// Lists committed fragments by shard: shard id → attempts (sorted, earliest first).
pub async fn fragments(
    store: &dyn ObjectStore,
    cid: &str,
) -> Result<BTreeMap<String, Vec<ObjectMeta>>, LedgerError> {
    let mut out: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
    for m in store.list(&layout::shards_prefix(cid)).await? {
        if let Some((shard, _)) = layout::parse_fragment_key(cid, &m.key) {
            out.entry(shard.to_string()).or_default().push(m);
        }
    }
    for v in out.values_mut() {
        v.sort_by(|a, b| a.key.cmp(&b.key));
    }
    Ok(out)
}

pub async fn failures(
    store: &dyn ObjectStore,
    cid: &str,
) -> Result<Vec<FailureRecord>, LedgerError> {
    let mut out = vec![];
    for m in store.list(&layout::failures_prefix(cid)).await? {
        let b = store.get(&m.key).await?;
        match serde_json::from_slice::<FailureRecord>(&b) {
            Ok(f) => out.push(f),
            Err(e) => tracing::warn!(
                "ignoring unreadable failure record {}: {e}",
                store.uri(&m.key)
            ),
        }
    }
    Ok(out)
}

pub async fn is_cancelled(store: &dyn ObjectStore, cid: &str) -> Result<bool, StoreError> {
    Ok(store.head(&layout::cancelled_marker(cid)).await?.is_some())
}

pub async fn cancel(store: &dyn ObjectStore, cid: &str, reason: &str) -> Result<(), LedgerError> {
    read_record(store, cid).await?;
    let body =
        serde_json::json!({"campaign_id": cid, "cancelled_at": Utc::now(), "reason": reason});
    store
        .put(
            &layout::cancelled_marker(cid),
            Bytes::from(body.to_string()),
            "application/json",
        )
        .await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub campaign_id: String,
    pub plan_digest: String,
    /// planned samples
    pub planned: u64,
    pub planned_shards: u64,
    /// samples in shards with a valid commit (verified: a fragment holding exactly the shard's
    /// planned samples, every object it names present with its size), or, when not verified,
    /// with any fragment
    pub committed: u64,
    pub committed_shards: u64,
    /// whether `committed` was verified (status reads every fragment and lists every object)
    pub verified: bool,
    /// shards whose every committed attempt is invalid, with the reason of the last one
    pub invalid: Vec<(String, String)>,
    /// samples in shards that were dead-lettered (and not committed since)
    pub failed: u64,
    /// dead-lettered shards (failure records of uncommitted shards)
    pub dead: u64,
    /// samples neither committed nor failed
    pub pending: u64,
    pub cancelled: bool,
    /// rows in the finalized manifest, if finalized
    pub finalized_rows: Option<u64>,
    /// whether the finalized manifest holds every planned sample
    pub finalized_complete: Option<bool>,
    pub failures: Vec<FailureRecord>,
}

/// The valid commits of a campaign, checked as finalize checks them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Commits {
    /// shard number → the attempt that is valid (the earliest, or the one finalize chose)
    pub valid: BTreeMap<u64, String>,
    /// shard id → (attempt key, reason) of every rejected attempt
    pub rejected: Vec<(String, String)>,
}

/// Reads every fragment and lists every object: which shards hold a valid commit.
pub async fn verified_commits(
    store: &dyn ObjectStore,
    rec: &CampaignRecord,
) -> Result<Commits, LedgerError> {
    let cid = &rec.campaign_id;
    let frags = fragments(store, cid).await?;
    let objects = Arc::new(object_sizes(store, cid).await?);
    let prefer = previous_index(store, cid)
        .await
        .map(|m| m.chosen)
        .unwrap_or_default();
    let mut stream = Box::pin(choose_all(store, rec, frags, Some(objects), &prefer).await);
    let mut out = Commits::default();
    while let Some(c) = stream.next().await {
        let c = c?;
        out.rejected.extend(c.rejected);
        if let Some((attempt, _)) = c.attempt {
            if let Ok(i) = c.shard.parse::<u64>() {
                out.valid.insert(i, attempt);
            }
        }
    }
    Ok(out)
}

/// Whether one shard holds a valid commit (what a worker checks before skipping a job as
/// done): a fragment with exactly the planned samples whose objects all exist with their sizes.
pub async fn shard_committed(
    store: &dyn ObjectStore,
    rec: &CampaignRecord,
    shard: u64,
) -> Result<bool, LedgerError> {
    let cid = &rec.campaign_id;
    let sid = ids::shard_id(shard);
    let attempts = store
        .list(&format!("{}{sid}/", layout::shards_prefix(cid)))
        .await?;
    if attempts.is_empty() {
        return Ok(false);
    }
    let mut objects = HashMap::new();
    for id in rec.shard_sample_ids(shard) {
        for m in store
            .list(&format!("{}{id}/", layout::samples_prefix(cid)))
            .await?
        {
            objects.insert(m.key, m.size);
        }
    }
    let c = choose_one(
        store,
        rec,
        shard,
        attempts,
        Some(Arc::new(objects)),
        Arc::new(store.root_uri()),
    )
    .await?;
    Ok(c.attempt.is_some())
}

/// The campaign's status. `verify` reads every fragment and lists every object (the truth
/// finalize will find); without it, any fragment counts as a commit (a quick listing).
pub async fn status(
    store: &dyn ObjectStore,
    cid: &str,
    verify: bool,
) -> Result<Status, LedgerError> {
    let rec = read_record(store, cid).await?;
    let frags = fragments(store, cid).await?;
    let (valid, invalid): (Vec<u64>, Vec<(String, String)>) = if verify {
        let c = verified_commits(store, &rec).await?;
        let mut invalid: BTreeMap<String, String> = BTreeMap::new();
        for (key, reason) in c.rejected {
            if let Some((shard, _)) = layout::parse_fragment_key(cid, &key) {
                if shard
                    .parse::<u64>()
                    .is_ok_and(|i| !c.valid.contains_key(&i))
                {
                    invalid.insert(shard.to_string(), reason);
                }
            }
        }
        (c.valid.into_keys().collect(), invalid.into_iter().collect())
    } else {
        (
            frags
                .keys()
                .filter_map(|s| s.parse::<u64>().ok())
                .filter(|&i| i < rec.shard_count)
                .collect(),
            vec![],
        )
    };
    let valid_ids: HashSet<String> = valid.iter().map(|&i| ids::shard_id(i)).collect();
    let committed: u64 = valid.iter().map(|&i| rec.shard_len(i)).sum();
    let fails: Vec<FailureRecord> = failures(store, cid)
        .await?
        .into_iter()
        .filter(|f| !valid_ids.contains(&f.shard_id))
        .collect();
    let failed: u64 = fails
        .iter()
        .filter_map(|f| f.shard_id.parse::<u64>().ok())
        .map(|i| rec.shard_len(i))
        .sum();
    let index = match store.get(&layout::manifest_index(cid)).await {
        Ok(b) => serde_json::from_slice::<ManifestIndex>(&b).ok(),
        Err(StoreError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    Ok(Status {
        campaign_id: cid.to_string(),
        plan_digest: rec.plan_digest.clone(),
        planned: rec.total_samples,
        planned_shards: rec.shard_count,
        committed,
        committed_shards: valid.len() as u64,
        verified: verify,
        invalid,
        failed,
        dead: fails.len() as u64,
        pending: rec.total_samples.saturating_sub(committed + failed),
        cancelled: is_cancelled(store, cid).await?,
        finalized_rows: index.as_ref().map(|m| m.rows),
        finalized_complete: index.as_ref().map(|m| m.missing_shards.is_empty()),
        failures: fails,
    })
}

/// Shards (by index) without a valid commit (verified as `status` verifies).
pub async fn uncommitted_shards(
    store: &dyn ObjectStore,
    rec: &CampaignRecord,
) -> Result<Vec<u64>, LedgerError> {
    let c = verified_commits(store, rec).await?;
    Ok((0..rec.shard_count)
        .filter(|i| !c.valid.contains_key(i))
        .collect())
}

/// What finalize wrote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestIndex {
    pub campaign_id: String,
    pub plan_digest: String,
    pub rows: u64,
    pub parts: Vec<String>,
    /// shard id → the attempt whose rows are in the manifest
    pub chosen: BTreeMap<String, String>,
    /// planned shards without a valid committed attempt (only with `--allow-partial`)
    pub missing_shards: Vec<String>,
    /// planned samples; `rows` equals it exactly when the manifest is complete
    #[serde(default)]
    pub planned_rows: u64,
    /// every planned sample is in the manifest
    #[serde(default)]
    pub complete: bool,
    /// committed attempts not used (duplicates from redelivery or concurrent runs)
    pub unused_attempts: u64,
    /// attempts rejected as invalid, with the reason
    pub rejected_attempts: Vec<(String, String)>,
    /// what the mask sources and the foreground constraint did, over all rows
    #[serde(default)]
    pub masks: manifest::MaskSummary,
    pub finalized_at: DateTime<Utc>,
}

struct Chosen {
    shard: String,
    attempt: Option<(String, Vec<RecordBatch>)>,
    unused: u64,
    rejected: Vec<(String, String)>,
}

fn key_of<'a>(root: &str, uri: &'a str) -> Option<&'a str> {
    uri.strip_prefix(root)?.strip_prefix('/')
}

/// Picks, for every planned shard, the earliest committed attempt that is valid: readable, of
/// this campaign, holding exactly the shard's planned sample ids once each, and (when
/// `objects` is given) naming objects that exist with the recorded sizes. Results come in
/// shard order.
async fn choose_all<'a>(
    store: &'a dyn ObjectStore,
    rec: &'a CampaignRecord,
    frags: BTreeMap<String, Vec<ObjectMeta>>,
    objects: Option<Arc<HashMap<String, u64>>>,
    prefer: &'a BTreeMap<String, String>,
) -> impl futures_util::Stream<Item = Result<Chosen, LedgerError>> + 'a {
    let root = store.root_uri();
    let root = std::sync::Arc::new(root);
    futures_util::stream::iter(0..rec.shard_count)
        .map(move |i| {
            let shard = ids::shard_id(i);
            let mut attempts = frags.get(&shard).cloned().unwrap_or_default();
            // a previously chosen attempt stays chosen while it is valid
            if let Some(p) = prefer.get(&shard) {
                if let Some(pos) = attempts.iter().position(|m| {
                    layout::parse_fragment_key(&rec.campaign_id, &m.key).map(|x| x.1)
                        == Some(p.as_str())
                }) {
                    let m = attempts.remove(pos);
                    attempts.insert(0, m);
                }
            }
            let root = root.clone();
            let objects = objects.clone();
            choose_one(store, rec, i, attempts, objects, root)
        })
        .buffered(READ_CONCURRENCY)
}

/// Picks the first valid attempt of shard `i` among `attempts` (in preference order).
async fn choose_one(
    store: &dyn ObjectStore,
    rec: &CampaignRecord,
    i: u64,
    attempts: Vec<ObjectMeta>,
    objects: Option<Arc<HashMap<String, u64>>>,
    root: Arc<String>,
) -> Result<Chosen, LedgerError> {
    let shard = ids::shard_id(i);
    let want: Arc<Vec<String>> = Arc::new(rec.shard_sample_ids(i));
    let mut rejected = vec![];
    let n = attempts.len() as u64;
    for m in attempts {
        let attempt = layout::parse_fragment_key(&rec.campaign_id, &m.key)
            .map(|x| x.1.to_string())
            .unwrap_or_default();
        let bytes = match store.get(&m.key).await {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        // Decoding and checking are CPU work: off the async threads, in parallel.
        let (uri, cid, shard2, want2, root2, objs) = (
            store.uri(&m.key),
            rec.campaign_id.clone(),
            shard.clone(),
            want.clone(),
            root.clone(),
            objects.clone(),
        );
        let checked = tokio::task::spawn_blocking(move || {
            let batches = manifest::read_batches(bytes, &uri).map_err(|e| e.to_string())?;
            validate(&batches, &cid, &shard2, &want2, &root2, objs.as_deref())?;
            Ok::<_, String>(batches)
        })
        .await
        .unwrap_or_else(|e| Err(format!("checking panicked: {e}")));
        let batches = match checked {
            Ok(b) => b,
            Err(reason) => {
                rejected.push((m.key.clone(), reason));
                continue;
            }
        };
        return Ok(Chosen {
            shard,
            attempt: Some((attempt, batches)),
            unused: n - 1,
            rejected,
        });
    }
    Ok(Chosen {
        shard,
        attempt: None,
        unused: 0,
        rejected,
    })
}

fn validate(
    batches: &[RecordBatch],
    campaign_id: &str,
    shard: &str,
    want: &[String],
    root: &str,
    objects: Option<&HashMap<String, u64>>,
) -> Result<(), String> {
    let mut got = vec![];
    for b in batches {
        let sid = b
            .column_by_name("sample_id")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or("no sample_id column")?;
        let cid = b
            .column_by_name("campaign_id")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or("no campaign_id column")?;
        let shd = b
            .column_by_name("shard_id")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or("no shard_id column")?;
        for i in 0..b.num_rows() {
            if cid.value(i) != campaign_id || shd.value(i) != shard {
                return Err(format!(
                    "row {i} belongs to {}/{}",
                    cid.value(i),
                    shd.value(i)
                ));
            }
            got.push(sid.value(i).to_string());
        }
        if let Some(objs) = objects {
            for (iu, is, mu, ms) in manifest::object_refs(b) {
                for (u, s) in [(iu, is), (mu, ms)] {
                    let k = key_of(root, u)
                        .ok_or_else(|| format!("{u} is outside the output store {root}"))?;
                    match objs.get(k) {
                        Some(sz) if *sz == s => {}
                        Some(sz) => return Err(format!("{u} has {sz} bytes, the row says {s}")),
                        None => return Err(format!("{u} is missing")),
                    }
                }
            }
        }
    }
    if got != want {
        return Err(format!(
            "holds {} rows that are not exactly the shard's {} planned samples",
            got.len(),
            want.len()
        ));
    }
    Ok(())
}

async fn object_sizes(
    store: &dyn ObjectStore,
    cid: &str,
) -> Result<HashMap<String, u64>, LedgerError> {
    Ok(store
        .list(&layout::samples_prefix(cid))
        .await?
        .into_iter()
        .map(|m| (m.key, m.size))
        .collect())
}

async fn previous_index(store: &dyn ObjectStore, cid: &str) -> Option<ManifestIndex> {
    let b = store.get(&layout::manifest_index(cid)).await.ok()?;
    serde_json::from_slice(&b).ok()
}

#[derive(Debug, Clone, Copy)]
pub struct FinalizeOptions {
    /// check that every object a row names exists with the recorded size
    pub verify_objects: bool,
    pub rows_per_part: usize,
    /// write the manifest even when shards have no valid commit (it says so: `complete`
    /// false, `missing_shards`); otherwise an incomplete campaign writes nothing and errors
    pub allow_partial: bool,
}

impl Default for FinalizeOptions {
    fn default() -> Self {
        Self {
            verify_objects: true,
            rows_per_part: ROWS_PER_PART,
            allow_partial: false,
        }
    }
}

/// Compacts the chosen attempt of every shard into `manifest/part-NNNNN.parquet` (zstd) and
/// writes `manifest/_manifest.json` last. Idempotent: re-running keeps earlier choices while
/// they stay valid, and removes parts a previous, larger run left behind.
pub async fn finalize(
    store: &dyn ObjectStore,
    cid: &str,
    opts: FinalizeOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ManifestIndex, LedgerError> {
    let rec = read_record(store, cid).await?;
    let frags = fragments(store, cid).await?;
    let incomplete = |missing: Vec<String>| LedgerError::Incomplete {
        id: cid.to_string(),
        store: store.root_uri(),
        missing: missing.len(),
        planned: rec.shard_count,
        first: missing.into_iter().take(5).collect(),
    };
    if !opts.allow_partial {
        // shards with no fragment at all: known from the listing, before anything is written
        let none: Vec<String> = (0..rec.shard_count)
            .map(ids::shard_id)
            .filter(|s| !frags.contains_key(s))
            .collect();
        if !none.is_empty() {
            return Err(incomplete(
                none.into_iter()
                    .map(|s| format!("{s}: not committed"))
                    .collect(),
            ));
        }
    }
    let objects = if opts.verify_objects {
        Some(Arc::new(object_sizes(store, cid).await?))
    } else {
        None
    };
    let prefer = previous_index(store, cid)
        .await
        .map(|m| m.chosen)
        .unwrap_or_default();
    let mut stream = Box::pin(choose_all(store, &rec, frags, objects, &prefer).await);
    let mut index = ManifestIndex {
        campaign_id: cid.to_string(),
        plan_digest: rec.plan_digest.clone(),
        rows: 0,
        parts: vec![],
        chosen: BTreeMap::new(),
        missing_shards: vec![],
        planned_rows: rec.total_samples,
        complete: false,
        unused_attempts: 0,
        rejected_attempts: vec![],
        masks: manifest::MaskSummary::default(),
        finalized_at: Utc::now(),
    };
    // Batches are encoded on a blocking thread in chunks of about one row group, so encoding
    // overlaps with reading fragments and only one row group is held in memory.
    const CHUNK_ROWS: usize = 128 * 1024;
    let mut writer: Option<manifest::PartWriter> = None;
    let mut pending: Vec<RecordBatch> = vec![];
    let mut pending_rows = 0usize;
    let mut done = 0u64;
    async fn encode(
        w: Option<manifest::PartWriter>,
        batches: Vec<RecordBatch>,
    ) -> Result<manifest::PartWriter, LedgerError> {
        tokio::task::spawn_blocking(move || {
            let mut w = match w {
                Some(w) => w,
                None => manifest::PartWriter::new()?,
            };
            for b in &batches {
                w.write(b)?;
            }
            Ok(w)
        })
        .await
        .map_err(|e| LedgerError::Manifest(ManifestError::Write(e.to_string())))?
    }
    async fn flush_part(
        store: &dyn ObjectStore,
        cid: &str,
        n: usize,
        w: manifest::PartWriter,
    ) -> Result<String, LedgerError> {
        let body = tokio::task::spawn_blocking(move || w.finish())
            .await
            .map_err(|e| LedgerError::Manifest(ManifestError::Write(e.to_string())))??;
        let key = layout::manifest_part(cid, n);
        store
            .put(&key, Bytes::from(body), "application/vnd.apache.parquet")
            .await?;
        Ok(key)
    }
    while let Some(c) = stream.next().await {
        let c = c?;
        done += 1;
        progress(done, rec.shard_count);
        index.unused_attempts += c.unused;
        index.rejected_attempts.extend(c.rejected);
        match c.attempt {
            None => index.missing_shards.push(c.shard),
            Some((attempt, batches)) => {
                index.chosen.insert(c.shard, attempt);
                for b in batches {
                    index.masks.add_batch(&b);
                    pending_rows += b.num_rows();
                    index.rows += b.num_rows() as u64;
                    pending.push(b);
                }
                let in_part = writer.as_ref().map(|w| w.rows()).unwrap_or(0) + pending_rows;
                if pending_rows >= CHUNK_ROWS || in_part >= opts.rows_per_part {
                    let w = encode(writer.take(), std::mem::take(&mut pending)).await?;
                    pending_rows = 0;
                    if w.rows() >= opts.rows_per_part {
                        let n = index.parts.len();
                        index.parts.push(flush_part(store, cid, n, w).await?);
                    } else {
                        writer = Some(w);
                    }
                }
            }
        }
    }
    if pending_rows > 0 || writer.is_some() || index.parts.is_empty() {
        let w = encode(writer.take(), std::mem::take(&mut pending)).await?;
        let n = index.parts.len();
        index.parts.push(flush_part(store, cid, n, w).await?);
    }
    index.complete = index.missing_shards.is_empty() && index.rows == rec.total_samples;
    if !index.complete && !opts.allow_partial {
        // invalid commits found while reading: take back what this run wrote, and the index
        // of an earlier run, which is no longer true either
        for m in store.list(&layout::manifest_prefix(cid)).await? {
            store.delete(&m.key).await?;
        }
        let why: BTreeMap<&str, &str> = index
            .rejected_attempts
            .iter()
            .filter_map(|(k, r)| Some((layout::parse_fragment_key(cid, k)?.0, r.as_str())))
            .collect();
        return Err(incomplete(
            index
                .missing_shards
                .iter()
                .map(|s| match why.get(s.as_str()) {
                    Some(r) => format!("{s}: {r}"),
                    None => format!("{s}: not committed"),
                })
                .collect(),
        ));
    }
    let keep: HashSet<&String> = index.parts.iter().collect();
    for m in store.list(&layout::manifest_prefix(cid)).await? {
        if m.key.ends_with(".parquet") && !keep.contains(&m.key) {
            store.delete(&m.key).await?;
        }
    }
    index.parts = index.parts.iter().map(|k| store.uri(k)).collect();
    index.finalized_at = Utc::now();
    store
        .put(
            &layout::manifest_index(cid),
            Bytes::from(serde_json::to_vec_pretty(&index).expect("index serializes")),
            "application/json",
        )
        .await?;
    Ok(index)
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GcReport {
    pub deleted_objects: u64,
    pub deleted_fragments: u64,
    pub deleted_bytes: u64,
    /// unreferenced objects younger than the shard time limit (an attempt may still be running)
    pub kept_young: u64,
    pub referenced: u64,
}

/// Deletes sample objects no chosen attempt references and fragments that were not chosen, when
/// older than the campaign's shard time limit (younger ones may belong to a running attempt).
pub async fn gc(
    store: &dyn ObjectStore,
    cid: &str,
    dry_run: bool,
    now: DateTime<Utc>,
) -> Result<GcReport, LedgerError> {
    let rec = read_record(store, cid).await?;
    let frags = fragments(store, cid).await?;
    let all_frags: Vec<ObjectMeta> = frags.values().flatten().cloned().collect();
    let objects_list = store.list(&layout::samples_prefix(cid)).await?;
    let objects: Arc<HashMap<String, u64>> = Arc::new(
        objects_list
            .iter()
            .map(|m| (m.key.clone(), m.size))
            .collect(),
    );
    let prefer = previous_index(store, cid)
        .await
        .map(|m| m.chosen)
        .unwrap_or_default();
    let root = store.root_uri();
    let mut referenced: HashSet<String> = HashSet::new();
    let mut chosen_keys: HashSet<String> = HashSet::new();
    let mut stream = Box::pin(choose_all(store, &rec, frags, Some(objects), &prefer).await);
    while let Some(c) = stream.next().await {
        let c = c?;
        if let Some((attempt, batches)) = c.attempt {
            chosen_keys.insert(layout::fragment(cid, &c.shard, &attempt));
            for b in &batches {
                for (iu, _, mu, _) in manifest::object_refs(b) {
                    for u in [iu, mu] {
                        if let Some(k) = key_of(&root, u) {
                            referenced.insert(k.to_string());
                        }
                    }
                }
            }
        }
    }
    let cutoff = now - chrono::Duration::seconds(rec.shard_time_limit_s as i64);
    let mut rep = GcReport {
        referenced: referenced.len() as u64,
        ..Default::default()
    };
    for m in objects_list {
        if referenced.contains(&m.key) {
            continue;
        }
        if m.last_modified > cutoff {
            rep.kept_young += 1;
            continue;
        }
        if !dry_run {
            store.delete(&m.key).await?;
        }
        rep.deleted_objects += 1;
        rep.deleted_bytes += m.size;
    }
    for m in all_frags {
        if chosen_keys.contains(&m.key) {
            continue;
        }
        if m.last_modified > cutoff {
            rep.kept_young += 1;
            continue;
        }
        if !dry_run {
            store.delete(&m.key).await?;
        }
        rep.deleted_fragments += 1;
        rep.deleted_bytes += m.size;
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    async fn setup(st: &LocalStore, total: u64, shard_size: u32) -> CampaignRecord {
        let spec = Campaign::parse(
            &format!("name = \"t\"\nseed = 1\nshard_size = {shard_size}\noutput = \"/o\"\n[dataset]\nsource = \"/d\"\n[categories.c.defects.d]\ncount = {total}\n"),
            std::path::Path::new("/"),
            "t.toml",
        )
        .unwrap();
        let rec = CampaignRecord {
            campaign_id: "c-1".into(),
            plan_digest: "0".repeat(64),
            plan_version: 1,
            total_samples: total,
            shard_count: total.div_ceil(shard_size as u64),
            shard_size,
            shard_time_limit_s: 60,
            seed: 1,
            created_at: Utc::now(),
            counts: vec![],
            spec,
            inputs: None,
        };
        write_record(st, &rec).await.unwrap();
        rec
    }

    fn rows(rec: &CampaignRecord, shard: u64, attempt: &str) -> Vec<crate::manifest::ManifestRow> {
        let s = rec.shard_size as u64;
        (shard * s..((shard + 1) * s).min(rec.total_samples))
            .map(|i| {
                let mut r = crate::manifest::example_row(i);
                r.sample_id = ids::sample_id(1, i);
                r.shard_id = ids::shard_id(shard);
                r.attempt = attempt.into();
                r
            })
            .collect()
    }

    #[tokio::test]
    async fn finalize_rolls_parts_keeps_one_attempt_and_reports_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let st = LocalStore::new(dir.path());
        let rec = setup(&st, 50, 4).await; // 13 shards
        for shard in 0..rec.shard_count {
            if shard == 7 {
                continue; // never committed
            }
            for attempt in ["0001-a", "0002-b"] {
                let body = crate::manifest::write_parquet(&rows(&rec, shard, attempt)).unwrap();
                st.put(
                    &layout::fragment("c-1", &ids::shard_id(shard), attempt),
                    Bytes::from(body),
                    "x",
                )
                .await
                .unwrap();
            }
        }
        // a fragment with the wrong samples is rejected in favour of the valid later attempt
        let wrong = crate::manifest::write_parquet(&rows(&rec, 2, "0000-z")[..2]).unwrap();
        st.put(
            &layout::fragment("c-1", &ids::shard_id(2), "0000-z"),
            Bytes::from(wrong),
            "x",
        )
        .await
        .unwrap();
        let opts = FinalizeOptions {
            verify_objects: false,
            rows_per_part: 10,
            allow_partial: false,
        };
        let e = finalize(&st, "c-1", opts, &|_, _| {}).await.unwrap_err();
        assert!(
            matches!(&e, LedgerError::Incomplete { missing: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("defectforge resume c-1"), "{e}");
        assert!(st
            .list(&layout::manifest_prefix("c-1"))
            .await
            .unwrap()
            .is_empty());
        let opts = FinalizeOptions {
            allow_partial: true,
            ..opts
        };
        let idx = finalize(&st, "c-1", opts, &|_, _| {}).await.unwrap();
        assert!(!idx.complete);
        assert_eq!((idx.rows, idx.planned_rows), (46, 50));
        assert_eq!(idx.rows, 46);
        assert_eq!(idx.missing_shards, vec![ids::shard_id(7)]);
        assert_eq!(idx.unused_attempts, 11 + 2); // every committed attempt not chosen, the rejected one included
        assert_eq!(idx.rejected_attempts.len(), 1);
        assert!(idx.chosen.values().all(|a| a == "0001-a"));
        assert!(idx.parts.len() >= 4, "{:?}", idx.parts);
        let mut all = vec![];
        for p in &idx.parts {
            let key = p.strip_prefix(&format!("{}/", st.root_uri())).unwrap();
            all.extend(crate::manifest::read_rows(st.get(key).await.unwrap(), p).unwrap());
        }
        let mut ids_seen: Vec<_> = all.iter().map(|r| r.sample_index).collect();
        ids_seen.sort();
        ids_seen.dedup();
        assert_eq!(ids_seen.len(), 46);
        // a second finalize with bigger parts removes the stale extra parts
        let idx2 = finalize(
            &st,
            "c-1",
            FinalizeOptions {
                verify_objects: false,
                rows_per_part: 1000,
                allow_partial: true,
            },
            &|_, _| {},
        )
        .await
        .unwrap();
        assert_eq!((idx2.rows, idx2.parts.len()), (46, 1));
        assert_eq!(
            st.list(&layout::manifest_prefix("c-1"))
                .await
                .unwrap()
                .len(),
            2
        ); // part + index
        assert_eq!(idx2.chosen, idx.chosen);
    }
}
