//! Numeric kernels that the core crate (CPU image handling) and the engine (tensors) must
//! compute identically, in a crate with no dependencies so that both can use it: torchvision
//! 0.13.1's bilinear tensor resize and AnomalyDiffusion's working sizes.

/// The AnomalyDiffusion working size and latent grid side.
pub const AD_WORKING_SIZE: u32 = 256;
pub const AD_LATENT_SIZE: u32 = 32;

/// Bilinear resize of a single-channel float image as torchvision 0.13.1's `Resize` on tensors
/// (`align_corners = False`, no antialias): output pixel i samples source coordinate
/// `(i + 0.5)·in/out − 0.5`, clamped at 0.
pub fn resize_bilinear_f32(src: &[f32], w: u32, h: u32, ow: u32, oh: u32) -> Vec<f32> {
    let coords = |n_in: u32, n_out: u32| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|i| {
                let x = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
                let x0 = (x.floor() as usize).min(n_in as usize - 1);
                let x1 = (x0 + 1).min(n_in as usize - 1);
                (x0, x1, x - x0 as f32)
            })
            .collect()
    };
    let (cx, cy) = (coords(w, ow), coords(h, oh));
    let mut out = Vec::with_capacity((ow * oh) as usize);
    for &(y0, y1, ly) in &cy {
        for &(x0, x1, lx) in &cx {
            let p = |x: usize, y: usize| src[y * w as usize + x];
            let top = p(x0, y0) * (1.0 - lx) + p(x1, y0) * lx;
            let bot = p(x0, y1) * (1.0 - lx) + p(x1, y1) * lx;
            out.push(top * (1.0 - ly) + bot * ly);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_matches_torch_interpolate() {
        // F.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=(4, 4), mode="bilinear",
        // align_corners=False)
        let up = resize_bilinear_f32(&[0.0, 1.0, 2.0, 3.0], 2, 2, 4, 4);
        let want = [
            0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
        ];
        assert_eq!(up, want);
        // 4 → 2 averages the two middle source pixels of each half
        let down = resize_bilinear_f32(&up, 4, 4, 2, 2);
        assert_eq!(down, [0.375, 1.125, 1.875, 2.625]);
        let same = resize_bilinear_f32(&[1.5, -2.0, 7.0], 3, 1, 3, 1);
        assert_eq!(same, [1.5, -2.0, 7.0]);
    }
}
