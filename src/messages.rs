//! The work of one generation shard: its types (settings stored once per defect type and
//! referenced by index from each sample) and samples (inputs by URI, seeds). It is never read
//! from the queue: a `generate` job names only the campaign and the shard (see
//! [`crate::job::GenerateJob`]), and the worker derives this from the committed campaign record
//! ([`crate::plan::Plan::shard`]).

use crate::campaign::{GeneratorKind, GeneratorSettings, MaskSource};
use serde::{Deserialize, Serialize};

/// The message format version this build writes and the newest it reads.
/// Version 2: learned mask sources (`generated`, `bank`), mask-model and placement settings.
/// Version 3: the job envelope (`kind`, see [`crate::job`]); a shard is the `generate` kind.
/// Version 4: a `generate` job carries identities only; its samples come from the record.
pub const MESSAGE_VERSION: u32 = 4;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeSpec {
    pub category: String,
    pub defect_type: String,
    pub generator: GeneratorKind,
    pub mask_source: MaskSource,
    pub settings: GeneratorSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleSpec {
    pub sample_id: String,
    /// global index in the plan
    pub index: u64,
    /// index into `ShardMessage::types`
    pub type_idx: u32,
    /// the normal image to paint on (local path or s3:// URI)
    pub normal_uri: String,
    /// the mask file, for mask sources `real`, `folder` and `bank`
    pub mask_uri: Option<String>,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardMessage {
    pub campaign_id: String,
    pub shard_id: String,
    pub shard_index: u64,
    /// root of the campaign output store (directory or s3://bucket/prefix)
    pub output: String,
    pub shard_time_limit_s: u64,
    pub types: Vec<TypeSpec>,
    pub samples: Vec<SampleSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("job message is not valid JSON for format v{MESSAGE_VERSION}: {0}")]
    Malformed(String),
    #[error("job message of format v{got} carries its work in the message; this worker (v{MESSAGE_VERSION}) takes only identities and reads the work from the campaign record: republish it with a current coordinator (`defectforge resume <campaign> --output <store>`)")]
    Outdated { got: u32 },
    #[error("job message has format v{got}, newer than this worker understands (v{MESSAGE_VERSION}): upgrade the worker")]
    TooNew { got: u32 },
    #[error("job kind {kind:?} is unknown to this worker (it runs: {}): upgrade the worker", crate::job::JobKind::NAMES.join(", "))]
    UnknownKind { kind: String },
    #[error("job message {shard} is inconsistent: {reason}")]
    Inconsistent { shard: String, reason: String },
}

impl ShardMessage {
    /// The message id used for broker de-duplication hints and logs.
    pub fn message_id(&self) -> String {
        format!("{}/{}", self.campaign_id, self.shard_id)
    }
}
