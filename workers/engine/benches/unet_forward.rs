//! Benchmark: the full-size Stable Diffusion 1.5 UNet forward (random weights, f32, CPU),
//! latent 32×32, 77-token context — seconds per forward and peak RSS, plus a per-stage
//! profile. The PyTorch side is `torch_unet.py` beside this file; results go to
//! docs/benchmarks.md ("Engine (issue 3)").
//!
//! `cargo bench -p defectforge-engine --bench unet_forward` (env: BATCHES=1,8 ITERS=3 LATENT=32
//! PROFILE=1 DTYPE=f32|f16).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use defectforge_engine::noise::{NoiseSource, SeededNoise};
use defectforge_engine::unet::{UNet2DConditionModel, UNetConfig};
use defectforge_engine::Weights;

#[path = "common/mod.rs"]
mod common;
use common::{cpu_seconds, dtype_from_env, emit, env_or, peak_rss_gib};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it,
    // where a multi-minute full-size forward has no place.
    if !std::env::args().any(|a| a == "--bench") {
        println!("unet_forward: run with `cargo bench` (skipped under `cargo test`)");
        return Ok(());
    }
    let batches: Vec<usize> = env_or("BATCHES", "1,8")
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let iters: usize = env_or("ITERS", "3").parse()?;
    let latent: usize = env_or("LATENT", "32").parse()?;
    let profile = env_or("PROFILE", "1") == "1";
    let dtype = dtype_from_env(DType::F32);
    #[cfg(feature = "cuda")]
    let dev = Device::new_cuda(0)?;
    #[cfg(not(feature = "cuda"))]
    let dev = Device::Cpu;

    let t0 = Instant::now();
    let weights = Weights::random(0, 0.02, dtype, &dev);
    weights.discard_random_tensors();
    let unet = UNet2DConditionModel::from_weights(&weights, &UNetConfig::sd_v1_5())?;
    let params = weights.consumed_param_count();
    println!(
        "candle SD 1.5 UNet {:.1} M params, {dtype:?} on {dev:?}, threads {}, init {:.1} s",
        params as f64 / 1e6,
        candle_core::utils::get_num_threads(),
        t0.elapsed().as_secs_f64()
    );
    drop(weights);
    let mut noise = SeededNoise::new(1);
    for &b in &batches {
        let x = noise.randn(&(b, 4, latent, latent).into(), dtype, &dev)?;
        let ctx = noise.randn(&(b, 77, 768).into(), dtype, &dev)?;
        let t = Tensor::full(500f32, b, &dev)?;
        let out = unet.forward(&x, &t, &ctx, None)?; // warm-up
        dev.synchronize()?;
        drop(out);
        let mut times = Vec::new();
        let cpu0 = cpu_seconds();
        for _ in 0..iters {
            let s = Instant::now();
            let out = unet.forward(&x, &t, &ctx, None)?;
            dev.synchronize()?;
            drop(out);
            times.push(s.elapsed().as_secs_f64());
        }
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
        let cpu = (cpu_seconds() - cpu0) / iters as f64;
        println!(
            "candle batch {b} latent {latent}: mean {mean:.2} s min {min:.2} s over {iters} iters, {cpu:.2} CPU-s/forward; peak RSS {:.2} GiB",
            peak_rss_gib()
        );
        emit(
            "unet_forward",
            &dev,
            dtype,
            serde_json::json!({"model": "sd-1.5", "batch": b, "latent": latent, "iters": iters,
                "mean_s": mean, "min_s": min, "cpu_s": cpu}),
        );
        if profile && matches!(dev, Device::Cpu) {
            let (_, prof) = unet.forward_profiled(&x, &t, &ctx)?;
            let total: f64 = prof.iter().map(|(_, s)| s).sum();
            println!("  profile (batch {b}, one forward, {total:.2} s):");
            for (name, s) in &prof {
                println!("    {name:<28} {s:7.3} s {:5.1} %", 100.0 * s / total);
            }
        }
    }
    Ok(())
}
