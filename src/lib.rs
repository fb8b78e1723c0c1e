//! defectforge core library: the campaign spec and its validation, deterministic planning and
//! sharding, the versioned shard messages, dataset layouts, the `ObjectStore` and `JobQueue`
//! seams with their S3/local and AMQP/in-process implementations, the Parquet manifest, and the
//! imaging helpers every generator shares. No model code and no CLI parsing live here.

pub mod campaign;
pub mod dataset;
pub mod demo;
pub mod evaluation;
pub mod foreground;
pub mod ids;
pub mod imaging;
pub mod job;
pub mod layout;
pub mod ledger;
pub mod manifest;
pub mod messages;
pub mod plan;
pub mod queue;
pub mod retry;
pub mod settings;
pub mod store;
pub mod training;

pub use campaign::{Campaign, CampaignError};
pub use job::{Job, JobKind};
pub use messages::{SampleSpec, ShardMessage};
pub use queue::{JobQueue, QueueError};
pub use store::{ObjectStore, StoreError};
