//! The one-command embedded mode on the shipped demo campaign: no RabbitMQ, no S3.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_campaign_runs_in_one_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = std::process::Command::new(bin("defectforge"))
        .args([
            "run",
            workspace().join("configs/demo.toml").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .env_remove("DEFECTFORGE_AMQP_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let part = String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(part.ends_with("part-00000.parquet"), "{part}");
    let st = defectforge::store::LocalStore::new(&out);
    let cid = std::fs::read_dir(out.join("campaigns"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .into_string()
        .unwrap();
    let c = defectforge::Campaign::load(&workspace().join("configs/demo.toml")).unwrap();
    let rows = verify_campaign(&st, &cid, c.seed, c.total_samples(), &Default::default()).await;
    let types: std::collections::BTreeSet<_> = rows
        .iter()
        .map(|r| {
            (
                r.category.as_str(),
                r.defect_type.as_str(),
                r.generator.as_str(),
                r.mask_source.as_str(),
            )
        })
        .collect();
    assert_eq!(types.len(), 4, "{types:?}");
    // a second run of the same campaign finds everything committed and changes nothing
    let before = manifest_rows(&st, &cid).await;
    let o = std::process::Command::new(bin("defectforge"))
        .args([
            "run",
            workspace().join("configs/demo.toml").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(manifest_rows(&st, &cid).await, before);
}
