//! RabbitMQ through lapin 4. Topology (declared idempotently by every client):
//! a durable quorum work queue with `x-delivery-limit` and a dead-letter exchange that routes to
//! `<queue>.dead` (also quorum), with at-least-once dead-lettering. Every publish waits for the
//! broker's confirm under a timeout. No automatic connection recovery: a lost connection is
//! reported to the caller, which reconnects within a bounded window or exits (pipeline.md §1.4).

use super::{
    Acker, Consumer, DeadLetter, DeadMessage, Delivery, Depth, JobQueue, QueueError, Selector,
    CLASS_HEADER, REASON_HEADER,
};
use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// amqp://user:pass@host:5672/%2f
    pub url: String,
    /// work queue name; the dead-letter queue is `<queue>.dead`
    pub queue: String,
    /// deliveries after which the broker dead-letters a message (crash-loop backstop)
    pub delivery_limit: u32,
    /// how long to wait for a publisher confirm or a connection
    pub timeout: Duration,
    /// connection name shown in the RabbitMQ management UI
    pub connection_name: String,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            queue: "defectforge.shards".into(),
            delivery_limit: 5,
            timeout: Duration::from_secs(30),
            connection_name: "defectforge".into(),
        }
    }
}

/// Replaces the password of an AMQP or HTTP URL with `****` for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((before, host)) = url.rsplit_once('@') else {
        return url.to_string();
    };
    match split_userinfo(before) {
        Some((scheme, userinfo)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:****@{host}")
        }
        None => format!("****@{host}"),
    }
}

/// (scheme, user info) of what precedes the '@' of a broker URL: after "://", or after
/// `amqp:`/`amqps:` in the form without slashes that URL parsers also accept.
fn split_userinfo(before: &str) -> Option<(&str, &str)> {
    before.split_once("://").or_else(|| {
        ["amqps", "amqp"]
            .into_iter()
            .find_map(|s| before.strip_prefix(s)?.strip_prefix(':').map(|u| (s, u)))
    })
}

/// The password written in a broker URL, if any.
fn url_password(url: &str) -> Option<&str> {
    let (before, _) = url.rsplit_once('@')?;
    let userinfo = split_userinfo(before).map_or(before, |(_, u)| u);
    userinfo
        .split_once(':')
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty())
}

/// `msg` with the URL's password replaced (client libraries may quote the URL they failed on).
fn scrub(msg: &str, url: &str) -> String {
    match url_password(url) {
        Some(p) => msg.replace(p, "****"),
        None => msg.to_string(),
    }
}

pub struct AmqpQueue {
    cfg: AmqpConfig,
    conn: Connection,
    publish_ch: Channel,
}

fn dead_queue(q: &str) -> String {
    format!("{q}.dead")
}
const DLX: &str = "defectforge.dlx";

fn berr(op: &str) -> impl Fn(lapin::Error) -> QueueError + '_ {
    move |e| QueueError::Broker {
        op: op.to_string(),
        message: e.to_string(),
    }
}

impl AmqpQueue {
    /// Connects and declares the topology. Fails fast (within `cfg.timeout`) when the broker is
    /// unreachable.
    pub async fn connect(cfg: AmqpConfig) -> Result<Self, QueueError> {
        let props = ConnectionProperties::default()
            .with_connection_name(cfg.connection_name.clone().into());
        let conn = tokio::time::timeout(cfg.timeout, Connection::connect(&cfg.url, props))
            .await
            .map_err(|_| QueueError::Connect {
                url: redact_url(&cfg.url),
                message: format!("no answer within {} s", cfg.timeout.as_secs()),
            })?
            .map_err(|e| QueueError::Connect {
                url: redact_url(&cfg.url),
                message: scrub(&e.to_string(), &cfg.url),
            })?;
        let publish_ch = conn
            .create_channel()
            .await
            .map_err(berr("opening a channel"))?;
        publish_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(berr("enabling publisher confirms"))?;
        let q = Self {
            cfg,
            conn,
            publish_ch,
        };
        q.declare().await?;
        Ok(q)
    }

    async fn declare(&self) -> Result<(), QueueError> {
        let ch = &self.publish_ch;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            DLX.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(berr("declaring the dead-letter exchange"))?;
        let mut dargs = FieldTable::default();
        dargs.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let dq = dead_queue(&self.cfg.queue);
        ch.queue_declare(dq.clone().into(), durable, dargs)
            .await
            .map_err(berr("declaring the dead-letter queue"))?;
        ch.queue_bind(
            dq.clone().into(),
            DLX.into(),
            dq.clone().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(berr("binding the dead-letter queue"))?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(DLX.into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(dq.into()),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(self.cfg.delivery_limit as i64),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        ch.queue_declare(self.cfg.queue.clone().into(), durable, args)
            .await
            .map_err(|e| QueueError::Broker {
                op: format!("declaring queue {:?}", self.cfg.queue),
                message: format!(
                    "{e} (if the queue exists with other arguments, delete it or choose another --queue)"
                ),
            })?;
        Ok(())
    }

    pub fn config(&self) -> &AmqpConfig {
        &self.cfg
    }

    pub async fn close(&self) {
        let _ = self.conn.close(200, "bye".into()).await;
    }

    async fn publish_to(&self, routing_key: &str, bodies: Vec<Vec<u8>>) -> Result<(), QueueError> {
        publish_on(
            &self.publish_ch,
            self.cfg.timeout,
            routing_key,
            bodies.into_iter().map(|b| (b, job_props())),
        )
        .await
    }
}

impl AmqpQueue {
    /// Takes every message of the dead-letter queue once: those `take` accepts go back to the
    /// work queue, the others back to the dead-letter queue with their headers. Returns how
    /// many went back to work.
    async fn walk_dead(
        &self,
        take: &mut (dyn FnMut(&DeadMessage) -> bool + Send),
    ) -> Result<u64, QueueError> {
        let ch = self
            .conn
            .create_channel()
            .await
            .map_err(berr("opening a channel"))?;
        let dq = dead_queue(&self.cfg.queue);
        let before = ch
            .queue_declare(
                dq.clone().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(berr("inspecting the dead-letter queue"))?
            .message_count() as u64;
        let mut moved = 0;
        for _ in 0..before {
            let Some(m) = ch
                .basic_get(dq.clone().into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(berr("reading the dead-letter queue"))?
            else {
                break;
            };
            let d = m.delivery;
            // Publish first (confirmed), then ack: a crash in between duplicates, never loses.
            let header = |k: &str| match d.properties.headers().as_ref()?.inner().get(k)? {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            };
            let m = DeadMessage {
                body: d.data.clone(),
                class: header(CLASS_HEADER),
                reason: header(REASON_HEADER),
            };
            if take(&m) {
                self.publish_to(&self.cfg.queue, vec![d.data.clone()])
                    .await?;
                moved += 1;
            } else {
                // back where it was, with its headers (the reason it died)
                publish_on(
                    &self.publish_ch,
                    self.cfg.timeout,
                    &dq,
                    [(d.data.clone(), d.properties.clone())],
                )
                .await?;
            }
            acked("ack", d.acker.ack(BasicAckOptions::default()).await)?;
        }
        let _ = ch.close(200, "done".into()).await;
        Ok(moved)
    }
}

fn job_props() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

/// Publishes persistent messages to a queue (default exchange) and waits for every confirm.
async fn publish_on(
    ch: &Channel,
    timeout: Duration,
    routing_key: &str,
    messages: impl IntoIterator<Item = (Vec<u8>, BasicProperties)>,
) -> Result<(), QueueError> {
    {
        const WINDOW: usize = 256;
        let mut pending = futures_util::stream::FuturesOrdered::new();
        let op = format!("publishing to {routing_key}");
        for (body, props) in messages {
            let confirm = tokio::time::timeout(
                timeout,
                ch.basic_publish(
                    "".into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &body,
                    props,
                ),
            )
            .await
            .map_err(|_| QueueError::Timeout {
                op: op.clone(),
                secs: timeout.as_secs(),
            })?
            .map_err(|e| QueueError::Lost(format!("{op}: {e}")))?;
            pending.push_back(async move { tokio::time::timeout(timeout, confirm).await });
            while pending.len() >= WINDOW {
                check_confirm(&op, timeout, pending.next().await)?;
            }
        }
        while !pending.is_empty() {
            check_confirm(&op, timeout, pending.next().await)?;
        }
        Ok(())
    }
}

fn check_confirm(
    op: &str,
    timeout: Duration,
    r: Option<Result<lapin::Result<Confirmation>, tokio::time::error::Elapsed>>,
) -> Result<(), QueueError> {
    match r {
        None => Ok(()),
        Some(Err(_)) => Err(QueueError::Timeout {
            op: op.to_string(),
            secs: timeout.as_secs(),
        }),
        Some(Ok(Err(e))) => Err(QueueError::Lost(format!("{op}: {e}"))),
        Some(Ok(Ok(Confirmation::Ack(None)))) | Some(Ok(Ok(Confirmation::NotRequested))) => Ok(()),
        Some(Ok(Ok(Confirmation::Ack(Some(_))))) => Err(QueueError::Nacked {
            op: op.to_string(),
            message: "the message was unroutable (does the queue exist?)".into(),
        }),
        Some(Ok(Ok(Confirmation::Nack(_)))) => Err(QueueError::Nacked {
            op: op.to_string(),
            message: "the broker nacked the message (queue full or broker overloaded)".into(),
        }),
    }
}

fn header_u64(v: &AMQPValue) -> Option<u64> {
    match v {
        AMQPValue::LongLongInt(i) => Some(*i as u64),
        AMQPValue::LongInt(i) => Some(*i as u64),
        AMQPValue::ShortInt(i) => Some(*i as u64),
        AMQPValue::LongUInt(i) => Some(*i as u64),
        AMQPValue::ShortUInt(i) => Some(*i as u64),
        AMQPValue::ShortShortInt(i) => Some(*i as u64),
        AMQPValue::ShortShortUInt(i) => Some(*i as u64),
        AMQPValue::Timestamp(i) => Some(*i),
        _ => None,
    }
}

struct AmqpAcker {
    acker: lapin::Acker,
    body: Vec<u8>,
    /// a confirming channel and the dead-letter queue, for dead-lettering with headers
    publish_ch: Channel,
    dead_queue: String,
    timeout: Duration,
}

fn acked(op: &str, r: lapin::Result<bool>) -> Result<(), QueueError> {
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(QueueError::Lost(format!(
            "{op}: the delivery's channel is gone; the broker will redeliver it"
        ))),
        Err(e) => Err(QueueError::Lost(format!("{op}: {e}"))),
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<(), QueueError> {
        acked("ack", self.acker.ack(BasicAckOptions::default()).await)
    }
    async fn requeue(&self) -> Result<(), QueueError> {
        acked(
            "nack",
            self.acker
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await,
        )
    }
    async fn dead_letter(&self, why: &DeadLetter) -> Result<(), QueueError> {
        // The broker's own dead-lettering cannot add headers: publish the copy with the
        // reason (confirmed) to the dead-letter queue, then ack. A crash in between leaves the
        // original to be redelivered: duplicated in the worst case, never lost.
        let mut h = FieldTable::default();
        h.insert(
            CLASS_HEADER.into(),
            AMQPValue::LongString(why.class.as_bytes().to_vec().into()),
        );
        let mut reason = why.reason.clone();
        if reason.len() > 4000 {
            let mut cut = 4000;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        h.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(reason.into_bytes().into()),
        );
        let props = job_props().with_headers(h);
        match publish_on(
            &self.publish_ch,
            self.timeout,
            &self.dead_queue,
            [(self.body.clone(), props)],
        )
        .await
        {
            Ok(()) => acked("ack", self.acker.ack(BasicAckOptions::default()).await),
            // cannot publish the copy: let the broker dead-letter it without the headers
            Err(e) => {
                tracing::warn!("dead-lettering without headers ({e})");
                acked(
                    "reject",
                    self.acker
                        .reject(BasicRejectOptions { requeue: false })
                        .await,
                )
            }
        }
    }
}

struct AmqpConsumer {
    inner: lapin::Consumer,
    _ch: Channel,
    publish_ch: Channel,
    dead_queue: String,
    timeout: Duration,
}

impl AmqpConsumer {
    fn to_delivery(&self, d: lapin::message::Delivery) -> Delivery {
        let previous = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").and_then(header_u64))
            .unwrap_or(if d.redelivered { 1 } else { 0 });
        Delivery {
            body: d.data.clone(),
            previous_deliveries: previous,
            acker: Box::new(AmqpAcker {
                acker: d.acker,
                body: d.data,
                publish_ch: self.publish_ch.clone(),
                dead_queue: self.dead_queue.clone(),
                timeout: self.timeout,
            }),
        }
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>, QueueError> {
        match self.inner.next().await {
            None => Err(QueueError::Lost(
                "the consumer was cancelled by the broker".into(),
            )),
            Some(Err(e)) => Err(QueueError::Lost(e.to_string())),
            Some(Ok(d)) => Ok(Some(self.to_delivery(d))),
        }
    }
}

#[async_trait]
impl JobQueue for AmqpQueue {
    async fn publish(&self, bodies: Vec<Vec<u8>>) -> Result<(), QueueError> {
        self.publish_to(&self.cfg.queue, bodies).await
    }

    async fn consume(&self, prefetch: u16) -> Result<Box<dyn Consumer>, QueueError> {
        let ch = self
            .conn
            .create_channel()
            .await
            .map_err(|e| QueueError::Lost(format!("opening a consumer channel: {e}")))?;
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(berr("setting prefetch"))?;
        let tag = format!("{}-{:08x}", self.cfg.connection_name, rand::random::<u32>());
        let inner = ch
            .basic_consume(
                self.cfg.queue.clone().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(berr("starting the consumer"))?;
        Ok(Box::new(AmqpConsumer {
            inner,
            _ch: ch,
            publish_ch: self.publish_ch.clone(),
            dead_queue: dead_queue(&self.cfg.queue),
            timeout: self.cfg.timeout,
        }))
    }

    async fn requeue_dead(&self, select: &Selector<'_>) -> Result<u64, QueueError> {
        self.walk_dead(&mut |m| select(m)).await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadMessage>, QueueError> {
        let mut out = vec![];
        self.walk_dead(&mut |m| {
            out.push(m.clone());
            false
        })
        .await?;
        Ok(out)
    }

    async fn depth(&self) -> Result<Depth, QueueError> {
        // Passive declares on a throwaway channel: a failing declare closes its channel.
        let ch = self
            .conn
            .create_channel()
            .await
            .map_err(berr("opening a channel"))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = ch
            .queue_declare(
                self.cfg.queue.clone().into(),
                passive,
                FieldTable::default(),
            )
            .await
            .map_err(berr("inspecting the work queue"))?;
        let d = ch
            .queue_declare(
                dead_queue(&self.cfg.queue).into(),
                passive,
                FieldTable::default(),
            )
            .await
            .map_err(berr("inspecting the dead-letter queue"))?;
        let _ = ch.close(200, "done".into()).await;
        Ok(Depth {
            ready: q.message_count() as u64,
            consumers: q.consumer_count() as u64,
            dead: d.message_count() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://bob:s3cret@rabbit:5672/%2f"),
            "amqp://bob:****@rabbit:5672/%2f"
        );
        assert_eq!(redact_url("amqp://rabbit:5672"), "amqp://rabbit:5672");
        // without "//" (accepted by URL parsers): still redacted
        assert_eq!(
            redact_url("amqp:bob:s3cret@rabbit:5672"),
            "amqp://bob:****@rabbit:5672"
        );
        assert_eq!(redact_url("bob:s3cret@rabbit"), "****@rabbit");
        assert_eq!(
            scrub(
                "invalid URL amqp:bob:s3cret@rabbit",
                "amqp:bob:s3cret@rabbit"
            ),
            "invalid URL amqp:bob:****@rabbit"
        );
        assert_eq!(url_password("amqp://rabbit"), None);
    }
}
