//! Pipeline benchmark (docs/benchmarks.md): end-to-end samples/s through RabbitMQ + S3 with
//! 256×256 images for the `noop` and `perlin` generators at 1, 2 and 4 worker processes, next to
//! the S3 server's raw PUT rate for objects of that size; plan + submit of a 1,000,000-sample
//! campaign (seconds, peak RSS); finalize of 1,000,000 rows from synthesized fragments at the
//! default shard size.
//!
//! Run against the services tests/services.sh starts:
//!   cargo build --release --bins
//!   eval "$(tests/services.sh start)"
//!   cargo bench -p defectforge-coordinator --bench pipeline
//! Environment: DEFECTFORGE_BENCH_SAMPLES (default 960), DEFECTFORGE_BENCH_WORKERS ("1,2,4"),
//! DEFECTFORGE_BENCH_PARTS (default "put,e2e,submit,finalize") to run only some parts.

use bytes::Bytes;
use defectforge::ledger::{self, CampaignRecord};
use defectforge::manifest::ManifestRow;
use defectforge::store::{self, ObjectStore, S3Config};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn var(n: &str) -> String {
    std::env::var(n)
        .unwrap_or_else(|_| panic!("{n} is not set: eval \"$(tests/services.sh start)\" first"))
}

struct Env {
    endpoint: String,
    bucket: String,
    ak: String,
    sk: String,
    amqp: String,
    root: PathBuf,
}

impl Env {
    fn s3(&self) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint.clone()),
            region: Some("garage".into()),
            path_style: Some(true),
            access_key_id: Some(self.ak.clone()),
            secret_access_key: Some(self.sk.clone()),
        }
    }
    fn bin(&self, name: &str) -> PathBuf {
        let p = self.root.join("target/release").join(name);
        assert!(
            p.exists(),
            "build the release binaries first: cargo build --release --bins"
        );
        p
    }
    fn cmd(&self, name: &str, queue: &str) -> Command {
        let mut c = Command::new(self.bin(name));
        c.env("DEFECTFORGE_S3_ENDPOINT", &self.endpoint)
            .env("DEFECTFORGE_S3_REGION", "garage")
            .env("AWS_ACCESS_KEY_ID", &self.ak)
            .env("AWS_SECRET_ACCESS_KEY", &self.sk)
            .env("DEFECTFORGE_AMQP_URL", &self.amqp)
            .env("DEFECTFORGE_QUEUE", queue)
            .env("RUST_LOG", "warn");
        c
    }
}

/// Peak RSS (KiB) and wall seconds of a child process, via wait4.
fn wait_rusage(child: Child) -> (i32, u64) {
    let pid = child.id() as i32;
    std::mem::forget(child);
    let mut status = 0;
    let mut ru: RUsage = unsafe { std::mem::zeroed() };
    let r = unsafe { wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid);
    (status, ru.ru_maxrss as u64)
}

#[repr(C)]
struct RUsage {
    ru_utime: [i64; 2],
    ru_stime: [i64; 2],
    ru_maxrss: i64,
    _rest: [i64; 13],
}
extern "C" {
    fn wait4(pid: i32, status: *mut i32, options: i32, rusage: *mut RUsage) -> i32;
}

fn delete_queue(q: &str) {
    for q in [q.to_string(), format!("{q}.dead")] {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_queue", &q])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn campaign(
    name: &str,
    dataset: &Path,
    output: &str,
    samples: u64,
    generator: &str,
    shard_size: u32,
) -> String {
    let per = samples / 4;
    format!(
        r#"
name = "{name}"
seed = 1
shard_size = {shard_size}
output = "{output}"
[dataset]
source = "{d}"
[categories.carpet.defects.color]
count = {per}
generator = "{generator}"
[categories.carpet.defects.cut]
count = {per}
generator = "{generator}"
mask = "scar"
[categories.wood.defects.scratch]
count = {per}
generator = "{generator}"
mask = "perlin"
[categories.bottle.defects.broken_large]
count = {per}
generator = "{generator}"
"#,
        d = dataset.display()
    )
}

async fn raw_put_rate(env: &Env, body: Bytes, n: usize, concurrency: usize) -> f64 {
    use futures_util::StreamExt;
    let st = store::open(
        &format!("s3://{}/bench-raw-{:08x}", env.bucket, rand_u32()),
        &env.s3(),
    )
    .await
    .unwrap();
    let t = Instant::now();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let st = st.clone();
            let body = body.clone();
            async move {
                st.put(&format!("o/{i:08}.png"), body, "image/png")
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    n as f64 / t.elapsed().as_secs_f64()
}

fn rand_u32() -> u32 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos())
        ^ std::process::id()
}

async fn end_to_end(
    env: &Env,
    dataset: &Path,
    generator: &str,
    workers: usize,
    samples: u64,
) -> f64 {
    let tag = format!("{generator}-{workers}-{:08x}", rand_u32());
    let queue = format!("bench.{tag}");
    let output = format!("s3://{}/bench/{tag}", env.bucket);
    let dir = tempfile::tempdir().unwrap();
    let cpath = dir.path().join("c.toml");
    std::fs::write(
        &cpath,
        campaign(&tag, dataset, &output, samples, generator, 16),
    )
    .unwrap();
    let out = env
        .cmd("defectforge", &queue)
        .args(["submit", cpath.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cid = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let st = store::open(&output, &env.s3()).await.unwrap();
    let t = Instant::now();
    let mut kids: Vec<Child> = (0..workers)
        .map(|_| {
            env.cmd("defectforge-worker", &queue)
                .args(["--idle-exit-s", "3"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let shards = samples.div_ceil(16);
    loop {
        let s = ledger::fragments(st.as_ref(), &cid).await.unwrap();
        if s.len() as u64 >= shards {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rate = samples as f64 / t.elapsed().as_secs_f64();
    for k in &mut kids {
        let _ = k.wait();
    }
    delete_queue(&queue);
    rate
}

fn row(i: u64, shard: &str, cid: &str) -> ManifestRow {
    let now = chrono::Utc::now();
    let sid = defectforge::ids::sample_id(1, i);
    ManifestRow {
        sample_id: sid.clone(),
        shard_id: shard.to_string(),
        campaign_id: cid.to_string(),
        sample_index: i,
        category: "carpet".into(),
        defect_type: "color".into(),
        image_uri: format!("/bench/campaigns/{cid}/samples/{sid}/0190aa-0001.png"),
        mask_uri: format!("/bench/campaigns/{cid}/samples/{sid}/0190aa-0001_mask.png"),
        normal_uri: format!("/data/carpet/train/good/{:03}.png", i % 280),
        mask_source: "real".into(),
        source_mask_uri: Some(format!("/data/carpet/ground_truth/color/{:03}_mask.png", i % 6)),
        generator: "perlin".into(),
        generator_version: "1".into(),
        model_digest: None,
        seed: defectforge::ids::sample_seed(1, i),
        generator_settings: r#"{"perlin":{"opacity":[0.2,1.0],"threshold":0.5,"scale_exp":[0,5],"texture_dir":null}}"#.into(),
        width: 256,
        height: 256,
        mask_area: 1000 + i % 777,
        bbox_x: 10,
        bbox_y: 20,
        bbox_w: 30,
        bbox_h: 40,
        image_sha256: defectforge::ids::sha256_hex(&i.to_le_bytes()),
        image_size: 150_000 + i % 1000,
        mask_sha256: defectforge::ids::sha256_hex(&(i + 1).to_le_bytes()),
        mask_size: 900,
        mean_abs_change_inside: 31.5,
        mean_abs_change_outside: 0.0,
        background_psnr: f32::INFINITY,
        normal_width: 256,
        normal_height: 256,
        diffusion_steps: None,
        reweighting: None,
        mask_placement: "off".into(),
        foreground_coverage: None,
        mask_attempts: None,
        latent_mask_area: 12,
        thin_defect: false,
        worker_id: "bench".into(),
        attempt: "0190aa-0001".into(),
        duration_ms: 12.0,
        started_at: now,
        finished_at: now,
    }
}

/// Synthesizes the fragments of a `total`-sample campaign at the default shard size.
async fn synthesize(st: Arc<dyn ObjectStore>, total: u64) -> String {
    let c = defectforge::Campaign::parse(
        &format!("name = \"synthetic\"\nseed = 1\noutput = \"/x\"\n[dataset]\nsource = \"/d\"\n[categories.carpet.defects.color]\ncount = {total}\n"),
        Path::new("/"),
        "synthetic.toml",
    )
    .unwrap();
    let shard_size = c.shard_size as u64;
    let cid = "synthetic-000000000000".to_string();
    let rec = CampaignRecord {
        campaign_id: cid.clone(),
        plan_digest: "0".repeat(64),
        plan_version: 1,
        total_samples: total,
        shard_count: total.div_ceil(shard_size),
        shard_size: shard_size as u32,
        shard_time_limit_s: 1200,
        seed: 1,
        created_at: chrono::Utc::now(),
        counts: vec![],
        spec: c,
        inputs: None,
    };
    ledger::write_record(st.as_ref(), &rec).await.unwrap();
    use futures_util::StreamExt;
    futures_util::stream::iter(0..rec.shard_count)
        .map(|s| {
            let st = st.clone();
            let cid = cid.clone();
            async move {
                let shard = defectforge::ids::shard_id(s);
                let rows: Vec<ManifestRow> = (s * shard_size..((s + 1) * shard_size).min(total))
                    .map(|i| row(i, &shard, &cid))
                    .collect();
                let body = defectforge::manifest::write_parquet(&rows).unwrap();
                st.put(
                    &defectforge::layout::fragment(&cid, &shard, "0190aa-0001"),
                    Bytes::from(body),
                    "application/vnd.apache.parquet",
                )
                .await
                .unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    cid
}

#[tokio::main]
async fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let env = Env {
        endpoint: var("DEFECTFORGE_TEST_S3_ENDPOINT"),
        bucket: var("DEFECTFORGE_TEST_S3_BUCKET"),
        ak: var("DEFECTFORGE_TEST_S3_ACCESS_KEY_ID"),
        sk: var("DEFECTFORGE_TEST_S3_SECRET_ACCESS_KEY"),
        amqp: var("DEFECTFORGE_TEST_AMQP_URL"),
        root: root.clone(),
    };
    let samples: u64 = std::env::var("DEFECTFORGE_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(960);
    let workers: Vec<usize> = std::env::var("DEFECTFORGE_BENCH_WORKERS")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let data = tempfile::tempdir().unwrap();
    defectforge::demo::materialise(data.path()).unwrap();
    println!(
        "machine: {} cores; RabbitMQ and Garage on the same machine",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    // the size of a generated 256x256 image
    let img = image::open(data.path().join("carpet/train/good/000.png"))
        .unwrap()
        .to_rgb8();
    let png = Bytes::from(defectforge::imaging::encode_png_rgb(&img).unwrap());
    println!("object size: {} bytes (256x256 PNG)", png.len());
    let parts = std::env::var("DEFECTFORGE_BENCH_PARTS")
        .unwrap_or_else(|_| "put,e2e,submit,finalize".into());
    let part = |p: &str| parts.split(',').any(|x| x == p);
    for w in workers.iter().filter(|_| part("put")) {
        let rate = raw_put_rate(&env, png.clone(), 2000, 8 * w).await;
        println!("raw S3 PUT, concurrency {:>2}: {rate:>8.0} objects/s = {:>7.0} samples/s (2 objects per sample)", 8 * w, rate / 2.0);
    }
    for generator in ["noop", "perlin"].into_iter().filter(|_| part("e2e")) {
        for &w in &workers {
            let r = end_to_end(&env, data.path(), generator, w, samples).await;
            println!("end to end, {generator:>6}, {w} worker(s): {r:>7.1} samples/s ({:.2} ms/sample/worker)", 1000.0 * w as f64 / r);
        }
    }
    // plan + submit of 1,000,000 samples
    let dir = tempfile::tempdir().unwrap();
    if part("submit") {
        let queue = format!("bench.1m.{:08x}", rand_u32());
        let cpath = dir.path().join("c.toml");
        std::fs::write(
            &cpath,
            campaign(
                "million",
                data.path(),
                &format!("s3://{}/bench/1m-{:08x}", env.bucket, rand_u32()),
                1_000_000,
                "perlin",
                32,
            ),
        )
        .unwrap();
        let t = Instant::now();
        let child = env
            .cmd("defectforge", &queue)
            .args(["submit", cpath.to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (status, rss) = wait_rusage(child);
        println!(
        "plan + submit 1,000,000 samples (31,250 shards): {:.1} s, peak RSS {} MiB, exit {status}",
        t.elapsed().as_secs_f64(),
        rss / 1024
    );
        delete_queue(&queue);
    }
    if !part("finalize") {
        return;
    }
    // finalize 1,000,000 rows from fragments at the default shard size
    for (label, loc) in [
        (
            "local directory",
            dir.path().join("fin").to_string_lossy().into_owned(),
        ),
        (
            "S3 (Garage)",
            format!("s3://{}/bench/fin-{:08x}", env.bucket, rand_u32()),
        ),
    ] {
        let st = store::open(&loc, &env.s3()).await.unwrap();
        let ts = Instant::now();
        let cid = synthesize(st.clone(), 1_000_000).await;
        let synth = ts.elapsed().as_secs_f64();
        let t = Instant::now();
        let child = env
            .cmd("defectforge", "unused")
            .args(["finalize", &cid, "--output", &loc, "--no-verify"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (status, rss) = wait_rusage(child);
        println!("finalize 1,000,000 rows from 31,250 fragments in {label}: {:.1} s, peak RSS {} MiB, exit {status} (synthesis took {synth:.0} s)", t.elapsed().as_secs_f64(), rss / 1024);
    }
}
