//! DDIM schedulers: diffusers' (`ddim`, Stable Diffusion parity) and the CompVis LDM's
//! (`ldm_ddim`, the official AnomalyDiffusion sampler's).

pub mod ddim;
pub mod ldm_ddim;

/// `torch.linspace(start, end, n)` in one float type: torch's CPU kernel fills the first half
/// forwards from `start` and the second half backwards from `end`, so both ends are exact.
macro_rules! torch_linspace {
    ($(#[$m:meta])* $name:ident, $t:ty) => {
        $(#[$m])*
        pub fn $name(start: $t, end: $t, n: usize) -> Vec<$t> {
            if n == 1 {
                return vec![start];
            }
            let step = (end - start) / (n - 1) as $t;
            let half = n / 2;
            (0..n)
                .map(|i| {
                    if i < half {
                        start + step * i as $t
                    } else {
                        end - step * (n - i - 1) as $t
                    }
                })
                .collect()
        }
    };
}

torch_linspace!(
    /// `torch.linspace` in float64 (the LDM's schedules).
    torch_linspace,
    f64
);
torch_linspace!(
    /// `torch.linspace(…, dtype=torch.float32)` (diffusers' schedules).
    torch_linspace_f32,
    f32
);
