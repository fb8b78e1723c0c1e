//! Benchmark: the paper's LDM-256 base (txt2img-f8-large) on CPU with random weights, f32 —
//! the UNet forward (872 M parameters, latent 32×32, 77 × 1280 context) and the 32-layer
//! BERT-style text encoder (77 tokens), seconds per forward, CPU-seconds and peak RSS. The
//! PyTorch side (the official CompVis modules) is `torch_ldm.py` beside this file; results go
//! to docs/benchmarks.md ("Engine part 2").
//!
//! `cargo bench -p defectforge-engine --bench ldm_forward` (env: BATCHES=1,8 ITERS=3 PARTS=unet,bert DTYPE=f32|f16|bf16)

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use defectforge_engine::bert::BertEmbedder;
use defectforge_engine::ldm::LdmConfig;
use defectforge_engine::noise::{NoiseSource, SeededNoise};
use defectforge_engine::unet::UNet2DConditionModel;
use defectforge_engine::Weights;

#[path = "common/mod.rs"]
mod common;
use common::{cpu_seconds, dtype_from_env, emit, env_or, peak_rss_gib};

/// Runs `f` once to warm up, then `iters` times; prints mean/min wall, CPU-s and peak RSS.
fn time<F: FnMut() -> candle_core::Result<Tensor>>(
    (part, batch): (&str, usize),
    iters: usize,
    (dev, dtype): (&Device, DType),
    mut f: F,
) -> candle_core::Result<()> {
    let label = format!("{part} batch {batch}");
    drop(f()?);
    dev.synchronize()?;
    let cpu0 = cpu_seconds();
    let mut times = Vec::new();
    for _ in 0..iters {
        let s = Instant::now();
        let out = f()?;
        dev.synchronize()?;
        drop(out);
        times.push(s.elapsed().as_secs_f64());
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let cpu = (cpu_seconds() - cpu0) / iters as f64;
    println!(
        "candle {label}: mean {mean:.3} s min {min:.3} s over {iters} iters, {cpu:.2} CPU-s/forward; peak RSS {:.2} GiB",
        peak_rss_gib()
    );
    emit(
        "ldm_forward",
        dev,
        dtype,
        serde_json::json!({"model": format!("ldm-256 {part}"), "batch": batch, "iters": iters,
            "mean_s": mean, "min_s": min, "cpu_s": cpu}),
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("ldm_forward: run with `cargo bench` (skipped under `cargo test`)");
        return Ok(());
    }
    let batches: Vec<usize> = env_or("BATCHES", "1,8")
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let iters: usize = env_or("ITERS", "3").parse()?;
    let parts = env_or("PARTS", "unet,bert");
    #[cfg(feature = "cuda")]
    let dev = Device::new_cuda(0)?;
    #[cfg(not(feature = "cuda"))]
    let dev = Device::Cpu;
    let dtype = dtype_from_env(DType::F32);
    let cfg = LdmConfig::txt2img_large();
    let mut noise = SeededNoise::new(1);
    let ctx_dim = cfg.bert.n_embed;

    if parts.contains("unet") {
        let t0 = Instant::now();
        let w = Weights::random(0, 0.02, dtype, &dev);
        w.discard_random_tensors();
        let unet = UNet2DConditionModel::from_weights(&w, &cfg.unet)?;
        println!(
            "candle LDM-256 UNet {:.1} M params, threads {}, init {:.1} s",
            w.consumed_param_count() as f64 / 1e6,
            candle_core::utils::get_num_threads(),
            t0.elapsed().as_secs_f64()
        );
        drop(w);
        for &b in &batches {
            let x = noise.randn(&(b, 4, 32, 32).into(), dtype, &dev)?;
            let ctx = noise.randn(&(b, 77, ctx_dim).into(), dtype, &dev)?;
            let t = Tensor::full(500f32, b, &dev)?;
            time(("unet", b), iters, (&dev, dtype), || {
                unet.forward(&x, &t, &ctx, None)
            })?;
        }
    }
    if parts.contains("bert") {
        let t0 = Instant::now();
        let w = Weights::random(0, 0.02, dtype, &dev);
        w.discard_random_tensors();
        let bert = w.build("BERTEmbedder", |vb| BertEmbedder::new(vb, &cfg.bert))?;
        println!(
            "candle LDM-256 BERT {:.1} M params ({} layers), init {:.1} s",
            w.consumed_param_count() as f64 / 1e6,
            cfg.bert.n_layer,
            t0.elapsed().as_secs_f64()
        );
        drop(w);
        for &b in &batches {
            let ids: Vec<u32> = (0..b * 77).map(|i| (i * 7919 % 30000) as u32).collect();
            let ids = Tensor::from_vec(ids, (b, 77), &dev)?;
            time(("bert", b), iters, (&dev, dtype), || bert.forward(&ids))?;
        }
    }
    Ok(())
}
