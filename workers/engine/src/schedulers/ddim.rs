//! DDIM sampling in the diffusers variant (`diffusers.DDIMScheduler`, Song et al. 2020,
//! "Denoising Diffusion Implicit Models", eq. 12), configured from a diffusers
//! `scheduler_config.json`: timestep spacing (leading / trailing / linspace), `steps_offset`,
//! `set_alpha_to_one`, eta, and the three prediction types. All randomness (eta > 0) is drawn
//! from an injected [`NoiseSource`].
//!
//! candle-transformers has a DDIM scheduler, but its constructor and `alphas_cumprod` are
//! private and its eta noise comes from candle's unseedable CPU RNG, so the project owns this.
//! The schedule is computed the way PyTorch computes it (float32 linspace, float64-accumulated
//! cumprod stored as float32) so that it matches diffusers to the last bits that matter.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::error::{EngineError, Result};
use crate::noise::NoiseSource;

/// The fields of diffusers' `scheduler_config.json` that DDIM uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DdimConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    /// `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: String,
    /// `leading`, `trailing` or `linspace`.
    pub timestep_spacing: String,
    pub thresholding: bool,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    /// diffusers' own defaults (not SD 1.5's; see [`DdimConfig::sd_v1_5`]).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            thresholding: false,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdimConfig {
    /// Stable Diffusion 1.5's scheduler config.
    pub fn sd_v1_5() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            clip_sample: false,
            set_alpha_to_one: false,
            steps_offset: 1,
            ..Self::default()
        }
    }
}

/// torch.linspace(start, end, n, dtype=float32): both ends computed from their own side.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    super::torch_linspace_f32(start as f32, end as f32, n)
}

/// Which quantity the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

/// Output of one DDIM step.
#[derive(Debug, Clone)]
pub struct DdimStepOutput {
    /// x_{t-1}.
    pub prev_sample: Tensor,
    /// The model's estimate of x_0.
    pub pred_original_sample: Tensor,
}

/// A DDIM scheduler with its inference timesteps set.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: DdimConfig,
    prediction: Prediction,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<usize>,
    num_inference_steps: usize,
    /// η of DDIM: 0 is deterministic, 1 is DDPM-like ancestral sampling.
    pub eta: f64,
}

impl DdimScheduler {
    /// Builds the schedule from `config` and sets `num_inference_steps` timesteps.
    pub fn new(config: DdimConfig, num_inference_steps: usize, eta: f64) -> Result<Self> {
        let invalid = |m: String| EngineError::Invalid(format!("DDIM config: {m}"));
        if config.thresholding {
            return Err(invalid("thresholding is not supported".into()));
        }
        if config.rescale_betas_zero_snr {
            return Err(invalid("rescale_betas_zero_snr is not supported".into()));
        }
        let n = config.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n {
            return Err(invalid(format!(
                "num_inference_steps {num_inference_steps} must be in 1..={n}"
            )));
        }
        let prediction = match config.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            "sample" => Prediction::Sample,
            other => return Err(invalid(format!("unknown prediction_type {other:?}"))),
        };
        let betas: Vec<f32> = if let Some(tb) = &config.trained_betas {
            tb.iter().map(|&b| b as f32).collect()
        } else {
            match config.beta_schedule.as_str() {
                "linear" => linspace_f32(config.beta_start, config.beta_end, n),
                "scaled_linear" => {
                    linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                // Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008.
                "squaredcos_cap_v2" => {
                    let abar = |t: f64| {
                        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                            .cos()
                            .powi(2)
                    };
                    (0..n)
                        .map(|i| {
                            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                            (1.0 - abar(t2) / abar(t1)).min(0.999) as f32
                        })
                        .collect()
                }
                other => return Err(invalid(format!("unknown beta_schedule {other:?}"))),
            }
        };
        if betas.len() != n {
            return Err(invalid(format!(
                "{} trained betas for {n} timesteps",
                betas.len()
            )));
        }
        // ᾱ_t = Π_{s≤t} (1 − β_s); torch's CPU cumprod accumulates float32 in float64.
        let mut acc = 1.0f64;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|&b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let steps = num_inference_steps;
        let timesteps: Vec<usize> = match config.timestep_spacing.as_str() {
            "leading" => {
                let ratio = n / steps;
                (0..steps)
                    .rev()
                    .map(|i| i * ratio + config.steps_offset)
                    .collect()
            }
            "trailing" => {
                let ratio = n as f64 / steps as f64;
                // np.round(np.arange(T, 0, -ratio)) - 1
                let mut v = Vec::new();
                let mut x = n as f64;
                while x > 0.0 && v.len() < steps {
                    v.push(x.round_ties_even() as usize - 1);
                    x -= ratio;
                }
                v
            }
            "linspace" => (0..steps)
                .rev()
                .map(|i| {
                    let x = if steps == 1 {
                        0.0
                    } else {
                        (n - 1) as f64 * i as f64 / (steps - 1) as f64
                    };
                    x.round_ties_even() as usize
                })
                .collect(),
            other => return Err(invalid(format!("unknown timestep_spacing {other:?}"))),
        };
        if let Some(&t) = timesteps.iter().find(|&&t| t >= n) {
            return Err(invalid(format!(
                "timestep {t} outside 0..{n} (steps_offset too large?)"
            )));
        }
        Ok(Self {
            config,
            prediction,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            num_inference_steps,
            eta,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// ᾱ_t for t = 0..num_train_timesteps.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The inference timesteps, from noisiest to cleanest.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// σ of the initial noise (1 for DDIM).
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The timestep that follows `t` in the inference schedule (may be negative at the end).
    pub fn prev_timestep(&self, t: usize) -> i64 {
        t as i64 - (self.config.num_train_timesteps / self.num_inference_steps) as i64
    }

    fn alpha_at(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// One DDIM step from x_t to x_{t−1} (Song et al. eq. 12, as diffusers computes it):
    /// x̂₀ = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t;  σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_prev));
    /// x_{t−1} = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev−σ_t²)·ε + σ_t·z, with z from `noise` when η > 0.
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<DdimStepOutput> {
        if timestep >= self.alphas_cumprod.len() {
            return Err(EngineError::Invalid(format!(
                "DDIM step: timestep {timestep} out of range"
            )));
        }
        let a_t = self.alphas_cumprod[timestep];
        let a_prev = self.alpha_at(self.prev_timestep(timestep));
        let b_t = 1.0f32 - a_t;
        let b_prev = 1.0f32 - a_prev;
        let dev = sample.device();
        let dt = sample.dtype();
        let scalar = |v: f32| Tensor::new(v, dev).and_then(|t| t.to_dtype(dt));
        let (x0, eps) = match self.prediction {
            Prediction::Epsilon => {
                let x0 = (sample - model_output.broadcast_mul(&scalar(b_t.sqrt())?)?)?
                    .broadcast_div(&scalar(a_t.sqrt())?)?;
                (x0, model_output.clone())
            }
            Prediction::Sample => {
                let eps = (sample - model_output.broadcast_mul(&scalar(a_t.sqrt())?)?)?
                    .broadcast_div(&scalar(b_t.sqrt())?)?;
                (model_output.clone(), eps)
            }
            Prediction::VPrediction => {
                let x0 = (sample.broadcast_mul(&scalar(a_t.sqrt())?)?
                    - model_output.broadcast_mul(&scalar(b_t.sqrt())?)?)?;
                let eps = (model_output.broadcast_mul(&scalar(a_t.sqrt())?)?
                    + sample.broadcast_mul(&scalar(b_t.sqrt())?)?)?;
                (x0, eps)
            }
        };
        let x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std_dev = self.eta as f32 * variance.sqrt();
        let dir = eps.broadcast_mul(&scalar((1.0 - a_prev - std_dev * std_dev).sqrt())?)?;
        let mut prev = (x0.broadcast_mul(&scalar(a_prev.sqrt())?)? + dir)?;
        if self.eta > 0.0 {
            let z = noise.randn(model_output.shape(), dt, dev)?;
            prev = (prev + z.broadcast_mul(&scalar(std_dev)?)?)?;
        }
        Ok(DdimStepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }

    /// q(x_t | x_0) with one timestep per batch element: √ᾱ_t·x₀ + √(1−ᾱ_t)·noise.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        let b = original.dim(0)?;
        if timesteps.len() != b {
            return Err(EngineError::Invalid(format!(
                "add_noise: {} timesteps for batch {b}",
                timesteps.len()
            )));
        }
        let mut sa = Vec::with_capacity(b);
        let mut sb = Vec::with_capacity(b);
        for &t in timesteps {
            let a = *self.alphas_cumprod.get(t).ok_or_else(|| {
                EngineError::Invalid(format!("add_noise: timestep {t} out of range"))
            })?;
            sa.push(a.sqrt());
            sb.push((1.0f32 - a).sqrt());
        }
        let mut shape = vec![1usize; original.rank()];
        shape[0] = b;
        let dev = original.device();
        let dt = original.dtype();
        let sa = Tensor::from_vec(sa, shape.as_slice(), dev)?.to_dtype(dt)?;
        let sb = Tensor::from_vec(sb, shape.as_slice(), dev)?.to_dtype(dt)?;
        Ok((original.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?)
    }

    /// ᾱ_t as an f32 tensor (for tests and training losses).
    pub fn alphas_cumprod_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        Ok(Tensor::new(self.alphas_cumprod.as_slice(), device)?.to_dtype(DType::F32)?)
    }
}
