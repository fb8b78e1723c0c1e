//! Stable Diffusion's networks (diffusers layout and names): the conditional UNet with its
//! attention and ResNet blocks, the KL VAE, the CLIP text encoder. The CompVis LDM reuses the
//! UNet and VAE.

pub mod attention;
pub mod clip;
pub mod resnet;
pub mod unet;
pub mod vae;
