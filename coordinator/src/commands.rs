//! The coordinator's commands. Each validates everything it can before it touches a service and
//! writes nothing when a check fails.

use crate::embedded::{run_in_process, EMBEDDED_DELIVERY_LIMIT};
use crate::CampaignRef;
use anyhow::{anyhow, bail, Context, Result};
use defectforge::campaign::Campaign;
use defectforge::job::Job;
use defectforge::ledger::{self, CampaignRecord, FinalizeOptions};
use defectforge::plan::Plan;
use defectforge::queue::{redact_url, AmqpQueue, InProcQueue, JobQueue};
use defectforge::store::{self, ObjectStore, S3Config};
use defectforge::{dataset, demo, ids, layout};
use defectforge_worker::cli::AmqpArgs;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::info;

/// Shards published per batch of confirms.
const PUBLISH_CHUNK: u64 = 512;

fn bar(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} ({{per_sec}}, ETA {{eta}})"
        ))
        .expect("template"),
    );
    pb
}

/// Loads, validates and plans a campaign (materialising the demo dataset when asked).
pub async fn load_plan(
    path: &Path,
    s3: &S3Config,
    output_override: Option<String>,
) -> Result<Plan> {
    Ok(load_planned(path, s3, output_override).await?.0)
}

/// [`load_plan`] and the record it is committed as, checked as a worker will check it (every
/// input under the campaign's input roots), so that a bad record is never written.
async fn load_planned(
    path: &Path,
    s3: &S3Config,
    output_override: Option<String>,
) -> Result<(Plan, CampaignRecord)> {
    let mut c = Campaign::load(path)?;
    if let Some(o) = output_override {
        c.output = defectforge::campaign::resolve_location(&std::env::current_dir()?, &o);
    }
    if c.dataset.demo {
        demo::ensure(Path::new(&c.dataset.source))
            .with_context(|| format!("materialising the demo dataset in {}", c.dataset.source))?;
    }
    let inputs = dataset::resolve(&c, s3)
        .await
        .map_err(|e| anyhow!("campaign {}: {e}", path.display()))?;
    let plan = Plan::new(c, &inputs);
    let rec = CampaignRecord::of(&plan, &inputs);
    rec.plan(&path.display().to_string())
        .map_err(|e| anyhow!("{e}"))?;
    Ok((plan, rec))
}

async fn open_output(location: &str, s3: &S3Config) -> Result<Arc<dyn ObjectStore>> {
    let st = store::open(location, s3).await?;
    st.check()
        .await
        .with_context(|| format!("checking the output store {location}"))?;
    Ok(st)
}

/// Resolves a campaign reference to its store and id.
async fn resolve_ref(c: &CampaignRef, s3: &S3Config) -> Result<(Arc<dyn ObjectStore>, String)> {
    let p = Path::new(&c.campaign);
    if c.campaign.ends_with(".toml") || p.is_file() {
        let plan = load_plan(p, s3, c.output.clone()).await?;
        let st = open_output(&plan.campaign.output, s3).await?;
        return Ok((st, plan.campaign_id));
    }
    let output = c.output.clone().ok_or_else(|| {
        anyhow!("--output (or DEFECTFORGE_OUTPUT) must name the campaign's output location when a campaign id is given")
    })?;
    if !ids::is_safe_campaign_id(&c.campaign) {
        bail!(
            "{:?} is neither a campaign file nor a campaign id (ids look like name-0123456789ab)",
            c.campaign
        );
    }
    Ok((open_output(&output, s3).await?, c.campaign.clone()))
}

pub async fn plan(path: &Path, json: bool, s3: &S3Config) -> Result<i32> {
    let p = load_plan(path, s3, None).await?;
    if json {
        let v = serde_json::json!({
            "campaign_id": p.campaign_id,
            "plan_digest": p.digest,
            "samples": p.total_samples,
            "shards": p.shard_count,
            "shard_size": p.campaign.shard_size,
            "shard_time_limit_s": p.campaign.shard_time_limit_s,
            "output": p.campaign.output,
            "counts": p.counts().iter().map(|(c, d, n)| serde_json::json!({"category": c, "defect_type": d, "count": n})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("campaign    {}", p.campaign_id);
        println!("digest      {}", p.digest);
        println!("samples     {}", p.total_samples);
        println!(
            "shards      {} of up to {} samples",
            p.shard_count, p.campaign.shard_size
        );
        println!("output      {}", p.campaign.output);
        for ((c, d, n), spec) in p.counts().iter().zip(
            p.campaign
                .categories
                .values()
                .flat_map(|c| c.defects.values()),
        ) {
            println!(
                "  {c}/{d}: {n} samples, generator {}, masks {}",
                spec.generator,
                spec.mask.as_str()
            );
        }
    }
    Ok(0)
}

async fn publish_shards(q: &dyn JobQueue, plan: &Plan, shards: &[u64]) -> Result<u64> {
    let pb = bar(shards.len() as u64, "publishing");
    let mut done = 0u64;
    for chunk in shards.chunks(PUBLISH_CHUNK as usize) {
        let bodies: Vec<Vec<u8>> = chunk
            .iter()
            .map(|&s| Job::Generate(plan.job(s)).to_bytes())
            .collect();
        q.publish(bodies).await.map_err(|e| {
            anyhow!(
                "{e}; {done} of {} shards were published before the failure — run `defectforge resume {}` once the broker is back",
                shards.len(),
                plan.campaign_id
            )
        })?;
        done += chunk.len() as u64;
        pb.set_position(done);
        if done.is_multiple_of(PUBLISH_CHUNK * 20) {
            info!("published {done}/{} shards", shards.len());
        }
    }
    pb.finish_and_clear();
    Ok(done)
}

pub async fn submit(path: &Path, amqp: &AmqpArgs, s3: &S3Config) -> Result<i32> {
    let (plan, rec) = load_planned(path, s3, None).await?;
    let st = open_output(&plan.campaign.output, s3).await?;
    // Connect before writing anything, so an unreachable broker leaves no trace.
    let q = AmqpQueue::connect(amqp.config("defectforge-coordinator")).await?;
    match ledger::read_record(st.as_ref(), &plan.campaign_id).await {
        Ok(_) => bail!(
            "campaign {} was already submitted to {}; run `defectforge resume {} --output {}` to publish its uncommitted shards",
            plan.campaign_id,
            plan.campaign.output,
            plan.campaign_id,
            plan.campaign.output
        ),
        Err(ledger::LedgerError::UnknownCampaign { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    ledger::write_record(st.as_ref(), &rec).await?;
    let shards: Vec<u64> = (0..plan.shard_count).collect();
    let t = Instant::now();
    publish_shards(&q, &plan, &shards).await?;
    q.close().await;
    eprintln!(
        "submitted {} samples in {} shards to {} (queue {}) in {:.1} s; results go to {}",
        plan.total_samples,
        plan.shard_count,
        redact_url(&amqp.amqp_url),
        amqp.queue,
        t.elapsed().as_secs_f64(),
        plan.campaign.output
    );
    println!("{}", plan.campaign_id);
    Ok(0)
}

pub async fn status(c: &CampaignRef, json: bool, verify: bool, s3: &S3Config) -> Result<i32> {
    let (st, cid) = resolve_ref(c, s3).await?;
    let s = ledger::status(st.as_ref(), &cid, verify).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(0);
    }
    println!(
        "campaign   {}{}",
        s.campaign_id,
        if s.cancelled { " (cancelled)" } else { "" }
    );
    println!(
        "planned    {} samples in {} shards",
        s.planned, s.planned_shards
    );
    println!(
        "committed  {} samples ({} shards{})",
        s.committed,
        s.committed_shards,
        if s.verified {
            ", verified"
        } else {
            ", unverified: --quick"
        }
    );
    if !s.invalid.is_empty() {
        println!(
            "invalid    {} shards whose commits are not valid (resume regenerates them):",
            s.invalid.len()
        );
        for (shard, why) in s.invalid.iter().take(10) {
            println!("  shard {shard}: {why}");
        }
    }
    println!(
        "failed     {} samples ({} dead-lettered shards)",
        s.failed, s.dead
    );
    println!("pending    {} samples", s.pending);
    match (s.finalized_rows, s.finalized_complete) {
        (Some(n), Some(true)) => println!("manifest   {n} rows (complete)"),
        (Some(n), _) => println!("manifest   {n} rows (PARTIAL: finalized with --allow-partial)"),
        (None, _) => println!("manifest   not finalized"),
    }
    for f in &s.failures {
        println!(
            "  shard {} [{}]: {}{}",
            f.shard_id,
            f.class,
            f.cause,
            f.input_uri
                .as_ref()
                .map(|u| format!(" (input {u})"))
                .unwrap_or_default()
        );
    }
    if !s.failures.is_empty() {
        println!(
            "fix the inputs, then run `defectforge requeue-dead {} --output {}`",
            s.campaign_id,
            st.root_uri()
        );
    }
    Ok(0)
}

pub async fn watch(
    c: &CampaignRef,
    interval_s: f64,
    timeout_s: Option<u64>,
    s3: &S3Config,
) -> Result<i32> {
    let (st, cid) = resolve_ref(c, s3).await?;
    let first = ledger::status(st.as_ref(), &cid, false).await?;
    let pb = bar(first.planned, "samples");
    let tty = std::io::stderr().is_terminal();
    let t0 = Instant::now();
    let start_committed = first.committed;
    loop {
        // polls list (cheap); the end is decided on a verified status, as finalize will see it
        let mut s = ledger::status(st.as_ref(), &cid, false).await?;
        if s.pending == 0 || s.cancelled {
            s = ledger::status(st.as_ref(), &cid, true).await?;
        }
        pb.set_position(s.committed);
        if !tty {
            let rate = (s.committed - start_committed.min(s.committed)) as f64
                / t0.elapsed().as_secs_f64().max(1e-3);
            let left = s.pending as f64 / rate.max(1e-9);
            eprintln!(
                "{cid}: {}/{} committed, {} failed, {:.1} samples/s, ETA {}",
                s.committed,
                s.planned,
                s.failed,
                rate,
                if rate > 0.0 {
                    format!("{left:.0} s")
                } else {
                    "unknown".into()
                }
            );
        }
        if (s.pending == 0 && s.invalid.is_empty()) || s.cancelled {
            pb.finish_and_clear();
            eprintln!(
                "{cid}: {} committed, {} failed{}",
                s.committed,
                s.failed,
                if s.cancelled { " (cancelled)" } else { "" }
            );
            return Ok(if s.failed == 0 && !s.cancelled { 0 } else { 1 });
        }
        if !s.invalid.is_empty() && s.pending > 0 {
            let (shard, why) = &s.invalid[0];
            eprintln!(
                "{cid}: {} shards hold invalid commits (shard {shard}: {why}); run `defectforge resume {cid} --output {}` to regenerate them",
                s.invalid.len(),
                st.root_uri()
            );
        }
        if let Some(t) = timeout_s {
            if t0.elapsed() > Duration::from_secs(t) {
                pb.finish_and_clear();
                eprintln!("{cid}: still {} samples pending after {t} s", s.pending);
                return Ok(1);
            }
        }
        tokio::time::sleep(Duration::from_secs_f64(interval_s.max(0.05))).await;
    }
}

pub async fn resume(
    c: &CampaignRef,
    include_dead: bool,
    amqp: &AmqpArgs,
    s3: &S3Config,
) -> Result<i32> {
    let (st, cid) = resolve_ref(c, s3).await?;
    let rec = ledger::read_record(st.as_ref(), &cid).await?;
    if ledger::is_cancelled(st.as_ref(), &cid).await? {
        bail!("campaign {cid} is cancelled; nothing to resume");
    }
    // the work is what the record says, as the workers will derive it
    let plan = rec
        .plan(&st.uri(&layout::campaign_record(&cid)))
        .map_err(|e| anyhow!("{e}"))?;
    let mut shards = ledger::uncommitted_shards(st.as_ref(), &rec).await?;
    if !include_dead {
        let dead: std::collections::HashSet<String> = ledger::failures(st.as_ref(), &cid)
            .await?
            .into_iter()
            .map(|f| f.shard_id)
            .collect();
        shards.retain(|s| !dead.contains(&ids::shard_id(*s)));
    }
    let q = AmqpQueue::connect(amqp.config("defectforge-coordinator")).await?;
    let n = publish_shards(&q, &plan, &shards).await?;
    q.close().await;
    eprintln!("{cid}: published {n} shards without a valid commit");
    Ok(0)
}

pub async fn cancel(c: &CampaignRef, s3: &S3Config) -> Result<i32> {
    let (st, cid) = resolve_ref(c, s3).await?;
    ledger::cancel(st.as_ref(), &cid, "cancelled from the CLI").await?;
    eprintln!("{cid}: cancelled; workers will skip its remaining shards; `finalize --allow-partial` publishes what was committed");
    Ok(0)
}

pub async fn finalize(
    c: &CampaignRef,
    verify: bool,
    allow_partial: bool,
    s3: &S3Config,
) -> Result<i32> {
    let (st, cid) = resolve_ref(c, s3).await?;
    let rec = ledger::read_record(st.as_ref(), &cid).await?;
    let pb = bar(rec.shard_count, "shards");
    let t = Instant::now();
    let idx = match ledger::finalize(
        st.as_ref(),
        &cid,
        FinalizeOptions {
            verify_objects: verify,
            allow_partial,
            ..Default::default()
        },
        &|d, _| pb.set_position(d),
    )
    .await
    {
        Ok(i) => i,
        Err(e @ ledger::LedgerError::Incomplete { .. }) => {
            pb.finish_and_clear();
            eprintln!("defectforge: {e}");
            return Ok(2);
        }
        Err(e) => return Err(e.into()),
    };
    pb.finish_and_clear();
    if !idx.complete {
        eprintln!(
            "{cid}: PARTIAL manifest (--allow-partial): {} of {} planned rows; missing shards: {}",
            idx.rows,
            idx.planned_rows,
            idx.missing_shards
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    eprintln!(
        "{cid}: {} rows in {} part(s) in {:.1} s; {} shards missing, {} duplicate attempts ignored, {} invalid attempts rejected",
        idx.rows,
        idx.parts.len(),
        t.elapsed().as_secs_f64(),
        idx.missing_shards.len(),
        idx.unused_attempts,
        idx.rejected_attempts.len()
    );
    let m = &idx.masks;
    let (changed, checked) = m.interventions();
    if checked > 0 {
        eprintln!(
            "{cid}: foreground constraint changed {changed} of {checked} masks ({})",
            m.placement
                .iter()
                .filter(|(k, _)| k.as_str() != "off")
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if m.generated_masks > 0 {
        eprintln!(
            "{cid}: {} learned masks sampled on the fly in {} draws (rejection rate {:.1} %)",
            m.generated_masks,
            m.generated_draws,
            100.0 * m.rejection_rate()
        );
    }
    if m.thin_defects > 0 {
        eprintln!(
            "{cid}: {} masks vanish at AnomalyDiffusion's 32x32 latent grid (thin_defect = true)",
            m.thin_defects
        );
    }
    for p in &idx.parts {
        println!("{p}");
    }
    Ok(0)
}

pub async fn requeue_dead(c: &CampaignRef, amqp: &AmqpArgs, s3: &S3Config) -> Result<i32> {
    let (st, cid) = resolve_ref(c, s3).await?;
    ledger::read_record(st.as_ref(), &cid).await?;
    let q = AmqpQueue::connect(amqp.config("defectforge-coordinator")).await?;
    let moved_shards = std::sync::Mutex::new(vec![]);
    let cid2 = cid.clone();
    let n = q
        // a rejected message did not match the campaign's record: it is not the campaign's work
        .requeue_dead(&|d| match Job::from_bytes(&d.body) {
            Ok(Job::Generate(m))
                if m.campaign_id == cid2 && d.class.as_deref() != Some("rejected") =>
            {
                moved_shards.lock().expect("list").push(m.shard_id());
                true
            }
            _ => false,
        })
        .await?;
    q.close().await;
    for s in moved_shards.into_inner().expect("list") {
        st.delete(&layout::failure(&cid, &s)).await?;
    }
    eprintln!("{cid}: moved {n} dead-lettered shards back to the work queue");
    Ok(0)
}

pub async fn dead(json: bool, amqp: &AmqpArgs) -> Result<i32> {
    let q = AmqpQueue::connect(amqp.config("defectforge-coordinator")).await?;
    let dead = q.dead_letters().await?;
    q.close().await;
    let rows: Vec<serde_json::Value> = dead
        .iter()
        .map(|m| {
            let job = match Job::from_bytes(&m.body) {
                Ok(j) => serde_json::json!({"kind": j.kind().as_str(), "id": j.id()}),
                Err(_) => serde_json::json!({"unreadable": String::from_utf8_lossy(&m.body[..m.body.len().min(200)])}),
            };
            serde_json::json!({
                "job": job,
                "class": m.class.as_deref().unwrap_or("delivery limit (no reason recorded)"),
                "reason": m.reason,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{} dead-lettered job(s) in {}.dead", rows.len(), amqp.queue);
        for r in &rows {
            println!(
                "  {} [{}]: {}",
                r["job"]["id"].as_str().unwrap_or("(unreadable message)"),
                r["class"].as_str().unwrap_or(""),
                r["reason"].as_str().unwrap_or("-")
            );
        }
    }
    Ok(0)
}

pub async fn gc(c: &CampaignRef, dry_run: bool, s3: &S3Config) -> Result<i32> {
    let (st, cid) = resolve_ref(c, s3).await?;
    let r = ledger::gc(st.as_ref(), &cid, dry_run, chrono::Utc::now()).await?;
    eprintln!(
        "{cid}: {} {} unreferenced objects and {} unused fragments ({} bytes); kept {} younger than the shard time limit",
        if dry_run { "would delete" } else { "deleted" },
        r.deleted_objects,
        r.deleted_fragments,
        r.deleted_bytes,
        r.kept_young
    );
    println!("{}", serde_json::to_string(&r)?);
    Ok(0)
}

pub async fn run(
    path: &Path,
    workers: Option<usize>,
    output: Option<String>,
    s3: &S3Config,
) -> Result<i32> {
    if !crate::embedded::EMBEDDED {
        return Err(crate::embedded::not_embedded("`run`"));
    }
    let t0 = Instant::now();
    let (plan, new_rec) = load_planned(path, s3, output).await?;
    let st = open_output(&plan.campaign.output, s3).await?;
    let cid = plan.campaign_id.clone();
    match ledger::read_record(st.as_ref(), &cid).await {
        Ok(r) if r.plan_digest == plan.digest => info!("campaign {cid} exists; continuing it"),
        Ok(_) => bail!(
            "campaign {cid} exists in {} with a different plan",
            plan.campaign.output
        ),
        Err(ledger::LedgerError::UnknownCampaign { .. }) => {
            ledger::write_record(st.as_ref(), &new_rec).await?
        }
        Err(e) => return Err(e.into()),
    }
    let rec = ledger::read_record(st.as_ref(), &cid).await?;
    let todo = ledger::uncommitted_shards(st.as_ref(), &rec).await?;
    let q = InProcQueue::new(EMBEDDED_DELIVERY_LIMIT);
    publish_shards(&q, &plan, &todo).await?;
    let n = workers
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        })
        .max(1);
    eprintln!(
        "{cid}: generating {} samples in {} shards with {n} worker(s)",
        plan.total_samples,
        todo.len()
    );
    let pb = bar(plan.total_samples, "samples");
    let done_before = plan.total_samples - todo.iter().map(|&s| rec.shard_len(s)).sum::<u64>();
    run_in_process(
        q,
        n,
        defectforge_worker::models::default_cache_dir(),
        vec![plan.campaign.output.clone()],
        s3,
        &|done| pb.set_position(done_before + done),
    )
    .await?;
    pb.finish_and_clear();
    // what failed is reported below; the manifest holds what was made and says if it is partial
    let idx = ledger::finalize(
        st.as_ref(),
        &cid,
        FinalizeOptions {
            allow_partial: true,
            ..Default::default()
        },
        &|_, _| {},
    )
    .await?;
    let s = ledger::status(st.as_ref(), &cid, false).await?;
    eprintln!(
        "{cid}: {} samples in {:.1} s; manifest: {} rows in {}",
        idx.rows,
        t0.elapsed().as_secs_f64(),
        idx.rows,
        st.uri(&layout::manifest_prefix(&cid))
    );
    for f in &s.failures {
        eprintln!("  failed shard {}: {}", f.shard_id, f.cause);
    }
    for p in &idx.parts {
        println!("{p}");
    }
    Ok(if s.failed == 0 && idx.missing_shards.is_empty() {
        0
    } else {
        1
    })
}

/// `models import`: converts, checks and uploads a model; prints its URI (or the manifest).
#[cfg(not(feature = "embedded"))]
pub async fn models_import(
    _inputs: defectforge_worker::models::ImportInputs,
    _to: &str,
    _staging: &Path,
    _json: bool,
    _s3: &S3Config,
) -> Result<i32> {
    Err(crate::embedded::not_embedded("`models import`"))
}

/// `models import`: converts, checks and uploads a model; prints its URI (or the manifest).
#[cfg(feature = "embedded")]
pub async fn models_import(
    inputs: defectforge_worker::models::ImportInputs,
    to: &str,
    staging: &Path,
    json: bool,
    s3: &S3Config,
) -> Result<i32> {
    let t0 = Instant::now();
    eprintln!("importing into {to} (converting and checking every tensor; the full-size model takes minutes)");
    let (manifest, uri) = defectforge_worker::models::import(inputs, to, s3, staging)
        .await
        .context("model import failed")?;
    eprintln!(
        "imported {} ({} defect types: {}) in {:.1} s",
        manifest.id,
        manifest.defect_types.len(),
        manifest.defect_types.join(", "),
        t0.elapsed().as_secs_f64()
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else {
        println!("{uri}");
    }
    Ok(0)
}

/// A settings problem ("max_attempts must be …") as the flag that sets it
/// ("--max-attempts must be …").
fn as_flag(problem: &str) -> String {
    let key_len = problem
        .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
        .unwrap_or(problem.len());
    format!(
        "--{}{}",
        problem[..key_len].replace('_', "-"),
        &problem[key_len..]
    )
}

/// Publishes a bank run's uncommitted jobs and waits until each is committed or failed.
async fn run_bank_jobs(
    dest: &str,
    run: &defectforge_worker::masks::bank::BankRun,
    root: &dyn ObjectStore,
    how: &BankRunArgs,
    s3: &S3Config,
) -> Result<defectforge_worker::masks::bank::RunProgress> {
    use defectforge_worker::masks::bank;
    let before = bank::progress(root, run).await?;
    // chunks failed by an earlier run are retried
    for f in &before.failures {
        root.delete(&bank::failure_key(&run.run_id, &f.type_name, f.chunk))
            .await?;
    }
    let jobs: Vec<Vec<u8>> = before
        .pending
        .iter()
        .map(|(t, k)| Job::MaskBank(run.job(dest, t, *k)).to_bytes())
        .collect();
    eprintln!(
        "{}: drawing {} masks of {} type(s) in {} job(s){}",
        run.run_id,
        run.total() - before.masks,
        run.types.len(),
        jobs.len(),
        if how.submit.is_some() {
            " on the worker fleet"
        } else {
            ""
        }
    );
    let pb = bar(run.total(), "masks");
    pb.set_position(before.masks);
    let wait_store = || async {
        let deadline =
            (how.timeout_s > 0).then(|| Instant::now() + Duration::from_secs(how.timeout_s));
        loop {
            let p = bank::progress(root, run).await?;
            pb.set_position(p.masks);
            let failed =
                |t: &str, k: u64| p.failures.iter().any(|f| f.type_name == t && f.chunk == k);
            if p.pending.iter().all(|(t, k)| failed(t, *k)) {
                return Ok::<_, anyhow::Error>(p);
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                bail!(
                    "{}: {} of {} jobs still running after {} s; they stay queued — run the same command again to wait for them and complete the bank",
                    run.run_id,
                    p.pending.len(),
                    p.pending.len() + p.committed.len(),
                    how.timeout_s
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let done = match &how.submit {
        Some(amqp) => {
            if !jobs.is_empty() {
                let q = AmqpQueue::connect(amqp.config("defectforge-coordinator")).await?;
                q.publish(jobs).await.map_err(|e| {
                    anyhow!("{e}; run the same command again once the broker is back")
                })?;
                q.close().await;
            }
            wait_store().await?
        }
        None => {
            let q = InProcQueue::new(EMBEDDED_DELIVERY_LIMIT);
            q.publish(jobs).await?;
            run_in_process(
                q,
                how.workers,
                how.model_cache.clone(),
                vec![dest.to_string()],
                s3,
                &|done| pb.set_position(before.masks + done),
            )
            .await?;
            bank::progress(root, run).await?
        }
    };
    pb.finish_and_clear();
    Ok(done)
}

/// How `masks generate` runs a bank's jobs.
pub struct BankRunArgs {
    /// masks per job
    pub chunk: u64,
    /// publish to this broker for the fleet (otherwise embedded)
    pub submit: Option<AmqpArgs>,
    /// embedded: workers in this process
    pub workers: usize,
    /// --submit: seconds to wait (0: until done)
    pub timeout_s: u64,
    pub model_cache: std::path::PathBuf,
}

/// `masks generate`: samples (or completes) a mask bank through `mask_bank` jobs (embedded or
/// on the fleet) and reports the rejection rates.
pub async fn masks_generate(
    req: defectforge_worker::masks::bank::BankRequest,
    how: BankRunArgs,
    json: bool,
    s3: &S3Config,
) -> Result<i32> {
    let problems = req.settings.validate("");
    if !problems.is_empty() {
        bail!(
            "invalid mask-model settings:\n  {}",
            problems
                .iter()
                .map(|p| as_flag(p))
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
    use defectforge_worker::masks::bank;
    if how.submit.is_none() && !crate::embedded::EMBEDDED {
        return Err(crate::embedded::not_embedded(
            "`masks generate` without --submit",
        ));
    }
    let t0 = Instant::now();
    let (run, root) = bank::prepare(
        &req,
        s3,
        how.chunk,
        defectforge::campaign::DEFAULT_SHARD_TIME_LIMIT_S,
    )
    .await
    .context("mask bank generation failed")?;
    let provs = if run.total() == 0 {
        bank::provenances(root.as_ref(), &run).await?
    } else {
        let done = run_bank_jobs(&req.dest, &run, root.as_ref(), &how, s3).await?;
        // committed chunks join the bank even when others failed: nothing drawn is lost
        let provs = bank::merge(root.as_ref(), &run)
            .await
            .context("merging the bank's committed chunks failed (run the command again)")?;
        if !done.failures.is_empty() {
            let list: Vec<String> = done
                .failures
                .iter()
                .map(|f| format!("{} chunk {}: {}", f.type_name, f.chunk, f.cause))
                .collect();
            bail!(
                "mask bank generation failed (the masks drawn are in the bank; run again to complete it):\n  {}",
                list.join("\n  ")
            );
        }
        provs
    };
    for p in &provs {
        let thin = p.masks.iter().filter(|m| m.thin).count();
        let extra = p.masks.len() as u64 > req.count;
        if extra {
            eprintln!(
                "{}+{}: the bank already holds {} masks, more than --count {}; campaigns use all of them",
                p.category,
                p.defect_type,
                p.masks.len(),
                req.count
            );
        }
        eprintln!(
            "{}+{}: {} masks, {} draws, rejection rate {:.1} % ({} border, {} empty, {} thin rejected), {} thin kept",
            p.category,
            p.defect_type,
            p.masks.len(),
            p.stats.drawn,
            100.0 * p.rejection_rate,
            p.stats.rejected_border,
            p.stats.rejected_empty,
            p.stats.rejected_thin,
            thin
        );
    }
    eprintln!(
        "bank {} ready in {:.1} s",
        req.dest,
        t0.elapsed().as_secs_f64()
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&provs)?);
    } else {
        println!("{}", req.dest);
    }
    Ok(0)
}

/// `models show`: fetches and checks a model's manifest and prints it.
pub async fn models_show(model: &str, s3: &S3Config) -> Result<i32> {
    let st = defectforge::store::open(model.trim_end_matches('/'), s3).await?;
    let bytes = st
        .get(defectforge_worker::models::MANIFEST_FILE)
        .await
        .with_context(|| format!("{model} is not a model directory"))?;
    let m: defectforge_worker::models::ModelManifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("{model}/model.json is not a model manifest"))?;
    let (digest, _) = defectforge_worker::models::content_id(&m.files);
    if digest != m.digest {
        bail!("{model}/model.json: its digest does not match its file list");
    }
    println!("{}", serde_json::to_string_pretty(&m)?);
    Ok(0)
}

/// Loads a training spec, materialising the demo dataset when asked.
#[cfg(feature = "embedded")]
fn load_training_spec(path: &Path) -> Result<defectforge::training::TrainingSpec> {
    let spec = defectforge::training::TrainingSpec::load(path)?;
    if spec.demo {
        demo::ensure(Path::new(&spec.dataset_source))
            .with_context(|| format!("cannot write the demo dataset at {}", spec.dataset_source))?;
    }
    Ok(spec)
}

/// `train run`: trains (or resumes) on this machine; prints the model URI (or the result).
#[cfg(feature = "embedded")]
pub async fn train_run(
    path: &Path,
    stop_at: Option<u64>,
    model_cache: std::path::PathBuf,
    staging: std::path::PathBuf,
    json: bool,
    s3: &S3Config,
) -> Result<i32> {
    use defectforge_worker::training::{run_blocking, TrainError, TrainOptions};
    let spec = load_training_spec(path)?;
    let run_id = spec.run_id();
    // running it again is resuming it: an earlier cancel is lifted
    let out = store::open(&spec.output, s3).await?;
    let marker = defectforge::training::keys::cancelled(&run_id);
    if out.head(&marker).await?.is_some() {
        out.delete(&marker).await?;
        eprintln!("{run_id}: was cancelled; resuming");
    }
    let opts = TrainOptions {
        model_cache,
        staging,
        stop_at,
        progress: std::io::stderr().is_terminal(),
    };
    let t0 = Instant::now();
    let s3c = s3.clone();
    let rt = tokio::runtime::Handle::current();
    let outcome = tokio::task::spawn_blocking(move || {
        run_blocking(&spec, &s3c, &opts, &rt, |step, loss| {
            tracing::debug!(step, loss, "training step");
        })
    })
    .await
    .map_err(|e| anyhow!("training thread failed: {e}"))?;
    let o = match outcome {
        Ok(o) => o,
        Err(TrainError::Cancelled) => {
            eprintln!("{run_id}: cancelled; its last checkpoint is kept");
            return Ok(3);
        }
        Err(e) => return Err(anyhow!(e).context(format!("training run {run_id} failed"))),
    };
    match &o.result {
        Some(r) => {
            eprintln!(
                "{run_id}: trained {} steps (resumed from {}) in {:.1} s, final loss {:.5}; model {}",
                r.steps,
                o.resumed_from,
                t0.elapsed().as_secs_f64(),
                r.final_loss,
                r.model_id
            );
            if json {
                println!("{}", serde_json::to_string_pretty(r)?);
            } else {
                println!("{}", r.model);
            }
            Ok(0)
        }
        None => {
            eprintln!(
                "{run_id}: stopped at step {} as asked (resumed from {}); `train run` again continues",
                o.step, o.resumed_from
            );
            Ok(0)
        }
    }
}

/// `train run` without the engine.
#[cfg(not(feature = "embedded"))]
pub async fn train_run(
    _path: &Path,
    _stop_at: Option<u64>,
    _model_cache: std::path::PathBuf,
    _staging: std::path::PathBuf,
    _json: bool,
    _s3: &S3Config,
) -> Result<i32> {
    Err(crate::embedded::not_embedded("`train run`"))
}

/// `eval`: trains and scores the detectors of an evaluation spec on this machine; prints the
/// comparison table (or results.json with --json). Exit 0 when every detector was scored.
#[cfg(feature = "embedded")]
pub async fn eval(path: &Path, compare: Vec<String>, json: bool, s3: &S3Config) -> Result<i32> {
    let mut spec = defectforge::evaluation::EvalSpec::load(path)?;
    if !compare.is_empty() {
        let cwd = std::env::current_dir()?;
        spec.campaigns = compare
            .iter()
            .map(|c| {
                if c.starts_with("s3://") || Path::new(c).is_absolute() {
                    c.trim_end_matches('/').to_string()
                } else {
                    cwd.join(c).display().to_string()
                }
            })
            .collect();
        spec.check().map_err(|e| anyhow!("--compare: {e}"))?;
    }
    let (dev, _) = defectforge_worker::models::engine_device()?;
    let tty = std::io::stderr().is_terminal();
    let progress: std::sync::Arc<dyn Fn(&str) + Send + Sync> =
        std::sync::Arc::new(move |m: &str| {
            if tty {
                eprintln!("{m}");
            } else {
                tracing::info!("{m}");
            }
        });
    let t0 = Instant::now();
    let report = defectforge_worker::evaluation::run(&spec, s3, &dev, progress)
        .await
        .with_context(|| format!("evaluation {} failed", spec.name))?;
    eprintln!(
        "evaluation {}: {} detector(s) trained and scored in {:.1} s; results in {}/evaluations/{}/",
        report.name,
        report.results.len(),
        t0.elapsed().as_secs_f64(),
        spec.output.trim_end_matches('/'),
        report.name
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", defectforge_worker::evaluation::print_table(&report));
    }
    Ok(0)
}

#[cfg(not(feature = "embedded"))]
pub async fn eval(_path: &Path, _compare: Vec<String>, _json: bool, _s3: &S3Config) -> Result<i32> {
    Err(crate::embedded::not_embedded("`eval`"))
}

/// `train status`: the newest checkpoint, recent losses and the result of a run; exit 0 when
/// it finished, 1 otherwise.
pub async fn train_status(path: &Path, json: bool, s3: &S3Config) -> Result<i32> {
    let spec = defectforge::training::TrainingSpec::load(path)?;
    let st = defectforge::training::status(&spec, s3).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print_train_status(&st);
    }
    Ok(if st.result.is_some() { 0 } else { 1 })
}

fn print_train_status(st: &defectforge::training::TrainStatus) {
    let at = st
        .checkpoint_step
        .map_or("no checkpoint yet".to_string(), |s| {
            format!("checkpoint at step {s}")
        });
    println!(
        "{}: {at} of {} steps{}",
        st.run_id,
        st.steps,
        if st.cancelled { " (cancelled)" } else { "" }
    );
    if let (Some(a), Some(b)) = (st.initial_eval_loss, st.eval_loss) {
        println!("  evaluation loss {a:.5} before training, {b:.5} at the checkpoint");
    }
    for (s, l) in &st.last_losses {
        println!("  step {s}: loss {l:.5}");
    }
    if let Some(r) = &st.result {
        println!("  finished: model {}", r.model);
    }
}

/// `train submit`: records the run (or checks its record) and publishes the job of its next
/// segment; workers continue the chain. Prints the run id.
pub async fn train_submit(path: &Path, amqp: &AmqpArgs, s3: &S3Config) -> Result<i32> {
    use defectforge::job::{Job, TrainJob};
    use defectforge::training::{committed_step, ensure_run_record, keys};
    let spec = defectforge::training::TrainingSpec::load(path)?;
    if spec.demo {
        demo::ensure(Path::new(&spec.dataset_source))
            .with_context(|| format!("cannot write the demo dataset at {}", spec.dataset_source))?;
    }
    let run_id = spec.run_id();
    let out = store::open(&spec.output, s3).await?;
    out.check()
        .await
        .with_context(|| format!("the run's output {} is not reachable", spec.output))?;
    ensure_run_record(out.as_ref(), &spec).await?;
    if out.head(&keys::result(&run_id)).await?.is_some() {
        eprintln!("{run_id}: already finished (`defectforge train status` shows its model)");
        println!("{run_id}");
        return Ok(0);
    }
    let marker = keys::cancelled(&run_id);
    if out.head(&marker).await?.is_some() {
        out.delete(&marker).await?;
        eprintln!("{run_id}: was cancelled; resuming");
    }
    let at = committed_step(out.as_ref(), &run_id).await?;
    let until = spec.training.next_segment_end(at);
    let q = AmqpQueue::connect(amqp.config("defectforge-train-submit"))
        .await
        .context("cannot reach the broker")?;
    let job = Job::Train(TrainJob {
        output: spec.output.clone(),
        run_id: run_id.clone(),
        spec_digest: spec.digest(),
        until_step: until,
    });
    out.put(
        &keys::segment_published(&run_id, until),
        bytes::Bytes::from_static(b"{}"),
        "application/json",
    )
    .await?;
    q.publish(vec![job.to_bytes()]).await?;
    q.close().await;
    eprintln!(
        "{run_id}: submitted (from step {at}, segments of {} steps to {}); results go to {}",
        spec.training.segment_steps, spec.training.steps, spec.output
    );
    println!("{run_id}");
    Ok(0)
}

/// `train watch`: follows a run from its store until it finishes (exit 0), is cancelled
/// (exit 3) or `timeout_s` passes (exit 1).
pub async fn train_watch(
    path: &Path,
    interval_s: u64,
    timeout_s: Option<u64>,
    s3: &S3Config,
) -> Result<i32> {
    let spec = defectforge::training::TrainingSpec::load(path)?;
    let t0 = Instant::now();
    let pb = bar(spec.training.steps, &format!("train {}", spec.run_id()));
    loop {
        let st = defectforge::training::status(&spec, s3).await?;
        pb.set_position(st.checkpoint_step.unwrap_or(0));
        if let Some(r) = &st.result {
            pb.finish_and_clear();
            print_train_status(&st);
            eprintln!("{}: finished; model {}", st.run_id, r.model);
            return Ok(0);
        }
        if st.cancelled {
            pb.abandon();
            print_train_status(&st);
            return Ok(3);
        }
        if timeout_s.is_some_and(|t| t0.elapsed() >= Duration::from_secs(t)) {
            pb.abandon();
            print_train_status(&st);
            eprintln!(
                "{}: not finished after {} s",
                st.run_id,
                t0.elapsed().as_secs()
            );
            return Ok(1);
        }
        info!(run = %st.run_id, step = ?st.checkpoint_step, "training in progress");
        tokio::time::sleep(Duration::from_secs(interval_s.max(1))).await;
    }
}

/// `train cancel`: a marker the run checks at every checkpoint.
pub async fn train_cancel(path: &Path, s3: &S3Config) -> Result<i32> {
    let spec = defectforge::training::TrainingSpec::load(path)?;
    let run = spec.run_id();
    let out = store::open(&spec.output, s3).await?;
    let body = serde_json::json!({"run_id": run, "cancelled_at": chrono::Utc::now().to_rfc3339()});
    out.put(
        &defectforge::training::keys::cancelled(&run),
        serde_json::to_vec(&body)?.into(),
        "application/json",
    )
    .await?;
    eprintln!("{run}: cancelled; the run stops at its next checkpoint");
    Ok(0)
}
