//! Adam and AdamW with `torch.optim` semantics, per parameter.
//!
//! candle-nn's `AdamW` keeps one step counter for all parameters and updates every parameter
//! at every step; torch keeps a step count and moments per parameter and skips a parameter
//! whose gradient is `None`. AnomalyDiffusion trains one embedding per defect type with
//! batches that hold only some types, so the difference is the method: an embedding whose
//! type sits out a batch must keep its value, its moments and its step (its bias correction
//! continues where it left off when its type comes back).
//!
//! The arithmetic follows torch's single-tensor kernels (`torch/optim/adam.py`,
//! `_single_tensor_adam`, amsgrad off, no maximize), in the parameter's dtype:
//!
//! ```text
//! step += 1
//! (AdamW)  p ← p·(1 − lr·wd)          (Adam, wd ≠ 0)  g ← g + wd·p
//! m ← m + (g − m)·(1 − β1)             (torch's lerp_ for weights < 0.5)
//! v ← v·β2 + (1 − β2)·g·g
//! p ← p − lr/(1 − β1^step) · m / (√v / √(1 − β2^step) + ε)
//! ```

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{EngineError, Result};

/// Hyper-parameters (torch's names and defaults: betas 0.9/0.999, eps 1e-8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW's decoupled weight decay (`p ← p·(1 − lr·wd)`) instead of Adam's L2 term.
    pub decoupled: bool,
}

impl AdamConfig {
    /// `torch.optim.Adam(lr=lr)`.
    pub fn adam(lr: f64) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }

    /// `torch.optim.AdamW(lr=lr, weight_decay=wd)`.
    pub fn adamw(lr: f64, weight_decay: f64) -> Self {
        Self {
            weight_decay,
            decoupled: true,
            ..Self::adam(lr)
        }
    }
}

/// One parameter's state (torch's `state[p]`).
#[derive(Debug, Clone)]
pub struct ParamState {
    pub step: u64,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// The optimizer over named parameters.
pub struct Adam {
    config: AdamConfig,
    params: Vec<(String, Var)>,
    state: BTreeMap<String, ParamState>,
}

impl Adam {
    /// An optimizer over `params` (names must be unique).
    pub fn new(params: Vec<(String, Var)>, config: AdamConfig) -> Result<Self> {
        let mut seen = std::collections::BTreeSet::new();
        for (n, _) in &params {
            if !seen.insert(n.as_str()) {
                return Err(EngineError::Invalid(format!(
                    "optimizer: parameter {n:?} is listed twice"
                )));
            }
        }
        Ok(Self {
            config,
            params,
            state: BTreeMap::new(),
        })
    }

    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    /// Sets the learning rate of the next steps (a scheduler's `param_group["lr"] = …`).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The state of a parameter that has taken at least one step.
    pub fn state(&self, name: &str) -> Option<&ParamState> {
        self.state.get(name)
    }

    /// Every parameter's state, by name (for checkpoints).
    pub fn states(&self) -> &BTreeMap<String, ParamState> {
        &self.state
    }

    /// Restores states saved from [`Self::states`]; every name must be a parameter, and the
    /// moments must have its shape.
    pub fn set_states(&mut self, states: BTreeMap<String, ParamState>) -> Result<()> {
        for (name, st) in &states {
            let Some((_, var)) = self.params.iter().find(|(n, _)| n == name) else {
                return Err(EngineError::Invalid(format!(
                    "optimizer state names {name:?}, which is not a parameter being trained"
                )));
            };
            for t in [&st.exp_avg, &st.exp_avg_sq] {
                if t.dims() != var.dims() {
                    return Err(EngineError::Invalid(format!(
                        "optimizer state of {name:?} has shape {:?}, the parameter {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
            }
        }
        self.state = states;
        Ok(())
    }

    /// One step with the gradients in `grads`. A parameter without a gradient is skipped
    /// entirely (value, moments and step unchanged), as torch skips `p.grad is None`.
    /// Returns the names of the parameters that were updated.
    pub fn step(&mut self, grads: &GradStore) -> Result<Vec<String>> {
        self.step_with(|_, v| grads.get(v.as_tensor()).cloned())
    }

    /// [`Self::step`] with gradients by parameter name (e.g. summed over micro-batches).
    pub fn step_named(&mut self, grads: &BTreeMap<String, Tensor>) -> Result<Vec<String>> {
        self.step_with(|n, _| grads.get(n).cloned())
    }

    fn step_with(&mut self, grad_of: impl Fn(&str, &Var) -> Option<Tensor>) -> Result<Vec<String>> {
        let c = self.config;
        let mut updated = Vec::new();
        for (name, var) in &self.params {
            let Some(g) = grad_of(name, var) else {
                continue;
            };
            let p = var.as_tensor();
            let g = g.to_dtype(p.dtype())?;
            let st = match self.state.get_mut(name) {
                Some(s) => s,
                None => {
                    let z = p.zeros_like()?;
                    self.state.entry(name.clone()).or_insert(ParamState {
                        step: 0,
                        exp_avg: z.clone(),
                        exp_avg_sq: z,
                    })
                }
            };
            st.step += 1;
            let mut p_new = p.detach();
            let mut g = g;
            if c.weight_decay != 0.0 {
                if c.decoupled {
                    p_new = (p_new * (1.0 - c.lr * c.weight_decay))?;
                } else {
                    g = (g + (p * c.weight_decay)?)?;
                }
            }
            let m = (&st.exp_avg + ((&g - &st.exp_avg)? * (1.0 - c.beta1))?)?;
            let v = ((&st.exp_avg_sq * c.beta2)? + ((&g * (1.0 - c.beta2))? * &g)?)?;
            let bc1 = 1.0 - c.beta1.powi(st.step as i32);
            let bc2_sqrt = (1.0 - c.beta2.powi(st.step as i32)).sqrt();
            let step_size = c.lr / bc1;
            let denom = ((v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let p_new = (p_new - ((&m / &denom)? * step_size)?)?;
            var.set(&p_new)?;
            st.exp_avg = m;
            st.exp_avg_sq = v;
            updated.push(name.clone());
        }
        Ok(updated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// torch.optim.Adam/AdamW for one element, transcribed from `_single_tensor_adam`
    /// (torch 2.x, amsgrad off): `None` is a step where the parameter has no gradient.
    fn torch_reference(p0: f64, grads: &[Option<f64>], c: AdamConfig) -> Vec<f64> {
        let (mut p, mut m, mut v, mut step) = (p0, 0.0, 0.0, 0i32);
        let mut out = Vec::new();
        for g in grads {
            if let Some(mut g) = *g {
                step += 1;
                if c.weight_decay != 0.0 {
                    if c.decoupled {
                        p *= 1.0 - c.lr * c.weight_decay;
                    } else {
                        g += c.weight_decay * p;
                    }
                }
                m += (g - m) * (1.0 - c.beta1);
                v = v * c.beta2 + (1.0 - c.beta2) * g * g;
                let bc1 = 1.0 - c.beta1.powi(step);
                let bc2_sqrt = (1.0 - c.beta2.powi(step)).sqrt();
                p -= c.lr / bc1 * m / (v.sqrt() / bc2_sqrt + c.eps);
            }
            out.push(p);
        }
        out
    }

    fn run(c: AdamConfig, grads_a: &[Option<f64>], grads_b: &[Option<f64>]) -> Vec<(f64, f64)> {
        let a = Var::from_tensor(&Tensor::new(&[0.5f64], &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[-1.25f64], &Device::Cpu).unwrap()).unwrap();
        let mut opt = Adam::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], c).unwrap();
        let mut out = Vec::new();
        for (ga, gb) in grads_a.iter().zip(grads_b) {
            let mut g = BTreeMap::new();
            if let Some(x) = ga {
                g.insert("a".to_string(), Tensor::new(&[*x], &Device::Cpu).unwrap());
            }
            if let Some(x) = gb {
                g.insert("b".to_string(), Tensor::new(&[*x], &Device::Cpu).unwrap());
            }
            opt.step_named(&g).unwrap();
            let val = |v: &Var| v.as_tensor().to_vec1::<f64>().unwrap()[0];
            out.push((val(&a), val(&b)));
        }
        out
    }

    #[test]
    fn matches_torch_per_parameter_including_steps_without_a_gradient() {
        let ga = [Some(0.3), Some(-0.1), Some(0.7), Some(0.2), Some(-0.4)];
        // b sits out steps 2 and 3 (its type is not in those batches)
        let gb = [Some(-2.0), None, None, Some(1.5), Some(0.25)];
        for c in [
            AdamConfig::adam(0.02),
            AdamConfig {
                weight_decay: 0.1,
                ..AdamConfig::adam(0.02)
            },
            AdamConfig::adamw(0.02, 0.01),
        ] {
            let got = run(c, &ga, &gb);
            let want_a = torch_reference(0.5, &ga, c);
            let want_b = torch_reference(-1.25, &gb, c);
            for (i, (a, b)) in got.iter().enumerate() {
                assert!(
                    (a - want_a[i]).abs() < 1e-14,
                    "{c:?} step {i}: a {a} vs {}",
                    want_a[i]
                );
                assert!(
                    (b - want_b[i]).abs() < 1e-14,
                    "{c:?} step {i}: b {b} vs {}",
                    want_b[i]
                );
            }
            // b is untouched while absent, weight decay included
            assert_eq!(got[0].1, got[1].1);
            assert_eq!(got[1].1, got[2].1);
            // one global step counter (candle-nn's AdamW) would give b a different update at
            // step 4: its bias correction would use step 4, not its own step 2
            let global: Vec<Option<f64>> =
                vec![Some(-2.0), Some(0.0), Some(0.0), Some(1.5), Some(0.25)];
            let drift = torch_reference(-1.25, &global, c);
            assert!((drift[3] - got[3].1).abs() > 1e-6, "{c:?}");
        }
    }

    #[test]
    fn restored_state_continues_the_same_trajectory() {
        let c = AdamConfig::adam(0.05);
        let dev = Device::Cpu;
        let grads = [0.3, -0.2, 0.9, 0.1];
        let mk = || Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &dev).unwrap()).unwrap();
        let (x, y) = (mk(), mk());
        let mut one = Adam::new(vec![("x".into(), x.clone())], c).unwrap();
        let mut two = Adam::new(vec![("x".into(), y.clone())], c).unwrap();
        for (i, g) in grads.iter().enumerate() {
            let gt = BTreeMap::from([("x".to_string(), Tensor::new(&[*g, -*g], &dev).unwrap())]);
            one.step_named(&gt).unwrap();
            two.step_named(&gt).unwrap();
            if i == 1 {
                // a checkpoint: a new optimizer over the saved value, from the saved state
                let saved = two.states().clone();
                two = Adam::new(vec![("x".into(), y.clone())], c).unwrap();
                two.set_states(saved).unwrap();
            }
        }
        assert_eq!(
            x.as_tensor().to_vec1::<f64>().unwrap(),
            y.as_tensor().to_vec1::<f64>().unwrap()
        );
        let wrong = BTreeMap::from([("nope".to_string(), one.state("x").unwrap().clone())]);
        let err = two.set_states(wrong).unwrap_err().to_string();
        assert!(err.contains("\"nope\""), "{err}");
    }
}
