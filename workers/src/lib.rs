//! defectforge worker: the delivery protocol every job kind shares (`protocol`: ack after
//! commit, requeue, dead-letter, graceful shutdown), the job handler (`runner`: generation
//! shards), mask banks, the `Generator` trait and its implementations, metrics.

pub mod cli;
pub mod compute;
pub mod generators;
pub mod http;
pub mod masks;
pub mod metrics;
pub mod models;
pub mod protocol;
pub mod runner;
