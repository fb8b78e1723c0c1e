//! The AnomalyDiffusion spatial encoder against the official code's outputs: for every
//! `anomalydiffusion-tiny*` fixture under `DEFECTFORGE_FIXTURES` (default `../shared/fixtures`
//! beside the workspace), the reduced-width encoder reproduces the eval-mode tokens and
//! backbone taps, the train-mode tokens (batch statistics, as the official generation script
//! runs it) and the running statistics one train-mode forward leaves behind; the torch state
//! dict and its safetensors twin hold bit-identical tensors and build the same model; a
//! checkpoint that does not fit is refused naming the tensor. Without fixtures the fixture
//! tests say so and pass.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use defectforge_engine::ad_files::read_torch_state_dict;
use defectforge_engine::spatial::{BnMode, SpatialEncoder, SpatialEncoderConfig};
use defectforge_engine::{EngineError, Weights};

mod common;

/// Every `anomalydiffusion-tiny*` fixture directory.
fn ad_dirs() -> Vec<PathBuf> {
    common::fixture_dirs("anomalydiffusion-tiny")
}

/// The reference tensors; `mask_u8` is U8, which `MmapedSafetensors` reads as is.
struct Refs(MmapedSafetensors);

impl Refs {
    fn open(path: &Path) -> Self {
        Self(unsafe { MmapedSafetensors::new(path) }.unwrap())
    }

    fn get(&self, name: &str) -> Tensor {
        self.0
            .load(name, &Device::Cpu)
            .unwrap_or_else(|e| panic!("reference tensor {name}: {e}"))
    }
}

/// Checks |got − want| ≤ 1e-4 + 1e-4·|want| element-wise; prints and returns the max errors.
fn check_close(what: &str, got: &Tensor, want: &Tensor) -> (f32, f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g: Vec<f32> = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let (mut max_abs, mut max_ratio, mut max_ref) = (0f32, 0f32, 0f32);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let err = (a - b).abs();
        let allowed = 1e-4 + 1e-4 * b.abs();
        assert!(
            err <= allowed,
            "{what}: element {i}: got {a}, reference {b} (|diff| {err} > {allowed})"
        );
        max_abs = max_abs.max(err);
        max_ratio = max_ratio.max(err / allowed);
        max_ref = max_ref.max(b.abs());
    }
    println!(
        "  {what:<46} max|diff| {max_abs:.3e}  (max |ref| {max_ref:.3e}, worst diff/tolerance {max_ratio:.3})"
    );
    (max_abs, max_ratio)
}

/// The fixture's config: the safetensors metadata, cross-checked against config.json.
fn fixture_config(dir: &Path) -> SpatialEncoderConfig {
    let cfg =
        SpatialEncoderConfig::from_safetensors_metadata(&dir.join("spatial_encoder.safetensors"))
            .unwrap()
            .expect("spatial_encoder.safetensors has a `config` metadata entry");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let from_json: SpatialEncoderConfig =
        serde_json::from_value(json["spatial_encoder"].clone()).unwrap();
    assert_eq!(cfg, from_json, "metadata config vs config.json");
    if let Some(n) = json["spatial_encoder_params"].as_u64() {
        assert_eq!(cfg.parameter_count().unwrap() as u64, n, "parameter count");
    }
    cfg
}

fn masks(refs: &Refs) -> Tensor {
    refs.get("mask_u8")
        .to_dtype(DType::F32)
        .unwrap()
        .unsqueeze(1)
        .unwrap()
}

#[test]
fn encoder_matches_the_official_outputs_in_eval_and_train_mode() {
    for dir in ad_dirs() {
        println!("{}", dir.display());
        let cfg = fixture_config(&dir);
        let refs = Refs::open(&dir.join("ref_spatial_encoder.safetensors"));
        let enc = SpatialEncoder::load(
            &dir.join("spatial_encoder.safetensors"),
            None,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(enc.config(), &cfg);
        let mask = masks(&refs);
        let stored = Weights::from_safetensors(
            &[dir.join("spatial_encoder.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();

        // Eval mode: running statistics, and the model is left unchanged.
        let taps = enc.forward_with_taps(&mask, BnMode::Eval).unwrap();
        check_close("tokens_eval", &taps.tokens, &refs.get("tokens_eval"));
        check_close("eval.c2", &taps.c2, &refs.get("eval.c2"));
        check_close("eval.c3", &taps.c3, &refs.get("eval.c3"));
        for (name, t) in enc.running_buffers().unwrap() {
            let want = stored.source_tensor(&name).unwrap();
            assert_eq!(
                raw_bytes(&t),
                raw_bytes(&want),
                "{name} changed by an eval-mode forward"
            );
        }

        // Train mode: batch statistics; one forward updates the running buffers.
        let tokens = enc.forward(&mask, BnMode::Train).unwrap();
        check_close("tokens_train", &tokens, &refs.get("tokens_train"));
        for layer in ["input_layer.1", "body.23.res_layer.4"] {
            let s = enc.running_stats(layer).unwrap();
            check_close(
                &format!("after_train.{layer}.running_mean"),
                &s.mean,
                &refs.get(&format!("after_train.{layer}.running_mean")),
            );
            check_close(
                &format!("after_train.{layer}.running_var"),
                &s.var,
                &refs.get(&format!("after_train.{layer}.running_var")),
            );
            let before = stored
                .source_tensor(&format!("{layer}.num_batches_tracked"))
                .unwrap()
                .to_scalar::<i64>()
                .unwrap();
            assert_eq!(
                s.num_batches_tracked,
                before + 1,
                "{layer}.num_batches_tracked"
            );
        }
        // Every layer moved its buffers, not only the two the fixture records.
        let buffers: HashMap<String, Tensor> = enc.running_buffers().unwrap().into_iter().collect();
        for bn in enc.batch_norm_names() {
            let key = format!("{bn}.running_mean");
            let now: Vec<f32> = buffers[&key].to_vec1().unwrap();
            let then: Vec<f32> = stored.source_tensor(&key).unwrap().to_vec1().unwrap();
            assert_ne!(now, then, "{key} was not updated by the train-mode forward");
        }
        assert!(enc.running_stats("body.99.res_layer.0").is_err());
    }
}

#[test]
fn the_listed_tensor_shapes_are_those_of_the_fixture_files() {
    // `tensor_shapes` (which the full-size parameter count relies on) lists exactly the keys
    // and shapes of the official-format files.
    for dir in ad_dirs() {
        let cfg = fixture_config(&dir);
        let mut listed: Vec<(String, Vec<usize>)> = cfg
            .tensor_shapes()
            .unwrap()
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect();
        listed.sort();
        let stored: Vec<(String, Vec<usize>)> =
            read_torch_state_dict(&dir.join("spatial_encoder.pt"))
                .unwrap()
                .into_iter()
                .map(|(n, t)| (n, t.dims().to_vec()))
                .collect();
        assert_eq!(listed, stored, "{}", dir.display());
    }
}

#[test]
fn torch_state_dict_and_safetensors_are_bit_identical() {
    for dir in ad_dirs() {
        let pt = read_torch_state_dict(&dir.join("spatial_encoder.pt")).unwrap();
        let st = Weights::from_safetensors(
            &[dir.join("spatial_encoder.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let names: Vec<&str> = pt.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, st.source_names(), "{}: key sets", dir.display());
        for (name, t) in &pt {
            let s = st.source_tensor(name).unwrap();
            assert_eq!(t.dtype(), s.dtype(), "{name}: dtype");
            assert_eq!(t.dims(), s.dims(), "{name}: shape");
            assert_eq!(raw_bytes(t), raw_bytes(&s), "{name}: bytes");
        }
        println!("{}: {} tensors bit-identical", dir.display(), pt.len());

        // Both files build the same encoder (the .pt through the accounting as well).
        let cfg = fixture_config(&dir);
        let a = SpatialEncoder::load(
            &dir.join("spatial_encoder.pt"),
            Some(&cfg),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let b = SpatialEncoder::load(
            &dir.join("spatial_encoder.safetensors"),
            None,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let mask = masks(&Refs::open(&dir.join("ref_spatial_encoder.safetensors")));
        let (ta, tb) = (
            a.forward(&mask, BnMode::Eval).unwrap(),
            b.forward(&mask, BnMode::Eval).unwrap(),
        );
        assert_eq!(raw_bytes(&ta), raw_bytes(&tb));
    }
}

#[test]
fn a_checkpoint_that_does_not_fit_is_refused_naming_the_tensor() {
    for dir in ad_dirs() {
        let cfg = fixture_config(&dir);
        let full: HashMap<String, Tensor> = read_torch_state_dict(&dir.join("spatial_encoder.pt"))
            .unwrap()
            .into_iter()
            .collect();

        let mut missing = full.clone();
        missing.remove("body.5.res_layer.4.running_var");
        let err = SpatialEncoder::from_weights(
            &Weights::from_tensors(missing, DType::F32, &Device::Cpu),
            &cfg,
        )
        .unwrap_err();
        assert!(
            matches!(&err, EngineError::MissingTensor { name, .. } if name == "body.5.res_layer.4.running_var"),
            "{err}"
        );

        let mut extra = full.clone();
        extra.insert(
            "styles.9.linear.bias".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = SpatialEncoder::from_weights(
            &Weights::from_tensors(extra, DType::F32, &Device::Cpu),
            &cfg,
        )
        .unwrap_err();
        assert!(err.to_string().contains("styles.9.linear.bias"), "{err}");

        // The default (full-size) config does not fit the reduced weights.
        let err = SpatialEncoder::from_weights(
            &Weights::from_tensors(full, DType::F32, &Device::Cpu),
            &SpatialEncoderConfig::default(),
        )
        .unwrap_err();
        assert!(matches!(err, EngineError::ShapeMismatch { .. }), "{err}");
    }
}

#[test]
fn wrong_inputs_are_refused_with_a_reason() {
    let cfg: SpatialEncoderConfig = serde_json::from_value(serde_json::json!({
        "text_num": 2, "stem": 2, "widths": [2, 4, 4, 4], "units": [1, 1, 1, 1],
        "fpn_dim": 4, "out_dim": 6, "spatial": 64
    }))
    .unwrap();
    let w = Weights::random(3, 0.1, DType::F32, &Device::Cpu);
    let enc = SpatialEncoder::from_weights(&w, &cfg).unwrap();
    let ok = Tensor::zeros((1, 1, 256, 256), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(enc.forward(&ok, BnMode::Eval).unwrap().dims(), &[1, 2, 6]);
    // A 512×512 mask leaves 2×2 pixels after the heads' six stride-2 convs; the official
    // `view(-1, out_c)` would silently turn them into extra rows.
    let big = Tensor::zeros((1, 1, 512, 512), DType::F32, &Device::Cpu).unwrap();
    let err = enc.forward(&big, BnMode::Eval).unwrap_err();
    assert!(err.to_string().contains("not 1x1"), "{err}");
    let two = Tensor::zeros((1, 2, 256, 256), DType::F32, &Device::Cpu).unwrap();
    assert!(enc
        .forward(&two, BnMode::Eval)
        .unwrap_err()
        .to_string()
        .contains("channels"));
}

/// Coarse and middle heads (unused by AnomalyDiffusion, supported like the official code):
/// heads read c3, p2 and p1 and are stacked in head order.
#[test]
fn coarse_and_middle_heads_read_their_own_maps() {
    let cfg: SpatialEncoderConfig = serde_json::from_value(serde_json::json!({
        "text_num": 3, "stem": 2, "widths": [2, 4, 4, 4], "units": [1, 1, 1, 1],
        "fpn_dim": 4, "out_dim": 5, "spatial": 64, "coarse_ind": 1, "middle_ind": 2
    }))
    .unwrap();
    let shapes = cfg.tensor_shapes().unwrap();
    let convs = |i: usize| {
        shapes
            .iter()
            .filter(|t| {
                t.name.starts_with(&format!("styles.{i}.convs.")) && t.name.ends_with(".weight")
            })
            .count()
    };
    assert_eq!((convs(0), convs(1), convs(2)), (4, 5, 6));
    let w = Weights::random(5, 0.1, DType::F32, &Device::Cpu);
    let enc = SpatialEncoder::from_weights(&w, &cfg).unwrap();
    let mask = Tensor::ones((2, 1, 256, 256), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        enc.forward(&mask, BnMode::Train).unwrap().dims(),
        &[2, 3, 5]
    );
}

fn raw_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}
