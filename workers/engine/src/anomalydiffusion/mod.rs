//! AnomalyDiffusion (Hu et al., AAAI 2024) on the LDM: the model with its anomaly and mask
//! embeddings (`model`), the blended DDIM sampler with adaptive attention re-weighting
//! (`sampler`), the spatial encoder (`spatial`), learned-mask sampling (`maskgen`) and the
//! official checkpoint files (`files`).

pub mod files;
pub mod maskgen;
pub mod model;
pub mod sampler;
pub mod spatial;
