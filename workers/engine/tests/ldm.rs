//! The LDM base beyond the parity numbers: the original checkpoint and its safetensors twin
//! load bit-identically, broken checkpoints and configs are refused naming the culprit, the
//! WordPiece tokenizer follows bert-base-uncased's rules, and the LDM DDIM loop replays
//! injected noise. Uses the `tiny-ldm*` fixtures under `DEFECTFORGE_FIXTURES` (default
//! `../shared/fixtures` beside the workspace); without them the fixture tests say so and pass.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use defectforge_engine::ldm::{open_checkpoint, LdmConfig, LdmModel};
use defectforge_engine::ldm_ddim::{DdpmSchedule, LdmDdim, ScheduleConfig};
use defectforge_engine::noise::{NoiseSource, ReplayNoise, SeededNoise};
use defectforge_engine::tokenizer::WordPieceTokenizer;
use defectforge_engine::weights::Weights;
use defectforge_engine::EngineError;

mod common;

/// Every `tiny-ldm*` fixture directory.
fn ldm_dirs() -> Vec<PathBuf> {
    common::fixture_dirs("tiny-ldm")
}

fn st_map(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
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
        d => panic!("unexpected dtype {d:?}"),
    }
}

#[test]
fn ckpt_and_safetensors_twin_load_bit_identically() {
    for dir in ldm_dirs() {
        let ckpt = open_checkpoint(&dir.join("model.ckpt"), DType::F32, &Device::Cpu).unwrap();
        let st = open_checkpoint(&dir.join("model.safetensors"), DType::F32, &Device::Cpu).unwrap();
        let a = ckpt.source_tensors().unwrap();
        let b = st.source_tensors().unwrap();
        assert!(
            a.len() > 50,
            "{}: only {} tensors read",
            dir.display(),
            a.len()
        );
        assert_eq!(
            a.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            b.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            "{}: key sets differ",
            dir.display()
        );
        for ((k, ta), (_, tb)) in a.iter().zip(&b) {
            assert_eq!(ta.dims(), tb.dims(), "{k}");
            assert_eq!(ta.dtype(), tb.dtype(), "{k}");
            assert!(
                bytes_of(ta) == bytes_of(tb),
                "{}: {k} differs",
                dir.display()
            );
        }
        // Both build the same model: identical outputs, bit for bit.
        let cfg = LdmConfig::from_file(&dir.join("config.json")).unwrap();
        let m1 = LdmModel::from_weights(&cfg, &ckpt).unwrap();
        let m2 = LdmModel::from_weights(&cfg, &st).unwrap();
        let n = cfg.latent_size;
        let x = SeededNoise::new(3)
            .randn(
                &(1, cfg.latent_channels, n, n).into(),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let ids = Tensor::new(&[[101u32, 201, 102, 0, 0]], &Device::Cpu).unwrap();
        let c1 = m1.encode_text(&ids).unwrap();
        let c2 = m2.encode_text(&ids).unwrap();
        assert_eq!(bytes_of(&c1), bytes_of(&c2));
        let e1 = m1.unet.forward_t(&x, 500.0, &c1, None).unwrap();
        let e2 = m2.unet.forward_t(&x, 500.0, &c2, None).unwrap();
        assert_eq!(bytes_of(&e1), bytes_of(&e2));
    }
}

fn expect_err(cfg: &LdmConfig, map: HashMap<String, Tensor>) -> EngineError {
    let w = Weights::from_tensors(map, DType::F32, &Device::Cpu);
    match LdmModel::from_weights(cfg, &w) {
        Ok(_) => panic!("a broken checkpoint loaded"),
        Err(e) => e,
    }
}

#[test]
fn broken_checkpoints_are_refused_naming_the_tensor() {
    for dir in ldm_dirs() {
        let cfg = LdmConfig::from_file(&dir.join("config.json")).unwrap();
        let good = st_map(&dir.join("model.safetensors"));

        // A missing UNet tensor is named by its checkpoint key.
        let gone = "model.diffusion_model.input_blocks.1.1.proj_in.weight";
        let mut m = good.clone();
        assert!(m.remove(gone).is_some());
        let e = expect_err(&cfg, m);
        assert!(
            matches!(&e, EngineError::MissingTensor { name, .. } if name == gone),
            "{e}"
        );
        assert!(e.to_string().contains(gone), "{e}");

        // A misshapen VAE tensor: named, with both shapes.
        let bad = "first_stage_model.decoder.up.0.block.0.conv1.weight";
        let mut m = good.clone();
        let t = m[bad].clone();
        let mut dims = t.dims().to_vec();
        dims[0] += 1;
        m.insert(
            bad.into(),
            Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = expect_err(&cfg, m);
        assert!(
            matches!(&e, EngineError::ShapeMismatch { name, .. } if name == bad),
            "{e}"
        );

        // A missing text-encoder tensor.
        let gone = "cond_stage_model.transformer.attn_layers.layers.0.1.to_q.weight";
        let mut m = good.clone();
        m.remove(gone).unwrap();
        let e = expect_err(&cfg, m);
        assert!(e.to_string().contains(gone), "{e}");

        // Tensors that belong to nothing are reported.
        let mut m = good.clone();
        m.insert(
            "model.diffusion_model.input_blocks.99.0.weight".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = expect_err(&cfg, m);
        assert!(
            e.to_string()
                .contains("model.diffusion_model.input_blocks.99.0.weight"),
            "{e}"
        );
        let mut m = good.clone();
        m.insert(
            "mystery.buffer".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(expect_err(&cfg, m).to_string().contains("mystery.buffer"));

        // The documented ignorable keys load (EMA copies, the LM head).
        let mut m = good.clone();
        m.insert(
            "model_ema.decay".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        LdmModel::from_weights(&cfg, &Weights::from_tensors(m, DType::F32, &Device::Cpu)).unwrap();

        // A config whose schedule disagrees with the stored buffers.
        let mut wrong = cfg.clone();
        wrong.schedule.linear_end = 0.02;
        let e = expect_err(&wrong, good.clone());
        assert!(e.to_string().contains("betas"), "{e}");

        // A config whose architecture disagrees: the first mismatching tensor is named.
        let mut wrong = cfg.clone();
        wrong.bert.n_layer += 1;
        let e = expect_err(&wrong, good);
        assert!(
            e.to_string()
                .contains(&format!("attn_layers.layers.{}", 2 * cfg.bert.n_layer)),
            "{e}"
        );
    }
}

#[test]
fn unreadable_checkpoints_fail_loudly() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("model.ckpt");
    let e = open_checkpoint(&missing, DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(e.to_string().contains("model.ckpt"), "{e}");
    std::fs::write(&missing, b"this is not a zip file").unwrap();
    let e = open_checkpoint(&missing, DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(e.to_string().contains("model.ckpt"), "{e}");
}

#[test]
fn official_yaml_config_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("txt2img-1p4B-eval.yaml");
    std::fs::write(
        &p,
        r#"model:
  base_learning_rate: 5.0e-05
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.012
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: caption
    image_size: 32
    channels: 4
    cond_stage_trainable: true
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [4, 2, 1]
        num_res_blocks: 2
        channel_mult: [1, 2, 4, 4]
        num_heads: 8
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 1280
        use_checkpoint: true
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.BERTEmbedder
      params:
        n_embed: 1280
        n_layer: 32
"#,
    )
    .unwrap();
    let cfg = LdmConfig::from_file(&p).unwrap();
    let large = LdmConfig::txt2img_large();
    assert_eq!(cfg.unet.block_out_channels, large.unet.block_out_channels);
    assert_eq!(cfg.bert, large.bert);
    assert_eq!(cfg.schedule, large.schedule);
    assert_eq!(cfg.vae.block_out_channels, vec![128, 256, 512, 512]);

    // Unsupported settings are all reported with their key paths.
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("conditioning_key: crossattn", "conditioning_key: hybrid")
        .replace("n_embed: 1280", "n_embed: 640");
    std::fs::write(&p, text).unwrap();
    let e = LdmConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("model.params.conditioning_key"), "{e}");
    assert!(e.contains("cond_stage_config.params.n_embed 640"), "{e}");
    assert!(e.contains("txt2img-1p4B-eval.yaml"), "{e}");
}

fn fixture_vocab(dir: &Path, out: &Path) {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let size = LdmConfig::from_file(&dir.join("config.json"))
        .unwrap()
        .bert
        .vocab_size;
    common::write_fixture_vocab(cfg["fixture_vocabulary"].as_object().unwrap(), size, out);
}

#[test]
fn wordpiece_follows_bert_base_uncased_rules() {
    let Some(dir) = ldm_dirs().into_iter().next() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let vocab = tmp.path().join("vocab.txt");
    fixture_vocab(&dir, &vocab);
    let tok = WordPieceTokenizer::from_vocab(&vocab, 77).unwrap();
    let ids = tok.encode("a photo of a small crack").unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(&ids[..8], &[101, 201, 204, 203, 201, 207, 302, 102]);
    assert!(ids[8..].iter().all(|&i| i == 0));
    // Lower-casing, accent stripping, whitespace, punctuation split off, unknown → [UNK].
    assert_eq!(
        tok.tokenize("  A  PHOTO of   a Cráck, zebra").unwrap(),
        vec![201, 204, 203, 201, 302, 100, 100]
    );
    // The placeholder token keeps bert-base-uncased's id.
    assert_eq!(tok.token_id("*"), Some(1008));
    assert_eq!(
        tok.tokenize("a photo of *").unwrap(),
        vec![201, 204, 203, 1008]
    );
    // Over-long prompts keep [SEP] last.
    let long = tok.encode(&"crack ".repeat(200)).unwrap();
    assert_eq!(long.len(), 77);
    assert_eq!(long[0], 101);
    assert_eq!(long[76], 102);
    assert!(long[1..76].iter().all(|&i| i == 302));
    // A vocabulary without the special tokens is refused by name.
    std::fs::write(&vocab, "a\nb\n").unwrap();
    let e = WordPieceTokenizer::from_vocab(&vocab, 77).err().unwrap();
    assert!(e.to_string().contains("[CLS]"), "{e}");
    let e = WordPieceTokenizer::from_vocab(&tmp.path().join("none.txt"), 77)
        .err()
        .unwrap();
    assert!(e.to_string().contains("none.txt"), "{e}");
}

#[test]
fn ldm_ddim_step_matches_the_formula_and_replays_noise() {
    let sched = DdpmSchedule::new(ScheduleConfig::default()).unwrap();
    let d = LdmDdim::new(&sched, 20, 1.0).unwrap();
    let dev = Device::Cpu;
    let x = SeededNoise::new(1)
        .randn(&(2, 4, 8, 8).into(), DType::F32, &dev)
        .unwrap();
    let e = SeededNoise::new(2)
        .randn(&(2, 4, 8, 8).into(), DType::F32, &dev)
        .unwrap();
    let z = SeededNoise::new(3)
        .randn(&(2, 4, 8, 8).into(), DType::F32, &dev)
        .unwrap();
    let (index, _t) = d.sampling_order().nth(5).unwrap();
    let step = d
        .step(index, &x, &e, &mut ReplayNoise::new([z.clone()]))
        .unwrap();
    let s = d.scalars(index);
    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let ev: Vec<f32> = e.flatten_all().unwrap().to_vec1().unwrap();
    let zv: Vec<f32> = z.flatten_all().unwrap().to_vec1().unwrap();
    let got: Vec<f32> = step.x_prev.flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..xv.len() {
        let x0 = (xv[i] - s.sqrt_one_minus_a_t * ev[i]) / s.a_t.sqrt();
        let want = s.a_prev.sqrt() * x0
            + (1.0 - s.a_prev - s.sigma_t * s.sigma_t).sqrt() * ev[i]
            + s.sigma_t * zv[i];
        assert!((got[i] - want).abs() < 1e-5, "{i}: {} vs {want}", got[i]);
    }
    // A replay without the step's noise fails instead of inventing some.
    assert!(d.step(index, &x, &e, &mut ReplayNoise::default()).is_err());
    // The whole loop is deterministic under a seeded source.
    let run = |seed| {
        let mut noise = SeededNoise::new(seed);
        let mut x = x.clone();
        for (i, _) in d.sampling_order() {
            x = d
                .step(i, &x, &(&x * 0.5).unwrap(), &mut noise)
                .unwrap()
                .x_prev;
        }
        bytes_of(&x)
    };
    assert_eq!(run(9), run(9));
    assert_ne!(run(9), run(10));
}

#[test]
fn q_sample_uses_the_float64_buffers() {
    let sched = DdpmSchedule::new(ScheduleConfig::default()).unwrap();
    let x0 = Tensor::ones((2, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let n = Tensor::ones((2, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let q = sched.q_sample(&x0, &[0, 999], &n).unwrap();
    let v: Vec<f32> = q.flatten_all().unwrap().to_vec1().unwrap();
    let want0 = sched.sqrt_alphas_cumprod()[0] + sched.sqrt_one_minus_alphas_cumprod()[0];
    let want1 = sched.sqrt_alphas_cumprod()[999] + sched.sqrt_one_minus_alphas_cumprod()[999];
    assert_eq!(v[0], want0);
    assert_eq!(v[7], want1);
    assert!(sched.q_sample(&x0, &[0], &n).is_err());
    assert!(sched.q_sample(&x0, &[0, 1000], &n).is_err());
}
