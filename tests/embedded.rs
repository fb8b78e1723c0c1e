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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perlin_takes_its_anomaly_source_from_a_texture_folder() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    defectforge::demo::materialise(&data).unwrap();
    let tex = dir.path().join("textures");
    std::fs::create_dir_all(&tex).unwrap();
    // a saturated blue texture, unlike anything in the demo images
    image::RgbImage::from_pixel(64, 64, image::Rgb([0, 0, 255]))
        .save(tex.join("blue.png"))
        .unwrap();
    let out = dir.path().join("out");
    let camp = dir.path().join("c.toml");
    std::fs::write(
        &camp,
        format!(
            r#"
name = "textures"
seed = 4
shard_size = 4
output = "{o}"
[dataset]
source = "{d}"
[categories.wood.defects.scratch]
count = 8
mask = "perlin"
[categories.wood.defects.scratch.perlin]
texture_dir = "{t}"
opacity = [1.0, 1.0]
"#,
            o = out.display(),
            d = data.display(),
            t = tex.display()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(bin("defectforge"))
        .args(["run", camp.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = defectforge::store::LocalStore::new(&out);
    let cid = std::fs::read_dir(out.join("campaigns"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .into_string()
        .unwrap();
    let rows = verify_campaign(&st, &cid, 4, 8, &Default::default()).await;
    for r in &rows {
        assert!(
            r.generator_settings.contains("textures"),
            "{}",
            r.generator_settings
        );
        // at full opacity the masked pixels come from the (augmented) texture, not from the wood
        let img = image::open(&r.image_uri).unwrap().to_rgb8();
        let mask = image::open(&r.mask_uri).unwrap().to_luma8();
        let wood = image::open(&r.normal_uri).unwrap().to_rgb8();
        let uniform_inside = img
            .pixels()
            .zip(mask.pixels())
            .filter(|(_, m)| m.0[0] > 0)
            .map(|(p, _)| p.0)
            .collect::<std::collections::BTreeSet<_>>();
        let wood_inside = wood
            .pixels()
            .zip(mask.pixels())
            .filter(|(_, m)| m.0[0] > 0)
            .map(|(p, _)| p.0)
            .collect::<std::collections::BTreeSet<_>>();
        assert!(
            uniform_inside.len() * 4 < wood_inside.len().max(4),
            "inside the mask the image should be the flat texture: {} colours vs {} in the wood",
            uniform_inside.len(),
            wood_inside.len()
        );
    }
}
