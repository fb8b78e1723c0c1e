//! What the fault audit found, each as a test against RabbitMQ + Garage: a job message is
//! identities only and nothing in it is trusted beyond them; a commit counts only when its
//! fragment holds exactly the planned samples with their objects present, and every command
//! agrees on that; one input cannot cost more than the worker's budgets.

mod common;

use common::*;
use defectforge::queue::{AmqpConfig, AmqpQueue, JobQueue};
use std::time::{Duration, Instant};

async fn queue(sc: &Scenario) -> AmqpQueue {
    AmqpQueue::connect(AmqpConfig {
        url: sc.s.amqp.clone(),
        queue: sc.queue.clone(),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn generate(cid: &str, shard: u64, output: &str, digest: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "v": 4, "kind": "generate", "campaign_id": cid, "shard": shard,
        "output": output, "plan_digest": digest,
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_stale_messages_are_dead_lettered_with_their_reason_and_change_nothing() {
    let sc = Scenario::new("forged");
    let local = sc.dir.path().join("dataset");
    defectforge::demo::materialise(&local).unwrap();
    let output = sc.s3_uri("out");
    let camp = sc.write(
        "c.toml",
        &demo_campaign("forged", 31, local.to_str().unwrap(), &output, 2, 2, None),
    );
    // the ids a forger would know: the plan is deterministic
    let c = defectforge::Campaign::load(&camp).unwrap();
    let inputs = defectforge::dataset::resolve(&c, &sc.s3()).await.unwrap();
    let plan = defectforge::plan::Plan::new(c, &inputs);
    let (cid, digest) = (plan.campaign_id.clone(), plan.digest.clone());
    assert_eq!(plan.shard_count, 4);

    // published before the real jobs: each would have corrupted or blocked the campaign
    let q = queue(&sc).await;
    let forged: Vec<Vec<u8>> = vec![
        // the old format, with the work in the message: an empty sample list for shard 0
        serde_json::to_vec(&serde_json::json!({
            "v": 3, "kind": "generate", "campaign_id": cid, "shard_id": "0000000",
            "shard_index": 0, "samples": [], "types": [], "output": output,
            "plan_digest": digest, "shard_time_limit_s": 0,
        }))
        .unwrap(),
        // ids of the real campaign, another plan
        generate(&cid, 1, &output, &"0".repeat(64)),
        // a shard the campaign does not have
        generate(&cid, 99, &output, &digest),
        // a store this worker does not serve (the worker would have read /etc)
        generate(&cid, 2, "/etc", &digest),
        // a store it serves whose bucket does not exist (workers used to exit 3 in a row)
        generate(&cid, 2, "s3://no-such-bucket-defectforge/x", &digest),
        // a campaign that was never submitted
        generate("nosuchcampaign-0123456789ab", 0, &output, &digest),
        b"not a job at all".to_vec(),
    ];
    q.publish(forged).await.unwrap();
    assert_eq!(sc.ok(&["submit", camp.to_str().unwrap()]).trim(), cid);

    let stores = format!(
        "s3://{},{},s3://no-such-bucket-defectforge",
        sc.s.bucket,
        sc.dir.path().display()
    );
    let log = std::fs::File::create(sc.dir.path().join("worker-a.log")).unwrap();
    let mut w = sc
        .cmd("defectforge-worker")
        .env("DEFECTFORGE_WORKER_ID", "forged-a")
        .env("DEFECTFORGE_STORES", &stores)
        .args(["--http-addr", "off"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    sc.ok(&[
        "watch",
        &cid,
        "--output",
        &output,
        "--interval-s",
        "0.5",
        "--timeout-s",
        "180",
    ]);
    let t0 = Instant::now();
    while q.depth().await.unwrap().dead < 7 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "forged messages not all dead-lettered: {}",
            sc.worker_log("a")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // none of them stopped the worker
    assert!(w.try_wait().unwrap().is_none(), "{}", sc.worker_log("a"));
    assert_eq!(kill_term(&mut w), Some(0), "{}", sc.worker_log("a"));

    // the campaign is whole, and no forged message left a failure record on it
    let st = json(&sc.ok(&["status", &cid, "--output", &output, "--json"]));
    assert_eq!(
        (st["committed"].as_u64(), st["verified"].as_bool()),
        (Some(8), Some(true)),
        "{st}"
    );
    assert_eq!(st["failures"].as_array().unwrap().len(), 0, "{st}");
    sc.ok(&["finalize", &cid, "--output", &output]);
    let store = sc.store(&output).await;
    verify_campaign(store.as_ref(), &cid, 31, 8, &sc.s3()).await;

    // `defectforge dead` says why each died, from the dead-letter headers
    let dead = json(&sc.ok(&["dead", "--json"]));
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 7, "{dead:?}");
    let find = |class: &str, needle: &str| {
        assert!(
            dead.iter()
                .any(|d| d["class"] == class
                    && d["reason"].as_str().is_some_and(|r| r.contains(needle))),
            "no dead letter of class {class} mentioning {needle:?}: {dead:#?}"
        );
    };
    find("unreadable", "reads the work from the campaign record");
    find("unreadable", "expected");
    find("rejected", "published for plan 000000000000");
    find("rejected", "there is no shard 99");
    find("rejected", "/etc is outside what this worker may open");
    find("rejected", "no-such-bucket-defectforge");
    find("rejected", "nosuchcampaign-0123456789ab");
    // the human form too
    let human = sc.ok(&["dead"]);
    assert!(
        human.contains("7 dead-lettered job(s)") && human.contains("[rejected]"),
        "{human}"
    );
    // requeue-dead of this campaign moves none of them: they were never its shards' work
    let o = sc.cli(&["requeue-dead", &cid, "--output", &output]);
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("moved 0"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(q.depth().await.unwrap().dead, 7);
    q.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_objects_and_invalid_commits_are_reported_refused_and_regenerated() {
    let sc = Scenario::new("lost");
    let (output, cid) = sc.submit_demo(32, 3, 3);
    let mut w = sc.worker("a", &["--http-addr", "off"]);
    let watch = |sc: &Scenario| {
        sc.ok(&[
            "watch",
            &cid,
            "--output",
            &output,
            "--interval-s",
            "0.5",
            "--timeout-s",
            "180",
        ])
    };
    watch(&sc);
    let store = sc.store(&output).await;
    let frags = defectforge::ledger::fragments(store.as_ref(), &cid)
        .await
        .unwrap();
    assert_eq!(frags.len(), 4);
    // shard 1 loses one image object
    let rows = defectforge::manifest::read_rows(
        store.get(&frags["0000001"][0].key).await.unwrap(),
        &frags["0000001"][0].key,
    )
    .unwrap();
    let root = format!("{}/", store.root_uri());
    let lost = rows[1].image_uri.strip_prefix(&root).unwrap().to_string();
    store.delete(&lost).await.unwrap();
    // shard 3's commit is replaced by shard 0's (the planned samples are not in it)
    let f0 = store.get(&frags["0000000"][0].key).await.unwrap();
    store
        .put(
            &frags["0000003"][0].key,
            f0,
            "application/vnd.apache.parquet",
        )
        .await
        .unwrap();

    // status (verified by default) tells the truth; --quick says it did not look
    let st = json(&sc.ok(&["status", &cid, "--output", &output, "--json"]));
    assert_eq!(st["committed"], 6, "{st}");
    assert_eq!(st["verified"], true);
    let invalid = st["invalid"].as_array().unwrap();
    assert_eq!(invalid.len(), 2, "{st}");
    let why = |shard: &str| {
        invalid
            .iter()
            .find(|i| i[0] == shard)
            .and_then(|i| i[1].as_str())
            .unwrap_or_else(|| panic!("shard {shard} not reported invalid: {st}"))
            .to_string()
    };
    assert!(why("0000001").contains("missing"), "{}", why("0000001"));
    assert!(why("0000003").contains("belongs to"), "{}", why("0000003"));
    let quick = json(&sc.ok(&["status", &cid, "--output", &output, "--json", "--quick"]));
    assert_eq!(quick["verified"], false);
    let human = sc.ok(&["status", &cid, "--output", &output]);
    assert!(
        human.contains("invalid") && human.contains("0000001") && human.contains("resume"),
        "{human}"
    );

    // finalize refuses (exit 2) and writes nothing; --allow-partial writes what is valid and
    // says so in the index
    let o = sc.cli(&["finalize", &cid, "--output", &output]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("0000001") && e.contains("0000003") && e.contains("--allow-partial"),
        "{e}"
    );
    let manifest = defectforge::layout::manifest_prefix(&cid);
    assert!(store.list(&manifest).await.unwrap().is_empty());
    sc.ok(&["finalize", &cid, "--output", &output, "--allow-partial"]);
    let idx: defectforge::ledger::ManifestIndex = serde_json::from_slice(
        &store
            .get(&defectforge::layout::manifest_index(&cid))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (idx.rows, idx.planned_rows, idx.complete),
        (6, 12, false),
        "{idx:?}"
    );
    assert_eq!(idx.missing_shards, vec!["0000001", "0000003"]);
    let human = sc.ok(&["status", &cid, "--output", &output]);
    assert!(human.contains("PARTIAL"), "{human}");

    // resume republishes exactly the two; the worker regenerates them (it does not skip them
    // as committed); the full finalize is then complete and every object checks out
    let o = sc.cli(&["resume", &cid, "--output", &output]);
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("published 2 shards"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    watch(&sc);
    assert_eq!(kill_term(&mut w), Some(0), "{}", sc.worker_log("a"));
    sc.ok(&["finalize", &cid, "--output", &output]);
    verify_campaign(store.as_ref(), &cid, 32, 12, &sc.s3()).await;
    let st = json(&sc.ok(&["status", &cid, "--output", &output, "--json"]));
    assert_eq!(
        (
            st["finalized_rows"].as_u64(),
            st["finalized_complete"].as_bool()
        ),
        (Some(12), Some(true)),
        "{st}"
    );
}

/// A folder-layout campaign of one category whose normal images `fill` writes into the folder
/// it is given; returns the campaign id.
fn folder_campaign(
    sc: &Scenario,
    name: &str,
    fill: impl FnOnce(&std::path::Path),
    generator: &str,
) -> String {
    let data = sc.dir.path().join(name);
    std::fs::create_dir_all(data.join("good")).unwrap();
    fill(&data.join("good"));
    let output = sc.s3_uri(name);
    let camp = sc.write(
        &format!("{name}.toml"),
        &format!(
            r#"
name = "{name}"
seed = 3
shard_size = 2
output = "{output}"
[dataset]
source = "{d}"
layout = "folder"
[categories.part]
normal_dir = "{d}/good"
[categories.part.defects.stain]
count = 2
generator = "{generator}"
mask = "perlin"
"#,
            d = data.display()
        ),
    );
    sc.ok(&["submit", camp.to_str().unwrap()])
        .trim()
        .to_string()
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([((x * 7) ^ (y * 13)) as u8, (x * y) as u8, (x + y * 5) as u8])
    });
    let mut b = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
        .unwrap();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_input_cannot_cost_more_than_the_budgets_or_escape_its_dataset() {
    let sc = Scenario::new("budget");
    let put = |name: &'static str, bytes: Vec<u8>| {
        move |d: &std::path::Path| std::fs::write(d.join(name), bytes).unwrap()
    };
    // a 20000×20000 greyscale PNG declared in a few bytes: refused from its header
    let huge = defectforge::imaging::testing::png_declaring(20000, 20000);
    assert!(huge.len() < 1000);
    let c_huge = folder_campaign(&sc, "huge", put("000.png", huge), "perlin");
    // a real image file over --max-input-bytes
    let heavy = png(256, 256);
    assert!(heavy.len() > 20000);
    let c_heavy = folder_campaign(&sc, "heavy", put("000.png", heavy), "perlin");
    // a 1×1 image nothing can paint a defect on: bad input (a permanent failure), not a retry
    // and not a hang (the cut-paste generator once looked for a far offset forever)
    let c_tiny = folder_campaign(&sc, "tiny", put("000.png", png(1, 1)), "cutpaste");

    let t0 = Instant::now();
    let mut w = sc.worker("a", &["--http-addr", "off", "--max-input-bytes", "20000"]);
    let failed = |cid: &str, name: &str| -> String {
        let output = sc.s3_uri(name);
        let st = sc.wait_status(cid, &output, Duration::from_secs(120), |v| {
            v["failures"].as_array().is_some_and(|f| !f.is_empty())
        });
        let f = &st["failures"][0];
        assert_eq!(f["class"], "permanent", "{st}");
        assert_eq!(st["committed"], 0, "{st}");
        f["cause"].as_str().unwrap().to_string()
    };
    let cause = failed(&c_huge, "huge");
    assert!(
        cause.contains("20000") && cause.contains("--max-input-pixels"),
        "{cause}"
    );
    let cause = failed(&c_heavy, "heavy");
    assert!(
        cause.contains("20000") && cause.contains("--max-input-bytes"),
        "{cause}"
    );
    let cause = failed(&c_tiny, "tiny");
    assert!(
        cause.contains("000.png") && cause.contains("1×1") && cause.contains("at least 16×16"),
        "{cause}"
    );
    // all three failed at once (no retries, no decoding of 400M pixels), the worker still up
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    assert!(w.try_wait().unwrap().is_none(), "{}", sc.worker_log("a"));
    assert_eq!(kill_term(&mut w), Some(0), "{}", sc.worker_log("a"));
    let log = sc.worker_log("a");
    assert!(!log.contains("transient failure"), "{log}");
}

#[test]
fn no_password_reaches_the_log_even_at_trace() {
    let sc = Scenario::new("trace");
    let url = sc.s.amqp.replacen("guest:guest@", "guest:hunter2@", 1);
    assert_ne!(url, sc.s.amqp, "the test broker URL carries guest:guest");
    let o = sc
        .cmd("defectforge-worker")
        .env("RUST_LOG", "trace")
        .env("DEFECTFORGE_AMQP_URL", &url)
        .env("DEFECTFORGE_RECONNECT_WINDOW_S", "0")
        .env("DEFECTFORGE_AMQP_TIMEOUT_S", "5")
        .args(["--http-addr", "off"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("guest:****@"), "{e}");
    assert!(!e.contains("hunter2"), "the password reached the log: {e}");
}

#[test]
fn a_hanging_s3_endpoint_fails_within_the_operation_timeout() {
    let sc = Scenario::new("hang");
    // accepts connections, reads what comes, never answers
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = vec![];
        for c in l.incoming().flatten() {
            let mut c2 = c.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(std::io::Read::read(&mut c2, &mut buf), Ok(n) if n > 0) {}
            });
            held.push(c);
        }
    });
    let local = sc.dir.path().join("dataset");
    defectforge::demo::materialise(&local).unwrap();
    let camp = sc.write(
        "c.toml",
        &demo_campaign(
            "hang",
            1,
            local.to_str().unwrap(),
            &sc.s3_uri("out"),
            2,
            2,
            None,
        ),
    );
    let t0 = Instant::now();
    let o = sc
        .cmd("defectforge")
        .args(["submit", camp.to_str().unwrap()])
        .env("DEFECTFORGE_S3_ENDPOINT", format!("http://{addr}"))
        .output()
        .unwrap();
    let took = t0.elapsed();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    // one operation's limit (45 s, its SDK retries included), not retries stacked on retries
    assert!(took < Duration::from_secs(75), "submit took {took:?}: {e}");
    assert!(e.contains(&sc.s.bucket), "{e}");
}
