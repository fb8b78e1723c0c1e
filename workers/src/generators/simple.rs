//! Diagnostic generators. `noop` paints a fixed colour into the mask: the pipeline benchmark uses
//! it to measure everything except generation. `attempt-noise` paints fresh OS randomness, so two
//! attempts of one sample never produce the same bytes, as with GPU diffusion; the exactly-once
//! tests use it.

use super::{GenError, GenInput, Generator};
use image::RgbImage;

pub struct NoopGenerator;
pub struct AttemptNoiseGenerator;

impl Generator for NoopGenerator {
    fn name(&self) -> &'static str {
        "noop"
    }
    fn version(&self) -> &'static str {
        "1"
    }
    fn generate(&self, batch: &[GenInput<'_>]) -> Result<Vec<RgbImage>, GenError> {
        Ok(batch
            .iter()
            .map(|i| {
                let mut out = i.normal.clone();
                for (o, m) in out.pixels_mut().zip(i.mask.pixels()) {
                    if m.0[0] > 0 {
                        o.0 = if o.0 == [255, 0, 255] {
                            [0, 255, 0]
                        } else {
                            [255, 0, 255]
                        };
                    }
                }
                out
            })
            .collect())
    }
}

impl Generator for AttemptNoiseGenerator {
    fn name(&self) -> &'static str {
        "attempt-noise"
    }
    fn version(&self) -> &'static str {
        "1"
    }
    fn generate(&self, batch: &[GenInput<'_>]) -> Result<Vec<RgbImage>, GenError> {
        Ok(batch
            .iter()
            .map(|i| {
                let mut out = i.normal.clone();
                for (o, m) in out.pixels_mut().zip(i.mask.pixels()) {
                    if m.0[0] > 0 {
                        let r: [u8; 3] = rand::random();
                        o.0 = if r == o.0 { r.map(|v| v ^ 0x80) } else { r };
                    }
                }
                out
            })
            .collect())
    }
}
