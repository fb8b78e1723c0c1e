//! Products with a frozen operand, without the frozen operand's gradient.
//!
//! candle's backward pass computes the gradient of *both* operands of every matmul and
//! convolution it meets on the gradient path, and keeps each in its `GradStore` until the end
//! (shared/reference/candle.md §2): for a frozen UNet and BERT that is one wasted GEMM per
//! layer (a third of the backward work) and a weight-sized store of gradients nobody reads.
//! The ops here compute the same forward value with candle's own kernels (so inference and
//! training give bit-identical activations) and return `None` for the frozen side in their
//! backward, so candle never computes or stores it.
//!
//! They are used only where the activation tracks a gradient and the weight does not
//! ([`frozen_weight`]); everywhere else the plain op runs. [`set_skip_frozen_grads`] turns them
//! off (the benchmark measures the difference; `docs/benchmarks.md`). Convolutions with a frozen
//! kernel run as im2col + [`matmul_frozen_lhs`] on the gradient path ([`crate::nn::Conv2d`]).

use std::cell::Cell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

thread_local! {
    static SKIP_FROZEN_GRADS: Cell<bool> = const { Cell::new(true) };
}

/// Whether products with a frozen weight skip that weight's gradient on this thread (default
/// `true`).
pub fn skip_frozen_grads() -> bool {
    SKIP_FROZEN_GRADS.with(|c| c.get())
}

/// Switches [`skip_frozen_grads`] for the calling thread (the forward that builds the graph
/// runs there; benchmarks and tests compare both).
pub fn set_skip_frozen_grads(on: bool) {
    SKIP_FROZEN_GRADS.with(|c| c.set(on));
}

/// True when `x` carries a gradient and `w` is a constant: the case the ops here are for.
pub fn frozen_weight(x: &Tensor, w: &Tensor) -> bool {
    skip_frozen_grads() && x.track_op() && !w.track_op()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Lhs,
    Rhs,
}

/// `lhs · rhs` (batched, equal batch dims) where `frozen` is a constant.
struct FrozenMatmul(Side);

fn matmul_dims(l1: &Layout, l2: &Layout) -> Result<((usize, usize, usize, usize), Shape)> {
    let (d1, d2) = (l1.dims(), l2.dims());
    let r = d1.len();
    if r < 2 || d2.len() != r {
        candle_core::bail!("frozen matmul: operands of shape {d1:?} and {d2:?}");
    }
    let (m, k, k2, n) = (d1[r - 2], d1[r - 1], d2[r - 2], d2[r - 1]);
    if k != k2 || d1[..r - 2] != d2[..r - 2] {
        candle_core::bail!("frozen matmul: shapes {d1:?} and {d2:?} do not multiply");
    }
    let b = d1[..r - 2].iter().product();
    let mut out = d1[..r - 2].to_vec();
    out.extend([m, n]);
    Ok(((b, m, n, k), Shape::from(out)))
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (bmnk, shape) = matmul_dims(l1, l2)?;
        Ok((s1.matmul(s2, bmnk, l1, l2)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (bmnk, shape) = matmul_dims(l1, l2)?;
        Ok((s1.matmul(s2, bmnk, l1, l2)?, shape))
    }

    fn bwd(
        &self,
        lhs: &Tensor,
        rhs: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok(match self.0 {
            Side::Rhs => (Some(grad.matmul(&rhs.t()?)?), None),
            Side::Lhs => (None, Some(lhs.t()?.matmul(grad)?)),
        })
    }
}

/// `x · w` with `w` frozen (same contract as `Tensor::matmul`).
pub fn matmul_frozen_rhs(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if frozen_weight(x, w) {
        x.apply_op2_arc(w, std::sync::Arc::new(Box::new(FrozenMatmul(Side::Rhs))))
    } else {
        x.matmul(w)
    }
}

/// `w · x` with `w` frozen (same contract as `Tensor::matmul`).
pub fn matmul_frozen_lhs(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    if frozen_weight(x, w) {
        w.apply_op2_arc(x, std::sync::Arc::new(Box::new(FrozenMatmul(Side::Lhs))))
    } else {
        w.matmul(x)
    }
}

/// `x ⊕ c` (same shape after broadcasting) with `c` frozen: `Add` or `Mul`.
struct FrozenBinary(Bin);

#[derive(Debug, Clone, Copy)]
enum Bin {
    Add,
    Mul,
}

impl CustomOp2 for FrozenBinary {
    fn name(&self) -> &'static str {
        match self.0 {
            Bin::Add => "frozen-add",
            Bin::Mul => "frozen-mul",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = match self.0 {
            Bin::Add => s1.binary_impl::<candle_core::op::Add>(s2, l1, l2)?,
            Bin::Mul => s1.binary_impl::<candle_core::op::Mul>(s2, l1, l2)?,
        };
        Ok((s, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let s = match self.0 {
            Bin::Add => s1.binary_impl::<candle_core::op::Add>(s2, l1, l2)?,
            Bin::Mul => s1.binary_impl::<candle_core::op::Mul>(s2, l1, l2)?,
        };
        Ok((s, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok(match self.0 {
            Bin::Add => (Some(grad.clone()), None),
            Bin::Mul => (Some(grad.mul(c)?), None),
        })
    }
}

fn frozen_binary(x: &Tensor, c: &Tensor, op: Bin) -> Result<Tensor> {
    let shape = x
        .shape()
        .broadcast_shape_binary_op(c.shape(), "frozen-binary")?;
    if &shape != x.shape() {
        candle_core::bail!(
            "frozen {op:?}: the constant {:?} would broadcast the input {:?}",
            c.dims(),
            x.dims()
        );
    }
    let c = c.broadcast_as(&shape)?;
    x.apply_op2_arc(&c, std::sync::Arc::new(Box::new(FrozenBinary(op))))
}

/// `x.broadcast_add(c)`; with `c` frozen and `x` tracked its (activation-sized) gradient is
/// neither computed nor stored. `c` must broadcast to `x`'s shape.
pub fn add_frozen(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    if frozen_weight(x, c) {
        frozen_binary(x, c, Bin::Add)
    } else {
        x.broadcast_add(c)
    }
}

/// `x.broadcast_mul(c)`, as [`add_frozen`].
pub fn mul_frozen(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    if frozen_weight(x, c) {
        frozen_binary(x, c, Bin::Mul)
    } else {
        x.broadcast_mul(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn frozen_products_give_candles_value_and_input_gradient_and_no_weight_gradient() {
        let x = Var::from_tensor(&rand(&[2, 3, 5], 1)).unwrap();
        let w = rand(&[5, 4], 2);
        let wb = w.broadcast_left(2).unwrap();
        let plain = x.as_tensor().matmul(&wb).unwrap();
        let frozen = matmul_frozen_rhs(x.as_tensor(), &wb).unwrap();
        assert_eq!(max_diff(&plain, &frozen), 0.0);
        let g_plain = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_frozen = frozen.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g_frozen.get(x.as_tensor()).unwrap();
        assert!(max_diff(g_plain.get(x.as_tensor()).unwrap(), gx) < 1e-12);
        assert!(g_plain.get(&wb).is_some(), "candle's matmul stores it");
        assert!(
            g_frozen.get(&wb).is_none(),
            "the frozen weight gets no gradient"
        );

        // lhs frozen: w [4, 5] · x [5, 6]
        let w = rand(&[4, 5], 3);
        let x = Var::from_tensor(&rand(&[5, 6], 4)).unwrap();
        let plain = w.matmul(x.as_tensor()).unwrap();
        let frozen = matmul_frozen_lhs(&w, x.as_tensor()).unwrap();
        assert_eq!(max_diff(&plain, &frozen), 0.0);
        let gp = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gf = frozen.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            max_diff(
                gp.get(x.as_tensor()).unwrap(),
                gf.get(x.as_tensor()).unwrap()
            ) < 1e-12
        );
        assert!(gf.get(&w).is_none());

        assert_eq!(x.dtype(), DType::F64);

        // bias and scale
        let x = Var::from_tensor(&rand(&[2, 3, 4], 7)).unwrap();
        let c = rand(&[1, 3, 1], 8);
        let plain = x
            .as_tensor()
            .broadcast_mul(&c)
            .unwrap()
            .broadcast_add(&c)
            .unwrap();
        let frozen = add_frozen(&mul_frozen(x.as_tensor(), &c).unwrap(), &c).unwrap();
        assert_eq!(max_diff(&plain, &frozen), 0.0);
        let gp = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gf = frozen.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            max_diff(
                gp.get(x.as_tensor()).unwrap(),
                gf.get(x.as_tensor()).unwrap()
            ) < 1e-12
        );
        assert!(gf.get(&c).is_none());
        assert!(
            add_frozen(&c, x.as_tensor()).is_ok(),
            "untracked input: the plain op"
        );
    }
}
