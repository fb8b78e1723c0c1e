//! The job protocol: one queue message is one job, a JSON object `{"v": …, "kind": …, …}` whose
//! other fields are the kind's own. Every kind shares the queue, the workers and the delivery
//! protocol (prefetch, ack after commit, requeue, dead-letter, time limit); docs/architecture.md
//! says where a new kind goes.
//!
//! `v` is the format version of the whole protocol: a worker refuses (and leaves for a newer
//! worker) any message with a newer `v`, and a kind it does not know, with "upgrade the
//! worker". Messages without `kind` are generation shards of format v2 and older.

use serde::{Deserialize, Serialize};

use crate::messages::{MessageError, ShardMessage, MESSAGE_VERSION};

/// The job format version this build writes and the newest it reads.
pub const JOB_VERSION: u32 = MESSAGE_VERSION;

/// The kinds of work on the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// one shard of a generation campaign ([`ShardMessage`])
    Generate,
    /// one chunk of a mask bank ([`MaskBankJob`])
    MaskBank,
}

impl JobKind {
    /// Every kind this build reads, as written in messages.
    pub const NAMES: &'static [&'static str] = &["generate", "mask_bank"];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Generate => "generate",
            JobKind::MaskBank => "mask_bank",
        }
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One chunk of a mask bank: identities only. The work (model, seed, settings, which masks)
/// comes from the bank run's record, `<bank>/.runs/<run_id>/run.json`, written before any of
/// its jobs is published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskBankJob {
    /// the bank root (a directory or s3://bucket/prefix)
    pub bank: String,
    pub run_id: String,
    /// `<category>+<defect>`
    pub type_name: String,
    /// chunk number within the type's masks to draw
    pub chunk: u64,
}

impl MaskBankJob {
    /// `<run_id>/<type>/<chunk>`, for logs and failure records.
    pub fn id(&self) -> String {
        format!("{}/{}/{:06}", self.run_id, self.type_name, self.chunk)
    }

    fn check(self) -> Result<Self, MessageError> {
        let bad = |reason: String| MessageError::Inconsistent {
            shard: format!("{}/{}", self.run_id, self.type_name),
            reason,
        };
        if !crate::ids::is_safe_campaign_id(&self.run_id) {
            return Err(bad(format!(
                "bank run id {:?} is not key-safe",
                self.run_id
            )));
        }
        if crate::campaign::split_type_name(&self.type_name).is_none() {
            return Err(bad(format!(
                "type {:?} is not <category>+<defect>",
                self.type_name
            )));
        }
        Ok(self)
    }
}

/// One queue message.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    Generate(ShardMessage),
    MaskBank(MaskBankJob),
}

impl Job {
    pub fn kind(&self) -> JobKind {
        match self {
            Job::Generate(_) => JobKind::Generate,
            Job::MaskBank(_) => JobKind::MaskBank,
        }
    }

    /// The id used for broker de-duplication hints and logs (`<campaign>/<shard>` for
    /// generation shards).
    pub fn id(&self) -> String {
        match self {
            Job::Generate(m) => m.message_id(),
            Job::MaskBank(j) => j.id(),
        }
    }

    /// What the job's progress is counted in, as far as the message says (samples of a
    /// generation shard; a bank chunk's size is in its run record).
    pub fn units(&self) -> u64 {
        match self {
            Job::Generate(m) => m.samples.len() as u64,
            Job::MaskBank(_) => 0,
        }
    }

    /// The run the job belongs to (a campaign or bank run id), for metrics.
    pub fn group(&self) -> &str {
        match self {
            Job::Generate(m) => &m.campaign_id,
            Job::MaskBank(j) => &j.run_id,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut o = match self {
            Job::Generate(m) => serde_json::to_value(m),
            Job::MaskBank(j) => serde_json::to_value(j),
        }
        .expect("jobs serialize");
        let map = o.as_object_mut().expect("a job is a JSON object");
        map.insert("v".into(), JOB_VERSION.into());
        map.insert("kind".into(), self.kind().as_str().into());
        serde_json::to_vec(&o).expect("jobs serialize")
    }

    /// Reads one message: checks the version and the kind before the kind's own fields, so
    /// that an old worker meeting newer work says "upgrade" instead of "malformed".
    pub fn from_bytes(b: &[u8]) -> Result<Job, MessageError> {
        #[derive(Deserialize)]
        struct Peek {
            v: u32,
            kind: Option<String>,
        }
        let peek: Peek =
            serde_json::from_slice(b).map_err(|e| MessageError::Malformed(e.to_string()))?;
        if peek.v > JOB_VERSION {
            return Err(MessageError::TooNew { got: peek.v });
        }
        match peek.kind.as_deref() {
            None | Some("generate") => Ok(Job::Generate(ShardMessage::from_bytes(b)?)),
            Some("mask_bank") => {
                let j: MaskBankJob = serde_json::from_slice(b)
                    .map_err(|e| MessageError::Malformed(e.to_string()))?;
                Ok(Job::MaskBank(j.check()?))
            }
            Some(other) => Err(MessageError::UnknownKind {
                kind: other.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_carry_version_and_kind_and_old_messages_are_generation_shards() {
        let m = crate::messages::tests::msg();
        let job = Job::Generate(m.clone());
        let v: serde_json::Value = serde_json::from_slice(&job.to_bytes()).unwrap();
        assert_eq!(v["kind"], "generate");
        assert_eq!(v["v"], JOB_VERSION);
        assert_eq!(Job::from_bytes(&job.to_bytes()).unwrap(), job);
        // a v2 shard message (no kind) is still read
        let mut old = serde_json::to_value(&m).unwrap();
        old["v"] = 2.into();
        let Ok(Job::Generate(back)) = Job::from_bytes(&serde_json::to_vec(&old).unwrap()) else {
            panic!("a v2 message is a generation shard")
        };
        assert_eq!(back.shard_id, m.shard_id);
        let bank = Job::MaskBank(MaskBankJob {
            bank: "s3://b/bank".into(),
            run_id: "bank-0123456789abcdef".into(),
            type_name: "bottle+broken_large".into(),
            chunk: 3,
        });
        let v: serde_json::Value = serde_json::from_slice(&bank.to_bytes()).unwrap();
        assert_eq!(v["kind"], "mask_bank");
        assert_eq!(Job::from_bytes(&bank.to_bytes()).unwrap(), bank);
        let Job::MaskBank(mut evil) = bank else {
            unreachable!()
        };
        evil.type_name = "../x".into();
        assert!(Job::from_bytes(&Job::MaskBank(evil).to_bytes()).is_err());
    }

    #[test]
    fn newer_versions_and_unknown_kinds_ask_for_an_upgrade() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&Job::Generate(crate::messages::tests::msg()).to_bytes())
                .unwrap();
        v["kind"] = "train".into();
        let e = Job::from_bytes(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(&e, MessageError::UnknownKind { kind } if kind == "train"));
        assert!(e.to_string().contains("upgrade the worker"), "{e}");
        v["v"] = (JOB_VERSION + 1).into();
        let e = Job::from_bytes(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(e, MessageError::TooNew { .. }), "{e}");
        assert!(matches!(
            Job::from_bytes(br#"{"kind": "generate"}"#),
            Err(MessageError::Malformed(_))
        ));
    }
}
