//! defectforge's diffusion engine on candle: a Stable-Diffusion-v1-family UNet with an
//! explicit attention-control interface, the KL VAE, the CLIP text encoder and tokenizer, and
//! DDIM with injectable noise — all numerically matched to Hugging Face diffusers /
//! transformers by the parity harness in `tests/parity.rs`.
//!
//! Why the project owns these modules instead of using `candle-transformers`' stable-diffusion
//! code (see shared/reference/candle.md): its UNet's attention is sealed (no way to read or
//! re-weight cross-attention), it takes one timestep per batch, it uses tanh-GELU where
//! diffusers uses erf-GELU, its `DownBlock2D`/`UpBlock2D` ignore `norm_num_groups`, its fused
//! softmax/LayerNorm silently cut gradients, its VAE hides the posterior moments and does not
//! clamp logvar, and its CLIP takes token ids only. The building blocks below candle-nn level
//! (Conv2d, Linear, GroupNorm, Embedding) are reused from candle-nn.
//!
//! Layout: [`unet`] (+ [`attention`], [`resnet`], [`control`]), [`vae`], [`clip`],
//! [`tokenizer`], [`ddim`], [`noise`], [`weights`] (loading with tensor accounting), [`nn`].

pub mod attention;
pub mod clip;
pub mod control;
pub mod cpu_ops;
pub mod ddim;
pub mod error;
pub mod nn;
pub mod noise;
pub mod resnet;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use candle_core::{DType, Device, Tensor};
pub use control::{AttentionController, AttentionSite};
pub use ddim::{DdimConfig, DdimScheduler};
pub use error::{EngineError, Result};
pub use noise::{NoiseSource, ReplayNoise, SeededNoise};
pub use weights::Weights;
