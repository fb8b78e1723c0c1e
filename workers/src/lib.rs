//! defectforge worker: the consume loop (ack after commit, graceful shutdown, bounded broker
//! reconnect), the `Generator` trait and its implementations.

pub mod bank;
pub mod cli;
pub mod generators;
pub mod http;
pub mod models;
pub mod runner;
