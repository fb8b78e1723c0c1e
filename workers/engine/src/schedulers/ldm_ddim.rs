//! The CompVis LDM noise schedule (`DDPM.register_schedule`) and its DDIM sampler
//! (`ldm.models.diffusion.ddim.DDIMSampler`), reproduced with the official code's number
//! formats, which differ from diffusers' DDIM in ways that matter for exact replay:
//!
//! * betas come from `torch.linspace(√start, √end, T, float64)²` (torch's symmetric linspace),
//!   every buffer is computed in float64 and stored as float32;
//! * DDIM uses "uniform" discretisation `range(0, T, T/S) + 1` (1, 1+c, …), not diffusers'
//!   leading spacing with steps offset;
//! * `alphas = alphas_cumprod[ts]` (float32), `alphas_prev = [alphas_cumprod[0]] +
//!   alphas[:-1]` and the eta-dependent sigmas are float64 (a numpy list), and
//!   `sqrt(1 − alphas)` is float32; `p_sample_ddim` reads every scalar through `torch.full`,
//!   i.e. casts it to float32, and evaluates `a_t.sqrt()` and `(1 − a_prev − σ²).sqrt()` in
//!   float32;
//! * the last step (t = 1) uses a_prev = alphas_cumprod\[0\] = 1 − β₀, so it still adds σ·ε, and
//!   every step draws its noise even when σ = 0 (so recorded noise replays in order).
//!
//! Step (Song et al. 2021, eq. 12): x̂₀ = (x − √(1−a_t)·ε)/√a_t;
//! x_prev = √a_prev·x̂₀ + √(1 − a_prev − σ²)·ε + σ·z.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::noise::NoiseSource;

/// `make_beta_schedule` kinds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// (linspace(√start, √end, T))² — the LDM default.
    Linear,
    /// linspace(start, end, T).
    SqrtLinear,
    /// √linspace(start, end, T).
    Sqrt,
    /// Nichol & Dhariwal's cosine schedule with offset `cosine_s`.
    Cosine,
}

/// The parameters of `DDPM.register_schedule` (the official YAML's `params`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    pub beta_schedule: BetaSchedule,
    pub timesteps: usize,
    pub linear_start: f64,
    pub linear_end: f64,
    pub cosine_s: f64,
}

impl Default for ScheduleConfig {
    /// The LDM txt2img-large values: linear, 1000 steps, 0.00085 → 0.012.
    fn default() -> Self {
        Self {
            beta_schedule: BetaSchedule::Linear,
            timesteps: 1000,
            linear_start: 0.00085,
            linear_end: 0.012,
            cosine_s: 8e-3,
        }
    }
}

use super::torch_linspace;

/// The DDPM schedule: float64 values and the float32 buffers the official model registers.
#[derive(Debug, Clone)]
pub struct DdpmSchedule {
    config: ScheduleConfig,
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    alphas_cumprod_f32: Vec<f32>,
    sqrt_alphas_cumprod: Vec<f32>,
    sqrt_one_minus_alphas_cumprod: Vec<f32>,
}

impl DdpmSchedule {
    /// Computes the schedule as `make_beta_schedule` + `register_schedule` do.
    pub fn new(config: ScheduleConfig) -> Result<Self> {
        let n = config.timesteps;
        if n < 2 {
            return Err(EngineError::Invalid(format!(
                "schedule: timesteps must be at least 2, got {n}"
            )));
        }
        let betas: Vec<f64> = match config.beta_schedule {
            BetaSchedule::Linear => {
                torch_linspace(config.linear_start.sqrt(), config.linear_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SqrtLinear => torch_linspace(config.linear_start, config.linear_end, n),
            BetaSchedule::Sqrt => torch_linspace(config.linear_start, config.linear_end, n)
                .into_iter()
                .map(f64::sqrt)
                .collect(),
            BetaSchedule::Cosine => {
                let s = config.cosine_s;
                let f: Vec<f64> = (0..=n)
                    .map(|i| {
                        let t = i as f64 / n as f64 + s;
                        (t / (1.0 + s) * std::f64::consts::FRAC_PI_2).cos().powi(2)
                    })
                    .collect();
                let f0 = f[0];
                let a: Vec<f64> = f.iter().map(|v| v / f0).collect();
                (0..n)
                    .map(|i| (1.0 - a[i + 1] / a[i]).clamp(0.0, 0.999))
                    .collect()
            }
        };
        if let Some(b) = betas.iter().find(|b| !(**b > 0.0 && **b < 1.0)) {
            return Err(EngineError::Invalid(format!(
                "schedule: beta {b} outside (0, 1); check linear_start/linear_end"
            )));
        }
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0f64;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        Ok(Self {
            alphas_cumprod_f32: alphas_cumprod.iter().map(|&a| a as f32).collect(),
            sqrt_alphas_cumprod: alphas_cumprod.iter().map(|&a| a.sqrt() as f32).collect(),
            sqrt_one_minus_alphas_cumprod: alphas_cumprod
                .iter()
                .map(|&a| (1.0 - a).sqrt() as f32)
                .collect(),
            config,
            betas,
            alphas_cumprod,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }

    /// Number of diffusion steps T.
    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// The `alphas_cumprod` buffer (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod_f32
    }

    /// The `sqrt_alphas_cumprod` buffer (float64 sqrt, cast to float32).
    pub fn sqrt_alphas_cumprod(&self) -> &[f32] {
        &self.sqrt_alphas_cumprod
    }

    /// The `sqrt_one_minus_alphas_cumprod` buffer (float64, cast to float32).
    pub fn sqrt_one_minus_alphas_cumprod(&self) -> &[f32] {
        &self.sqrt_one_minus_alphas_cumprod
    }

    /// The twelve schedule buffers an LDM checkpoint stores, by their state-dict names, as
    /// float32 values computed in float64 (`register_schedule` with v_posterior 0).
    pub fn buffers(&self) -> Vec<(&'static str, Vec<f32>)> {
        let b = &self.betas;
        let ac = &self.alphas_cumprod;
        let prev: Vec<f64> = std::iter::once(1.0)
            .chain(ac.iter().take(ac.len() - 1).copied())
            .collect();
        let n = b.len();
        let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        let map = |g: &dyn Fn(usize) -> f64| f((0..n).map(g).collect());
        let post_var = |i: usize| b[i] * (1.0 - prev[i]) / (1.0 - ac[i]);
        vec![
            ("betas", f(b.clone())),
            ("alphas_cumprod", f(ac.clone())),
            ("alphas_cumprod_prev", f(prev.clone())),
            ("sqrt_alphas_cumprod", map(&|i| ac[i].sqrt())),
            (
                "sqrt_one_minus_alphas_cumprod",
                map(&|i| (1.0 - ac[i]).sqrt()),
            ),
            ("log_one_minus_alphas_cumprod", map(&|i| (1.0 - ac[i]).ln())),
            ("sqrt_recip_alphas_cumprod", map(&|i| (1.0 / ac[i]).sqrt())),
            (
                "sqrt_recipm1_alphas_cumprod",
                map(&|i| (1.0 / ac[i] - 1.0).sqrt()),
            ),
            ("posterior_variance", map(&post_var)),
            (
                "posterior_log_variance_clipped",
                map(&|i| post_var(i).max(1e-20).ln()),
            ),
            (
                "posterior_mean_coef1",
                map(&|i| b[i] * prev[i].sqrt() / (1.0 - ac[i])),
            ),
            (
                "posterior_mean_coef2",
                map(&|i| (1.0 - prev[i]) * (1.0 - b[i]).sqrt() / (1.0 - ac[i])),
            ),
        ]
    }

    /// `q_sample`: √ᾱ_t·x₀ + √(1−ᾱ_t)·ε with per-sample timesteps `t` (one per batch
    /// element), using the float32 buffers as the official code does.
    pub fn q_sample(&self, x0: &Tensor, t: &[usize], noise: &Tensor) -> Result<Tensor> {
        let b = x0.dim(0)?;
        if t.len() != b {
            return Err(EngineError::Invalid(format!(
                "q_sample: {} timesteps for a batch of {b}",
                t.len()
            )));
        }
        if let Some(bad) = t.iter().find(|&&t| t >= self.num_timesteps()) {
            return Err(EngineError::Invalid(format!(
                "q_sample: timestep {bad} is outside 0..{}",
                self.num_timesteps()
            )));
        }
        let col = |v: &[f32]| -> Result<Tensor> {
            let vals: Vec<f32> = t.iter().map(|&i| v[i]).collect();
            let mut shape = vec![b];
            shape.extend(std::iter::repeat_n(1, x0.rank() - 1));
            Ok(Tensor::from_vec(vals, shape, x0.device())?.to_dtype(x0.dtype())?)
        };
        let a = col(&self.sqrt_alphas_cumprod)?;
        let s = col(&self.sqrt_one_minus_alphas_cumprod)?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }
}

/// The float32 scalars one DDIM step uses (`p_sample_ddim` after `torch.full`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdimStepScalars {
    pub a_t: f32,
    pub a_prev: f32,
    pub sigma_t: f32,
    pub sqrt_one_minus_a_t: f32,
}

/// The result of one DDIM step.
#[derive(Debug, Clone)]
pub struct LdmDdimStep {
    /// x_{t−1}.
    pub x_prev: Tensor,
    /// The predicted x̂₀.
    pub pred_x0: Tensor,
}

/// `DDIMSampler` after `make_schedule(S, "uniform", eta)`.
#[derive(Debug, Clone)]
pub struct LdmDdim {
    timesteps: Vec<usize>,
    alphas: Vec<f32>,
    alphas_prev: Vec<f64>,
    sigmas: Vec<f64>,
    sqrt_one_minus_alphas: Vec<f32>,
    eta: f64,
}

impl LdmDdim {
    /// `make_schedule(ddim_num_steps = steps, ddim_discretize = "uniform", ddim_eta = eta)`.
    pub fn new(schedule: &DdpmSchedule, steps: usize, eta: f64) -> Result<Self> {
        let t_total = schedule.num_timesteps();
        if steps == 0 || steps > t_total {
            return Err(EngineError::Invalid(format!(
                "DDIM: steps must be in 1..={t_total}, got {steps}"
            )));
        }
        if !(0.0..=1.0).contains(&eta) {
            return Err(EngineError::Invalid(format!(
                "DDIM: eta must be in [0, 1], got {eta}"
            )));
        }
        let c = t_total / steps;
        // range(0, T, c) + 1; with T not divisible by S numpy yields more than S values, as
        // the official code does.
        let timesteps: Vec<usize> = (0..t_total).step_by(c).map(|t| t + 1).collect();
        if let Some(&last) = timesteps.last() {
            if last >= t_total {
                return Err(EngineError::Invalid(format!(
                    "DDIM: {steps} steps over {t_total} timesteps reach t = {last}, outside the schedule"
                )));
            }
        }
        let ac = schedule.alphas_cumprod();
        let alphas: Vec<f32> = timesteps.iter().map(|&t| ac[t]).collect();
        let alphas_prev: Vec<f64> = std::iter::once(ac[0] as f64)
            .chain(alphas.iter().take(alphas.len() - 1).map(|&a| a as f64))
            .collect();
        let sigmas: Vec<f64> = alphas
            .iter()
            .zip(&alphas_prev)
            .map(|(&a, &ap)| {
                let a = a as f64;
                eta * ((1.0 - ap) / (1.0 - a) * (1.0 - a / ap)).sqrt()
            })
            .collect();
        let sqrt_one_minus_alphas = alphas.iter().map(|&a| (1.0f32 - a).sqrt()).collect();
        Ok(Self {
            timesteps,
            alphas,
            alphas_prev,
            sigmas,
            sqrt_one_minus_alphas,
            eta,
        })
    }

    /// `ddim_timesteps`, ascending (sampling walks them backwards).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// `(index, t)` in sampling order: from the largest timestep down to 1.
    pub fn sampling_order(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.timesteps.iter().copied().enumerate().rev()
    }

    /// `ddim_alphas` (float32).
    pub fn alphas(&self) -> &[f32] {
        &self.alphas
    }

    /// `ddim_alphas_prev` (float64, as the official numpy array).
    pub fn alphas_prev(&self) -> &[f64] {
        &self.alphas_prev
    }

    /// `ddim_sigmas` (float64).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// `ddim_sqrt_one_minus_alphas` (float32).
    pub fn sqrt_one_minus_alphas(&self) -> &[f32] {
        &self.sqrt_one_minus_alphas
    }

    /// The eta the schedule was made with.
    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// The float32 scalars step `index` uses.
    pub fn scalars(&self, index: usize) -> DdimStepScalars {
        DdimStepScalars {
            a_t: self.alphas[index],
            a_prev: self.alphas_prev[index] as f32,
            sigma_t: self.sigmas[index] as f32,
            sqrt_one_minus_a_t: self.sqrt_one_minus_alphas[index],
        }
    }

    /// One `p_sample_ddim` update at `index` (position in [`timesteps`](Self::timesteps)) from
    /// the model's noise prediction `e_t` (after any guidance). Draws one noise tensor of x's
    /// shape from `noise`, as the official code always does.
    pub fn step(
        &self,
        index: usize,
        x: &Tensor,
        e_t: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<LdmDdimStep> {
        if index >= self.timesteps.len() {
            return Err(EngineError::Invalid(format!(
                "DDIM: step index {index} outside 0..{}",
                self.timesteps.len()
            )));
        }
        let s = self.scalars(index);
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let e32 = e_t.to_dtype(DType::F32)?;
        let sqrt_a_t = s.a_t.sqrt();
        let pred_x0 = ((&x32 - (&e32 * s.sqrt_one_minus_a_t as f64)?)? / sqrt_a_t as f64)?;
        let dir_coef = (1.0f32 - s.a_prev - s.sigma_t * s.sigma_t).sqrt();
        let dir_xt = (&e32 * dir_coef as f64)?;
        let z = noise
            .randn(x.shape(), DType::F32, x.device())?
            .to_dtype(DType::F32)?;
        let noise_term = (z * s.sigma_t as f64)?;
        let x_prev = (((&pred_x0 * s.a_prev.sqrt() as f64)? + dir_xt)? + noise_term)?;
        Ok(LdmDdimStep {
            x_prev: x_prev.to_dtype(dtype)?,
            pred_x0: pred_x0.to_dtype(dtype)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_linspace_hits_both_ends_exactly() {
        let v = torch_linspace(0.1, 0.7, 7);
        assert_eq!(v[0], 0.1);
        assert_eq!(v[6], 0.7);
        assert!((v[3] - 0.4).abs() < 1e-15);
    }

    #[test]
    fn uniform_timesteps_start_at_one() {
        let s = DdpmSchedule::new(ScheduleConfig::default()).unwrap();
        let d = LdmDdim::new(&s, 10, 1.0).unwrap();
        assert_eq!(
            d.timesteps(),
            &[1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
        );
        assert_eq!(d.sampling_order().next(), Some((9, 901)));
        // The last step still adds noise: a_prev = alphas_cumprod[0] < 1.
        assert!(d.sigmas()[0] > 0.0);
        assert!(LdmDdim::new(&s, 0, 1.0).is_err());
        assert!(LdmDdim::new(&s, 10, 1.5).is_err());
        let eta0 = LdmDdim::new(&s, 10, 0.0).unwrap();
        assert!(eta0.sigmas().iter().all(|&x| x == 0.0));
    }
}
