//! Benchmark: one AnomalyDiffusion sample (256×256) with the full-size model on random weights —
//! the LDM-256 base (UNet 872 M, BERT 32 layers, KL VAE), the 356 M-parameter spatial encoder and
//! a 4 × 1280 anomaly embedding — through the whole generation path (VAE encode, context with
//! splice, blended DDIM with re-weighting, VAE decode): seconds and peak RSS per sample at each
//! step count. Results go to docs/benchmarks.md ("AnomalyDiffusion generation").
//!
//! `MODE=masks` measures learned-mask sampling instead (a 16 × 1280 mask embedding, classifier-
//! free guidance 5, decode and post-processing; no spatial encoder, no blending).
//!
//! `cargo bench -p defectforge-engine --bench ad_sample` (env: STEPS=50,200 BATCH=1 AAR=official
//! MODE=generate|masks DTYPE: bf16 on CUDA, f32 on CPU)

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use defectforge_engine::ad_files::EmbeddingsFile;
use defectforge_engine::ad_model::AnomalyModel;
use defectforge_engine::anomaly::{AarMode, SamplerOptions};
use defectforge_engine::ldm::{LdmConfig, LdmModel};
use defectforge_engine::maskgen::MaskSamplerOptions;
use defectforge_engine::noise::PerSampleNoise;
use defectforge_engine::spatial::{BnMode, SpatialEncoder, SpatialEncoderConfig};
use defectforge_engine::tokenizer::WordPieceTokenizer;
use defectforge_engine::Weights;

#[path = "common/mod.rs"]
mod common;
use common::{dtype_from_env, emit, env_or, peak_rss_gib};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("ad_sample: run with `cargo bench` (skipped under `cargo test`)");
        return Ok(());
    }
    let steps: Vec<usize> = env_or("STEPS", "50,200")
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let batch: usize = env_or("BATCH", "1").parse()?;
    let aar: AarMode = env_or("AAR", "official").parse()?;
    #[cfg(feature = "cuda")]
    let (dev, dtype) = (Device::new_cuda(0)?, dtype_from_env(DType::BF16));
    #[cfg(not(feature = "cuda"))]
    let (dev, dtype) = (Device::Cpu, dtype_from_env(DType::F32));

    let t0 = Instant::now();
    let cfg = LdmConfig::txt2img_large();
    let w = Weights::random(0, 0.02, dtype, &dev);
    w.discard_random_tensors();
    let ldm = LdmModel::from_weights(&cfg, &w)?;
    let sw = Weights::random(1, 0.02, dtype, &dev);
    sw.discard_random_tensors();
    let spatial = SpatialEncoder::from_weights(&sw, &SpatialEncoderConfig::default())?;
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
    let emb = EmbeddingsFile {
        placeholder_tokens: [("*".to_string(), 1008i64)].into(),
        params: BTreeMap::from([(
            "wood+color".to_string(),
            (Tensor::randn(0f32, 0.3, (4, 1280), &Device::Cpu)?),
        )]),
    };
    let mut model = AnomalyModel::assemble(ldm, spatial, emb, tok, dtype, &dev)?;
    model.set_mask_embeddings(EmbeddingsFile {
        placeholder_tokens: [("*".to_string(), 1008i64)].into(),
        params: BTreeMap::from([(
            "wood+color".to_string(),
            (Tensor::randn(0f32, 0.3, (16, 1280), &Device::Cpu)?),
        )]),
    })?;
    let mode = env_or("MODE", "generate");
    println!(
        "full-size AnomalyDiffusion: LDM txt2img-large + spatial encoder {:.1} M params, {dtype:?} on {dev:?}, threads {}, init {:.1} s, RSS {:.2} GiB",
        sw.consumed_param_count() as f64 / 1e6,
        candle_core::utils::get_num_threads(),
        t0.elapsed().as_secs_f64(),
        peak_rss_gib()
    );
    drop((w, sw));
    let normal =
        // drawn on the CPU: the engine needs no cuRAND on the GPU (scripts/gpu/run.sh)
        ((Tensor::rand(0f32, 1.0, (batch, 3, 256, 256), &Device::Cpu)? * 2.0)? - 1.0)?
            .to_device(&dev)?
            .to_dtype(dtype)?;
    let mut mv = vec![0f32; batch * 256 * 256];
    for b in 0..batch {
        for y in 96..160 {
            for x in 80..176 {
                mv[b * 65536 + y * 256 + x] = 1.0;
            }
        }
    }
    let mask = Tensor::from_vec(mv, (batch, 1, 256, 256), &dev)?.to_dtype(dtype)?;
    let prompts = vec!["a photo of a *".to_string(); batch];
    let names = vec!["wood+color".to_string(); batch];
    let seeds: Vec<u64> = (0..batch as u64).collect();
    if mode == "masks" {
        for s in steps {
            let opts = MaskSamplerOptions {
                steps: s,
                ..Default::default()
            };
            let t = Instant::now();
            let out =
                model.sample_masks(&prompts, &names, &opts, &mut PerSampleNoise::new(&seeds))?;
            dev.synchronize()?;
            let secs = t.elapsed().as_secs_f64();
            println!(
                "candle masks {s} steps (CFG 5), batch {batch}: {secs:.1} s ({:.2} s/mask, {:.3} s/step); accepted {}/{batch}; peak RSS {:.2} GiB",
                secs / batch as f64,
                secs / s as f64,
                out.accepted.iter().filter(|a| **a).count(),
                peak_rss_gib()
            );
            emit(
                "mask_sample",
                &dev,
                dtype,
                serde_json::json!({"steps": s, "batch": batch, "guidance": opts.guidance,
                    "seconds": secs, "masks_per_s": batch as f64 / secs}),
            );
        }
        return Ok(());
    }
    for s in steps {
        let opts = SamplerOptions {
            steps: s,
            eta: 1.0,
            aar,
        };
        let t = Instant::now();
        let out = model.generate(
            &normal,
            &mask,
            &prompts,
            &names,
            &opts,
            BnMode::Eval,
            &mut PerSampleNoise::new(&seeds),
        )?;
        dev.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "candle {s} steps, batch {batch}, aar {}: {secs:.1} s ({:.2} s/sample, {:.3} s/step); peak RSS {:.2} GiB; output {:?}",
            aar.as_str(),
            secs / batch as f64,
            secs / s as f64,
            peak_rss_gib(),
            out.dims()
        );
        emit(
            "ad_sample",
            &dev,
            dtype,
            serde_json::json!({"steps": s, "batch": batch, "aar": aar.as_str(),
                "seconds": secs, "samples_per_s": batch as f64 / secs}),
        );
    }
    Ok(())
}
