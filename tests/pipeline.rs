//! The campaign pipeline end to end, against the real RabbitMQ and the real S3 server (Garage)
//! that tests/run.sh starts: several worker processes, a worker killed mid-campaign, a shard run
//! twice at once, a corrupt input that is dead-lettered and later requeued.

mod common;

use common::*;
use std::time::Duration;

async fn demo_in_s3(sc: &Scenario) -> String {
    let local = sc.dir.path().join("dataset");
    defectforge::demo::materialise(&local).unwrap();
    let data_uri = sc.s3_uri("dataset");
    let st = sc.store(&sc.s3_uri("")).await;
    upload_dir(st.as_ref(), &local, "dataset/").await;
    data_uri
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_produce_every_planned_sample_exactly_once() {
    let sc = Scenario::new("e2e");
    let dataset = demo_in_s3(&sc).await;
    let output = sc.s3_uri("out");
    let camp = sc.write(
        "c.toml",
        &demo_campaign("e2e", 11, &dataset, &output, 60, 8, None),
    );
    let c = camp.to_str().unwrap();
    let plan = sc.ok(&["plan", c, "--json"]);
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    assert_eq!(plan["samples"], 240);
    assert_eq!(plan["shards"], 30);
    let cid = sc.ok(&["submit", c]).trim().to_string();
    assert_eq!(cid, plan["campaign_id"].as_str().unwrap());
    let mut w1 = sc.worker("a", &[]);
    let mut w2 = sc.worker("b", &["--concurrency", "2"]);
    sc.ok(&[
        "watch",
        &cid,
        "--output",
        &output,
        "--interval-s",
        "0.5",
        "--timeout-s",
        "600",
    ]);
    assert_eq!(
        kill_term(&mut w1),
        Some(0),
        "worker a: {}",
        sc.worker_log("a")
    );
    assert_eq!(
        kill_term(&mut w2),
        Some(0),
        "worker b: {}",
        sc.worker_log("b")
    );
    sc.ok(&["finalize", &cid, "--output", &output]);
    let st = sc.store(&output).await;
    let rows = verify_campaign(st.as_ref(), &cid, 11, 240, &sc.s3()).await;
    // both workers took part
    let workers: std::collections::BTreeSet<_> = rows.iter().map(|r| r.worker_id.clone()).collect();
    assert!(workers.len() >= 2, "{workers:?}");
    assert!(rows.iter().all(|r| r.normal_uri.starts_with(&dataset)));
    let status: serde_json::Value =
        serde_json::from_str(&sc.ok(&["status", &cid, "--output", &output, "--json"])).unwrap();
    assert_eq!(
        (
            status["planned"].as_u64(),
            status["committed"].as_u64(),
            status["failed"].as_u64(),
            status["dead"].as_u64()
        ),
        (Some(240), Some(240), Some(0), Some(0))
    );
    assert_eq!(status["finalized_rows"], 240);
    // a data scientist reads the manifest from S3 with pyarrow and DuckDB and joins it to the objects
    let prefix = format!("{}/out/campaigns/{cid}", sc.prefix);
    let out = std::process::Command::new(&sc.s.python)
        .arg(workspace().join("tests/check_manifest.py"))
        .args([&sc.s.endpoint, &sc.s.region, &sc.s.bucket, &prefix, "240"])
        .env("AWS_ACCESS_KEY_ID", &sc.s.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &sc.s.secret_key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python readers: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // credentials never appear in logs or status output
    for text in [
        sc.worker_log("a"),
        sc.worker_log("b"),
        serde_json::to_string(&status).unwrap(),
    ] {
        assert!(!text.contains(&sc.s.secret_key), "secret key leaked");
    }
    // gc keeps everything the manifest references
    let gc = sc.ok(&["gc", &cid, "--output", &output]);
    let gc: serde_json::Value = serde_json::from_str(gc.trim()).unwrap();
    assert_eq!(gc["deleted_objects"], 0);
    verify_campaign(st.as_ref(), &cid, 11, 240, &sc.s3()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_campaign_loses_and_duplicates_nothing() {
    let sc = Scenario::new("kill9");
    let (output, cid) = sc.submit_demo(12, 100, 4);
    let mut w1 = sc.worker("victim", &[]);
    let at_kill = sc.wait_status(&cid, &output, Duration::from_secs(300), |v| {
        v["committed"].as_u64().unwrap_or(0) > 0
    });
    w1.kill().unwrap(); // SIGKILL: no chance to finish, ack or clean up
    w1.wait().unwrap();
    assert!(
        at_kill["committed"].as_u64().unwrap() < 400,
        "the victim finished before it could be killed"
    );
    let mut w2 = sc.worker("rescuer", &[]);
    sc.ok(&[
        "watch",
        &cid,
        "--output",
        &output,
        "--interval-s",
        "0.5",
        "--timeout-s",
        "600",
    ]);
    assert_eq!(kill_term(&mut w2), Some(0));
    sc.ok(&["finalize", &cid, "--output", &output]);
    let st = sc.store(&output).await;
    verify_campaign(st.as_ref(), &cid, 12, 400, &sc.s3()).await;
}

/// Two workers run the same shard at the same moment with a generator whose bytes differ
/// between attempts: both commit, and finalize still yields one row per sample that matches the
/// objects it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_run_twice_at_once_yields_one_row_per_sample() {
    use defectforge::queue::{InProcQueue, JobQueue};
    use defectforge_worker::generators::{GenError, GenInput, Generator};
    use defectforge_worker::protocol::Outcome;
    use defectforge_worker::runner::{Worker, WorkerConfig};
    use std::sync::{Arc, Barrier};

    /// attempt-noise, but both attempts must be inside `generate` together.
    struct Rendezvous(Arc<Barrier>);
    impl Generator for Rendezvous {
        fn name(&self) -> &'static str {
            "attempt-noise"
        }
        fn version(&self) -> &'static str {
            "test"
        }
        fn generate(&self, batch: &[GenInput<'_>]) -> Result<Vec<image::RgbImage>, GenError> {
            self.0.wait();
            defectforge_worker::generators::simple::AttemptNoiseGenerator.generate(batch)
        }
    }

    let sc = Scenario::new("dup");
    let local = sc.dir.path().join("dataset");
    defectforge::demo::materialise(&local).unwrap();
    let output = sc.s3_uri("out");
    let camp = sc.write(
        "c.toml",
        &demo_campaign(
            "dup",
            13,
            local.to_str().unwrap(),
            &output,
            4,
            16,
            Some("attempt-noise"),
        ),
    );
    // plan + record through the library; deliver the one shard twice
    let c = defectforge::Campaign::load(&camp).unwrap();
    let inputs = defectforge::dataset::resolve(&c, &sc.s3()).await.unwrap();
    let plan = defectforge::plan::Plan::new(c, &inputs);
    assert_eq!(plan.shard_count, 1);
    let st = sc.store(&output).await;
    let mut rec = defectforge::ledger::CampaignRecord::of(&plan, &inputs);
    rec.shard_time_limit_s = 120;
    defectforge::ledger::write_record(st.as_ref(), &rec)
        .await
        .unwrap();
    let q = InProcQueue::new(5);
    let body = defectforge::Job::Generate(plan.job(0)).to_bytes();
    q.publish(vec![body.clone(), body]).await.unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let mk = |id: &str| {
        let cache = Arc::new(defectforge_worker::models::ModelCache::new(
            std::env::temp_dir().join("defectforge-test-models"),
            sc.s3(),
        ));
        let mut g = defectforge_worker::generators::registry(cache);
        g.insert("attempt-noise", Arc::new(Rendezvous(barrier.clone())));
        Arc::new(Worker::with_generators(
            WorkerConfig {
                worker_id: id.into(),
                s3: sc.s3(),
                stores: vec![format!("s3://{}", sc.s.bucket)],
                ..Default::default()
            },
            g,
        ))
    };
    let (wa, wb) = (mk("dup-a"), mk("dup-b"));
    let mut ca = q.consume(1).await.unwrap();
    let mut cb = q.consume(1).await.unwrap();
    let (da, db) = (
        ca.next().await.unwrap().unwrap(),
        cb.next().await.unwrap().unwrap(),
    );
    let (ra, rb) = tokio::join!(wa.handle(da), wb.handle(db));
    assert_eq!(ra.unwrap(), Outcome::Committed { samples: 16 });
    assert_eq!(rb.unwrap(), Outcome::Committed { samples: 16 });
    let frags = defectforge::ledger::fragments(st.as_ref(), &plan.campaign_id)
        .await
        .unwrap();
    assert_eq!(frags["0000000"].len(), 2, "both attempts committed");
    let idx = defectforge::ledger::finalize(
        st.as_ref(),
        &plan.campaign_id,
        Default::default(),
        &|_, _| {},
    )
    .await
    .unwrap();
    assert_eq!((idx.rows, idx.unused_attempts), (16, 1));
    let rows = verify_campaign(st.as_ref(), &plan.campaign_id, 13, 16, &sc.s3()).await;
    assert!(rows.iter().all(|r| r.attempt == idx.chosen["0000000"]));
    // the losing attempt's objects exist, differ, and are what gc removes once old enough
    let all = st
        .list(&defectforge::layout::samples_prefix(&plan.campaign_id))
        .await
        .unwrap();
    assert_eq!(all.len(), 64);
    let later = chrono::Utc::now() + chrono::Duration::seconds(121);
    let rep = defectforge::ledger::gc(st.as_ref(), &plan.campaign_id, false, later)
        .await
        .unwrap();
    assert_eq!((rep.deleted_objects, rep.deleted_fragments), (32, 1));
    verify_campaign(st.as_ref(), &plan.campaign_id, 13, 16, &sc.s3()).await;

    // The same through the broker: every shard published twice, two worker processes.
    let sc2 = Scenario::new("dup2");
    let output2 = sc2.s3_uri("out");
    let camp2 = sc2.write(
        "c.toml",
        &demo_campaign(
            "dup2",
            14,
            local.to_str().unwrap(),
            &output2,
            10,
            4,
            Some("attempt-noise"),
        ),
    );
    let c2 = camp2.to_str().unwrap();
    let cid2 = sc2.ok(&["submit", c2]).trim().to_string();
    sc2.ok(&["resume", c2]); // publishes all 10 shards a second time
    let mut w1 = sc2.worker("a", &[]);
    let mut w2 = sc2.worker("b", &[]);
    sc2.ok(&[
        "watch",
        &cid2,
        "--output",
        &output2,
        "--interval-s",
        "0.5",
        "--timeout-s",
        "300",
    ]);
    // let the duplicates drain before stopping
    std::thread::sleep(Duration::from_secs(2));
    kill_term(&mut w1);
    kill_term(&mut w2);
    sc2.ok(&["finalize", &cid2, "--output", &output2]);
    let st2 = sc2.store(&output2).await;
    verify_campaign(st2.as_ref(), &cid2, 14, 40, &sc2.s3()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_input_is_dead_lettered_and_requeued_after_the_fix() {
    let sc = Scenario::new("corrupt");
    let data = sc.dir.path().join("data");
    std::fs::create_dir_all(data.join("good")).unwrap();
    let good = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90]));
    for i in 0..6 {
        good.save(data.join(format!("good/{i:03}.png"))).unwrap();
    }
    let bad = data.join("good/003.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    let output = sc.s3_uri("out");
    let camp = sc.write(
        "c.toml",
        &format!(
            r#"
name = "corrupt"
seed = 5
shard_size = 2
output = "{output}"
[dataset]
source = "{d}"
layout = "folder"
[categories.tile]
normal_dir = "{d}/good"
[categories.tile.defects.crack]
count = 24
generator = "cutpaste"
mask = "cutpaste"
"#,
            d = data.display()
        ),
    );
    let c = camp.to_str().unwrap();
    let cid = sc.ok(&["submit", c]).trim().to_string();
    let mut w = sc.worker("a", &[]);
    let st = sc.wait_status(&cid, &output, Duration::from_secs(300), |v| {
        v["pending"] == 0
    });
    let failed = st["failed"].as_u64().unwrap();
    let dead = st["dead"].as_u64().unwrap();
    assert!(failed > 0 && failed < 24, "{st}");
    assert_eq!(st["committed"].as_u64().unwrap() + failed, 24);
    for f in st["failures"].as_array().unwrap() {
        let cause = f["cause"].as_str().unwrap();
        assert!(
            cause.contains("003.png") && cause.contains("cannot be decoded"),
            "{cause}"
        );
        assert_eq!(f["class"], "permanent");
        assert!(f["sample_id"].is_string());
    }
    let human = sc.ok(&["status", c]);
    assert!(
        human.contains("003.png") && human.contains("requeue-dead"),
        "{human}"
    );
    // the messages really are in the dead-letter queue
    let q = defectforge::queue::AmqpQueue::connect(defectforge::queue::AmqpConfig {
        url: sc.s.amqp.clone(),
        queue: sc.queue.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    use defectforge::queue::JobQueue;
    assert_eq!(q.depth().await.unwrap().dead, dead);
    // fix the input, requeue, and the campaign completes
    good.save(&bad).unwrap();
    sc.ok(&["requeue-dead", c]);
    sc.ok(&["watch", c, "--interval-s", "0.5", "--timeout-s", "300"]);
    assert_eq!(q.depth().await.unwrap().dead, 0);
    q.close().await;
    assert_eq!(kill_term(&mut w), Some(0));
    sc.ok(&["finalize", c]);
    let store = sc.store(&output).await;
    verify_campaign(store.as_ref(), &cid, 5, 24, &sc.s3()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_current_shard_and_cancel_skips_the_rest() {
    use defectforge::queue::JobQueue;
    let sc = Scenario::new("sigterm");
    let data = sc.dir.path().join("data");
    std::fs::create_dir_all(data.join("good")).unwrap();
    // large images make one shard take seconds
    let big = image::RgbImage::from_fn(1024, 768, |x, y| {
        image::Rgb([(x ^ y) as u8, (x * 3 + y) as u8, (y / 3) as u8])
    });
    big.save(data.join("good/000.png")).unwrap();
    let output = sc.s3_uri("out");
    let camp = sc.write(
        "c.toml",
        &format!(
            r#"
name = "sigterm"
seed = 8
shard_size = 24
output = "{output}"
[dataset]
source = "{d}"
layout = "folder"
[categories.sheet]
normal_dir = "{d}/good"
[categories.sheet.defects.stain]
count = 72
generator = "perlin"
mask = "perlin"
"#,
            d = data.display()
        ),
    );
    let c = camp.to_str().unwrap();
    let cid = sc.ok(&["submit", c]).trim().to_string();
    let mut w = sc.worker("a", &[]);
    // wait until the worker holds its first shard, then ask it to stop
    let t0 = std::time::Instant::now();
    while !sc.worker_log("a").contains("consuming") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "worker did not start: {}",
            sc.worker_log("a")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = sc.wait_status(&cid, &output, Duration::from_secs(5), |_| true);
    assert_eq!(
        before["committed"], 0,
        "the first shard finished too fast to test SIGTERM"
    );
    assert_eq!(kill_term(&mut w), Some(0), "{}", sc.worker_log("a"));
    let after = sc.wait_status(&cid, &output, Duration::from_secs(5), |_| true);
    assert_eq!(
        after["committed"], 24,
        "exactly the shard in progress is committed"
    );
    let q = defectforge::queue::AmqpQueue::connect(defectforge::queue::AmqpConfig {
        url: sc.s.amqp.clone(),
        queue: sc.queue.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let t1 = std::time::Instant::now();
    while q.depth().await.unwrap().ready != 2 {
        assert!(
            t1.elapsed() < Duration::from_secs(10),
            "the other two shards should be back in the queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // cancel: a new worker acks and skips the remaining shards; finalize keeps what was committed
    sc.ok(&["cancel", c]);
    let mut w2 = sc.worker("b", &["--idle-exit-s", "3"]);
    assert_eq!(w2.wait().unwrap().code(), Some(0), "{}", sc.worker_log("b"));
    assert_eq!(q.depth().await.unwrap().ready, 0);
    q.close().await;
    let st: serde_json::Value = serde_json::from_str(&sc.ok(&["status", c, "--json"])).unwrap();
    assert_eq!(
        (st["cancelled"].as_bool(), st["committed"].as_u64()),
        (Some(true), Some(24))
    );
    // a cancelled campaign is incomplete: finalize says so and writes nothing unless asked
    let refused = sc.cli(&["finalize", c]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--allow-partial"),
        "{refused:?}"
    );
    sc.ok(&["finalize", c, "--allow-partial"]);
    let store = sc.store(&output).await;
    let rows = manifest_rows(store.as_ref(), &cid).await;
    assert_eq!(rows.len(), 24);
    assert!(
        rows.iter().all(|r| (r.width, r.height) == (1024, 768)),
        "generated at the normal image's own resolution"
    );
}
