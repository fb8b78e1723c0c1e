//! Benchmark: one AnomalyDiffusion training step (forward + backward + Adam) of the full-size
//! model on random weights — LDM-256 (UNet 872 M, 32-layer BERT, KL VAE; all frozen), the
//! 356 M-parameter spatial encoder and one 4 × 1280 anomaly embedding per row trainable — at
//! 256×256: seconds, process CPU seconds and peak RSS per step. Results go to
//! docs/benchmarks.md ("Training").
//!
//! `cargo bench -p defectforge-engine --bench train_step` (env: BATCH=1,4 STEPS=2
//! SKIP_FROZEN=1|0 ENCODER=train|frozen DTYPE=f32|bf16, default f32; MODE=mask: the mask model's
//! step, 16-vector embeddings with AdamW and the plain loss). `SKIP_FROZEN=0` lets candle compute and store the
//! frozen weights' gradients too (what its stock ops do), to measure what skipping them saves.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use defectforge_engine::ad_files::EmbeddingsFile;
use defectforge_engine::ad_model::AnomalyModel;
use defectforge_engine::ldm::{LdmConfig, LdmModel};
use defectforge_engine::noise::SeededNoise;
use defectforge_engine::spatial::{BnMode, SpatialEncoder, SpatialEncoderConfig};
use defectforge_engine::tokenizer::WordPieceTokenizer;
use defectforge_engine::train::adam::{Adam, AdamConfig};
use defectforge_engine::train::frozen::set_skip_frozen_grads;
use defectforge_engine::train::{
    mask_training_loss, masked_training_loss, LossBatch, MaskLossBatch, Trainable,
};
use defectforge_engine::{NoiseSource, Weights};

#[path = "common/mod.rs"]
mod common;
use common::{cpu_seconds, dtype_from_env, emit, env_or, peak_rss_gib};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("train_step: run with `cargo bench` (skipped under `cargo test`)");
        return Ok(());
    }
    let batches: Vec<usize> = env_or("BATCH", "1,4")
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let steps: usize = env_or("STEPS", "2").parse()?;
    let skip = env_or("SKIP_FROZEN", "1") != "0";
    let train_encoder = env_or("ENCODER", "train") == "train";
    set_skip_frozen_grads(skip);
    #[cfg(feature = "cuda")]
    let (dev, dtype) = (Device::new_cuda(0)?, dtype_from_env(DType::F32));
    #[cfg(not(feature = "cuda"))]
    let (dev, dtype) = (Device::Cpu, dtype_from_env(DType::F32));

    let t0 = Instant::now();
    let cfg = LdmConfig::txt2img_large();
    let w = Weights::random(0, 0.02, dtype, &dev);
    w.discard_random_tensors();
    let ldm = LdmModel::from_weights(&cfg, &w)?;
    drop(w);
    // The encoder goes through a file so that `load_trainable` makes its parameters Vars.
    let se_cfg = SpatialEncoderConfig::default();
    let enc_file = std::env::temp_dir().join("defectforge-bench-encoder.safetensors");
    {
        let sw = Weights::random(1, 0.02, DType::F32, &Device::Cpu);
        let spatial = SpatialEncoder::from_weights(&sw, &se_cfg)?;
        drop(spatial);
        sw.save_consumed(&enc_file)?;
    }
    let spatial = SpatialEncoder::load(&enc_file, Some(&se_cfg), dtype, &dev)?;
    let tmp = std::env::temp_dir().join("defectforge-bench-vocab.txt");
    let mut lines: Vec<String> = (0..cfg.bert.vocab_size)
        .map(|i| format!("[unused{i}]"))
        .collect();
    for (id, tok) in [
        (0, "[PAD]"),
        (100, "[UNK]"),
        (101, "[CLS]"),
        (102, "[SEP]"),
        (1008, "*"),
        (1037, "a"),
        (6302, "photo"),
        (1997, "of"),
    ] {
        lines[id] = tok.to_string();
    }
    std::fs::write(&tmp, lines.join("\n") + "\n")?;
    let tok = WordPieceTokenizer::from_vocab(&tmp, 77)?;
    let types: Vec<String> = (0..4).map(|i| format!("part+defect{i}")).collect();
    let emb = EmbeddingsFile {
        placeholder_tokens: [("*".to_string(), 1008i64)].into(),
        params: types
            .iter()
            .map(|t| {
                Ok((
                    t.clone(),
                    Tensor::randn(0f32, 0.3, (4, 1280), &Device::Cpu)?,
                ))
            })
            .collect::<Result<BTreeMap<_, _>, candle_core::Error>>()?,
    };
    let mut model = AnomalyModel::assemble(ldm, spatial, emb, tok, dtype, &dev)?;
    // MODE=mask: the mask model's step (issue 15) — 16 × 1280 mask embeddings, AdamW
    // (wd 0.01), the plain loss; no encoder, no mask in the loss.
    let mask_mode = env_or("MODE", "image") == "mask";
    let tr = if mask_mode {
        let init = Tensor::zeros((16, 1280), dtype, &dev)?;
        Trainable::install_masks(&mut model, &types, &init)?
    } else {
        let init = model.embeddings[&types[0]].zeros_like()?;
        Trainable::install(
            &mut model,
            &types,
            &init,
            train_encoder.then_some(enc_file.as_path()),
        )?
    };
    let mut opt = Adam::new(
        tr.named(),
        if mask_mode {
            AdamConfig::adamw(0.02, 0.01)
        } else {
            AdamConfig::adam(0.02)
        },
    )?;
    let trainable: usize = tr.named().iter().map(|(_, v)| v.elem_count()).sum();
    println!(
        "full-size AnomalyDiffusion training: {:.1} M trainable parameters, {dtype:?} on {dev:?}, threads {}, skip frozen grads {skip}, init {:.1} s, RSS {:.2} GiB",
        trainable as f64 / 1e6,
        candle_core::utils::get_num_threads(),
        t0.elapsed().as_secs_f64(),
        peak_rss_gib()
    );
    for batch in batches {
        let mut noise = SeededNoise::new(batch as u64);
        let z = noise.randn(&(batch, 4, 32, 32).into(), dtype, &dev)?;
        let eps = noise.randn(&(batch, 4, 32, 32).into(), dtype, &dev)?;
        let mut mv = vec![0f32; batch * 256 * 256];
        for b in 0..batch {
            for y in 96..160 {
                for x in 80..176 {
                    mv[b * 65536 + y * 256 + x] = 1.0;
                }
            }
        }
        let masks = Tensor::from_vec(mv, (batch, 1, 256, 256), &dev)?.to_dtype(dtype)?;
        let prompts = vec!["a photo of a *".to_string(); batch];
        let names: Vec<String> = (0..batch).map(|i| types[i % types.len()].clone()).collect();
        let t: Vec<usize> = (0..batch).map(|i| 100 + 200 * i).collect();
        for s in 0..steps {
            let (w0, c0) = (Instant::now(), cpu_seconds());
            let out = if mask_mode {
                mask_training_loss(
                    &model,
                    &MaskLossBatch {
                        latents: &z,
                        prompts: &prompts,
                        names: &names,
                        timesteps: &t,
                        noise: &eps,
                    },
                )?
            } else {
                masked_training_loss(
                    &model,
                    &LossBatch {
                        latents: &z,
                        masks: &masks,
                        prompts: &prompts,
                        names: &names,
                        timesteps: &t,
                        noise: &eps,
                    },
                    BnMode::Train,
                )?
            };
            let fwd = w0.elapsed().as_secs_f64();
            let grads = out.loss.backward()?;
            let bwd = w0.elapsed().as_secs_f64() - fwd;
            opt.step(&grads)?;
            drop(grads);
            dev.synchronize()?;
            let secs = w0.elapsed().as_secs_f64();
            let loss = out.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            emit(
                if mask_mode {
                    "mask_train_step"
                } else {
                    "train_step"
                },
                &dev,
                dtype,
                serde_json::json!({"step": s, "batch": batch, "seconds": secs, "forward_s": fwd,
                    "backward_s": bwd, "images_per_s": batch as f64 / secs,
                    "encoder": if mask_mode { "none" } else if train_encoder { "train" } else { "frozen" }, "loss": loss}),
            );
            println!(
                "candle train step {s} batch {batch}: {secs:.1} s (forward {fwd:.1}, backward {bwd:.1}, Adam {:.1}), CPU {:.1} s, peak RSS {:.2} GiB, loss {:.5}",
                secs - fwd - bwd,
                cpu_seconds() - c0,
                peak_rss_gib(),
                loss
            );
        }
    }
    Ok(())
}
