//! The GPU check's runner (scripts/gpu/run.sh) up to the point where a GPU is needed: what it
//! says on a machine without one, and — with a stand-in `nvidia-smi` and stand-in binaries —
//! that it runs each step under its limits, records status, time, GPU memory and the
//! benchmarks' `BENCH_JSON` lines into results.json, and reports failures and the budget.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A pack folder holding the real run.sh and a manifest, plus `bins` (name → shell body).
fn pack(dir: &Path, bins: &[(&str, &str)]) -> PathBuf {
    let p = dir.join("gpu-check");
    std::fs::create_dir_all(p.join("bin")).unwrap();
    std::fs::copy(repo().join("scripts/gpu/run.sh"), p.join("run.sh")).unwrap();
    std::fs::write(
        p.join("MANIFEST.json"),
        r#"{"commit": "test", "built_at": "now", "cuda_compute_cap": "90", "cuda_wheels": []}"#,
    )
    .unwrap();
    for (name, body) in bins {
        write_exe(&p.join("bin").join(name), body);
    }
    p
}

fn write_exe(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// PATH without any nvidia-smi, optionally with a folder of stand-ins first.
fn path_with(extra: Option<&Path>) -> String {
    let mut parts = Vec::new();
    if let Some(e) = extra {
        parts.push(e.display().to_string());
    }
    parts.push("/usr/local/bin:/usr/bin:/bin".to_string());
    parts.join(":")
}

fn run(
    pack: &Path,
    out: &Path,
    path: &str,
    env: &[(&str, &str)],
) -> (i32, serde_json::Value, String) {
    let mut cmd = Command::new(pack.join("run.sh"));
    cmd.arg(out).env("PATH", path).env_remove("LD_LIBRARY_PATH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap_or_default())
            .unwrap_or(serde_json::Value::Null);
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap_or_default();
    (
        o.status.code().unwrap_or(-1),
        results,
        log + &String::from_utf8_lossy(&o.stderr),
    )
}

#[test]
fn without_a_gpu_it_says_so_and_writes_why() {
    let dir = tempfile::tempdir().unwrap();
    let p = pack(dir.path(), &[]);
    let out = dir.path().join("results");
    let (rc, results, log) = run(&p, &out, &path_with(None), &[]);
    assert_eq!(rc, 3, "{log}");
    assert_eq!(results["status"], "no-gpu", "{results}");
    let reason = results["reason"].as_str().unwrap();
    assert!(
        reason.contains("no nvidia-smi") && reason.contains("GPU machine"),
        "{reason}"
    );
    assert!(log.contains("no nvidia-smi"), "{log}");
}

/// A stand-in nvidia-smi: one H100, memory.used growing while a step runs.
fn fake_smi(dir: &Path) -> PathBuf {
    let bin = dir.join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let counter = dir.join("smi-count");
    write_exe(
        &bin.join("nvidia-smi"),
        &format!(
            r#"case "$*" in
  *name,memory.total,compute_cap*) echo "NVIDIA H100 80GB HBM3, 81559 MiB, 9.0" ;;
  *driver_version*) echo "580.65.06" ;;
  *memory.used*) n=$(cat {c} 2>/dev/null || echo 0); echo $((n + 1)) > {c}; echo $((500 + n * 10)) ;;
esac"#,
            c = counter.display()
        ),
    );
    bin
}

#[test]
fn with_a_gpu_each_step_is_recorded_with_its_measurements_and_failures_count() {
    let dir = tempfile::tempdir().unwrap();
    let bench = r#"echo "candle something"; echo 'BENCH_JSON {"bench": "stand-in", "batch": 8, "samples_per_s": 12.5}'; sleep 0.3"#;
    let p = pack(
        dir.path(),
        &[
            ("parity", "echo \"parity args: $*\"; exit 0"),
            ("ad_sample", bench),
            ("unet_forward", "echo 'unet fails'; exit 7"),
        ],
    );
    let smi = fake_smi(dir.path());
    let out = dir.path().join("results");
    let (rc, results, log) = run(
        &p,
        &out,
        &path_with(Some(&smi)),
        &[(
            "GPU_CHECK_STEPS",
            "parity-f32,ad-sample-bf16,unet-sd15-bf16",
        )],
    );
    assert_eq!(rc, 1, "a failed step makes the run fail: {log}");
    assert_eq!(results["status"], "failed", "{results}");
    assert!(
        results["gpu"].as_str().unwrap().contains("H100"),
        "{results}"
    );
    assert_eq!(results["driver"], "580.65.06");
    let steps = results["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    // only the selected steps ran, in the script's order; torch is recorded as skipped (no
    // CUDA torch here) or run, never silently absent
    assert_eq!(
        &names[..3],
        ["parity-f32", "ad-sample-bf16", "unet-sd15-bf16"],
        "{names:?}"
    );
    let by = |n: &str| steps.iter().find(|s| s["step"] == n).unwrap();
    assert_eq!(by("parity-f32")["status"], "ok");
    assert!(
        by("parity-f32")["tail"][0]
            .as_str()
            .unwrap()
            .contains("parity_all_fixtures"),
        "the f32 parity step runs the harness test: {}",
        by("parity-f32")
    );
    let ad = by("ad-sample-bf16");
    assert_eq!(ad["status"], "ok");
    assert_eq!(ad["measurements"][0]["samples_per_s"], 12.5, "{ad}");
    assert!(
        ad["peak_gpu_mib_over_idle"].as_i64().unwrap() > 0,
        "memory was sampled: {ad}"
    );
    let unet = by("unet-sd15-bf16");
    assert_eq!(
        (unet["status"].as_str(), unet["rc"].as_i64()),
        (Some("failed"), Some(7))
    );
    assert!(
        log.contains("unet fails"),
        "what a step printed is in the log: {log}"
    );
}

#[test]
fn steps_past_the_budget_are_skipped_and_said_so() {
    let dir = tempfile::tempdir().unwrap();
    let p = pack(dir.path(), &[("parity", "sleep 2; exit 0")]);
    let smi = fake_smi(dir.path());
    let out = dir.path().join("results");
    let (rc, results, log) = run(
        &p,
        &out,
        &path_with(Some(&smi)),
        &[
            ("GPU_CHECK_STEPS", "parity-f32,parity-bf16"),
            ("GPU_CHECK_BUDGET_S", "21"),
        ],
    );
    assert_eq!(rc, 0, "{log}");
    let steps = results["steps"].as_array().unwrap();
    let status = |n: &str| steps.iter().find(|s| s["step"] == n).unwrap()["status"].clone();
    assert_eq!(status("parity-f32"), "ok");
    assert_eq!(status("parity-bf16"), "skipped", "{results}");
    assert!(log.contains("budget"), "{log}");
}

#[test]
fn a_pack_without_its_binaries_is_named_broken() {
    let dir = tempfile::tempdir().unwrap();
    let p = pack(dir.path(), &[]);
    let smi = fake_smi(dir.path());
    let out = dir.path().join("results");
    let (rc, results, log) = run(&p, &out, &path_with(Some(&smi)), &[]);
    assert_eq!(rc, 1, "{log}");
    assert_eq!(results["status"], "broken-pack");
    assert!(log.contains("scripts/gpu-check.sh pack"), "{log}");
}

#[test]
fn binaries_packed_as_one_xz_tar_are_unpacked_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = pack(
        dir.path(),
        &[("parity", "echo \"packed parity $*\"; exit 0")],
    );
    let st = Command::new("sh")
        .arg("-c")
        .arg("tar cJf bin.tar.xz bin && rm -rf bin")
        .current_dir(&p)
        .status()
        .unwrap();
    assert!(st.success());
    let smi = fake_smi(dir.path());
    let out = dir.path().join("results");
    let (rc, results, log) = run(
        &p,
        &out,
        &path_with(Some(&smi)),
        &[("GPU_CHECK_STEPS", "parity-f32")],
    );
    assert_eq!(rc, 0, "{log}");
    assert!(log.contains("unpacking bin.tar.xz"), "{log}");
    let step = &results["steps"][0];
    assert_eq!(step["status"], "ok", "{results}");
    assert!(step["tail"][0]
        .as_str()
        .unwrap()
        .contains("packed parity parity_all_fixtures"));
}
