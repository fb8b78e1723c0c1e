//! Shared helpers for the system tests: the real services that tests/run.sh starts (RabbitMQ,
//! Garage), the built binaries, isolated queue names and S3 prefixes per test, and the checks a
//! user would run on a finished campaign.
#![allow(dead_code)]

use defectforge::manifest::ManifestRow;
use defectforge::store::{self, ObjectStore, S3Config};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Services {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    pub amqp: String,
    pub python: String,
}

fn var(n: &str) -> String {
    std::env::var(n).unwrap_or_else(|_| {
        panic!("{n} is not set: run the system tests through tests/run.sh, which starts Garage and checks RabbitMQ")
    })
}

pub fn services() -> Services {
    Services {
        endpoint: var("DEFECTFORGE_TEST_S3_ENDPOINT"),
        region: var("DEFECTFORGE_TEST_S3_REGION"),
        bucket: var("DEFECTFORGE_TEST_S3_BUCKET"),
        access_key: var("DEFECTFORGE_TEST_S3_ACCESS_KEY_ID"),
        secret_key: var("DEFECTFORGE_TEST_S3_SECRET_ACCESS_KEY"),
        amqp: var("DEFECTFORGE_TEST_AMQP_URL"),
        python: var("DEFECTFORGE_TEST_PYTHON"),
    }
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target"));
    let p = target.join("debug").join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, as tests/run.sh does)",
        p.display()
    );
    p
}

/// One test's isolated world: its own queue, S3 prefix and scratch directory.
pub struct Scenario {
    pub s: Services,
    pub name: String,
    pub queue: String,
    pub prefix: String,
    pub dir: tempfile::TempDir,
}

impl Scenario {
    pub fn new(name: &str) -> Self {
        let tag = format!("{name}-{:08x}", rand::random::<u32>());
        Scenario {
            s: services(),
            name: name.to_string(),
            queue: format!("dftest.{tag}"),
            prefix: tag,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn s3(&self) -> S3Config {
        S3Config {
            endpoint: Some(self.s.endpoint.clone()),
            region: Some(self.s.region.clone()),
            path_style: Some(true),
            access_key_id: Some(self.s.access_key.clone()),
            secret_access_key: Some(self.s.secret_key.clone()),
        }
    }

    /// s3://bucket/<test prefix>/<rel>
    pub fn s3_uri(&self, rel: &str) -> String {
        format!("s3://{}/{}/{rel}", self.s.bucket, self.prefix)
    }

    pub async fn store(&self, uri: &str) -> Arc<dyn ObjectStore> {
        store::open(uri, &self.s3()).await.unwrap()
    }

    /// A command for one of the binaries with this scenario's services in its environment.
    pub fn cmd(&self, bin_name: &str) -> Command {
        let mut c = Command::new(bin(bin_name));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("DEFECTFORGE_S3_ENDPOINT", &self.s.endpoint)
            .env("DEFECTFORGE_S3_REGION", &self.s.region)
            .env("AWS_ACCESS_KEY_ID", &self.s.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.s.secret_key)
            .env("DEFECTFORGE_AMQP_URL", &self.s.amqp)
            .env("DEFECTFORGE_QUEUE", &self.queue)
            .env("DEFECTFORGE_RETRY_ATTEMPTS", "3")
            .env(
                "DEFECTFORGE_STORES",
                format!("s3://{},{}", self.s.bucket, self.dir.path().display()),
            )
            .current_dir(self.dir.path());
        c
    }

    /// Runs `defectforge <args>` and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        let out = self.cmd("defectforge").args(args).output().unwrap();
        eprintln!(
            "$ defectforge {}\n  exit {:?}\n  stdout: {}\n  stderr: {}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        out
    }

    /// Runs a CLI command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "defectforge {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a CLI command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.status.success(), "defectforge {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Submits a campaign file, runs one worker (tag "a", model cache `cache`, no HTTP) until
    /// `watch` sees the campaign done, stops the worker, and returns the campaign id.
    pub fn run_with_worker(
        &self,
        camp: &Path,
        output: &str,
        cache: &Path,
        timeout_s: u32,
    ) -> String {
        let cid = self
            .ok(&["submit", camp.to_str().unwrap()])
            .trim()
            .to_string();
        let mut w = self.worker(
            "a",
            &[
                "--idle-exit-s",
                "20",
                "--model-cache",
                cache.to_str().unwrap(),
                "--http-addr",
                "off",
            ],
        );
        self.ok(&[
            "watch",
            &cid,
            "--output",
            output,
            "--interval-s",
            "0.5",
            "--timeout-s",
            &timeout_s.to_string(),
        ]);
        kill_term(&mut w);
        cid
    }

    /// Starts a worker process; its log goes to <dir>/worker-<tag>.log.
    pub fn worker(&self, tag: &str, extra: &[&str]) -> Child {
        let log = std::fs::File::create(self.dir.path().join(format!("worker-{tag}.log"))).unwrap();
        self.cmd("defectforge-worker")
            .env("DEFECTFORGE_WORKER_ID", format!("{}-{tag}", self.name))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub fn worker_log(&self, tag: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("worker-{tag}.log")))
            .unwrap_or_default()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Materialises the demo dataset locally, submits a campaign over it to an S3 output with
    /// `per_type` samples per defect type, and returns (output URI, campaign id).
    pub fn submit_demo(&self, seed: u64, per_type: u64, shard_size: u32) -> (String, String) {
        let local = self.dir.path().join("dataset");
        defectforge::demo::materialise(&local).unwrap();
        let output = self.s3_uri("out");
        let camp = self.write(
            "c.toml",
            &demo_campaign(
                &self.name,
                seed,
                local.to_str().unwrap(),
                &output,
                per_type,
                shard_size,
                None,
            ),
        );
        let cid = self
            .ok(&["submit", camp.to_str().unwrap()])
            .trim()
            .to_string();
        (output, cid)
    }

    /// Polls `status --json` until `pred` holds or the timeout passes.
    pub fn wait_status(
        &self,
        campaign: &str,
        output: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            let out = self
                .cmd("defectforge")
                .args(["status", campaign, "--output", output, "--json"])
                .output()
                .unwrap();
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if pred(&v) {
                    return v;
                }
                if t0.elapsed() > timeout {
                    panic!("status did not reach the expected state within {timeout:?}: {v}");
                }
            } else if t0.elapsed() > timeout {
                panic!("status failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        for q in [self.queue.clone(), format!("{}.dead", self.queue)] {
            let _ = Command::new("rabbitmqctl")
                .args(["delete_queue", &q])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Uploads a local directory tree to a store under `prefix`.
pub async fn upload_dir(st: &dyn ObjectStore, dir: &Path, prefix: &str) {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out)
            } else {
                out.push(p)
            }
        }
    }
    let mut files = vec![];
    walk(dir, &mut files);
    for f in files {
        let rel = f
            .strip_prefix(dir)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        st.put(
            &format!("{prefix}{rel}"),
            bytes::Bytes::from(std::fs::read(&f).unwrap()),
            "application/octet-stream",
        )
        .await
        .unwrap();
    }
}

/// Reads the finalized manifest of a campaign.
pub async fn manifest_rows(st: &dyn ObjectStore, cid: &str) -> Vec<ManifestRow> {
    let idx: defectforge::ledger::ManifestIndex = serde_json::from_slice(
        &st.get(&defectforge::layout::manifest_index(cid))
            .await
            .unwrap(),
    )
    .unwrap();
    let mut rows = vec![];
    for p in &idx.parts {
        let key = p.strip_prefix(&format!("{}/", st.root_uri())).unwrap();
        rows.extend(defectforge::manifest::read_rows(st.get(key).await.unwrap(), p).unwrap());
    }
    assert_eq!(rows.len() as u64, idx.rows);
    rows
}

/// What a user checks on a finished campaign: exactly the planned sample ids, each once; every
/// object present with the recorded size and sha256; images decode; masks are binary and
/// non-empty; pixels outside the mask equal the normal image.
pub async fn verify_campaign(
    st: &dyn ObjectStore,
    cid: &str,
    seed: u64,
    total: u64,
    s3: &S3Config,
) -> Vec<ManifestRow> {
    let rows = manifest_rows(st, cid).await;
    let mut ids: Vec<&str> = rows.iter().map(|r| r.sample_id.as_str()).collect();
    ids.sort();
    let mut want: Vec<String> = (0..total)
        .map(|i| defectforge::ids::sample_id(seed, i))
        .collect();
    want.sort();
    assert_eq!(ids.len(), want.len(), "row count");
    assert_eq!(
        ids,
        want.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "sample ids"
    );
    let root = format!("{}/", st.root_uri());
    for r in &rows {
        let img = st
            .get(r.image_uri.strip_prefix(&root).unwrap())
            .await
            .unwrap();
        let mask = st
            .get(r.mask_uri.strip_prefix(&root).unwrap())
            .await
            .unwrap();
        assert_eq!(img.len() as u64, r.image_size, "{}", r.image_uri);
        assert_eq!(mask.len() as u64, r.mask_size, "{}", r.mask_uri);
        assert_eq!(
            defectforge::ids::sha256_hex(&img),
            r.image_sha256,
            "{}",
            r.image_uri
        );
        assert_eq!(
            defectforge::ids::sha256_hex(&mask),
            r.mask_sha256,
            "{}",
            r.mask_uri
        );
        let out = image::load_from_memory(&img).unwrap().to_rgb8();
        let m = image::load_from_memory(&mask).unwrap().to_luma8();
        assert!(
            m.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255),
            "mask {} is not binary",
            r.mask_uri
        );
        let area = m.pixels().filter(|p| p.0[0] == 255).count() as u64;
        assert!(
            area > 0 && area == r.mask_area,
            "mask {} area {area} vs row {}",
            r.mask_uri,
            r.mask_area
        );
        let (nst, nkey) = store::open_object(&r.normal_uri, s3).await.unwrap();
        let normal = image::load_from_memory(&nst.get(&nkey).await.unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(normal.dimensions(), out.dimensions());
        assert_eq!(
            defectforge::imaging::changed_outside(&normal, &out, &m),
            0,
            "{} changed outside its mask",
            r.image_uri
        );
        assert!(
            r.mean_abs_change_inside > 0.0,
            "{} has no visible anomaly",
            r.image_uri
        );
        assert_eq!(r.mean_abs_change_outside, 0.0);
    }
    rows
}

/// Campaign TOML over the demo dataset at `dataset` with `n` samples per defect type.
pub fn demo_campaign(
    name: &str,
    seed: u64,
    dataset: &str,
    output: &str,
    per_type: u64,
    shard_size: u32,
    generator: Option<&str>,
) -> String {
    let g = |default: &str| generator.unwrap_or(default).to_string();
    format!(
        r#"
name = "{name}"
seed = {seed}
shard_size = {shard_size}
shard_time_limit_s = 120
output = "{output}"
[dataset]
source = "{dataset}"
[categories.carpet.defects.color]
count = {per_type}
generator = "{g1}"
mask = "real"
[categories.carpet.defects.cut]
count = {per_type}
generator = "{g2}"
mask = "scar"
[categories.wood.defects.scratch]
count = {per_type}
generator = "{g1}"
mask = "perlin"
[categories.bottle.defects.broken_large]
count = {per_type}
generator = "{g2}"
mask = "real"
few_shot_split = "official"
"#,
        g1 = g("perlin"),
        g2 = g("cutpaste"),
    )
}

pub fn kill_term(c: &mut Child) -> Option<i32> {
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    let t0 = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s.code();
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = c.kill();
            panic!("worker did not stop within 60 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The shared parity fixtures (DEFECTFORGE_FIXTURES, default ../shared/fixtures), or None
/// (with a note) when they are absent and the variable is unset.
pub fn fixtures() -> Option<PathBuf> {
    let p = std::env::var_os("DEFECTFORGE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared/fixtures"));
    if p.join("tiny-ldm").is_dir() && p.join("anomalydiffusion-tiny").is_dir() {
        Some(p)
    } else {
        assert!(
            std::env::var_os("DEFECTFORGE_FIXTURES").is_none(),
            "DEFECTFORGE_FIXTURES={} has no tiny-ldm / anomalydiffusion-tiny",
            p.display()
        );
        eprintln!("no fixtures at {}; skipping", p.display());
        None
    }
}

/// bert-style vocab.txt from the fixture's word list (the id is the line number).
pub fn write_vocab(fx: &Path, out: &Path) {
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.join("tiny-ldm/config.json")).unwrap()).unwrap();
    let size = cfg["official_yaml_equivalent"]["model"]["params"]["cond_stage_config"]["params"]
        ["vocab_size"]
        .as_u64()
        .unwrap() as usize;
    let mut lines: Vec<String> = (0..size).map(|i| format!("[unused{i}]")).collect();
    for (w, id) in cfg["fixture_vocabulary"].as_object().unwrap() {
        lines[id.as_u64().unwrap() as usize] = w.clone();
    }
    std::fs::write(out, lines.join("\n") + "\n").unwrap();
}

/// Imports the fixtures' tiny AnomalyDiffusion model with `defectforge models import` (plus
/// `extra` arguments) into `to`; returns the model URI.
pub fn import_fixture_model(sc: &Scenario, fx: &Path, to: &str, extra: &[&str]) -> String {
    let vocab = sc.dir.path().join("vocab.txt");
    write_vocab(fx, &vocab);
    let p = |r: &str| fx.join(r).to_string_lossy().into_owned();
    let (ckpt, cfg, emb, se) = (
        p("tiny-ldm/model.ckpt"),
        p("tiny-ldm/config.json"),
        p("anomalydiffusion-tiny/embeddings.pt"),
        p("anomalydiffusion-tiny/spatial_encoder.pt"),
    );
    let mut args = vec![
        "models",
        "import",
        "--ldm-ckpt",
        &ckpt,
        "--ldm-config",
        &cfg,
        "--vocab",
        vocab.to_str().unwrap(),
        "--embeddings",
        &emb,
        "--spatial-encoder",
        &se,
        "--to",
        to,
    ];
    args.extend_from_slice(extra);
    sc.ok(&args).trim().to_string()
}

/// Pixels more than `d` pixels (Chebyshev) away from every mask pixel.
pub fn far_from_mask(mask: &image::GrayImage, d: i64) -> Vec<bool> {
    let (w, h) = (mask.width() as i64, mask.height() as i64);
    let on: Vec<(i64, i64)> = mask
        .enumerate_pixels()
        .filter(|(_, _, p)| p.0[0] > 0)
        .map(|(x, y, _)| (x as i64, y as i64))
        .collect();
    let mut near = vec![false; (w * h) as usize];
    for (x, y) in on {
        for yy in (y - d).max(0)..=(y + d).min(h - 1) {
            for xx in (x - d).max(0)..=(x + d).min(w - 1) {
                near[(yy * w + xx) as usize] = true;
            }
        }
    }
    near.into_iter().map(|n| !n).collect()
}

/// Waits (up to 10 minutes) until training run `run` under `store` has committed `n`
/// checkpoints, failing with `why` and its log if `child` exits first.
pub async fn wait_for_commits(
    store: &dyn ObjectStore,
    run: &str,
    n: usize,
    child: &mut std::process::Child,
    why: &dyn Fn() -> String,
) {
    let t0 = std::time::Instant::now();
    loop {
        let commits = store
            .list(&format!("training/{run}/checkpoints/"))
            .await
            .unwrap()
            .into_iter()
            .filter(|m| m.key.ends_with(".commit"))
            .count();
        if commits >= n {
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "{}", why());
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(600),
            "no checkpoint of {run}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
