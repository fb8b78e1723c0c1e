//! Measurement helpers shared by the engine benchmarks.
#![allow(dead_code)]

/// An environment variable, or `default`.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Peak resident set size of this process (VmHWM), GiB.
pub fn peak_rss_gib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0 / 1024.0)
}

/// Process CPU seconds (user + system) from /proc/self/stat; robust to other load on the box.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the ")".
    (ticks(11) + ticks(12)) / 100.0
}

/// One machine-readable result line, `BENCH_JSON {…}` on stdout, beside the human one:
/// scripts/gpu-check.sh collects these into its results file. `fields` are the measurement's
/// parameters and numbers; the device and dtype describe where it ran.
pub fn emit(
    bench: &str,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    fields: serde_json::Value,
) {
    let mut v = serde_json::json!({
        "bench": bench,
        "device": format!("{device:?}"),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "threads": candle_core::utils::get_num_threads(),
        "peak_rss_gib": peak_rss_gib(),
    });
    if let (Some(o), serde_json::Value::Object(f)) = (v.as_object_mut(), fields) {
        o.extend(f);
    }
    println!("BENCH_JSON {v}");
}

/// The dtype named by `DTYPE` (f32, f16, bf16), or `default`.
pub fn dtype_from_env(default: candle_core::DType) -> candle_core::DType {
    match std::env::var("DTYPE").as_deref() {
        Ok("f32") => candle_core::DType::F32,
        Ok("f16") => candle_core::DType::F16,
        Ok("bf16") => candle_core::DType::BF16,
        Ok(other) => panic!("DTYPE={other}: expected f32, f16 or bf16"),
        Err(_) => default,
    }
}
