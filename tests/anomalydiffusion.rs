//! AnomalyDiffusion end to end: the fixtures' tiny model is imported with `defectforge models
//! import` exactly as a user imports the real one (official model.ckpt, embeddings.pt,
//! spatial_encoder.pt), then a campaign generates with it through RabbitMQ and S3, and the
//! manifest records what the user needs to trust the output.

mod common;

use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_generates_with_an_imported_anomalydiffusion_model() {
    let Some(fx) = fixtures() else { return };
    let sc = Scenario::new("ad-e2e");
    let models = sc.s3_uri("models");
    let uri = import_fixture_model(&sc, &fx, &models, &[]);
    assert!(uri.starts_with(&format!("{models}/models/ad-")), "{uri}");
    // Content-hashed: importing the same files again names the same model.
    assert_eq!(import_fixture_model(&sc, &fx, &models, &[]), uri);
    let shown: serde_json::Value = serde_json::from_str(&sc.ok(&["models", "show", &uri])).unwrap();
    let digest = shown["digest"].as_str().unwrap().to_string();
    assert_eq!(
        shown["defect_types"],
        serde_json::json!(["bottle+broken_large", "capsule+crack", "wood+color"])
    );
    assert_eq!(
        shown["spatial_encoder"]["widths"],
        serde_json::json!([4, 8, 16, 32])
    );
    for f in [
        "ldm.safetensors",
        "ldm.json",
        "vocab.txt",
        "spatial_encoder.safetensors",
        "embeddings.safetensors",
    ] {
        assert!(
            shown["files"][f]["sha256"].is_string(),
            "{f} not in the manifest"
        );
    }

    let local = sc.dir.path().join("dataset");
    defectforge::demo::materialise(&local).unwrap();
    let output = sc.s3_uri("out");
    let camp = sc.write(
        "ad.toml",
        &format!(
            r#"
name = "ad e2e"
seed = 5
shard_size = 3
shard_time_limit_s = 300
output = "{output}"
[dataset]
source = "{data}"
[categories.bottle.defects.broken_large]
count = 3
generator = "anomalydiffusion"
mask = "real"
[categories.bottle.defects.broken_large.anomalydiffusion]
model = "{uri}"
steps = 10
[categories.wood.defects.scratch]
count = 3
generator = "anomalydiffusion"
mask = "perlin"
[categories.wood.defects.scratch.anomalydiffusion]
model = "{uri}"
embedding = "wood+color"
steps = 10
background_paste = true
feather_px = 2.0
[categories.carpet.defects.color]
count = 2
generator = "anomalydiffusion"
mask = "real"
[categories.carpet.defects.color.anomalydiffusion]
model = "{uri}"
embedding = "capsule+crack"
steps = 20
prompt = "a photo of a small *"
full_resolution = true
"#,
            data = local.display()
        ),
    );
    let cache = sc.dir.path().join("model-cache");
    let cid = sc.run_with_worker(&camp, &output, &cache, 600);
    assert!(
        sc.worker_log("a").contains("model loaded"),
        "{}",
        sc.worker_log("a")
    );
    // The model's files are in the cache (re-hashed at every load, no marker trusted).
    let id = uri.rsplit('/').next().unwrap();
    assert!(cache.join(id).read_dir().unwrap().count() > 0);
    assert!(!cache.join(id).join(".verified").exists());
    sc.ok(&["finalize", &cid, "--output", &output]);
    let st = sc.store(&output).await;
    let rows = manifest_rows(st.as_ref(), &cid).await;
    assert_eq!(rows.len(), 8);
    let root = format!("{}/", st.root_uri());
    for r in &rows {
        assert_eq!(r.generator, "anomalydiffusion");
        assert_eq!(r.model_digest.as_deref(), Some(digest.as_str()));
        let want_steps = if r.category == "carpet" { 20 } else { 10 };
        assert_eq!(r.diffusion_steps, Some(want_steps));
        // Re-weighting defaults: on for texture categories, off for objects.
        let want_rw = if r.category == "bottle" {
            "off"
        } else {
            "official"
        };
        assert_eq!(r.reweighting.as_deref(), Some(want_rw), "{}", r.category);
        assert_eq!((r.width, r.height), (256, 256));
        assert_eq!((r.normal_width, r.normal_height), (256, 256));
        assert!(r.mean_abs_change_inside > 0.0, "{r:?}");
        let img = image::load_from_memory(
            &st.get(r.image_uri.strip_prefix(&root).unwrap())
                .await
                .unwrap(),
        )
        .unwrap()
        .to_rgb8();
        let mask = image::load_from_memory(
            &st.get(r.mask_uri.strip_prefix(&root).unwrap())
                .await
                .unwrap(),
        )
        .unwrap()
        .to_luma8();
        let normal = image::open(&r.normal_uri).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), mask.dimensions());
        let psnr = defectforge::imaging::background_psnr(&normal, &img, &mask);
        assert!((psnr - r.background_psnr).abs() < 1e-3 || psnr == r.background_psnr);
        match r.category.as_str() {
            // The official output: the background only approximates the normal image.
            "bottle" => assert!(r.mean_abs_change_outside > 0.0 && r.background_psnr.is_finite()),
            // A feathered paste: exact beyond the feather band (2 px), blended inside it.
            "wood" | "carpet" => {
                let far = far_from_mask(&mask, 3);
                for (i, (a, b)) in normal.pixels().zip(img.pixels()).enumerate() {
                    if far[i] {
                        assert_eq!(
                            a, b,
                            "{}: pixel {i} beyond the feather changed",
                            r.sample_id
                        );
                    }
                }
            }
            other => panic!("unexpected category {other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_or_embedding_is_dead_lettered_with_a_clear_cause() {
    let Some(fx) = fixtures() else { return };
    let sc = Scenario::new("ad-errors");
    let models = sc.s3_uri("models");
    let uri = import_fixture_model(&sc, &fx, &models, &[]);
    let local = sc.dir.path().join("dataset");
    defectforge::demo::materialise(&local).unwrap();
    let output = sc.s3_uri("out");
    let missing = format!("{models}/models/ad-0000000000000000");
    let camp = sc.write(
        "bad.toml",
        &format!(
            r#"
name = "ad errors"
seed = 1
shard_size = 2
shard_time_limit_s = 120
output = "{output}"
[dataset]
source = "{data}"
[categories.bottle.defects.broken_large]
count = 2
generator = "anomalydiffusion"
[categories.bottle.defects.broken_large.anomalydiffusion]
model = "{missing}"
steps = 10
[categories.carpet.defects.cut]
count = 2
generator = "anomalydiffusion"
mask = "scar"
[categories.carpet.defects.cut.anomalydiffusion]
model = "{uri}"
steps = 10
"#,
            data = local.display()
        ),
    );
    let cid = sc
        .ok(&["submit", camp.to_str().unwrap()])
        .trim()
        .to_string();
    let mut w = sc.worker("e", &["--idle-exit-s", "10", "--http-addr", "off"]);
    let status = sc.wait_status(&cid, &output, Duration::from_secs(300), |v| {
        v["dead"].as_u64().unwrap_or(0) == 2
    });
    kill_term(&mut w);
    for f in status["failures"].as_array().unwrap() {
        assert_eq!(f["class"], "permanent", "{f}");
    }
    let text = status.to_string();
    assert!(text.contains("model.json"), "{text}");
    assert!(text.contains("carpet+cut"), "{text}");
    assert!(text.contains("bottle/broken_large"), "{text}");
}

/// Regression (issue 11): a shard that mixes two defect types of one model used to apply the
/// first type's embedding, prompt and background paste to every sample of the batch. Each
/// sample must get its own settings, and the mixed shard must paint what each type's own
/// shard paints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_sharing_a_shard_and_a_model_each_keep_their_own_settings() {
    let Some(fx) = fixtures() else { return };
    let sc = Scenario::new("ad-mixed");
    let models = sc.s3_uri("models");
    let uri = import_fixture_model(&sc, &fx, &models, &[]);
    let local = sc.dir.path().join("dataset");
    defectforge::demo::materialise(&local).unwrap();
    let output = sc.s3_uri("out");
    // Same model, steps, eta, re-weighting and BatchNorm mode (one sampler call); wood has an
    // embedding override and a background paste, bottle neither.
    let campaign = |shard_size: u32| {
        format!(
            r#"
name = "ad mixed"
seed = 11
shard_size = {shard_size}
shard_time_limit_s = 300
output = "{output}"
[dataset]
source = "{data}"
[categories.bottle.defects.broken_large]
count = 3
generator = "anomalydiffusion"
mask = "real"
[categories.bottle.defects.broken_large.anomalydiffusion]
model = "{uri}"
steps = 10
reweighting = "off"
[categories.wood.defects.scratch]
count = 3
generator = "anomalydiffusion"
mask = "perlin"
[categories.wood.defects.scratch.anomalydiffusion]
model = "{uri}"
embedding = "wood+color"
prompt = "a close-up photo of a *"
steps = 10
reweighting = "off"
background_paste = true
feather_px = 2.0
"#,
            data = local.display()
        )
    };
    let cache = sc.dir.path().join("model-cache");
    let st = sc.store(&output).await;
    let root = format!("{}/", st.root_uri());
    let mut runs = vec![];
    let mut tampered: Option<(std::path::PathBuf, Vec<u8>)> = None;
    for shard_size in [6, 3] {
        let camp = sc.write(&format!("mixed-{shard_size}.toml"), &campaign(shard_size));
        let cid = sc.run_with_worker(&camp, &output, &cache, 600);
        if let Some((f, good)) = tampered.take() {
            // ...and the next worker fetched it again instead of loading it
            assert_eq!(std::fs::read(&f).unwrap(), good, "{}", f.display());
            assert!(
                sc.worker_log("a")
                    .contains("differs from its manifest digest"),
                "{}",
                sc.worker_log("a")
            );
        } else {
            // after the first run, a cached model file changes on disk (same size)...
            let model_dir = cache.read_dir().unwrap().next().unwrap().unwrap().path();
            let mut files: Vec<_> = model_dir
                .read_dir()
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            files.sort();
            let f = files.into_iter().next().expect("a cached safetensors file");
            let good = std::fs::read(&f).unwrap();
            std::fs::write(&f, vec![0u8; good.len()]).unwrap();
            tampered = Some((f, good));
        }
        sc.ok(&["finalize", &cid, "--output", &output]);
        let mut rows = manifest_rows(st.as_ref(), &cid).await;
        rows.sort_by_key(|r| r.sample_index);
        assert_eq!(rows.len(), 6);
        let shards: std::collections::BTreeSet<_> = rows.iter().map(|r| &r.shard_id).collect();
        assert_eq!(
            shards.len(),
            6 / shard_size as usize,
            "shard_size {shard_size}"
        );
        let mut images = vec![];
        for r in &rows {
            let s: serde_json::Value = serde_json::from_str(&r.generator_settings).unwrap();
            let ad = &s["anomalydiffusion"];
            let key = |k: &str| k.strip_prefix(&root).unwrap().to_string();
            let img = image::load_from_memory(&st.get(&key(&r.image_uri)).await.unwrap())
                .unwrap()
                .to_rgb8();
            let mask = image::load_from_memory(&st.get(&key(&r.mask_uri)).await.unwrap())
                .unwrap()
                .to_luma8();
            let normal = image::open(&r.normal_uri).unwrap().to_rgb8();
            match r.category.as_str() {
                "wood" => {
                    assert_eq!(ad["embedding"], "wood+color", "{}", r.sample_id);
                    assert_eq!(ad["background_paste"], true);
                    assert_eq!(ad["prompt"], "a close-up photo of a *");
                    let far = far_from_mask(&mask, 3);
                    let changed = normal
                        .pixels()
                        .zip(img.pixels())
                        .enumerate()
                        .filter(|(i, (a, b))| far[*i] && a != b)
                        .count();
                    assert_eq!(
                        changed, 0,
                        "{} (shard_size {shard_size}): the background paste was lost",
                        r.sample_id
                    );
                }
                "bottle" => {
                    assert!(ad["embedding"].is_null(), "{}", r.sample_id);
                    assert_eq!(ad["background_paste"], false);
                    assert_eq!(ad["prompt"], "random");
                    assert!(
                        r.mean_abs_change_outside > 0.0,
                        "{}: the official output does not paste the background",
                        r.sample_id
                    );
                }
                other => panic!("unexpected category {other}"),
            }
            images.push((r.sample_id.clone(), img));
        }
        runs.push(images);
    }
    // Sample seeds depend on (campaign seed, index) only, and spatial_bn = "eval" makes a
    // sample independent of its batch: the mixed shard paints what the per-type shards
    // paint (up to float reassociation across batch sizes).
    for ((id_a, a), (id_b, b)) in runs[0].iter().zip(&runs[1]) {
        assert_eq!(id_a, id_b);
        let mad = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| (*x as f64 - *y as f64).abs())
            .sum::<f64>()
            / a.as_raw().len() as f64;
        eprintln!("{id_a}: mixed vs per-type shard, mean |Δ| = {mad:.4}");
        assert!(
            mad < 0.5,
            "{id_a}: the mixed shard painted something else (mean |Δ| = {mad:.2})"
        );
    }
}
