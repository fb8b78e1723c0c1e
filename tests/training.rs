//! `defectforge train` end to end on the fixtures' tiny model, the demo dataset and Garage:
//! new defect types are learned from their few real examples; the loss on the run's fixed
//! evaluation batch falls; a run killed with SIGKILL mid-way resumes from its last checkpoint
//! and ends with exactly the model an uninterrupted run produces (CPU is deterministic, and
//! every draw of a step derives from the seed and the step); the result is a model directory a
//! campaign generates with; bad inputs are refused with the thing and the fix.

mod common;

use common::*;
use std::path::PathBuf;

fn spec(sc: &Scenario, name: &str, base: &str, out: &str, extra: &str) -> PathBuf {
    let data = sc.dir.path().join("data");
    sc.write(
        &format!("{name}.toml"),
        &format!(
            r#"
name = "{name}"
seed = 23
base_model = "{base}"
output = "{out}"
[dataset]
source = "{d}"
demo = true
[types."carpet+color"]
[types."bottle+broken_large"]
[training]
steps = 12
batch = 2
base_lr = 1e-3
checkpoint_every = 3
preview_every = 6
{extra}
"#,
            d = data.display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_learns_types_survives_kill_9_and_the_model_generates() {
    let Some(fx) = fixtures() else { return };
    let sc = Scenario::new("train");
    let models = sc.s3_uri("models");
    let base = import_fixture_model(&sc, &fx, &models, &[]);
    let out = sc.s3_uri("runs");

    // An uninterrupted run.
    let reference = spec(&sc, "reference", &base, &out, "");
    let r: serde_json::Value =
        serde_json::from_str(&sc.ok(&["train", "run", reference.to_str().unwrap(), "--json"]))
            .unwrap();
    let (a, b) = (
        r["initial_eval_loss"].as_f64().unwrap(),
        r["final_eval_loss"].as_f64().unwrap(),
    );
    println!("evaluation loss {a} -> {b}");
    assert!(
        b < a,
        "12 steps must lower the loss on the fixed evaluation batch: {a} -> {b}"
    );
    let trained = r["model"].as_str().unwrap().to_string();
    assert!(
        trained.starts_with(&format!("{out}/models/ad-")),
        "{trained}"
    );
    assert_ne!(trained, base);

    // The same training under another name, killed with SIGKILL after a checkpoint, resumed.
    let resumed = spec(&sc, "resumed", &base, &out, "");
    let mut child = sc
        .cmd("defectforge")
        .args(["train", "run", resumed.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let store = sc.store(&out).await;
    wait_for_commits(store.as_ref(), "resumed", 2, &mut child, &|| {
        "the run ended before it could be killed".to_string()
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "finished too fast to kill"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let st = sc.cli(&["train", "status", resumed.to_str().unwrap(), "--json"]);
    assert_eq!(st.status.code(), Some(1), "unfinished");
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let at = st["checkpoint_step"].as_u64().unwrap();
    assert!((6..12).contains(&at), "{st}");
    let out2 = sc.cli(&["train", "run", resumed.to_str().unwrap(), "--json"]);
    assert!(out2.status.success());
    let err = String::from_utf8_lossy(&out2.stderr);
    assert!(err.contains(&format!("resumed from {at}")), "{err}");
    let r2: serde_json::Value = serde_json::from_slice(&out2.stdout).unwrap();
    assert_eq!(
        r2["model_digest"], r["model_digest"],
        "the resumed run must end with the uninterrupted run's model"
    );
    // its log covers every step once, its previews exist
    let st: serde_json::Value = serde_json::from_slice(
        &sc.cli(&["train", "status", resumed.to_str().unwrap(), "--json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(st["log_rows"], 12, "{st}");
    for step in [6, 12] {
        let png = store
            .get(&format!("training/resumed/previews/{step:08}.png"))
            .await
            .unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (3 * 256, 2 * 256));
    }

    // The same training on the worker fleet (segments of 6 steps through RabbitMQ): the
    // worker is killed with SIGKILL inside the first segment, after its step-3 checkpoint;
    // the broker redelivers the segment to another worker, which resumes at step 3.
    let fleet = spec(&sc, "fleet", &base, &out, "segment_steps = 6");
    assert_eq!(
        sc.ok(&["train", "submit", fleet.to_str().unwrap()]).trim(),
        "fleet"
    );
    let mut wa = sc.worker("a", &[]);
    wait_for_commits(store.as_ref(), "fleet", 1, &mut wa, &|| {
        format!("worker a stopped: {}", sc.worker_log("a"))
    })
    .await;
    wa.kill().unwrap(); // SIGKILL, mid-segment
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
    assert!(
        sc.worker_log("b").contains("resuming from checkpoint"),
        "{}",
        sc.worker_log("b")
    );

    // The trained model records where it came from and names the new types.
    let shown: serde_json::Value =
        serde_json::from_str(&sc.ok(&["models", "show", &trained])).unwrap();
    let types = shown["defect_types"].as_array().unwrap();
    for t in ["carpet+color", "bottle+broken_large", "wood+color"] {
        assert!(types.iter().any(|v| v == t), "{t} missing from {types:?}");
    }
    let base_shown: serde_json::Value =
        serde_json::from_str(&sc.ok(&["models", "show", &base])).unwrap();
    assert_eq!(
        shown["lineage"]["base_model"]["digest"],
        base_shown["digest"]
    );
    assert_eq!(shown["lineage"]["steps"], 12);
    assert_eq!(shown["lineage"]["few_shot_split"], "disjoint");

    // A campaign generates the new type with the trained model, no further step.
    let data = sc.dir.path().join("data");
    let camp = sc.write(
        "camp.toml",
        &format!(
            r#"
name = "with trained"
seed = 3
shard_size = 2
output = "{o}"
[dataset]
source = "{d}"
[categories.carpet.defects.color]
count = 2
generator = "anomalydiffusion"
mask = "real"
[categories.carpet.defects.color.anomalydiffusion]
model = "{trained}"
steps = 5
"#,
            o = sc.dir.path().join("camp-out").display(),
            d = data.display()
        ),
    );
    sc.ok(&["run", camp.to_str().unwrap(), "--workers", "1"]);

    // Submitting a changed spec under the same name is refused, naming the change.
    let changed = spec(&sc, "resumed", &base, &out, "accumulation = 2");
    let e = sc.fails(&["train", "run", changed.to_str().unwrap()]);
    assert!(e.contains("training.accumulation: 1 → 2"), "{e}");
    assert!(e.contains("another name"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_training_inputs_name_the_thing_and_the_fix() {
    let Some(fx) = fixtures() else { return };
    let sc = Scenario::new("train-bad");
    let models = sc.dir.path().join("models");
    let base = import_fixture_model(&sc, &fx, models.to_str().unwrap(), &[]);
    let d = sc.dir.path().join("folder");
    let png = |p: &std::path::Path, w: u32, h: u32, on: bool| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        image::GrayImage::from_fn(w, h, |x, _| {
            image::Luma([if on && x < 4 { 255 } else { 0 }])
        })
        .save(p)
        .unwrap();
    };
    // nomask: an image, no masks; noimage: masks but no images; size: 64x64 image, 32x32 mask
    png(&d.join("nomask/img/000.png"), 64, 64, true);
    std::fs::create_dir_all(d.join("nomask/mask")).unwrap();
    png(&d.join("noimage/mask/000_mask.png"), 64, 64, true);
    std::fs::create_dir_all(d.join("noimage/img")).unwrap();
    png(&d.join("size/img/000.png"), 64, 64, true);
    png(&d.join("size/mask/000_mask.png"), 32, 32, true);
    let write = |name: &str, base: &str, types: &str| {
        sc.write(
            &format!("{name}.toml"),
            &format!(
                r#"
name = "{name}"
seed = 1
base_model = "{base}"
output = "{o}"
[dataset]
source = "{d}"
layout = "folder"
{types}
[training]
steps = 2
"#,
                o = sc.dir.path().join("out").display(),
                d = d.display()
            ),
        )
    };
    let both = write(
        "data",
        &base,
        r#"
[types."sheet+nomask"]
images = "nomask/img"
masks = "nomask/mask"
[types."sheet+noimage"]
images = "noimage/img"
masks = "noimage/mask"
"#,
    );
    let e = sc.fails(&["train", "run", both.to_str().unwrap()]);
    assert!(e.contains("sheet+nomask: no masks in"), "{e}");
    assert!(e.contains("leaves no training image"), "{e}");
    let size = write(
        "size",
        &base,
        "[types.\"sheet+size\"]\nimages = \"size/img\"\nmasks = \"size/mask\"\n",
    );
    let e = sc.fails(&["train", "run", size.to_str().unwrap()]);
    assert!(e.contains("is 64x64 but its mask"), "{e}");
    assert!(e.contains("must have the image's size"), "{e}");
    let nowhere = sc.dir.path().join("models/models/ad-0000000000000000");
    png(&d.join("ok/img/000.png"), 64, 64, true);
    png(&d.join("ok/mask/000_mask.png"), 64, 64, true);
    let unknown = write(
        "unknown",
        nowhere.to_str().unwrap(),
        "[types.\"sheet+ok\"]\nimages = \"ok/img\"\nmasks = \"ok/mask\"\n",
    );
    let e = sc.fails(&["train", "run", unknown.to_str().unwrap()]);
    assert!(e.contains("base_model"), "{e}");
    assert!(e.contains("models import"), "{e}");
    // a malformed spec: every problem at once
    let bad = sc.write("bad.toml", "name = \"x\"\n[training]\nsteps = 0\n");
    let e = sc.fails(&["train", "run", bad.to_str().unwrap()]);
    for needle in [
        "seed: missing",
        "base_model: missing",
        "training.steps must be >= 1",
        "types: missing",
    ] {
        assert!(e.contains(needle), "{needle}: {e}");
    }
}
