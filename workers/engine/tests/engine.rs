//! Behaviour of the engine beyond the reference fixtures: a tiny model built from random
//! weights survives a save/reload unchanged, a wrong checkpoint is refused with the tensor's
//! name, attention control acts per layer and per batch element, timesteps are per sample,
//! DDIM replays injected noise, CLIP accepts spliced embeddings, and the CLIP tokenizer loads
//! from vocab.json + merges.txt.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use defectforge_engine::clip::{ClipConfig, ClipTextModel};
use defectforge_engine::control::{
    AttentionRecorder, ReweightTarget, SpanRule, SpanWeight, TokenSpanReweight,
};
use defectforge_engine::ddim::{DdimConfig, DdimScheduler};
use defectforge_engine::noise::{NoiseSource, ReplayNoise, SeededNoise};
use defectforge_engine::tokenizer::ClipTokenizer;
use defectforge_engine::unet::{UNet2DConditionModel, UNetConfig};
use defectforge_engine::vae::{AutoencoderKL, VaeConfig};
use defectforge_engine::{EngineError, Weights};

fn unet_json() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": 4, "out_channels": 4,
        "block_out_channels": [16, 32],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": 2,
        "cross_attention_dim": 12,
        "norm_num_groups": 4
    })
}

fn unet_config() -> UNetConfig {
    serde_json::from_value(unet_json()).unwrap()
}

fn vae_config() -> VaeConfig {
    serde_json::from_value(serde_json::json!({
        "block_out_channels": [8, 16], "layers_per_block": 1,
        "latent_channels": 4, "norm_num_groups": 4
    }))
    .unwrap()
}

fn clip_config() -> ClipConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "hidden_size": 12, "intermediate_size": 20,
        "num_hidden_layers": 2, "num_attention_heads": 3,
        "bos_token_id": 48, "eos_token_id": 49
    }))
    .unwrap()
}

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    SeededNoise::new(seed)
        .randn(&shape.into(), DType::F32, &Device::Cpu)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn random_unet() -> (UNet2DConditionModel, Weights) {
    let w = Weights::random(7, 0.05, DType::F32, &Device::Cpu);
    let m = UNet2DConditionModel::from_weights(&w, &unet_config()).unwrap();
    (m, w)
}

#[test]
fn tiny_models_roundtrip_through_safetensors_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let x = randn(1, &[2, 4, 8, 8]);
    let ctx = randn(2, &[2, 7, 12]);
    let t = Tensor::new(&[500i64, 20], &dev).unwrap();

    // UNet, saved in the diffusers layout and loaded through the public `load`.
    let (unet, w) = random_unet();
    let before = unet.forward(&x, &t, &ctx, None).unwrap();
    let udir = dir.path().join("unet");
    std::fs::create_dir_all(&udir).unwrap();
    std::fs::write(udir.join("config.json"), unet_json().to_string()).unwrap();
    w.save_consumed(&udir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let reloaded = UNet2DConditionModel::load(&udir, DType::F32, &dev).unwrap();
    let after = reloaded.forward(&x, &t, &ctx, None).unwrap();
    assert_eq!(max_abs_diff(&before, &after), 0.0);

    // VAE.
    let vw = Weights::random(8, 0.05, DType::F32, &dev);
    let vae = AutoencoderKL::from_weights(&vw, &vae_config()).unwrap();
    let img = randn(3, &[1, 3, 16, 16]);
    let z = randn(4, &[1, 4, 8, 8]);
    let (m0, d0) = (vae.encode(&img).unwrap().mean, vae.decode(&z).unwrap());
    let p = dir.path().join("vae.safetensors");
    vw.save_consumed(&p).unwrap();
    let vae2 = AutoencoderKL::from_weights(
        &Weights::from_safetensors(&[&p], DType::F32, &dev).unwrap(),
        &vae_config(),
    )
    .unwrap();
    assert_eq!(max_abs_diff(&m0, &vae2.encode(&img).unwrap().mean), 0.0);
    assert_eq!(max_abs_diff(&d0, &vae2.decode(&z).unwrap()), 0.0);

    // CLIP.
    let cw = Weights::random(9, 0.05, DType::F32, &dev);
    let clip = ClipTextModel::from_weights(&cw, &clip_config()).unwrap();
    let ids = Tensor::new(&[[48u32, 5, 6, 7, 49, 49, 49]], &dev).unwrap();
    let h0 = clip.forward(&ids).unwrap();
    let p = dir.path().join("clip.safetensors");
    cw.save_consumed(&p).unwrap();
    let clip2 = ClipTextModel::from_weights(
        &Weights::from_safetensors(&[&p], DType::F32, &dev).unwrap(),
        &clip_config(),
    )
    .unwrap();
    assert_eq!(max_abs_diff(&h0, &clip2.forward(&ids).unwrap()), 0.0);
}

#[test]
fn wrong_checkpoints_are_refused_naming_the_tensor() {
    let (_, w) = random_unet();
    let good = w.consumed();
    let cfg = unet_config();
    let load = |map: HashMap<String, Tensor>| {
        UNet2DConditionModel::from_weights(
            &Weights::from_tensors(map, DType::F32, &Device::Cpu),
            &cfg,
        )
    };

    let name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let mut missing = good.clone();
    missing.remove(name).unwrap();
    let err = load(missing).unwrap_err();
    assert!(
        matches!(&err, EngineError::MissingTensor { name: n, .. } if n == name),
        "{err}"
    );
    assert!(err.to_string().contains(name));

    let mut misshapen = good.clone();
    misshapen.insert(
        "conv_in.weight".into(),
        Tensor::zeros((16, 4, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load(misshapen).unwrap_err();
    assert!(
        matches!(&err, EngineError::ShapeMismatch { name, got, .. } if name == "conv_in.weight" && got == &vec![16, 4, 1, 1]),
        "{err}"
    );

    let mut extra = good.clone();
    extra.insert(
        "down_blocks.0.attentions.7.proj_in.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load(extra).unwrap_err();
    assert!(
        matches!(&err, EngineError::UnexpectedTensors { names, .. } if names == &vec!["down_blocks.0.attentions.7.proj_in.weight".to_string()]),
        "{err}"
    );
    assert!(load(good).is_ok());
}

#[test]
fn vae_reads_legacy_attention_key_names() {
    let dev = Device::Cpu;
    let vw = Weights::random(8, 0.05, DType::F32, &dev);
    let vae = AutoencoderKL::from_weights(&vw, &vae_config()).unwrap();
    let z = randn(4, &[1, 4, 8, 8]);
    let renamed: HashMap<String, Tensor> = vw
        .consumed()
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.");
            (k, v)
        })
        .collect();
    assert!(renamed.contains_key("decoder.mid_block.attentions.0.proj_attn.weight"));
    let legacy = AutoencoderKL::from_weights(
        &Weights::from_tensors(renamed, DType::F32, &dev),
        &vae_config(),
    )
    .unwrap();
    assert_eq!(
        max_abs_diff(&vae.decode(&z).unwrap(), &legacy.decode(&z).unwrap()),
        0.0
    );
}

#[test]
fn attention_control_reweights_chosen_spans_per_batch_element() {
    let (unet, _) = random_unet();
    let x = randn(1, &[2, 4, 8, 8]);
    let ctx = randn(2, &[2, 7, 12]);
    let plain = unet.forward_t(&x, 300.0, &ctx, None).unwrap();

    // Identity weights change nothing.
    let mut identity = TokenSpanReweight {
        target: ReweightTarget::Logits,
        rules: vec![SpanRule {
            batch: 0,
            tokens: 1..3,
            weight: SpanWeight::Scalar(1.0),
        }],
    };
    let same = unet
        .forward_t(&x, 300.0, &ctx, Some(&mut identity))
        .unwrap();
    assert_eq!(max_abs_diff(&plain, &same), 0.0);

    // Re-weighting batch element 1 (logits ×3 on tokens 1..3, with a spatial map) leaves
    // element 0 untouched and changes element 1.
    let map = Tensor::from_vec(
        (0..64)
            .map(|i| 1.0 + (i % 8) as f32 * 0.5)
            .collect::<Vec<_>>(),
        (8, 8),
        &Device::Cpu,
    )
    .unwrap();
    for target in [ReweightTarget::Logits, ReweightTarget::Probs] {
        let mut ctrl = TokenSpanReweight {
            target,
            rules: vec![
                SpanRule {
                    batch: 1,
                    tokens: 1..3,
                    weight: SpanWeight::Scalar(3.0),
                },
                SpanRule {
                    batch: 1,
                    tokens: 4..5,
                    weight: SpanWeight::Map(map.clone()),
                },
            ],
        };
        let out = unet.forward_t(&x, 300.0, &ctx, Some(&mut ctrl)).unwrap();
        assert_eq!(max_abs_diff(&plain.i(0).unwrap(), &out.i(0).unwrap()), 0.0);
        assert!(
            max_abs_diff(&plain.i(1).unwrap(), &out.i(1).unwrap()) > 1e-4,
            "{target:?}"
        );
    }

    // The recorder sees every cross-attention layer with its grid and probabilities.
    let mut rec = AttentionRecorder::new(|s| s.is_cross);
    unet.forward_t(&x, 300.0, &ctx, Some(&mut rec)).unwrap();
    let names: Vec<&str> = rec.records.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
            "mid_block.attentions.0.transformer_blocks.0.attn2",
            "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
            "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
        ]
    );
    assert_eq!(rec.records[0].probs.dims(), &[2, 2, 64, 7]);
    assert_eq!(rec.records[1].probs.dims(), &[2, 2, 16, 7]);
    let row_sums = rec.records[0].probs.sum(3).unwrap();
    let ones = Tensor::ones_like(&row_sums).unwrap();
    assert!(max_abs_diff(&row_sums, &ones) < 1e-5);
}

#[test]
fn timesteps_are_per_sample() {
    let (unet, _) = random_unet();
    let x = randn(1, &[2, 4, 8, 8]);
    let ctx = randn(2, &[2, 7, 12]);
    let a = unet.forward_t(&x, 700.0, &ctx, None).unwrap();
    let b = unet.forward_t(&x, 3.0, &ctx, None).unwrap();
    let t = Tensor::new(&[700f32, 3.0], &Device::Cpu).unwrap();
    let mixed = unet.forward(&x, &t, &ctx, None).unwrap();
    assert!(max_abs_diff(&mixed.i(0).unwrap(), &a.i(0).unwrap()) < 1e-6);
    assert!(max_abs_diff(&mixed.i(1).unwrap(), &b.i(1).unwrap()) < 1e-6);
    assert!(max_abs_diff(&a, &b) > 1e-4);
}

#[test]
fn ddim_with_eta_replays_injected_noise() {
    let s = DdimScheduler::new(DdimConfig::sd_v1_5(), 10, 1.0).unwrap();
    assert_eq!(s.timesteps()[0], 901);
    let eps = randn(1, &[1, 4, 4, 4]);
    let x = randn(2, &[1, 4, 4, 4]);
    let z = randn(3, &[1, 4, 4, 4]);
    let det = DdimScheduler::new(DdimConfig::sd_v1_5(), 10, 0.0).unwrap();
    let mut none = ReplayNoise::default();
    let out0 = det.step(&eps, 501, &x, &mut none).unwrap();

    let mut replay = ReplayNoise::new([z.clone()]);
    let out = s.step(&eps, 501, &x, &mut replay).unwrap();
    assert_eq!(replay.remaining(), 0);
    // x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev−σ²)·ε + σ·z, with σ² = (1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev).
    let ac = s.alphas_cumprod();
    let (at, ap) = (ac[501] as f64, ac[401] as f64);
    let var = (1.0 - ap) / (1.0 - at) * (1.0 - at / ap);
    let expected = ((&out0.pred_original_sample * ap.sqrt()).unwrap()
        + (&eps * (1.0 - ap - var).sqrt()).unwrap()
        + (&z * var.sqrt()).unwrap())
    .unwrap();
    assert!(max_abs_diff(&out.prev_sample, &expected) < 1e-5);
    // A replay that runs out is an error, not fresh randomness.
    assert!(matches!(
        s.step(&eps, 501, &x, &mut replay),
        Err(EngineError::Noise(_))
    ));
    // add_noise takes one timestep per sample.
    let x2 = randn(4, &[2, 4, 4, 4]);
    let n2 = randn(5, &[2, 4, 4, 4]);
    let q = s.add_noise(&x2, &n2, &[10, 900]).unwrap();
    let want1 = ((x2.i(1).unwrap() * (ac[900] as f64).sqrt()).unwrap()
        + (n2.i(1).unwrap() * (1.0 - ac[900] as f64).sqrt()).unwrap())
    .unwrap();
    assert!(max_abs_diff(&q.i(1).unwrap(), &want1) < 1e-6);
}

#[test]
fn clip_accepts_spliced_token_embeddings() {
    let dev = Device::Cpu;
    let clip =
        ClipTextModel::from_weights(&Weights::random(9, 0.05, DType::F32, &dev), &clip_config())
            .unwrap();
    let ids = Tensor::new(&[[48u32, 5, 6, 7, 8, 49, 49]], &dev).unwrap();
    let by_ids = clip.forward(&ids).unwrap();
    let emb = clip.embed_tokens(&ids).unwrap();
    assert_eq!(
        max_abs_diff(&by_ids, &clip.forward_embeds(&emb).unwrap()),
        0.0
    );
    // Splice a learned embedding at position 3: causal attention leaves positions 0..3 alone.
    let learned = randn(11, &[1, 1, 12]);
    let spliced = Tensor::cat(
        &[
            emb.narrow(1, 0, 3).unwrap(),
            learned,
            emb.narrow(1, 4, 3).unwrap(),
        ],
        1,
    )
    .unwrap();
    let out = clip.forward_embeds(&spliced).unwrap();
    assert_eq!(
        max_abs_diff(
            &out.narrow(1, 0, 3).unwrap(),
            &by_ids.narrow(1, 0, 3).unwrap()
        ),
        0.0
    );
    assert!(
        max_abs_diff(
            &out.narrow(1, 3, 4).unwrap(),
            &by_ids.narrow(1, 3, 4).unwrap()
        ) > 1e-4
    );
    // Pooling picks the first EOS.
    let pooled = clip.pooled(&by_ids, &ids).unwrap();
    assert_eq!(
        max_abs_diff(&pooled.i(0).unwrap(), &by_ids.i((0, 5)).unwrap()),
        0.0
    );
}

#[test]
fn clip_tokenizer_loads_vocab_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = serde_json::json!({
        "<|startoftext|>": 0, "<|endoftext|>": 1, "c": 2, "a": 3, "t": 4, "t</w>": 5,
        "ca": 6, "cat</w>": 7, "a</w>": 8, "!</w>": 9, "!": 10, "d": 11, "o": 12, "g</w>": 13,
        "do": 14, "dog</w>": 15, "g": 16
    });
    std::fs::write(dir.path().join("vocab.json"), vocab.to_string()).unwrap();
    std::fs::write(
        dir.path().join("merges.txt"),
        "#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n",
    )
    .unwrap();
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    let ids = tok.encode("A  Cat\tdog!").unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(&ids[..7], &[0, 8, 7, 15, 9, 1, 1]);
    assert!(ids[5..].iter().all(|&i| i == 1));
    // Over-long text keeps its EOS.
    let long = tok.encode(&"cat ".repeat(100)).unwrap();
    assert_eq!((long[0], long[75], long[76]), (0, 7, 1));
}

#[test]
fn sd15_configs_build_shapes() {
    let cfg = UNetConfig::sd_v1_5();
    assert_eq!(cfg.block_out_channels, vec![320, 640, 1280, 1280]);
    let _ = VaeConfig::sd_v1_5();
    let _ = ClipConfig::sd_v1_5();
}

#[test]
fn half_precision_follows_f32() {
    // f16 on CPU exercises the half-precision paths used on GPU (bf16 has no CPU matmul).
    let dev = Device::Cpu;
    let x = randn(1, &[2, 4, 8, 8]);
    let ctx = randn(2, &[2, 7, 12]);
    let w32 = Weights::random(7, 0.05, DType::F32, &dev);
    let w16 = Weights::random(7, 0.05, DType::F16, &dev);
    let u32m = UNet2DConditionModel::from_weights(&w32, &unet_config()).unwrap();
    let u16m = UNet2DConditionModel::from_weights(&w16, &unet_config()).unwrap();
    let a = u32m.forward_t(&x, 400.0, &ctx, None).unwrap();
    let b = u16m
        .forward_t(
            &x.to_dtype(DType::F16).unwrap(),
            400.0,
            &ctx.to_dtype(DType::F16).unwrap(),
            None,
        )
        .unwrap();
    assert_eq!(b.dtype(), DType::F16);
    let b = b.to_dtype(DType::F32).unwrap();
    let scale: f32 = a.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(
        max_abs_diff(&a, &b) < 2e-2 * scale.max(1.0),
        "{} vs scale {scale}",
        max_abs_diff(&a, &b)
    );
}

#[test]
fn odd_latent_sizes_upsample_to_the_skip_size() {
    // 9×7 latents: the down path rounds up (9→5, 7→4), the up path must return to 9×7, as
    // diffusers' `forward_upsample_size` does.
    let (unet, _) = random_unet();
    let x = randn(1, &[1, 4, 9, 7]);
    let ctx = randn(2, &[1, 7, 12]);
    let out = unet.forward_t(&x, 250.0, &ctx, None).unwrap();
    assert_eq!(out.dims(), &[1, 4, 9, 7]);
}
