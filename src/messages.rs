//! Versioned shard messages: one queue message is one shard, carrying everything a stateless
//! worker needs (inputs by URI, seeds, generator settings, output location). Settings are stored
//! once per defect type in the shard and referenced by index from each sample.

use crate::campaign::{GeneratorKind, GeneratorSettings, MaskSource};
use serde::{Deserialize, Serialize};

/// The message format version this build writes and the newest it reads.
/// Version 2: learned mask sources (`generated`, `bank`), mask-model and placement settings.
/// Version 3: the job envelope (`kind`, see [`crate::job`]); a shard is the `generate` kind.
pub const MESSAGE_VERSION: u32 = 3;

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
    pub v: u32,
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
    #[error("shard message is not valid JSON for format v{MESSAGE_VERSION}: {0}")]
    Malformed(String),
    #[error("job message has format v{got}, newer than this worker understands (v{MESSAGE_VERSION}): upgrade the worker")]
    TooNew { got: u32 },
    #[error("job kind {kind:?} is unknown to this worker (it runs: {}): upgrade the worker", crate::job::JobKind::NAMES.join(", "))]
    UnknownKind { kind: String },
    #[error("shard message {shard} is inconsistent: {reason}")]
    Inconsistent { shard: String, reason: String },
}

impl ShardMessage {
    pub fn from_bytes(b: &[u8]) -> Result<Self, MessageError> {
        #[derive(Deserialize)]
        struct Peek {
            v: u32,
        }
        let peek: Peek =
            serde_json::from_slice(b).map_err(|e| MessageError::Malformed(e.to_string()))?;
        if peek.v > MESSAGE_VERSION {
            return Err(MessageError::TooNew { got: peek.v });
        }
        let m: ShardMessage =
            serde_json::from_slice(b).map_err(|e| MessageError::Malformed(e.to_string()))?;
        let bad = |reason: String| MessageError::Inconsistent {
            shard: format!("{}/{}", m.campaign_id, m.shard_id),
            reason,
        };
        if !crate::ids::is_safe_campaign_id(&m.campaign_id) {
            return Err(bad(format!(
                "campaign id {:?} is not key-safe",
                m.campaign_id
            )));
        }
        if m.shard_id.is_empty() || !m.shard_id.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad(format!(
                "shard id {:?} is not a shard number",
                m.shard_id
            )));
        }
        for s in &m.samples {
            if s.type_idx as usize >= m.types.len() {
                return Err(bad(format!(
                    "sample {} names type #{}",
                    s.sample_id, s.type_idx
                )));
            }
            if s.sample_id.len() != 24 || !s.sample_id.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad(format!(
                    "sample id {:?} is not a 24-hex id",
                    s.sample_id
                )));
            }
        }
        Ok(m)
    }

    /// The message id used for broker de-duplication hints and logs.
    pub fn message_id(&self) -> String {
        format!("{}/{}", self.campaign_id, self.shard_id)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn msg() -> ShardMessage {
        ShardMessage {
            v: MESSAGE_VERSION,
            campaign_id: "demo-0123".into(),
            shard_id: "0000001".into(),
            shard_index: 1,
            output: "/tmp/out".into(),
            shard_time_limit_s: 60,
            types: vec![TypeSpec {
                category: "carpet".into(),
                defect_type: "color".into(),
                generator: GeneratorKind::Perlin,
                mask_source: MaskSource::Perlin,
                settings: Default::default(),
            }],
            samples: vec![SampleSpec {
                sample_id: crate::ids::sample_id(1, 0),
                index: 0,
                type_idx: 0,
                normal_uri: "/data/carpet/train/good/000.png".into(),
                mask_uri: None,
                seed: 5,
            }],
        }
    }

    #[test]
    fn round_trips_and_rejects_bad_messages() {
        let m = msg();
        assert_eq!(
            ShardMessage::from_bytes(&serde_json::to_vec(&m).unwrap()).unwrap(),
            m
        );
        let mut newer = serde_json::to_value(&m).unwrap();
        newer["v"] = 99.into();
        assert!(matches!(
            ShardMessage::from_bytes(&serde_json::to_vec(&newer).unwrap()),
            Err(MessageError::TooNew { got: 99 })
        ));
        let mut evil = m.clone();
        evil.campaign_id = "../../x".into();
        assert!(ShardMessage::from_bytes(&serde_json::to_vec(&evil).unwrap()).is_err());
        let mut evil = m.clone();
        evil.samples[0].sample_id = "../../../etc/passwd00000".into();
        assert!(ShardMessage::from_bytes(&serde_json::to_vec(&evil).unwrap()).is_err());
        assert!(ShardMessage::from_bytes(b"{nope").is_err());
    }
}
