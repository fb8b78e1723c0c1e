//! Learned masks end to end: the fixtures' tiny model is imported with its mask embeddings,
//! `defectforge masks generate` writes and then completes a mask bank in S3, and a campaign
//! draws masks from that bank and samples new ones on the fly, through RabbitMQ and S3; the
//! manifest says where each mask came from, what the foreground constraint did, and which
//! masks are too thin for the latent grid.

mod common;

use common::*;

fn provenance(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

/// The fixture model with the fixture mask embedding for bottle+broken_large and wood+scratch.
fn import_with_mask_models(sc: &Scenario, fx: &std::path::Path, models: &str) -> String {
    let mask_pt = fx.join("anomalydiffusion-tiny/mask_embeddings.pt");
    import_fixture_model(
        sc,
        fx,
        models,
        &[
            "--mask-embeddings",
            &format!("bottle+broken_large={}", mask_pt.display()),
            "--mask-embeddings",
            &format!("wood+scratch={}", mask_pt.display()),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_uses_banked_and_generated_masks() {
    let Some(fx) = fixtures() else { return };
    let sc = Scenario::new("masks-e2e");
    let models = sc.s3_uri("models");
    let uri = import_with_mask_models(&sc, &fx, &models);
    let shown: serde_json::Value = serde_json::from_str(&sc.ok(&["models", "show", &uri])).unwrap();
    assert_eq!(
        shown["mask_types"],
        serde_json::json!(["bottle+broken_large", "wood+scratch"])
    );
    assert_eq!(shown["mask_embedding_shape"], serde_json::json!([16, 32]));
    assert!(shown["files"]["mask_embeddings.safetensors"]["sha256"].is_string());

    // A bank of 3 masks, then completed to 4: the first 3 are kept as they are.
    let bank = sc.s3_uri("bank");
    let cache = sc.dir.path().join("model-cache");
    let gen = |count: &str| {
        sc.ok(&[
            "masks",
            "generate",
            "--model",
            &uri,
            "--types",
            "bottle+broken_large",
            "--count",
            count,
            "--steps",
            "10",
            "--seed",
            "11",
            "--to",
            &bank,
            "--model-cache",
            cache.to_str().unwrap(),
        ])
    };
    gen("3");
    let st_bank = sc.store(&bank).await;
    let p3 = provenance(
        &st_bank
            .get("bottle/broken_large/provenance.json")
            .await
            .unwrap(),
    );
    assert_eq!(p3["masks"].as_array().unwrap().len(), 3);
    gen("4");
    let p4 = provenance(
        &st_bank
            .get("bottle/broken_large/provenance.json")
            .await
            .unwrap(),
    );
    let masks = p4["masks"].as_array().unwrap();
    assert_eq!(masks.len(), 4);
    // A stray image in the bank's folder is not a bank mask: campaigns use the provenance.
    let stray = image::GrayImage::from_pixel(256, 256, image::Luma([255]));
    st_bank
        .put(
            "bottle/broken_large/zz_stray.png",
            defectforge::imaging::encode_png_gray(&stray)
                .unwrap()
                .into(),
            "image/png",
        )
        .await
        .unwrap();
    assert_eq!(&masks[..3], &p3["masks"].as_array().unwrap()[..]);
    assert_eq!(p4["model_digest"], shown["digest"]);
    assert_eq!(p4["settings"]["guidance"], serde_json::json!(5.0));
    let drawn = p4["stats"]["drawn"].as_u64().unwrap();
    assert!(drawn >= 4);
    let rejected = p4["stats"]["rejected_border"].as_u64().unwrap()
        + p4["stats"]["rejected_empty"].as_u64().unwrap();
    assert!((p4["rejection_rate"].as_f64().unwrap() - rejected as f64 / drawn as f64).abs() < 1e-9);
    for m in masks {
        let png = st_bank
            .get(&format!(
                "bottle/broken_large/{}",
                m["file"].as_str().unwrap()
            ))
            .await
            .unwrap();
        assert_eq!(
            defectforge::ids::sha256_hex(&png),
            m["sha256"].as_str().unwrap()
        );
        let img = image::load_from_memory(&png).unwrap().to_luma8();
        assert_eq!(img.dimensions(), (256, 256));
        assert!(img.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
        let area = img.pixels().filter(|p| p.0[0] > 0).count() as u64;
        assert_eq!(area, m["area"].as_u64().unwrap());
        assert!(area > 0);
        // The official border rule held for every banked mask.
        let line = |f: &dyn Fn(u32) -> (u32, u32)| {
            (0..256)
                .filter(|&i| img.get_pixel(f(i).0, f(i).1).0[0] > 0)
                .count()
        };
        for l in [
            line(&|i| (i, 0)),
            line(&|i| (i, 255)),
            line(&|i| (0, i)),
            line(&|i| (255, i)),
        ] {
            assert!(l as f64 <= 256.0 / 3.0, "a border line holds {l} pixels");
        }
        assert_eq!(
            m["thin"].as_bool().unwrap(),
            m["latent_mask_area"].as_u64().unwrap() == 0
        );
    }

    // A campaign: banked masks with a model-free generator, generated masks with the
    // AnomalyDiffusion generator (object category: constrained to the bottle) and with Perlin
    // on a texture (not constrained).
    let local = sc.dir.path().join("dataset");
    defectforge::demo::materialise(&local).unwrap();
    let output = sc.s3_uri("out");
    let camp = sc.write(
        "masks.toml",
        &format!(
            r#"
name = "learned masks e2e"
seed = 9
shard_size = 3
shard_time_limit_s = 600
output = "{output}"
[dataset]
source = "{data}"
[categories.bottle.defects.broken_large]
count = 3
generator = "cutpaste"
mask = "bank"
mask_bank = "{bank}"
[categories.bottle.defects.crack]
count = 2
generator = "anomalydiffusion"
mask = "generated"
[categories.bottle.defects.crack.anomalydiffusion]
model = "{uri}"
embedding = "bottle+broken_large"
steps = 10
thin_defects = "dilate"
feather_px = 1.0
[categories.bottle.defects.crack.mask_model]
embedding = "bottle+broken_large"
steps = 10
[categories.wood.defects.scratch]
count = 2
generator = "perlin"
mask = "generated"
[categories.wood.defects.scratch.mask_model]
model = "{uri}"
steps = 10
"#,
            data = local.display()
        ),
    );
    let cid = sc.run_with_worker(&camp, &output, &cache, 900);
    assert!(
        sc.worker_log("a").contains("learned masks sampled"),
        "{}",
        sc.worker_log("a")
    );
    let fin = sc.cli(&["finalize", &cid, "--output", &output]);
    assert!(fin.status.success());
    let fin_err = String::from_utf8_lossy(&fin.stderr);
    let st = sc.store(&output).await;
    let rows = manifest_rows(st.as_ref(), &cid).await;
    assert_eq!(rows.len(), 7);
    // finalize reports what the mask sources and the constraint did, and records it.
    let idx: defectforge::ledger::ManifestIndex = serde_json::from_slice(
        &st.get(&defectforge::layout::manifest_index(&cid))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(idx.masks.generated_masks, 4);
    assert_eq!(
        idx.masks.generated_draws,
        rows.iter()
            .filter_map(|r| r.mask_attempts)
            .map(u64::from)
            .sum::<u64>()
    );
    for (k, n) in &idx.masks.placement {
        assert_eq!(
            *n,
            rows.iter().filter(|r| &r.mask_placement == k).count() as u64
        );
    }
    let (changed, checked) = idx.masks.interventions();
    assert_eq!(checked, 5);
    assert!(
        fin_err.contains("learned masks sampled on the fly in"),
        "{fin_err}"
    );
    assert!(
        fin_err.contains(&format!(
            "foreground constraint changed {changed} of 5 masks"
        )),
        "{fin_err}"
    );
    let root = format!("{}/", st.root_uri());
    let bank_root = format!("{}/bottle/broken_large/", st_bank.root_uri());
    for r in &rows {
        let mask = image::load_from_memory(
            &st.get(r.mask_uri.strip_prefix(&root).unwrap())
                .await
                .unwrap(),
        )
        .unwrap()
        .to_luma8();
        let area = mask.pixels().filter(|p| p.0[0] > 0).count() as u64;
        assert_eq!(area, r.mask_area);
        assert!(area > 0);
        assert_eq!(
            r.latent_mask_area,
            defectforge::imaging::latent_mask_area(&mask)
        );
        assert_eq!(r.thin_defect, r.latent_mask_area == 0);
        match (r.category.as_str(), r.defect_type.as_str()) {
            ("bottle", "broken_large") => {
                assert_eq!(r.mask_source, "bank");
                let src = r.source_mask_uri.as_deref().unwrap();
                assert!(src.starts_with(&bank_root), "{src}");
                assert!(!src.ends_with("zz_stray.png"), "{src}");
                assert_eq!(r.mask_attempts, None);
            }
            ("bottle", "crack") => {
                assert_eq!(r.mask_source, "generated");
                assert_eq!(r.generator, "anomalydiffusion");
                assert!(r.mask_attempts.unwrap() >= 1);
                assert_eq!(r.source_mask_uri, None);
                // thin_defects = "dilate" samples whole latent cells and pastes the normal
                // image back: exact beyond the 1-px feather.
                let img = image::load_from_memory(
                    &st.get(r.image_uri.strip_prefix(&root).unwrap())
                        .await
                        .unwrap(),
                )
                .unwrap()
                .to_rgb8();
                let normal = image::open(&r.normal_uri).unwrap().to_rgb8();
                let far = far_from_mask(&mask, 2);
                for (i, (a, b)) in normal.pixels().zip(img.pixels()).enumerate() {
                    assert!(!far[i] || a == b, "{}: pixel {i} changed", r.sample_id);
                }
                assert!(r.mean_abs_change_inside > 0.0);
            }
            ("wood", "scratch") => {
                assert_eq!(r.mask_source, "generated");
                assert!(r.mask_attempts.unwrap() >= 1);
            }
            other => panic!("unexpected type {other:?}"),
        }
        if r.category == "bottle" {
            // Learned masks on an object category are kept on the object: the demo bottle is
            // a disk of radius 92 around the centre (±3 px) on a dark background.
            assert_ne!(r.mask_placement, "off", "{r:?}");
            let cov = r.foreground_coverage.unwrap();
            if r.mask_placement != "unplaceable" {
                assert!(cov >= 0.98, "{r:?}");
                let on_disk = mask
                    .enumerate_pixels()
                    .filter(|(x, y, p)| {
                        let (dx, dy) = (*x as f32 - 128.0, *y as f32 - 128.0);
                        p.0[0] > 0 && (dx * dx + dy * dy).sqrt() < 96.0
                    })
                    .count() as f64;
                assert!(
                    on_disk / area as f64 >= 0.98,
                    "{}: {:.3} of the mask on the bottle",
                    r.sample_id,
                    on_disk / area as f64
                );
            }
        } else {
            // Textures have no background: the constraint stays off by default.
            assert_eq!(r.mask_placement, "off");
            assert_eq!(r.foreground_coverage, None);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_mask_errors_name_the_missing_piece() {
    let Some(fx) = fixtures() else { return };
    let sc = Scenario::new("masks-err");
    let models = sc.s3_uri("models");
    // A model without mask embeddings cannot fill a bank.
    let uri = import_fixture_model(&sc, &fx, &models, &[]);
    let cache = sc.dir.path().join("model-cache");
    let bank = sc.s3_uri("bank");
    let err = sc.fails(&[
        "masks",
        "generate",
        "--model",
        &uri,
        "--types",
        "bottle+broken_large",
        "--count",
        "2",
        "--to",
        &bank,
        "--model-cache",
        cache.to_str().unwrap(),
    ]);
    assert!(
        err.contains("no mask model \"bottle+broken_large\"") && err.contains("--mask-embeddings"),
        "{err}"
    );
    // A mask embedding given without a <category>+<defect> name is refused at import.
    assert!(sc
        .fails(&[
            "models",
            "import",
            "--ldm-ckpt",
            "x",
            "--ldm-config",
            "x",
            "--vocab",
            "x",
            "--embeddings",
            "x",
            "--spatial-encoder",
            "x",
            "--to",
            &models,
            "--mask-embeddings",
            "broken=x.pt",
        ])
        .contains("<category>+<defect>"));

    // A campaign drawing from a bank that lacks the type is refused before anything is queued,
    // with the command that fills the bank.
    let local = sc.dir.path().join("dataset");
    defectforge::demo::materialise(&local).unwrap();
    let camp = sc.write(
        "bank.toml",
        &format!(
            r#"
name = "empty bank"
seed = 1
output = "{out}"
[dataset]
source = "{data}"
[categories.bottle.defects.broken_large]
count = 2
generator = "perlin"
mask = "bank"
mask_bank = "{bank}"
"#,
            out = sc.s3_uri("out"),
            data = local.display()
        ),
    );
    let err = sc.fails(&["plan", camp.to_str().unwrap()]);
    assert!(
        err.contains("mask_bank") && err.contains("defectforge masks generate"),
        "{err}"
    );

    // Generated masks from a model without the type's mask model: refused at plan time.
    let camp = sc.write(
        "gen.toml",
        &format!(
            r#"
name = "no mask model"
seed = 1
output = "{out}"
[dataset]
source = "{data}"
[categories.bottle.defects.broken_large]
count = 2
generator = "perlin"
mask = "generated"
[categories.bottle.defects.broken_large.mask_model]
model = "{uri}"
"#,
            out = sc.s3_uri("out"),
            data = local.display()
        ),
    );
    let err = sc.fails(&["plan", camp.to_str().unwrap()]);
    assert!(
        err.contains("has no mask model \"bottle+broken_large\"")
            && err.contains("--mask-embeddings"),
        "{err}"
    );

    // Masks that can never pass the border rule (threshold -1: every pixel set) exhaust their
    // draws with a message that says why.
    let uri2 = import_fixture_model(
        &sc,
        &fx,
        &models,
        &[
            "--mask-embeddings",
            &format!(
                "bottle+broken_large={}",
                fx.join("anomalydiffusion-tiny/mask_embeddings.pt")
                    .display()
            ),
        ],
    );
    let err = sc.fails(&[
        "masks",
        "generate",
        "--model",
        &uri2,
        "--types",
        "bottle+broken_large",
        "--count",
        "1",
        "--steps",
        "10",
        "--threshold",
        "-1",
        "--max-attempts",
        "2",
        "--to",
        &bank,
        "--model-cache",
        cache.to_str().unwrap(),
    ]);
    assert!(
        err.contains("no acceptable mask in 2 draws")
            && err.contains("2 spilled over a border line"),
        "{err}"
    );
}

/// Reads every mask of a bank: (type, provenance entries without timestamps, PNG bytes).
async fn bank_contents(
    st: &dyn defectforge::ObjectStore,
    types: &[&str],
) -> Vec<(String, serde_json::Value, Vec<Vec<u8>>)> {
    let mut out = vec![];
    for t in types {
        let dir = t.replace('+', "/");
        let p = provenance(&st.get(&format!("{dir}/provenance.json")).await.unwrap());
        let mut pngs = vec![];
        for m in p["masks"].as_array().unwrap() {
            let f = m["file"].as_str().unwrap();
            pngs.push(st.get(&format!("{dir}/{f}")).await.unwrap().to_vec());
        }
        let keep = serde_json::json!({
            "masks": p["masks"],
            "stats": p["stats"],
            "rejection_rate": p["rejection_rate"],
            "settings": p["settings"],
            "model_digest": p["model_digest"],
            "bank_seed": p["bank_seed"],
            "embedding": p["embedding"],
        });
        out.push((t.to_string(), keep, pngs));
    }
    out
}

/// A bank is a job kind on the shared queue: two workers fill it through RabbitMQ + S3, one of
/// them killed mid-bank, and the result equals the embedded bank byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bank_filled_by_the_fleet_equals_the_embedded_bank_even_when_a_worker_dies() {
    let Some(fx) = fixtures() else { return };
    let sc = Scenario::new("bank-fleet");
    let models = sc.s3_uri("models");
    let uri = import_with_mask_models(&sc, &fx, &models);
    let types = ["bottle+broken_large", "wood+scratch"];
    let args = |to: &str, cache: &str| -> Vec<String> {
        [
            "masks",
            "generate",
            "--model",
            &uri,
            "--types",
            &types.join(","),
            "--count",
            "8",
            "--steps",
            "10",
            "--batch",
            "2",
            "--chunk",
            "2",
            "--seed",
            "3",
            "--to",
            to,
            "--model-cache",
            cache,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let embedded = sc.s3_uri("bank-embedded");
    let cache = sc.dir.path().join("cache-cli");
    let a: Vec<String> = args(&embedded, cache.to_str().unwrap());
    sc.ok(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());

    // The fleet: workers a and b; a is killed (SIGKILL) once the first chunk is committed, and
    // c takes its place.
    let worker = |tag: &str| {
        sc.worker(
            tag,
            &[
                "--model-cache",
                sc.dir.path().join(format!("cache-{tag}")).to_str().unwrap(),
                "--http-addr",
                "off",
                "--idle-exit-s",
                "60",
            ],
        )
    };
    let (mut wa, mut wb) = (worker("a"), worker("b"));
    let fleet = sc.s3_uri("bank-fleet");
    let mut f = args(&fleet, cache.to_str().unwrap());
    f.extend(["--submit".into(), "--timeout-s".into(), "300".into()]);
    let cli = sc
        .cmd("defectforge")
        .args(&f)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let st = sc.store(&fleet).await;
    let t0 = std::time::Instant::now();
    loop {
        let commits = st
            .list(".runs/")
            .await
            .unwrap()
            .into_iter()
            .filter(|o| o.key.contains("/chunks/") && o.key.ends_with(".json"))
            .count();
        if commits > 0 {
            break;
        }
        assert!(t0.elapsed().as_secs() < 240, "no bank chunk committed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    wa.kill().unwrap();
    wa.wait().unwrap();
    let mut wc = worker("c");
    let out = tokio::task::spawn_blocking(move || cli.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "masks generate --submit failed: {err}"
    );
    assert!(err.contains("on the worker fleet"), "{err}");
    for w in [&mut wb, &mut wc] {
        kill_term(w);
    }
    // Both surviving workers' logs and the commit records say who did the work.
    let commits: Vec<serde_json::Value> = {
        let mut v = vec![];
        for o in st.list(".runs/").await.unwrap() {
            if o.key.contains("/chunks/") && o.key.ends_with(".json") {
                v.push(serde_json::from_slice(&st.get(&o.key).await.unwrap()).unwrap());
            }
        }
        v
    };
    assert_eq!(
        commits.len(),
        8,
        "one commit per chunk (2 types x 4 chunks)"
    );
    let st_e = sc.store(&embedded).await;
    let e = bank_contents(st_e.as_ref(), &types).await;
    let f = bank_contents(st.as_ref(), &types).await;
    for ((te, pe, me), (tf, pf, mf)) in e.iter().zip(&f) {
        assert_eq!(te, tf);
        assert_eq!(me.len(), 8, "{te}: 8 masks");
        assert_eq!(
            pe, pf,
            "{te}: the fleet's provenance differs from the embedded one"
        );
        assert!(
            me == mf,
            "{te}: the fleet's masks differ from the embedded ones"
        );
    }
    // Staged copies are removed once merged; the bank's own files are what campaigns read.
    assert!(!st
        .list(".runs/")
        .await
        .unwrap()
        .iter()
        .any(|o| o.key.ends_with(".png")));
    // Running the same command again finds the bank complete and draws nothing.
    let again = sc.ok(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(again.trim(), embedded);
}
