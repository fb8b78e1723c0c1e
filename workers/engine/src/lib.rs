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
//! clamp logvar, and its CLIP takes token ids only. Embedding is reused from candle-nn; Conv2d,
//! Linear, GroupNorm, LayerNorm, softmax and GELU are the project's ([`nn`], [`cpu_ops`]), so
//! that training ([`train`]) gets exact gradients without gradients for frozen weights.
//!
//! Typical use (a worker generating one image; on GPU build with `--features cuda` and use
//! `Device::new_cuda(0)` with `DType::BF16`/`F16` — no nvcc is needed for the default build):
//!
//! ```no_run
//! use defectforge_engine::{clip::ClipTextModel, ddim::DdimScheduler, noise::SeededNoise,
//!     tokenizer::ClipTokenizer, unet::UNet2DConditionModel, vae::AutoencoderKL,
//!     weights::read_json, DType, Device, NoiseSource, Tensor};
//! # fn main() -> defectforge_engine::Result<()> {
//! let (root, dev, dt) = (std::path::Path::new("sd15"), Device::Cpu, DType::F32);
//! let unet = UNet2DConditionModel::load(&root.join("unet"), dt, &dev)?;
//! let vae = AutoencoderKL::load(&root.join("vae"), dt, &dev)?;
//! let clip = ClipTextModel::load(&root.join("text_encoder"), dt, &dev)?;
//! let tok = ClipTokenizer::from_dir(&root.join("tokenizer"))?;
//! let sched = DdimScheduler::new(read_json(&root.join("scheduler/scheduler_config.json"))?, 50, 0.0)?;
//! let ids = Tensor::new(tok.encode("a scratch on a metal plate")?.as_slice(), &dev)?.unsqueeze(0)?;
//! let ctx = clip.forward(&ids)?; // or clip.forward_embeds(spliced token embeddings)
//! let mut noise = SeededNoise::new(42);
//! let mut x = noise.randn(&(1, 4, 32, 32).into(), dt, &dev)?;
//! for &t in sched.timesteps() {
//!     // Pass `Some(&mut controller)` to read or re-weight cross-attention.
//!     let eps = unet.forward_t(&x, t as f64, &ctx, None)?;
//!     x = sched.step(&eps, t, &x, &mut noise)?.prev_sample;
//! }
//! let image = vae.decode(&(x / vae.config().scaling_factor)?)?; // [1, 3, 256, 256] in ~[-1, 1]
//! # let _ = image; Ok(()) }
//! ```
//!
//! Layout, one folder per model family: [`sd`] (the Stable Diffusion UNet with its attention
//! and ResNet blocks, the VAE, CLIP), [`ldm`] (the CompVis LDM: config, checkpoint, model, its
//! BERT and WordPiece tokenizer), [`anomalydiffusion`] (model, blended sampler with attention
//! re-weighting, spatial encoder, mask generation, the official files), [`schedulers`] (the SD
//! and LDM DDIM schedulers); shared: [`nn`], [`weights`] (loading with tensor accounting),
//! [`control`] (attention control), [`noise`], [`cpu_ops`] (fused CPU kernels), [`train`]
//! (the training graph, Adam, augmentation), [`error`].
//! The flat names (`unet`, `ad_model`, `anomaly`, …) stay as aliases of the folders' modules.

pub mod anomalydiffusion;
pub mod control;
pub mod cpu_ops;
pub mod detect;
pub mod error;
pub mod ldm;
pub mod nn;
pub mod noise;
pub mod schedulers;
pub mod sd;
pub mod train;
pub mod weights;

pub use anomalydiffusion::{
    files as ad_files, maskgen, model as ad_model, sampler as anomaly, spatial,
};
pub use ldm::{bert, tokenizer};
pub use schedulers::{ddim, ldm_ddim};
pub use sd::{attention, clip, resnet, unet, vae};

pub use candle_core as candle;
pub use candle_core::{DType, Device, Tensor};
pub use control::{AttentionController, AttentionSite};
pub use ddim::{DdimConfig, DdimScheduler};
pub use defectforge_kernels::{AD_LATENT_SIZE, AD_WORKING_SIZE};
pub use error::{EngineError, Result};
pub use noise::{NoiseSource, PerSampleNoise, ReplayNoise, SeededNoise};
pub use weights::Weights;
