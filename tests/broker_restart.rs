//! The broker restarts mid-campaign (rabbitmqctl stop_app / start_app). Workers reconnect
//! within their window and the campaign completes with every sample exactly once; /readyz
//! answers 503 while the broker is away and 200 again once the worker consumes. This test
//! lives in its own binary so that no other test shares the broker while it is down.

mod common;
mod probe;

use common::*;
use probe::{endpoint, get, wait_code};
use std::process::Command;
use std::time::Duration;

struct RestoreBroker;
impl Drop for RestoreBroker {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").status();
        let _ = Command::new("rabbitmqctl")
            .args(["await_startup", "--timeout", "60"])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_survives_a_broker_restart() {
    let sc = Scenario::new("restart");
    let (output, cid) = sc.submit_demo(21, 75, 4);
    let mut w1 = sc.worker(
        "a",
        &["--reconnect-window-s", "120", "--http-addr", "127.0.0.1:0"],
    );
    let mut w2 = sc.worker("b", &["--reconnect-window-s", "120"]);
    let ep = endpoint(|| sc.worker_log("a"));
    wait_code(&ep, "/readyz", 200, Duration::from_secs(30));
    sc.wait_status(&cid, &output, Duration::from_secs(300), |v| {
        v["committed"].as_u64().unwrap_or(0) >= 20
    });
    {
        let _guard = RestoreBroker;
        assert!(Command::new("rabbitmqctl")
            .arg("stop_app")
            .status()
            .unwrap()
            .success());
        std::thread::sleep(Duration::from_secs(5));
        // workers wait for the broker instead of exiting
        assert!(
            w1.try_wait().unwrap().is_none(),
            "worker a exited: {}",
            sc.worker_log("a")
        );
        assert!(
            w2.try_wait().unwrap().is_none(),
            "worker b exited: {}",
            sc.worker_log("b")
        );
        // unready while reconnecting, yet alive (no liveness restart)
        wait_code(&ep, "/readyz", 503, Duration::from_secs(20));
        assert_eq!(get(&ep, "/healthz").unwrap().0, 200);
        let m = get(&ep, "/metrics").unwrap().1;
        assert!(m.contains("defectforge_ready 0\n"), "{m}");
    }
    // ready again once the broker is back and the worker consumes
    wait_code(&ep, "/readyz", 200, Duration::from_secs(120));
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
    assert_eq!(kill_term(&mut w1), Some(0), "{}", sc.worker_log("a"));
    assert_eq!(kill_term(&mut w2), Some(0), "{}", sc.worker_log("b"));
    assert!(sc.worker_log("a").contains("reconnect") || sc.worker_log("b").contains("reconnect"));
    sc.ok(&["finalize", &cid, "--output", &output]);
    let st = sc.store(&output).await;
    verify_campaign(st.as_ref(), &cid, 21, 300, &sc.s3()).await;
}

#[test]
fn a_worker_gives_up_after_its_reconnect_window() {
    let sc = Scenario::new("window");
    let t0 = std::time::Instant::now();
    let log = sc.dir.path().join("worker.log");
    let mut w = sc
        .cmd("defectforge-worker")
        .env("DEFECTFORGE_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .args([
            "--reconnect-window-s",
            "3",
            "--amqp-timeout-s",
            "2",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // alive but never ready while the broker is unreachable, until it gives up
    let ep = endpoint(|| std::fs::read_to_string(&log).unwrap_or_default());
    assert_eq!(get(&ep, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(get(&ep, "/readyz").map(|r| r.0), Some(503));
    let status = w.wait().unwrap();
    assert_eq!(status.code(), Some(2));
    let e = std::fs::read_to_string(&log).unwrap();
    assert!(
        e.contains("unreachable for 3 s") && e.contains("supervisor restarts"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
}
