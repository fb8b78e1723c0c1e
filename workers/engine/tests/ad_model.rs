//! The assembled AnomalyDiffusion model on the fixtures' tiny weights, beyond the parity
//! numbers: a sample depends on its own seed only (not on its batch), batch size 1 works, mixed
//! defect types share a batch, every re-weighting mode runs, and wrong requests are refused by
//! name. Uses `anomalydiffusion-tiny*` under `DEFECTFORGE_FIXTURES` (skips without fixtures).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use defectforge_engine::ad_files::read_embeddings_pt;
use defectforge_engine::ad_model::{infer_spatial_config, AnomalyModel};
use defectforge_engine::anomaly::{AarMode, SamplerOptions};
use defectforge_engine::ldm::LdmModel;
use defectforge_engine::noise::PerSampleNoise;
use defectforge_engine::spatial::{BnMode, SpatialEncoder, SpatialEncoderConfig};
use defectforge_engine::tokenizer::WordPieceTokenizer;

mod common;

fn fixture_dirs() -> Vec<PathBuf> {
    common::fixture_dirs("anomalydiffusion-tiny")
}

fn load(dir: &Path) -> (AnomalyModel, serde_json::Value) {
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let ldm_dir = dir
        .parent()
        .unwrap()
        .join(cfg["ldm_folder"].as_str().unwrap());
    let dev = Device::Cpu;
    let ldm = LdmModel::load(
        &ldm_dir.join("config.json"),
        &ldm_dir.join("model.ckpt"),
        DType::F32,
        &dev,
    )
    .unwrap();
    // The shape inferred from the official file's tensors is the fixture's config.
    let st = defectforge_engine::ad_files::read_torch_state_dict(&dir.join("spatial_encoder.pt"))
        .unwrap();
    let shapes: Vec<(String, Vec<usize>)> = st
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let inferred = infer_spatial_config(&shapes).unwrap();
    let declared: SpatialEncoderConfig =
        serde_json::from_value(cfg["spatial_encoder"].clone()).unwrap();
    assert_eq!(inferred, declared);
    let spatial = SpatialEncoder::load(
        &dir.join("spatial_encoder.pt"),
        Some(&inferred),
        DType::F32,
        &dev,
    )
    .unwrap();
    let emb = read_embeddings_pt(&dir.join("embeddings.pt")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let vocab = tmp.path().join("vocab.txt");
    common::write_fixture_vocab(
        cfg["fixture_vocabulary"].as_object().unwrap(),
        ldm.bert.config().vocab_size,
        &vocab,
    );
    let tok = WordPieceTokenizer::from_vocab(&vocab, 77).unwrap();
    let model = AnomalyModel::assemble(ldm, spatial, emb, tok, DType::F32, &dev).unwrap();
    (model, cfg)
}

fn inputs(b: usize) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let x =
        ((Tensor::rand(0f32, 1.0, (b, 3, 256, 256), &dev).unwrap() * 2.0).unwrap() - 1.0).unwrap();
    let mut m = vec![0f32; b * 256 * 256];
    for i in 0..b {
        for y in (40 + 20 * i)..(120 + 20 * i) {
            for x in 60..150 {
                m[i * 65536 + y * 256 + x] = 1.0;
            }
        }
    }
    (x, Tensor::from_vec(m, (b, 1, 256, 256), &dev).unwrap())
}

fn row(t: &Tensor, i: usize) -> Vec<f32> {
    t.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn samples_depend_on_their_own_seed_only() {
    for dir in fixture_dirs() {
        let (model, cfg) = load(&dir);
        let types: Vec<String> = cfg["defect_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let (x, m) = inputs(2);
        let opts = SamplerOptions {
            steps: 5,
            eta: 1.0,
            aar: AarMode::Official,
        };
        // A mixed batch of two defect types…
        let prompts = vec![model.random_prompt(3), "a dark photo of the *".to_string()];
        let names = vec![types[0].clone(), types[1].clone()];
        let both = model
            .generate(
                &x,
                &m,
                &prompts,
                &names,
                &opts,
                BnMode::Eval,
                &mut PerSampleNoise::new(&[11, 12]),
            )
            .unwrap();
        assert_eq!(both.dims(), &[2, 3, 256, 256]);
        assert!(row(&both, 0).iter().all(|v| v.is_finite()));
        // …and the second sample alone, batch size 1: the same pixels.
        let alone = model
            .generate(
                &x.narrow(0, 1, 1).unwrap(),
                &m.narrow(0, 1, 1).unwrap(),
                &prompts[1..],
                &names[1..],
                &opts,
                BnMode::Eval,
                &mut PerSampleNoise::new(&[12]),
            )
            .unwrap();
        let (a, b) = (row(&both, 1), row(&alone, 0));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-4,
            "{}: batch changed a sample by {worst}",
            dir.display()
        );
        // Another seed gives another sample.
        let other = model
            .generate(
                &x.narrow(0, 1, 1).unwrap(),
                &m.narrow(0, 1, 1).unwrap(),
                &prompts[1..],
                &names[1..],
                &opts,
                BnMode::Eval,
                &mut PerSampleNoise::new(&[13]),
            )
            .unwrap();
        assert_ne!(row(&other, 0), b);
        // Every re-weighting mode and the batch-statistics encoder run.
        for aar in [AarMode::Off, AarMode::Legacy, AarMode::Paper] {
            let o = SamplerOptions {
                steps: 4,
                eta: 0.5,
                aar,
            };
            let out = model
                .generate(
                    &x,
                    &m,
                    &prompts,
                    &names,
                    &o,
                    BnMode::Batch,
                    &mut PerSampleNoise::new(&[1, 2]),
                )
                .unwrap();
            assert!(row(&out, 0).iter().all(|v| v.is_finite()), "{aar:?}");
        }
    }
}

#[test]
fn wrong_requests_are_refused_by_name() {
    for dir in fixture_dirs() {
        let (model, _) = load(&dir);
        let (x, m) = inputs(1);
        let opts = SamplerOptions {
            steps: 2,
            eta: 1.0,
            aar: AarMode::Off,
        };
        let mut noise = PerSampleNoise::new(&[1]);
        let e = model
            .generate(
                &x,
                &m,
                &["a photo of a *".into()],
                &["carpet+hole".into()],
                &opts,
                BnMode::Eval,
                &mut noise,
            )
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("carpet+hole") && e.contains("it knows"), "{e}");
        let e = model
            .generate(
                &x,
                &m,
                &["a photo of a crack".into()],
                &[model.defect_types()[0].clone()],
                &opts,
                BnMode::Eval,
                &mut noise,
            )
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("placeholder"), "{e}");
    }
}

#[test]
fn dilated_regions_paint_masks_thinner_than_the_latent_grid() {
    for dir in fixture_dirs() {
        let (model, cfg) = load(&dir);
        let name = cfg["defect_types"][0].as_str().unwrap().to_string();
        // A fixed, smooth normal image (the test must not depend on random inputs).
        let px: Vec<f32> = (0..3 * 256 * 256)
            .map(|k| {
                let (c, y, x) = (k / 65536, (k / 256) % 256, k % 256);
                0.4 * ((x as f32 / 23.0 + c as f32).sin() * (y as f32 / 31.0).cos())
            })
            .collect();
        let x = Tensor::from_vec(px, (1, 3, 256, 256), &Device::Cpu).unwrap();
        // A 2-px vertical line at columns 40-41: off the pixels the 32x32 latent mask samples.
        let mut v = vec![0f32; 256 * 256];
        for y in 64..192 {
            v[y * 256 + 40] = 1.0;
            v[y * 256 + 41] = 1.0;
        }
        let thin = Tensor::from_vec(v, (1, 1, 256, 256), &Device::Cpu).unwrap();
        let opts = SamplerOptions {
            steps: 5,
            eta: 1.0,
            aar: AarMode::Off,
        };
        let run = |region: Option<&Tensor>| {
            model
                .generate_in_region(
                    &x,
                    &thin,
                    region,
                    &["a photo of a *".to_string()],
                    std::slice::from_ref(&name),
                    &opts,
                    BnMode::Eval,
                    &mut PerSampleNoise::new(&[5]),
                )
                .unwrap()
        };
        let keep = run(None);
        let region = defectforge_engine::anomaly::block_fill(&thin, 8).unwrap();
        let dilated = run(Some(&region));
        let diff: Vec<f32> = (dilated - &keep)
            .unwrap()
            .abs()
            .unwrap()
            .mean(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // The dilated run generates inside the touched cells (columns 40..48, rows 64..192);
        // the official one leaves the line to the background. Far from the cells both follow
        // the normal image (through the same noised latents), so they differ much less.
        let mean = |f: &dyn Fn(usize, usize) -> bool| {
            let (mut s, mut n) = (0f32, 0f32);
            for y in 0..256 {
                for x in 0..256 {
                    if f(x, y) {
                        s += diff[y * 256 + x];
                        n += 1.0;
                    }
                }
            }
            s / n
        };
        let inside = mean(&|x, y| (40..48).contains(&x) && (64..192).contains(&y));
        let far = mean(&|x, y| !(16..72).contains(&x) || !(40..216).contains(&y));
        eprintln!("{}: inside {inside:.4}, far {far:.4}", dir.display());
        assert!(
            inside > 3.0 * far && inside > 0.05,
            "{}: change inside the cells {inside:.4}, far away {far:.4}",
            dir.display()
        );
    }
}
