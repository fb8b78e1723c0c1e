//! The job protocol: one queue message is one job, a JSON object `{"v": …, "kind": …, …}` whose
//! other fields are the kind's own. Every kind shares the queue, the workers and the delivery
//! protocol (prefetch, ack after commit, requeue, dead-letter, time limit); docs/architecture.md
//! says where a new kind goes.
//!
//! `v` is the format version of the whole protocol: a worker refuses (and leaves for a newer
//! worker) any message with a newer `v`, and a kind it does not know, with "upgrade the
//! worker". Every kind carries identities only (which run, which piece of it, where its record
//! lives); the work itself is read from the committed record, never from the message. Generation
//! messages of format v3 and older carried their samples and are refused with the fix.

use serde::{Deserialize, Serialize};

use crate::messages::{MessageError, MESSAGE_VERSION};

/// The job format version this build writes and the newest it reads.
pub const JOB_VERSION: u32 = MESSAGE_VERSION;

/// The kinds of work on the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// one shard of a generation campaign ([`GenerateJob`])
    Generate,
    /// one chunk of a mask bank ([`MaskBankJob`])
    MaskBank,
    /// one segment of a training run ([`TrainJob`])
    Train,
}

impl JobKind {
    /// Every kind this build reads, as written in messages.
    pub const NAMES: &'static [&'static str] = &["generate", "mask_bank", "train"];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Generate => "generate",
            JobKind::MaskBank => "mask_bank",
            JobKind::Train => "train",
        }
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One shard of a generation campaign: identities only. The worker reads the campaign record
/// from `output` (a store its configuration allows), checks that the record hashes to
/// `plan_digest`, and derives the shard's samples from it ([`crate::plan::Plan::shard`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerateJob {
    pub campaign_id: String,
    /// shard number
    pub shard: u64,
    /// root of the campaign's output store (directory or s3://bucket/prefix), where its record is
    pub output: String,
    /// the plan digest of the record the job was published from
    pub plan_digest: String,
}

impl GenerateJob {
    pub fn shard_id(&self) -> String {
        crate::ids::shard_id(self.shard)
    }

    fn check(self) -> Result<Self, MessageError> {
        let bad = |reason: String| MessageError::Inconsistent {
            shard: format!("{}/{}", self.campaign_id, self.shard),
            reason,
        };
        if !crate::ids::is_safe_campaign_id(&self.campaign_id) {
            return Err(bad(format!(
                "campaign id {:?} is not key-safe",
                self.campaign_id
            )));
        }
        if self.plan_digest.len() != 64 || !self.plan_digest.bytes().all(|c| c.is_ascii_hexdigit())
        {
            return Err(bad("plan digest is not 64 hex digits".into()));
        }
        Ok(self)
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

/// One segment of a training run: identities only. The worker reads the run's record
/// (`training/<run_id>/run.json` under `output`), checks that it hashes to `spec_digest`,
/// resumes from the run's newest valid checkpoint and trains one segment
/// (`training.segment_steps`), commits its checkpoint, and publishes the next segment before
/// it acks this one: no delivery outlives the broker's consumer timeout, and a lost worker
/// costs at most one segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainJob {
    /// the run's output root (a directory or s3://bucket/prefix), where its record is
    pub output: String,
    pub run_id: String,
    /// the SHA-256 of the run's spec (its record)
    pub spec_digest: String,
    /// the step the segment trains to (the next segment's job names the one after)
    pub until_step: u64,
}

impl TrainJob {
    /// `<run_id>/<until_step>`, for logs and failure records.
    pub fn id(&self) -> String {
        format!("{}/{:08}", self.run_id, self.until_step)
    }

    fn check(self) -> Result<Self, MessageError> {
        let bad = |reason: String| MessageError::Inconsistent {
            shard: self.id(),
            reason,
        };
        if !crate::ids::is_safe_campaign_id(&self.run_id) {
            return Err(bad(format!("run id {:?} is not key-safe", self.run_id)));
        }
        if self.spec_digest.len() != 64 || !self.spec_digest.bytes().all(|c| c.is_ascii_hexdigit())
        {
            return Err(bad("spec digest is not 64 hex digits".into()));
        }
        if self.until_step == 0 || self.until_step > crate::training::MAX_STEPS {
            return Err(bad(format!(
                "until_step {} is out of range",
                self.until_step
            )));
        }
        Ok(self)
    }
}

/// One queue message.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    Generate(GenerateJob),
    MaskBank(MaskBankJob),
    Train(TrainJob),
}

impl Job {
    pub fn kind(&self) -> JobKind {
        match self {
            Job::Generate(_) => JobKind::Generate,
            Job::MaskBank(_) => JobKind::MaskBank,
            Job::Train(_) => JobKind::Train,
        }
    }

    /// The id used for broker de-duplication hints and logs (`<campaign>/<shard>` for
    /// generation shards).
    pub fn id(&self) -> String {
        match self {
            Job::Generate(m) => format!("{}/{}", m.campaign_id, m.shard_id()),
            Job::MaskBank(j) => j.id(),
            Job::Train(j) => j.id(),
        }
    }

    /// The run the job belongs to (a campaign or bank run id), for metrics.
    pub fn group(&self) -> &str {
        match self {
            Job::Generate(m) => &m.campaign_id,
            Job::MaskBank(j) => &j.run_id,
            Job::Train(j) => &j.run_id,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut o = match self {
            Job::Generate(m) => serde_json::to_value(m),
            Job::MaskBank(j) => serde_json::to_value(j),
            Job::Train(j) => serde_json::to_value(j),
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
            samples: Option<serde::de::IgnoredAny>,
        }
        let peek: Peek =
            serde_json::from_slice(b).map_err(|e| MessageError::Malformed(e.to_string()))?;
        if peek.v > JOB_VERSION {
            return Err(MessageError::TooNew { got: peek.v });
        }
        match peek.kind.as_deref() {
            None | Some("generate") if peek.v < 4 || peek.samples.is_some() => {
                Err(MessageError::Outdated { got: peek.v })
            }
            None => Err(MessageError::Malformed("no job kind".into())),
            Some("generate") => {
                let j: GenerateJob = serde_json::from_slice(b)
                    .map_err(|e| MessageError::Malformed(e.to_string()))?;
                Ok(Job::Generate(j.check()?))
            }
            Some("mask_bank") => {
                let j: MaskBankJob = serde_json::from_slice(b)
                    .map_err(|e| MessageError::Malformed(e.to_string()))?;
                Ok(Job::MaskBank(j.check()?))
            }
            Some("train") => {
                let j: TrainJob = serde_json::from_slice(b)
                    .map_err(|e| MessageError::Malformed(e.to_string()))?;
                Ok(Job::Train(j.check()?))
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

    pub(crate) fn generate() -> GenerateJob {
        GenerateJob {
            campaign_id: "demo-0123456789ab".into(),
            shard: 7,
            output: "s3://b/out".into(),
            plan_digest: "ab".repeat(32),
        }
    }

    #[test]
    fn jobs_carry_version_kind_and_identities_only() {
        let job = Job::Generate(generate());
        let v: serde_json::Value = serde_json::from_slice(&job.to_bytes()).unwrap();
        assert_eq!(v["kind"], "generate");
        assert_eq!(v["v"], JOB_VERSION);
        assert_eq!(job.id(), "demo-0123456789ab/0000007");
        assert_eq!(Job::from_bytes(&job.to_bytes()).unwrap(), job);
        // a message that carries its samples (v3 and older) is refused with the fix
        let mut old = v.clone();
        old["samples"] = serde_json::json!([]);
        let e = Job::from_bytes(&serde_json::to_vec(&old).unwrap()).unwrap_err();
        assert!(matches!(e, MessageError::Outdated { .. }), "{e}");
        assert!(e.to_string().contains("defectforge resume"), "{e}");
        let mut v2 = serde_json::json!({"v": 2, "campaign_id": "x-1", "samples": []});
        assert!(matches!(
            Job::from_bytes(&serde_json::to_vec(&v2).unwrap()),
            Err(MessageError::Outdated { got: 2 })
        ));
        v2["v"] = 4.into();
        assert!(Job::from_bytes(&serde_json::to_vec(&v2).unwrap()).is_err());
        let mut evil = generate();
        evil.campaign_id = "../../x".into();
        assert!(Job::from_bytes(&Job::Generate(evil).to_bytes()).is_err());
        let mut evil = generate();
        evil.plan_digest = "zz".into();
        assert!(Job::from_bytes(&Job::Generate(evil).to_bytes()).is_err());
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
        let train = Job::Train(TrainJob {
            output: "s3://b/runs".into(),
            run_id: "demo-types".into(),
            spec_digest: "cd".repeat(32),
            until_step: 2000,
        });
        let v: serde_json::Value = serde_json::from_slice(&train.to_bytes()).unwrap();
        assert_eq!(v["kind"], "train");
        assert_eq!(Job::from_bytes(&train.to_bytes()).unwrap(), train);
        assert_eq!(train.id(), "demo-types/00002000");
        let Job::Train(mut evil) = train else {
            unreachable!()
        };
        evil.run_id = "../x".into();
        assert!(Job::from_bytes(&Job::Train(evil.clone()).to_bytes()).is_err());
        evil.run_id = "ok".into();
        evil.until_step = 0;
        assert!(Job::from_bytes(&Job::Train(evil).to_bytes()).is_err());
    }

    #[test]
    fn newer_versions_and_unknown_kinds_ask_for_an_upgrade() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&Job::Generate(generate()).to_bytes()).unwrap();
        v["kind"] = "evaluate".into();
        let e = Job::from_bytes(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(&e, MessageError::UnknownKind { kind } if kind == "evaluate"));
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
