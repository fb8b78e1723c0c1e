//! `defectforge eval`: the metrics against scikit-learn and a reference AU-PRO, the honest
//! split on file identities, a detector trained on a Perlin campaign detecting the demo's real
//! defects, the comparison table, and bad input.

mod common;

use common::*;
use defectforge::evaluation::metrics::*;
use std::path::Path;
use std::process::Command;

/// Deterministic pseudo-random values in [0, 1), quantised so that ties occur.
fn values(n: usize, seed: u64, levels: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let u = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
            (u * levels as f64).floor() as f32 / levels as f32
        })
        .collect()
}

#[test]
fn metrics_match_scikit_learn_and_the_reference_au_pro() {
    let s = services();
    // image level: 60 scores with ties, labels correlated with the scores
    let scores = values(60, 1, 12);
    let noise = values(60, 2, 100);
    let labels: Vec<bool> = scores
        .iter()
        .zip(&noise)
        .map(|(s, n)| s + 0.6 * n > 0.8)
        .collect();
    // pixel level: 5 maps of 40×32 with blob ground truths (several components, touching
    // diagonally in one place) and scores raised inside them
    let (w, h) = (40usize, 32usize);
    let mut maps = vec![];
    let mut gts = vec![];
    for k in 0..5u64 {
        let base = values(w * h, 10 + k, 40);
        let mut g = vec![false; w * h];
        if k != 2 {
            let (cx, cy) = (8.0 + 5.0 * k as f32, 10.0 + 3.0 * k as f32);
            for y in 0..h {
                for x in 0..w {
                    let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                    g[y * w + x] = dx * dx + dy * dy < 20.0 || (x == 30 + k as usize && y < 6);
                }
            }
            g[7 * w + 31 + k as usize] = true; // a diagonal neighbour of the line's end
        }
        let m: Vec<f32> = base
            .iter()
            .zip(&g)
            .map(|(&b, &gt)| {
                if gt {
                    (0.35 + 0.7 * b).min(1.0)
                } else {
                    0.8 * b
                }
            })
            .collect();
        maps.push(m);
        gts.push(g);
    }
    let input = serde_json::json!({
        "scores": scores, "labels": labels, "w": w, "h": h, "maps": maps, "gts": gts,
    });
    let mut child = Command::new(&s.python)
        .arg(workspace().join("tests/eval_reference.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "reference: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let close = |name: &str, ours: Option<f64>| {
        let want = r[name].as_f64().unwrap();
        let got = ours.unwrap_or_else(|| panic!("{name} undefined"));
        assert!(
            (got - want).abs() < 1e-9,
            "{name}: ours {got}, reference {want}"
        );
    };
    close("auroc", auroc(&scores, &labels));
    close("ap", average_precision(&scores, &labels));
    close("f1_max", f1_max(&scores, &labels));
    let px: Vec<f32> = maps.iter().flatten().copied().collect();
    let pl: Vec<bool> = gts.iter().flatten().copied().collect();
    close("pixel_auroc", auroc(&px, &pl));
    close("pixel_ap", average_precision(&px, &pl));
    close("pixel_f1_max", f1_max_at_thresholds(&px, &pl));
    let m: Vec<&[f32]> = maps.iter().map(|v| v.as_slice()).collect();
    let g: Vec<&[bool]> = gts.iter().map(|v| v.as_slice()).collect();
    close("au_pro", au_pro(&m, &g, w, h, 0.3));
    for (i, want) in r["image_scores"].as_array().unwrap().iter().enumerate() {
        let got = image_score(&maps[i], w, h) as f64;
        assert!(
            (got - want.as_f64().unwrap()).abs() < 1e-6,
            "image score {i}: {got} vs {want}"
        );
    }
    // the AU-PRO is not trivially 0 or 1 here, nor the pixel AUROC
    let a = au_pro(&m, &g, w, h, 0.3).unwrap();
    assert!(a > 0.05 && a < 0.95, "{a}");
}

fn run_ok(args: &[&str]) -> (String, String) {
    let o = Command::new(bin("defectforge"))
        .args(args)
        .env_remove("DEFECTFORGE_AMQP_URL")
        .env("DEFECTFORGE_LOG_FORMAT", "json")
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert!(o.status.success(), "defectforge {args:?}: {err}");
    (out, err)
}

fn run_err(args: &[&str]) -> String {
    let o = Command::new(bin("defectforge"))
        .args(args)
        .env_remove("DEFECTFORGE_AMQP_URL")
        .output()
        .unwrap();
    assert!(!o.status.success(), "defectforge {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A carpet-only campaign over `dataset` (`color`: real masks, `cut`: scar masks).
fn campaign(dir: &Path, name: &str, dataset: &Path, generator: &str) -> String {
    let toml = format!(
        r#"
name = "{name}"
seed = 11
shard_size = 16
output = "{out}"
[dataset]
source = "{ds}"
demo = true
[categories.carpet.defects.color]
count = 32
generator = "{generator}"
mask = "real"
[categories.carpet.defects.cut]
count = 32
generator = "{generator}"
mask = "scar"
"#,
        out = dir.join("out").display(),
        ds = dataset.display(),
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, toml).unwrap();
    run_ok(&["run", p.to_str().unwrap()]);
    let cdir = dir.join("out/campaigns");
    let id = std::fs::read_dir(&cdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with(name))
        .unwrap();
    cdir.join(id).display().to_string()
}

/// An evaluation spec at a reduced size: 64², base 8, `epochs` of `samples`, lr 1e-3 (the
/// paper's 1e-4 needs its 200 epochs).
fn eval_spec(
    dir: &Path,
    name: &str,
    campaigns: &[&str],
    extra: &str,
    (epochs, samples): (u32, u32),
) -> String {
    let list: Vec<String> = campaigns.iter().map(|c| format!("\"{c}\"")).collect();
    let toml = format!(
        r#"
name = "{name}"
output = "{out}"
campaigns = [{list}]
seeds = [1, 2]
{extra}
[detector]
image_size = 64
base_channels = 8
epochs = {epochs}
epoch_samples = {samples}
batch = 8
lr = 1e-3
"#,
        out = dir.join("out").display(),
        list = list.join(", "),
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, toml).unwrap();
    p.display().to_string()
}

#[test]
fn a_detector_trained_on_a_perlin_campaign_finds_the_real_defects() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("dataset");
    let perlin = campaign(dir.path(), "perlin", &ds, "perlin");
    let cutpaste = campaign(dir.path(), "cutpaste", &ds, "cutpaste");

    let spec = eval_spec(dir.path(), "one", &[&perlin], "", (10, 64));
    let (table, _) = run_ok(&["eval", &spec]);
    assert!(table.contains("pixel_auroc"), "{table}");
    let res = dir.path().join("out/evaluations/one");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(res.join("results.json")).unwrap()).unwrap();

    // the honest split: every demo good test image and the 4 of 6 defects per type after the
    // few-shot split; none of them is a mask the generator drew from (file identities)
    let test = report["test_sets"]["carpet"].as_array().unwrap();
    let good = test.iter().filter(|t| t["defect_type"] == "good").count();
    assert_eq!((good, test.len() - good), (6, 8), "{test:?}");
    let cid = perlin.rsplit('/').next().unwrap();
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(&perlin).join("campaign.json")).unwrap())
            .unwrap();
    let few_shot: Vec<String> = rec["inputs"]["categories"]["carpet"]["defects"]["color"]["masks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert_eq!(few_shot.len(), 2);
    let st = defectforge::store::LocalStore::new(dir.path().join("out"));
    let rows = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(manifest_rows(&st, cid));
    let used: std::collections::BTreeSet<String> = rows
        .iter()
        .filter_map(|r| r.source_mask_uri.clone())
        .collect();
    assert!(!used.is_empty());
    for t in test {
        if let Some(m) = t["mask_uri"].as_str() {
            assert!(!few_shot.iter().any(|f| f == m), "{m} is a few-shot mask");
            assert!(!used.contains(m), "{m} was painted by the generator");
            let img = t["image_uri"].as_str().unwrap();
            let stem = Path::new(img).file_stem().unwrap().to_str().unwrap();
            assert!(
                !few_shot
                    .iter()
                    .any(|f| f.ends_with(&format!("/{stem}_mask.png"))),
                "{img}"
            );
        }
    }

    // clearly better than chance on the real defects (measured: pixel 0.9988, image 1.0)
    let s = &report["summaries"][&perlin];
    let px = s["pixel_auroc"]["mean"].as_f64().unwrap();
    let img = s["image_auroc"]["mean"].as_f64().unwrap();
    eprintln!("perlin campaign: pixel AUROC {px:.4}, image AUROC {img:.4}");
    assert!(px > 0.9, "pixel AUROC {px}");
    assert!(img > 0.8, "image AUROC {img}");
    assert_eq!(s["pixel_auroc"]["n"], 2);
    for f in [
        "scores.parquet",
        &format!("curves-carpet-{cid}.png"),
        &format!("worst-carpet-{cid}.png"),
    ] {
        let b = std::fs::read(res.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(b.len() > 100, "{f}");
    }
    // per-image scores: one row per test image and seed, readable as Parquet
    let b = bytes::Bytes::from(std::fs::read(res.join("scores.parquet")).unwrap());
    let rd = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(b)
        .unwrap()
        .build()
        .unwrap();
    let n: usize = rd.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(n, 14 * 2);

    // the comparison: same detector, seeds and test set on two campaigns, one table
    // (a short schedule: the table is what is checked here)
    let spec = eval_spec(dir.path(), "two", &[&perlin], "", (2, 16));
    let (table, _) = run_ok(&["eval", &spec, "--compare", &perlin, &cutpaste]);
    let head = table.lines().find(|l| l.starts_with("metric")).unwrap();
    let ccid = cutpaste.rsplit('/').next().unwrap();
    assert!(head.contains(cid) && head.contains(ccid), "{table}");
    assert!(head.contains(&format!("Δ {ccid}")), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("pixel_auroc"))
        .unwrap();
    assert_eq!(row.matches('±').count(), 3, "{table}");
}

#[test]
fn bad_evaluations_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("dataset");
    let c = campaign(dir.path(), "perlin", &ds, "perlin");
    // a manifest from another dataset than the one named
    let other = dir.path().join("other");
    let spec = eval_spec(
        dir.path(),
        "e1",
        &[&c],
        &format!("dataset = \"{}\"", other.display()),
        (1, 8),
    );
    let e = run_err(&["eval", &spec]);
    assert!(e.contains("was generated from the dataset"), "{e}");
    // a category without test defects outside the few-shot split
    let small = dir.path().join("small");
    defectforge::demo::materialise(&small).unwrap();
    for d in ["color", "cut"] {
        for i in 1..6 {
            std::fs::remove_file(small.join(format!("carpet/test/{d}/{i:03}.png"))).unwrap();
        }
    }
    let c2 = campaign(dir.path(), "small", &small, "perlin");
    let spec = eval_spec(dir.path(), "e2", &[&c2], "", (1, 8));
    let e = run_err(&["eval", &spec]);
    assert!(
        e.contains("no real test defects outside the few-shot split"),
        "{e}"
    );
    // not a campaign folder; a campaign that does not exist
    let spec = eval_spec(
        dir.path(),
        "e3",
        &[dir.path().join("out").to_str().unwrap()],
        "",
        (1, 8),
    );
    let e = run_err(&["eval", &spec]);
    assert!(e.contains("not a campaign folder"), "{e}");
    let missing = dir.path().join("out/campaigns/nope-1");
    let spec = eval_spec(dir.path(), "e4", &[missing.to_str().unwrap()], "", (1, 8));
    let e = run_err(&["eval", &spec]);
    assert!(e.contains("nope-1"), "{e}");
}
