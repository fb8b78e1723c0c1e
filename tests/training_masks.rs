//! Mask-model training (`kind = "mask"`) end to end on the fixtures' tiny model, the demo
//! dataset, RabbitMQ and Garage: two defect types learned in one run with mixed batches; the
//! loss on the fixed evaluation set falls; the run on the fleet, its worker killed with SIGKILL
//! mid-segment, ends with exactly the model an uninterrupted run produces; the trained model's
//! mask embeddings fill a mask bank with no further step; bad masks are refused by name.

mod common;

use common::*;
use std::path::PathBuf;

fn spec(sc: &Scenario, name: &str, base: &str, out: &str, data: &str, extra: &str) -> PathBuf {
    sc.write(
        &format!("{name}.toml"),
        &format!(
            r#"
kind = "mask"
name = "{name}"
seed = 5
base_model = "{base}"
output = "{out}"
[dataset]
source = "{data}"
demo = true
[types."carpet+color"]
[types."bottle+broken_large"]
[training]
steps_per_type = 8
batch = 2
base_lr = 2e-3
checkpoint_every = 2
preview_every = 4
{extra}
"#
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mask_training_learns_types_together_survives_kill_9_and_fills_a_bank() {
    let Some(fx) = fixtures() else { return };
    let sc = Scenario::new("train-masks");
    let models = sc.s3_uri("models");
    let base = import_fixture_model(&sc, &fx, &models, &[]);
    let out = sc.s3_uri("runs");
    let data = sc.dir.path().join("data").display().to_string();

    // An uninterrupted run: 2 types at batch 2 → every batch holds both, 8 steps.
    let reference = spec(&sc, "masks-ref", &base, &out, &data, "");
    let r: serde_json::Value =
        serde_json::from_str(&sc.ok(&["train", "run", reference.to_str().unwrap(), "--json"]))
            .unwrap();
    let (a, b) = (
        r["initial_eval_loss"].as_f64().unwrap(),
        r["final_eval_loss"].as_f64().unwrap(),
    );
    println!("mask evaluation loss {a} -> {b}");
    assert!(
        b < a,
        "8 steps must lower the mask loss on the fixed evaluation set: {a} -> {b}"
    );
    let trained = r["model"].as_str().unwrap().to_string();
    let shown: serde_json::Value =
        serde_json::from_str(&sc.ok(&["models", "show", &trained])).unwrap();
    assert_eq!(
        shown["mask_types"],
        serde_json::json!(["bottle+broken_large", "carpet+color"]),
        "{shown}"
    );
    assert_eq!(shown["mask_embedding_shape"], serde_json::json!([16, 32]));
    assert_eq!(shown["lineage"]["learned"], "mask embeddings");
    // the anomaly model is the base model's, untouched
    let base_shown: serde_json::Value =
        serde_json::from_str(&sc.ok(&["models", "show", &base])).unwrap();
    assert_eq!(shown["defect_types"], base_shown["defect_types"]);
    // the preview: a grid of sampled masks per type, with the accepted share beside it
    let store = sc.store(&out).await;
    let png = store
        .get("training/masks-ref/previews/00000008.png")
        .await
        .unwrap();
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (4 * 256, 2 * 256));
    let acc: serde_json::Value = serde_json::from_slice(
        &store
            .get("training/masks-ref/previews/00000008.json")
            .await
            .unwrap(),
    )
    .unwrap();
    for t in ["carpet+color", "bottle+broken_large"] {
        let share = acc["accepted_share"][t].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&share), "{acc}");
    }

    // The same run on the fleet in segments of 4 steps; the worker is killed with SIGKILL
    // after its first checkpoint, another resumes.
    let fleet = spec(&sc, "masks-fleet", &base, &out, &data, "segment_steps = 4");
    sc.ok(&["train", "submit", fleet.to_str().unwrap()]);
    let mut wa = sc.worker("a", &[]);
    wait_for_commits(store.as_ref(), "masks-fleet", 1, &mut wa, &|| {
        format!("worker a stopped: {}", sc.worker_log("a"))
    })
    .await;
    wa.kill().unwrap();
    wa.wait().unwrap();
    let mut wb = sc.worker("b", &[]);
    sc.ok(&[
        "train",
        "watch",
        fleet.to_str().unwrap(),
        "--interval-s",
        "1",
        "--timeout-s",
        "600",
    ]);
    assert_eq!(kill_term(&mut wb), Some(0), "{}", sc.worker_log("b"));
    let st: serde_json::Value = serde_json::from_slice(
        &sc.cli(&["train", "status", fleet.to_str().unwrap(), "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(
        st["result"]["model_digest"], r["model_digest"],
        "the fleet's run must end with the uninterrupted run's model: {st}"
    );

    // The trained mask model fills a bank, no further step.
    let bank = sc.s3_uri("bank");
    let cache = sc.dir.path().join("model-cache");
    sc.ok(&[
        "masks",
        "generate",
        "--model",
        &trained,
        "--types",
        "carpet+color",
        "--count",
        "2",
        "--steps",
        "5",
        "--seed",
        "3",
        "--to",
        &bank,
        "--model-cache",
        cache.to_str().unwrap(),
    ]);
    let bank_store = sc.store(&bank).await;
    assert!(bank_store.get("carpet/color/provenance.json").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_masks_are_refused_by_name() {
    let Some(fx) = fixtures() else { return };
    let sc = Scenario::new("train-masks-bad");
    let models = sc.s3_uri("models");
    let base = import_fixture_model(&sc, &fx, &models, &[]);
    let out = sc.dir.path().join("runs").display().to_string();
    // a folder-layout type whose one example's mask is a grey ramp, another's is empty
    let root = sc.dir.path().join("folder");
    for (t, kind) in [("grey", "ramp"), ("blank", "empty")] {
        let (i, m) = (root.join(t).join("images"), root.join(t).join("masks"));
        std::fs::create_dir_all(&i).unwrap();
        std::fs::create_dir_all(&m).unwrap();
        for k in 0..3 {
            image::RgbImage::from_pixel(64, 64, image::Rgb([90, 90, 90]))
                .save(i.join(format!("{k:03}.png")))
                .unwrap();
            let mask = image::GrayImage::from_fn(64, 64, |x, y| {
                image::Luma([match kind {
                    "ramp" => (x * 4) as u8,
                    _ => {
                        let _ = y;
                        0
                    }
                }])
            });
            mask.save(m.join(format!("{k:03}.png"))).unwrap();
        }
    }
    let spec = sc.write(
        "bad.toml",
        &format!(
            r#"
kind = "mask"
name = "bad"
seed = 1
base_model = "{base}"
output = "{out}"
[dataset]
source = "{src}"
layout = "folder"
[types."part+grey"]
images = "grey/images"
masks = "grey/masks"
[training]
steps_per_type = 2
"#,
            src = root.display()
        ),
    );
    let e = sc.fails(&["train", "run", spec.to_str().unwrap()]);
    assert!(
        e.contains("000.png is not a binary mask") && e.contains("white defect on black"),
        "{e}"
    );
    let empty = sc.write(
        "empty.toml",
        &std::fs::read_to_string(&spec)
            .unwrap()
            .replace("name = \"bad\"", "name = \"empty\"")
            .replace("grey/", "blank/")
            .replace("part+grey", "part+blank"),
    );
    let e = sc.fails(&["train", "run", empty.to_str().unwrap()]);
    assert!(e.contains("000.png is empty"), "{e}");
}
