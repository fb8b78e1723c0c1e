//! The job queue seam: shards go in, workers take them out one at a time, and a shard is acked
//! only after its result is committed to the store. `AmqpQueue` (RabbitMQ through lapin: durable
//! quorum queue, dead-letter exchange, delivery limit, publisher confirms) and `InProcQueue`
//! (embedded mode, same semantics in memory) implement it.

mod amqp;
mod inproc;

pub use amqp::{redact_url, AmqpConfig, AmqpQueue};
pub use inproc::InProcQueue;

use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot connect to the broker at {url}: {message} (is RabbitMQ running? check --amqp-url / DEFECTFORGE_AMQP_URL)")]
    Connect { url: String, message: String },
    #[error("broker error during {op}: {message}")]
    Broker { op: String, message: String },
    #[error("the broker did not confirm {op} within {secs} s")]
    Timeout { op: String, secs: u64 },
    #[error("the broker refused {op}: {message}")]
    Nacked { op: String, message: String },
    #[error("the connection to the broker was lost: {0}")]
    Lost(String),
}

/// What happens to a delivery after processing.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Done (the result is committed): remove the message.
    async fn ack(&self) -> Result<(), QueueError>;
    /// Try again later (transient failure): back into the queue; counts towards the delivery limit.
    async fn requeue(&self) -> Result<(), QueueError>;
    /// Permanent failure: move the message to the dead-letter queue, with why in its headers
    /// (`x-defectforge-class`, `x-defectforge-reason`).
    async fn dead_letter(&self, why: &DeadLetter) -> Result<(), QueueError>;
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// "permanent", "exhausted" or "unreadable"
    pub class: &'static str,
    pub reason: String,
}

/// A message in the dead-letter queue and why it is there (None: the broker dead-lettered it
/// at the delivery limit, or an older worker did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadMessage {
    pub body: Vec<u8>,
    pub class: Option<String>,
    pub reason: Option<String>,
}

/// Header names of a dead-lettered message.
pub const CLASS_HEADER: &str = "x-defectforge-class";
pub const REASON_HEADER: &str = "x-defectforge-reason";

pub struct Delivery {
    pub body: Vec<u8>,
    /// how many times this message was delivered before (0 on first delivery)
    pub previous_deliveries: u64,
    pub acker: Box<dyn Acker>,
}

#[async_trait]
pub trait Consumer: Send {
    /// The next delivery; `Ok(None)` when the queue is closed for good (embedded mode drained).
    async fn next(&mut self) -> Result<Option<Delivery>, QueueError>;
}

/// Queue depth as far as the broker tells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Depth {
    /// messages ready for delivery (excludes messages held by workers)
    pub ready: u64,
    pub consumers: u64,
    /// messages in the dead-letter queue (all campaigns)
    pub dead: u64,
}

/// Chooses messages by body (a type alias keeps async_trait's lifetime rewriting away from it).
pub type Selector<'a> = dyn Fn(&DeadMessage) -> bool + Send + Sync + 'a;

#[async_trait]
pub trait JobQueue: Send + Sync {
    /// Publishes messages, each confirmed by the broker before this returns.
    async fn publish(&self, bodies: Vec<Vec<u8>>) -> Result<(), QueueError>;
    /// Starts consuming with the given prefetch.
    async fn consume(&self, prefetch: u16) -> Result<Box<dyn Consumer>, QueueError>;
    /// Moves dead-lettered messages accepted by `select` back to the work queue; returns how many.
    async fn requeue_dead(&self, select: &Selector<'_>) -> Result<u64, QueueError>;
    /// Every dead-lettered message with its reason, left where it is.
    async fn dead_letters(&self) -> Result<Vec<DeadMessage>, QueueError>;
    async fn depth(&self) -> Result<Depth, QueueError>;
}
