//! Bad input and unavailable services: each gives one clear error naming the problem and the
//! fix, a non-zero exit, and nothing half-written. Hostile names never escape the campaign.

mod common;

use common::*;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn assert_nothing_written(sc: &Scenario, output: &str) {
    let st = sc.store(output).await;
    let objs = st.list("").await.unwrap();
    assert!(objs.is_empty(), "objects were written: {objs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_services_and_bad_campaigns_fail_cleanly() {
    let sc = Scenario::new("errors");
    let local = sc.dir.path().join("dataset");
    defectforge::demo::materialise(&local).unwrap();
    let output = sc.s3_uri("out");
    let good = sc.write(
        "good.toml",
        &demo_campaign("errs", 1, local.to_str().unwrap(), &output, 4, 4, None),
    );
    let good = good.to_str().unwrap();

    // broker unreachable
    let o = sc
        .cmd("defectforge")
        .args(["submit", good])
        .env(
            "DEFECTFORGE_AMQP_URL",
            "amqp://guest:hunter2@127.0.0.1:1/%2f",
        )
        .env("DEFECTFORGE_AMQP_TIMEOUT_S", "5")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("cannot connect to the broker at amqp://guest:****@127.0.0.1:1"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "password leaked: {e}");
    // the same URL without "//" (URL parsers accept it): still no password in the output
    let o = sc
        .cmd("defectforge")
        .args(["submit", good])
        .env("DEFECTFORGE_AMQP_URL", "amqp:guest:hunter2@127.0.0.1:1/%2f")
        .env("DEFECTFORGE_AMQP_TIMEOUT_S", "5")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("guest:****@127.0.0.1:1"), "{e}");
    assert!(!e.contains("hunter2"), "password leaked: {e}");
    assert_nothing_written(&sc, &output).await;

    // wrong S3 credentials
    let o = sc
        .cmd("defectforge")
        .args(["submit", good])
        .env(
            "AWS_SECRET_ACCESS_KEY",
            "0000000000000000000000000000000000000000000000000000000000000000",
        )
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("access denied") && e.contains("AWS_ACCESS_KEY_ID"),
        "{e}"
    );
    assert!(!e.contains(&sc.s.secret_key));
    assert_nothing_written(&sc, &output).await;

    // missing bucket
    let nob = sc.write(
        "nobucket.toml",
        &demo_campaign(
            "errs",
            1,
            local.to_str().unwrap(),
            "s3://no-such-bucket-here/x",
            4,
            4,
            None,
        ),
    );
    let o = sc.cli(&["submit", nob.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("bucket \"no-such-bucket-here\" does not exist"),
        "{e}"
    );

    // malformed campaign: every problem at once, with key paths
    let bad = sc.write(
        "bad.toml",
        &format!(
            r#"
name = "bad"
seed = 1
shard_size = 0
shard_time_limit_s = 0
output = "{output}"
[dataset]
source = "{d}"
[categories."../../escape".defects.scratch]
count = 3
[categories.carpet.defects."a b"]
count = 3
[categories.carpet.defects.color]
count = -2
generator = "stable-diffusion-xl"
"#,
            d = local.display()
        ),
    );
    let o = sc.cli(&["submit", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    for needle in [
        "shard_size must be >= 1",
        "shard_time_limit_s must be >= 10",
        "categories.\"../../escape\": category name",
        "defects.\"a b\": defect type name",
        "categories.carpet.defects.color.count must be >= 1",
        "unknown generator \"stable-diffusion-xl\"",
    ] {
        assert!(e.contains(needle), "missing {needle:?} in {e}");
    }
    let o = sc.cli(&["plan", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    // counts past the planner's bounds are refused before anything is written (they used to
    // pass `plan` and make `submit` panic after writing the campaign record)
    let huge = sc.write(
        "huge.toml",
        &format!(
            r#"
name = "huge"
seed = 1
output = "{output}"
[dataset]
source = "{d}"
[categories.carpet.defects.color]
count = 9223372036854775807
[categories.carpet.defects.cut]
count = 600000000
mask = "scar"
[categories.carpet.defects.hole]
count = 600000000
mask = "scar"
"#,
            d = local.display()
        ),
    );
    for cmd in ["plan", "submit"] {
        let o = sc.cli(&[cmd, huge.to_str().unwrap()]);
        let e = stderr(&o);
        assert!(!o.status.success(), "{cmd} accepted i64::MAX samples");
        assert!(
            e.contains("categories.carpet.defects.color.count must be <= 1000000000")
                && e.contains("more than 1000000000 samples in total"),
            "{cmd}: {e}"
        );
        assert!(!e.contains("panicked"), "{e}");
    }
    // a TOML syntax error names the file and the line
    let syn = sc.write("syntax.toml", "name = \"x\"\nseed = [1,\n");
    let o = sc.cli(&["plan", syn.to_str().unwrap()]);
    assert!(
        !o.status.success()
            && stderr(&o).contains("syntax.toml")
            && stderr(&o).contains("not valid TOML")
    );
    // a defect type without real masks in the dataset
    let nomask = sc.write(
        "nomask.toml",
        &format!(
            r#"
name = "nomask"
seed = 1
output = "{output}"
[dataset]
source = "{d}"
[categories.carpet.defects.stain]
count = 3
"#,
            d = local.display()
        ),
    );
    let o = sc.cli(&["plan", nomask.to_str().unwrap()]);
    assert!(
        !o.status.success()
            && stderr(&o).contains("categories.carpet.defects.stain: no defect images"),
        "{}",
        stderr(&o)
    );
    assert_nothing_written(&sc, &output).await;

    // status of an unknown campaign
    let o = sc.cli(&["status", "nope-000000000000", "--output", &output]);
    assert!(!o.status.success() && stderr(&o).contains("campaign nope-000000000000 not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_size_mask_fails_with_a_clear_record_and_the_rest_completes() {
    let sc = Scenario::new("masksize");
    let data = sc.dir.path().join("data");
    std::fs::create_dir_all(data.join("good")).unwrap();
    std::fs::create_dir_all(data.join("masks")).unwrap();
    image::RgbImage::from_pixel(64, 64, image::Rgb([100, 120, 140]))
        .save(data.join("good/000.png"))
        .unwrap();
    let m = image::GrayImage::from_fn(32, 32, |x, _| image::Luma([if x < 8 { 255 } else { 0 }]));
    m.save(data.join("masks/small_mask.png")).unwrap();
    let out_dir = sc.dir.path().join("out");
    let camp = sc.write(
        "c.toml",
        &format!(
            r#"
name = "masksize"
seed = 3
shard_size = 4
output = "{o}"
[dataset]
source = "{d}"
layout = "folder"
[categories.can]
normal_dir = "{d}/good"
[categories.can.defects.dent]
count = 4
mask = "folder"
mask_dir = "{d}/masks"
[categories.can.defects.scratch]
count = 4
generator = "cutpaste"
mask = "scar"
"#,
            d = data.display(),
            o = out_dir.display()
        ),
    );
    let o = sc.cli(&["run", camp.to_str().unwrap(), "--workers", "1"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a run with failed samples must exit non-zero"
    );
    let e = stderr(&o);
    assert!(
        e.contains("small_mask.png is 32x32 but the normal image") && e.contains("is 64x64"),
        "{e}"
    );
    // the good shard is committed and finalized; the bad one has a failure record
    let st = defectforge::store::LocalStore::new(&out_dir);
    let status: serde_json::Value =
        serde_json::from_str(&sc.ok(&["status", camp.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(
        (status["committed"].as_u64(), status["failed"].as_u64()),
        (Some(4), Some(4)),
        "{status}"
    );
    let cid = status["campaign_id"].as_str().unwrap();
    let rows = manifest_rows(&st, cid).await;
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.defect_type == "scratch"));
}

#[test]
fn hostile_names_never_reach_object_keys() {
    // names are validated in the campaign; messages carrying them anyway are rejected before
    // any key is built, and keys themselves cannot escape the store root
    use defectforge::store::check_key;
    assert!(!defectforge::campaign::is_safe_name("../x"));
    assert!(!defectforge::campaign::is_safe_name(".hidden"));
    assert!(!defectforge::campaign::is_safe_name("a/b"));
    assert!(!defectforge::campaign::is_safe_name("tab\there"));
    assert!(check_key("campaigns/../../etc/passwd").is_err());
    let k = defectforge::layout::sample_image(
        "c-1",
        &defectforge::ids::sample_id(1, 2),
        &defectforge::ids::new_attempt_id(),
    );
    assert!(check_key(&k).is_ok() && k.starts_with("campaigns/c-1/samples/"));
}
