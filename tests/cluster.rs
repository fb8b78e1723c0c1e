//! What Kubernetes and Prometheus see of a worker: /healthz, /readyz and /metrics during a real
//! campaign (RabbitMQ and Garage from tests/run.sh), with the scraped counts checked against the
//! finalized manifest.

mod common;
mod probe;

use common::*;
use probe::*;
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_finalized_manifest() {
    let sc = Scenario::new("cluster");
    let local = sc.dir.path().join("dataset");
    defectforge::demo::materialise(&local).unwrap();
    let output = sc.s3_uri("out");
    let camp = sc.write(
        "c.toml",
        &demo_campaign("cluster", 31, local.to_str().unwrap(), &output, 20, 4, None),
    );
    let mut wa = sc.worker("a", &["--http-addr", "127.0.0.1:0"]);
    let mut wb = sc.worker("b", &["--http-addr", "127.0.0.1:0", "--concurrency", "2"]);
    let (ea, eb) = (
        endpoint(|| sc.worker_log("a")),
        endpoint(|| sc.worker_log("b")),
    );
    for e in [&ea, &eb] {
        assert_eq!(get(e, "/healthz").unwrap().0, 200);
        wait_code(e, "/readyz", 200, Duration::from_secs(30));
        assert_eq!(get(e, "/nope").unwrap().0, 404);
        let m = get(e, "/metrics").unwrap().1;
        assert_eq!(sample(&m, "defectforge_ready"), Some(1.0), "{m}");
        assert_eq!(sample(&m, "defectforge_model_load_seconds"), Some(0.0));
    }
    let cid = sc
        .ok(&["submit", camp.to_str().unwrap()])
        .trim()
        .to_string();
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
    sc.ok(&["finalize", &cid, "--output", &output]);
    let st = sc.store(&output).await;
    let rows = verify_campaign(st.as_ref(), &cid, 31, 80, &sc.s3()).await;
    let (ma, mb) = (
        get(&ea, "/metrics").unwrap().1,
        get(&eb, "/metrics").unwrap().1,
    );
    let v = |m: &str, s: &str| sample(m, s).unwrap_or_else(|| panic!("no {s} in\n{m}"));
    let mut shards_total = 0.0;
    for (tag, m) in [("a", &ma), ("b", &mb)] {
        let mine: Vec<_> = rows
            .iter()
            .filter(|r| r.worker_id == format!("cluster-{tag}"))
            .collect();
        let shards: BTreeSet<_> = mine.iter().map(|r| r.shard_id.clone()).collect();
        let bytes: u64 = mine.iter().map(|r| r.image_size + r.mask_size).sum();
        assert_eq!(
            v(m, "defectforge_samples_total{outcome=\"committed\"}"),
            mine.len() as f64,
            "worker {tag}\n{m}"
        );
        assert_eq!(
            v(m, "defectforge_shards_total{outcome=\"committed\"}"),
            shards.len() as f64,
            "worker {tag}\n{m}"
        );
        assert_eq!(
            v(m, "defectforge_uploaded_bytes_total"),
            bytes as f64,
            "{m}"
        );
        for o in [
            "dead_lettered_permanent",
            "dead_lettered_exhausted",
            "requeued",
            "timed_out",
        ] {
            assert_eq!(
                v(m, &format!("defectforge_shards_total{{outcome=\"{o}\"}}")),
                0.0,
                "{m}"
            );
        }
        let handled: f64 = [
            "committed",
            "skipped",
            "dead_lettered_permanent",
            "dead_lettered_exhausted",
            "dead_lettered_unreadable",
            "dead_lettered_rejected",
            "requeued",
        ]
        .iter()
        .map(|o| v(m, &format!("defectforge_shards_total{{outcome=\"{o}\"}}")))
        .sum();
        assert_eq!(
            v(m, "defectforge_shard_duration_seconds_count"),
            handled,
            "{m}"
        );
        assert_eq!(
            v(m, "defectforge_shard_duration_seconds_bucket{le=\"+Inf\"}"),
            handled
        );
        if !mine.is_empty() {
            assert!(v(m, "defectforge_generator_seconds_total") > 0.0, "{m}");
            assert_eq!(
                v(
                    m,
                    &format!("defectforge_current_campaign{{campaign=\"{cid}\"}}")
                ),
                0.0,
                "{m}"
            );
        }
        shards_total += v(m, "defectforge_shards_total{outcome=\"committed\"}");
    }
    let all_shards: BTreeSet<_> = rows.iter().map(|r| r.shard_id.clone()).collect();
    assert_eq!(shards_total, all_shards.len() as f64);
    assert_eq!(all_shards.len(), 20);
    assert_eq!(kill_term(&mut wa), Some(0), "{}", sc.worker_log("a"));
    assert_eq!(kill_term(&mut wb), Some(0), "{}", sc.worker_log("b"));
}

#[test]
fn http_endpoint_can_be_disabled() {
    let sc = Scenario::new("nohttp");
    let out = sc
        .cmd("defectforge-worker")
        .args(["--http-addr", "off", "--idle-exit-s", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("listening on http://"));
    let bad = sc
        .cmd("defectforge-worker")
        .args(["--http-addr", "localhost"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--http-addr"));
}
