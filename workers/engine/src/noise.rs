//! Injectable randomness. Every random draw of the engine (initial latents, DDIM's eta noise,
//! VAE posterior samples, q-sample noise) goes through a [`NoiseSource`], so that a test can
//! replay a reference implementation's recorded draws exactly and a worker can make a sample
//! reproducible from its seed alone, independent of thread scheduling or device.

use std::collections::VecDeque;

use candle_core::{DType, Device, Shape, Tensor};

use crate::error::{EngineError, Result};

/// A source of standard-normal noise tensors.
pub trait NoiseSource {
    /// The next standard-normal tensor of `shape`, as `dtype` on `device`.
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor>;
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed 64-bit generator. Enough for noise
/// and random test weights; not for cryptography.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in the open interval (0, 1).
    pub fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// `n` standard-normal values (Box–Muller: z = sqrt(-2 ln u1)·cos(2π u2), and the sin twin).
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1 = self.next_open01();
            let u2 = self.next_open01();
            let r = (-2.0 * u1.ln()).sqrt();
            let th = std::f64::consts::TAU * u2;
            out.push((r * th.cos()) as f32);
            out.push((r * th.sin()) as f32);
        }
        out.truncate(n);
        out
    }
}

/// Deterministic noise from a seed, generated on the host and then moved to the device, so the
/// same seed gives the same noise on CPU and GPU.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: SplitMix64,
}

impl SeededNoise {
    /// Noise stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let v = self.rng.normals(shape.elem_count());
        Ok(Tensor::from_vec(v, shape.clone(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}

/// Replays recorded draws in order; a draw of the wrong shape or one past the end is an error,
/// so a replay that diverges from the reference's sequence of draws fails loudly.
#[derive(Debug, Default)]
pub struct ReplayNoise {
    queue: VecDeque<Tensor>,
    served: usize,
}

impl ReplayNoise {
    /// Replay the given tensors in order.
    pub fn new(draws: impl IntoIterator<Item = Tensor>) -> Self {
        Self {
            queue: draws.into_iter().collect(),
            served: 0,
        }
    }

    /// Replay the slices of `stacked` along its first dimension (e.g. a `[22, B, C, H, W]`
    /// reference tensor holding 22 draws).
    pub fn from_stacked(stacked: &Tensor) -> Result<Self> {
        let n = stacked.dim(0)?;
        let draws = (0..n)
            .map(|i| stacked.get(i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self::new(draws))
    }

    /// Draws not yet served.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl NoiseSource for ReplayNoise {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let next = self.queue.pop_front().ok_or_else(|| {
            EngineError::Noise(format!(
                "replay exhausted after {} draws (asked for {shape:?})",
                self.served
            ))
        })?;
        if next.shape() != shape {
            return Err(EngineError::Noise(format!(
                "replay draw {} has shape {:?}, the caller asked for {shape:?}",
                self.served,
                next.shape()
            )));
        }
        self.served += 1;
        Ok(next.to_dtype(dtype)?.to_device(device)?)
    }
}

/// One seeded stream per batch row: a draw of shape `[B, …]` takes row b from stream b, so a
/// sample's noise depends on its own seed only, never on which other samples share its batch.
#[derive(Debug, Clone)]
pub struct PerSampleNoise {
    streams: Vec<SeededNoise>,
}

impl PerSampleNoise {
    /// Streams for the given per-row seeds.
    pub fn new(seeds: &[u64]) -> Self {
        Self {
            streams: seeds.iter().map(|&s| SeededNoise::new(s)).collect(),
        }
    }
}

impl NoiseSource for PerSampleNoise {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let dims = shape.dims();
        if dims.first() != Some(&self.streams.len()) {
            return Err(EngineError::Noise(format!(
                "per-sample noise for {} rows asked for shape {dims:?}",
                self.streams.len()
            )));
        }
        let row: Shape = dims[1..].to_vec().into();
        let rows = self
            .streams
            .iter_mut()
            .map(|s| s.randn(&row, DType::F32, &Device::Cpu))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}
