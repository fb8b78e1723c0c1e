//! The training graph on the fixtures' tiny model: float64 finite differences of the whole
//! masked loss (spatial encoder → splice → 32-layer BERT → UNet) against candle's backward,
//! frozen weights without stored gradients, and a few Adam steps that lower the loss; the
//! mask model's plain loss likewise, with AdamW's per-type isolation.
//! Uses `anomalydiffusion-tiny*` under `DEFECTFORGE_FIXTURES` (skips without fixtures).

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use defectforge_engine::ad_files::read_embeddings_pt;
use defectforge_engine::ad_model::AnomalyModel;
use defectforge_engine::ldm::LdmModel;
use defectforge_engine::spatial::{BnMode, SpatialEncoder, SpatialEncoderConfig};
use defectforge_engine::tokenizer::WordPieceTokenizer;
use defectforge_engine::train::adam::{Adam, AdamConfig};
use defectforge_engine::train::frozen::set_skip_frozen_grads;
use defectforge_engine::train::{
    init_embedding, mask_training_loss, masked_training_loss, LossBatch, MaskLossBatch, Trainable,
};

mod common;

fn fixture_dirs() -> Vec<PathBuf> {
    common::fixture_dirs("anomalydiffusion-tiny")
}

/// The fixture model in `dtype`, its types trainable, the encoder trainable.
fn load(dir: &Path, dtype: DType) -> (AnomalyModel, Trainable, tempfile::TempDir) {
    load_with(dir, dtype, true)
}

fn load_with(
    dir: &Path,
    dtype: DType,
    train_encoder: bool,
) -> (AnomalyModel, Trainable, tempfile::TempDir) {
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
        dtype,
        &dev,
    )
    .unwrap();
    let se: SpatialEncoderConfig = serde_json::from_value(cfg["spatial_encoder"].clone()).unwrap();
    let enc_file = dir.join("spatial_encoder.pt");
    let spatial = SpatialEncoder::load(&enc_file, Some(&se), dtype, &dev).unwrap();
    let emb = read_embeddings_pt(&dir.join("embeddings.pt")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let vocab = tmp.path().join("vocab.txt");
    common::write_fixture_vocab(
        cfg["fixture_vocabulary"].as_object().unwrap(),
        ldm.bert.config().vocab_size,
        &vocab,
    );
    let tok = WordPieceTokenizer::from_vocab(&vocab, 77).unwrap();
    let mut model = AnomalyModel::assemble(ldm, spatial, emb, tok, dtype, &dev).unwrap();
    let names = model.defect_types();
    let init = model.embeddings[&names[0]].zeros_like().unwrap();
    let tr = Trainable::install(
        &mut model,
        &names,
        &init,
        train_encoder.then_some(enc_file.as_path()),
    )
    .unwrap();
    (model, tr, tmp)
}

/// A fixed batch of 2 rows (types 0 and 1), soft-edged rectangles, t = 150 and 700.
struct Batch {
    z: Tensor,
    masks: Tensor,
    eps: Tensor,
    prompts: Vec<String>,
    names: Vec<String>,
    t: Vec<usize>,
}

fn lcg(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // roughly N(0,1): sum of 4 uniforms, centred and scaled
            let mut acc = 0.0;
            for _ in 0..4 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                acc += (s >> 11) as f64 / (1u64 << 53) as f64;
            }
            (acc - 2.0) * 3f64.sqrt()
        })
        .collect()
}

fn batch(model: &AnomalyModel, dtype: DType) -> Batch {
    let dev = Device::Cpu;
    let names = model.defect_types();
    let mut m = vec![0f64; 2 * 256 * 256];
    for (i, (y0, x0)) in [(40usize, 60usize), (120, 30)].into_iter().enumerate() {
        for y in y0..y0 + 90 {
            for x in x0..x0 + 110 {
                let edge = y == y0 || x == x0 || y == y0 + 89 || x == x0 + 109;
                m[i * 65536 + y * 256 + x] = if edge { 0.5 } else { 1.0 };
            }
        }
    }
    let t = |v: Vec<f64>, s: (usize, usize, usize, usize)| {
        Tensor::from_vec(v, s, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    Batch {
        z: t(lcg(1, 2 * 4 * 32 * 32), (2, 4, 32, 32)),
        masks: t(m, (2, 1, 256, 256)),
        eps: t(lcg(2, 2 * 4 * 32 * 32), (2, 4, 32, 32)),
        prompts: vec![model.random_prompt(0), model.random_prompt(19)],
        names: vec![names[0].clone(), names[1].clone()],
        t: vec![150, 700],
    }
}

fn loss_of(model: &AnomalyModel, b: &Batch) -> Tensor {
    masked_training_loss(
        model,
        &LossBatch {
            latents: &b.z,
            masks: &b.masks,
            prompts: &b.prompts,
            names: &b.names,
            timesteps: &b.t,
            noise: &b.eps,
        },
        BnMode::Batch,
    )
    .unwrap()
    .loss
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Σ ⟨g, u⟩ over `params` and the central difference of `loss` along `u`.
fn directional(
    loss: &dyn Fn() -> Tensor,
    params: &[(String, Var)],
    grads: &GradStore,
    h: f64,
    seed: u64,
) -> (f64, f64) {
    // A unit direction over all the parameters: a step of h moves them by h in norm, so the
    // difference stays in the loss's smooth neighbourhood (ReLU kinks, second order).
    let raw: Vec<Tensor> = params
        .iter()
        .enumerate()
        .map(|(i, (_, v))| {
            let n = v.elem_count();
            Tensor::from_vec(lcg(seed + i as u64, n), v.dims(), &Device::Cpu).unwrap()
        })
        .collect();
    let norm: f64 = raw
        .iter()
        .map(|u| scalar(&u.sqr().unwrap().sum_all().unwrap()))
        .sum::<f64>()
        .sqrt();
    let dirs: Vec<Tensor> = raw.iter().map(|u| (u / norm).unwrap()).collect();
    let mut analytic = 0.0;
    for ((_, v), u) in params.iter().zip(&dirs) {
        if let Some(g) = grads.get(v.as_tensor()) {
            analytic += scalar(&(g * u).unwrap().sum_all().unwrap());
        }
    }
    let orig: Vec<Tensor> = params
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    let shift = |k: f64| {
        for (((_, v), u), o) in params.iter().zip(&dirs).zip(&orig) {
            v.set(&(o + (u * k).unwrap()).unwrap()).unwrap();
        }
    };
    shift(h);
    let plus = scalar(&loss());
    shift(-h);
    let minus = scalar(&loss());
    shift(0.0);
    (analytic, (plus - minus) / (2.0 * h))
}

#[test]
fn the_whole_graph_matches_float64_finite_differences() {
    for dir in fixture_dirs() {
        let (model, tr, _tmp) = load(&dir, DType::F64);
        let b = batch(&model, DType::F64);
        let loss = loss_of(&model, &b);
        let grads = loss.backward().unwrap();
        let emb: Vec<(String, Var)> = tr
            .embeddings
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        // Every encoder parameter got a gradient (BatchNorm affine, PReLU, convs, heads).
        let missing: Vec<&str> = tr
            .encoder
            .iter()
            .filter(|(_, v)| grads.get(v.as_tensor()).is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        assert!(missing.is_empty(), "no gradient for {missing:?}");
        // The third type is not in the batch: no gradient at all.
        let absent = &model.defect_types()[2];
        assert!(grads.get(tr.embeddings[absent].as_tensor()).is_none());
        for (what, params) in [("embeddings", &emb), ("spatial encoder", &tr.encoder)] {
            let (a, fd) = directional(&|| loss_of(&model, &b), params, &grads, 1e-5, 7);
            let rel = (a - fd).abs() / a.abs().max(fd.abs());
            println!(
                "{}: {what}: analytic {a:.9e}, finite difference {fd:.9e}, rel {rel:.2e}",
                dir.display()
            );
            assert!(
                a.abs() > 1e-9,
                "{what}: a vanishing gradient proves nothing"
            );
            assert!(rel < 1e-5, "{what}: analytic {a} vs finite difference {fd}");
        }
    }
}

#[test]
fn frozen_weights_get_no_gradients_and_the_trained_ones_do_not_change() {
    for dir in fixture_dirs() {
        let (model, tr, _tmp) = load(&dir, DType::F32);
        let b = batch(&model, DType::F32);
        let stored = |g: &GradStore| -> usize {
            g.get_ids()
                .map(|id| g.get_id(*id).unwrap().elem_count())
                .sum()
        };
        let params = tr.named();
        let grad_vec = |g: &GradStore| -> Vec<Vec<f32>> {
            params
                .iter()
                .map(|(_, v)| match g.get(v.as_tensor()) {
                    Some(t) => t.flatten_all().unwrap().to_vec1().unwrap(),
                    None => vec![],
                })
                .collect()
        };
        set_skip_frozen_grads(false);
        let l_off = loss_of(&model, &b);
        let g_off = l_off.backward().unwrap();
        set_skip_frozen_grads(true);
        let l_on = loss_of(&model, &b);
        let g_on = l_on.backward().unwrap();
        let (s_off, s_on) = (stored(&g_off), stored(&g_on));
        let trainable: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
        println!(
            "{}: gradient elements stored: {s_off} with candle's ops, {s_on} skipping frozen \
             operands ({trainable} trainable parameters)",
            dir.display()
        );
        assert!(s_on * 2 < s_off, "{s_on} vs {s_off}");
        // The same function: float32 rounding differs only where a strided frozen conv runs as
        // im2col + GEMM instead of candle's conv kernel.
        let (a, b) = (scalar(&l_on), scalar(&l_off));
        println!("loss {a:.9} (frozen ops) vs {b:.9} (candle's)");
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
        let (on, off) = (grad_vec(&g_on), grad_vec(&g_off));
        // Some gradients are zero in exact arithmetic (a BatchNorm bias followed by another
        // BatchNorm): their float32 noise is measured against the largest gradient.
        let global = off.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        for ((n, _), (a, b)) in params.iter().zip(on.iter().zip(&off)) {
            assert_eq!(a.len(), b.len(), "{n}");
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                d <= 1e-3 * scale + 1e-5 * global,
                "{n}: {d} vs scale {scale} (largest gradient {global})"
            );
        }
    }
}

#[test]
fn adam_steps_lower_the_loss_and_leave_absent_types_alone() {
    for dir in fixture_dirs() {
        let (model, tr, _tmp) = load(&dir, DType::F32);
        let b = batch(&model, DType::F32);
        let absent = model.defect_types()[2].clone();
        let before_absent = tr.embeddings[&absent]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut opt = Adam::new(tr.named(), AdamConfig::adam(2e-3)).unwrap();
        let first = scalar(&loss_of(&model, &b));
        let mut last = first;
        for _ in 0..5 {
            let loss = loss_of(&model, &b);
            last = scalar(&loss);
            let grads = loss.backward().unwrap();
            let updated = opt.step(&grads).unwrap();
            assert!(!updated.contains(&format!("embedding.{absent}")));
        }
        let end = scalar(&loss_of(&model, &b));
        println!("{}: loss {first:.6} → {last:.6} → {end:.6}", dir.display());
        assert!(end < first, "5 steps on one batch must lower its loss");
        let after_absent = tr.embeddings[&absent]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(before_absent, after_absent);
        assert!(opt.state(&format!("embedding.{absent}")).is_none());
        assert_eq!(
            opt.state(&format!("embedding.{}", model.defect_types()[0]))
                .unwrap()
                .step,
            5
        );
    }
}

#[test]
fn new_types_start_from_the_initialiser_word() {
    for dir in fixture_dirs() {
        let (model, _tr, _tmp) = load(&dir, DType::F32);
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let vocab = cfg["fixture_vocabulary"].as_object().unwrap();
        let (word, id) = vocab
            .iter()
            .find(|(w, _)| w.chars().all(|c| c.is_ascii_lowercase()) && w.len() > 3)
            .map(|(w, id)| (w.clone(), id.as_u64().unwrap() as u32))
            .unwrap();
        let e = init_embedding(&model, &word, 4).unwrap();
        assert_eq!(e.dims(), &[4, model.ldm.bert.config().n_embed]);
        let row = model
            .ldm
            .bert
            .embed_tokens(&Tensor::new(&[[id]], &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for r in 0..4 {
            assert_eq!(e.get(r).unwrap().to_vec1::<f32>().unwrap(), row);
        }
        let two = format!("{word} {word}");
        let err = init_embedding(&model, &two, 4).unwrap_err().to_string();
        assert!(err.contains("exactly one"), "{err}");
    }
}

#[test]
fn a_frozen_encoder_stays_as_it_was_while_the_embeddings_learn() {
    for dir in fixture_dirs() {
        let (model, tr, _tmp) = load_with(&dir, DType::F32, false);
        assert!(tr.encoder.is_empty());
        let b = batch(&model, DType::F32);
        let tokens = |m: &AnomalyModel| -> Vec<f32> {
            m.spatial
                .forward(&b.masks, BnMode::Batch)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let before = tokens(&model);
        let e0 = tr.embeddings[&b.names[0]]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut opt = Adam::new(tr.named(), AdamConfig::adam(2e-3)).unwrap();
        assert!(opt
            .params()
            .iter()
            .all(|(n, _)| n.starts_with("embedding.")));
        for _ in 0..2 {
            let g = loss_of(&model, &b).backward().unwrap();
            opt.step(&g).unwrap();
        }
        assert_eq!(tokens(&model), before, "the frozen encoder changed");
        let e1 = tr.embeddings[&b.names[0]]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(e0, e1, "the embedding did not learn");
    }
}

/// The fixture model with every type's mask embedding trainable, new from the first lowercase
/// word of the fixture's vocabulary (the official init word "crack" is not in it), 16 vectors.
fn load_masks(dir: &Path, dtype: DType) -> (AnomalyModel, Trainable, tempfile::TempDir) {
    let (mut model, _, tmp) = load_with(dir, dtype, false);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let word = cfg["fixture_vocabulary"]
        .as_object()
        .unwrap()
        .keys()
        .find(|w| w.chars().all(|c| c.is_ascii_lowercase()) && w.len() > 3)
        .unwrap()
        .clone();
    let init = init_embedding(&model, &word, 16).unwrap();
    let names = model.defect_types();
    let tr = Trainable::install_masks(&mut model, &names, &init).unwrap();
    (model, tr, tmp)
}

fn mask_loss_of(model: &AnomalyModel, b: &Batch) -> Tensor {
    mask_training_loss(
        model,
        &MaskLossBatch {
            latents: &b.z,
            prompts: &b.prompts,
            names: &b.names,
            timesteps: &b.t,
            noise: &b.eps,
        },
    )
    .unwrap()
    .loss
}

#[test]
fn the_mask_loss_matches_float64_finite_differences() {
    for dir in fixture_dirs() {
        let (model, tr, _tmp) = load_masks(&dir, DType::F64);
        let b = batch(&model, DType::F64);
        let grads = mask_loss_of(&model, &b).backward().unwrap();
        let absent = &model.defect_types()[2];
        assert!(
            grads.get(tr.embeddings[absent].as_tensor()).is_none(),
            "a type outside the batch has no gradient"
        );
        // the anomaly embeddings are not on this graph at all
        for t in model.embeddings.values() {
            assert!(grads.get(t).is_none());
        }
        let params: Vec<(String, Var)> = tr.named();
        let (a, fd) = directional(&|| mask_loss_of(&model, &b), &params, &grads, 1e-5, 11);
        let rel = (a - fd).abs() / a.abs().max(fd.abs());
        println!(
            "{}: mask embeddings: analytic {a:.9e}, finite difference {fd:.9e}, rel {rel:.2e}",
            dir.display()
        );
        assert!(a.abs() > 1e-9, "a vanishing gradient proves nothing");
        assert!(rel < 1e-5, "analytic {a} vs finite difference {fd}");
    }
}

#[test]
fn adamw_on_mask_embeddings_learns_and_leaves_absent_types_untouched_weight_decay_included() {
    for dir in fixture_dirs() {
        let (model, tr, _tmp) = load_masks(&dir, DType::F32);
        let b = batch(&model, DType::F32);
        let absent = model.defect_types()[2].clone();
        let values = |n: &str| -> Vec<f32> {
            tr.embeddings[n]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let before_absent = values(&absent);
        let before_present = values(&b.names[0]);
        // the official mask optimizer: AdamW, lr 0.02 (5e-3 × batch 4), weight decay 0.01
        let mut opt = Adam::new(tr.named(), AdamConfig::adamw(0.02, 0.01)).unwrap();
        let first = scalar(&mask_loss_of(&model, &b));
        for _ in 0..4 {
            let grads = mask_loss_of(&model, &b).backward().unwrap();
            let updated = opt.step(&grads).unwrap();
            assert!(!updated.contains(&format!("embedding.{absent}")));
        }
        let end = scalar(&mask_loss_of(&model, &b));
        println!("{}: mask loss {first:.6} → {end:.6}", dir.display());
        assert!(
            end < first,
            "4 AdamW steps on one batch must lower its loss"
        );
        assert_eq!(
            values(&absent),
            before_absent,
            "weight decay touched an absent type"
        );
        assert!(opt.state(&format!("embedding.{absent}")).is_none());
        assert_ne!(values(&b.names[0]), before_present);
        assert_eq!(
            opt.state(&format!("embedding.{}", b.names[0]))
                .unwrap()
                .step,
            4
        );
    }
}
