//! defectforge worker: the delivery protocol every job kind shares (`protocol`: ack after
//! commit, requeue, dead-letter, graceful shutdown), the job handler (`runner`: generation
//! shards), mask banks, training (`training`), the `Generator` trait and its implementations, metrics.

pub mod cli;
#[cfg(feature = "engine")]
pub mod compute;
#[cfg(feature = "engine")]
pub mod evaluation;
#[cfg(feature = "engine")]
mod evaluation_pictures;
#[cfg(feature = "engine")]
pub mod generators;
#[cfg(feature = "engine")]
pub mod http;
pub mod masks;
pub mod metrics;
pub mod models;
pub mod protocol;
#[cfg(feature = "engine")]
pub mod runner;
#[cfg(feature = "engine")]
pub mod training;
