//! In-process queue for embedded mode (`defectforge run`): the same ack/requeue/dead-letter
//! semantics as the AMQP queue, including a delivery limit, without a broker.

use super::{
    Acker, Consumer, DeadLetter, DeadMessage, Delivery, Depth, JobQueue, QueueError, Selector,
};
use async_trait::async_trait;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

#[derive(Default)]
struct State {
    ready: VecDeque<(Vec<u8>, u64)>,
    in_flight: usize,
    dead: Vec<Vec<u8>>,
    /// why each dead message was dead-lettered (None: by the delivery limit)
    dead_why: Vec<Option<DeadLetter>>,
    closed: bool,
}

/// A queue in memory. After `close_when_drained`, consumers get `None` once nothing is ready and
/// nothing is in flight.
#[derive(Clone)]
pub struct InProcQueue {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
    delivery_limit: u64,
}

impl InProcQueue {
    pub fn new(delivery_limit: u64) -> Self {
        Self {
            state: Default::default(),
            notify: Arc::new(Notify::new()),
            delivery_limit,
        }
    }

    pub fn close_when_drained(&self) {
        self.state.lock().expect("queue").closed = true;
        self.notify.notify_waiters();
    }

    /// Bodies currently dead-lettered.
    pub fn dead(&self) -> Vec<Vec<u8>> {
        self.state.lock().expect("queue").dead.clone()
    }

    /// Why each dead-lettered body was dead-lettered (None: the delivery limit).
    pub fn dead_reasons(&self) -> Vec<Option<DeadLetter>> {
        self.state.lock().expect("queue").dead_why.clone()
    }
}

struct InProcAcker {
    q: InProcQueue,
    body: Vec<u8>,
    deliveries: u64,
    done: Mutex<bool>,
}

impl InProcAcker {
    fn finish(&self, f: impl FnOnce(&mut State)) {
        let mut done = self.done.lock().expect("acker");
        if *done {
            return;
        }
        *done = true;
        let mut s = self.q.state.lock().expect("queue");
        s.in_flight -= 1;
        f(&mut s);
        drop(s);
        self.q.notify.notify_waiters();
    }
}

impl Drop for InProcAcker {
    fn drop(&mut self) {
        // An unacked delivery whose handler vanished goes back, like a closed AMQP channel.
        let body = std::mem::take(&mut self.body);
        let n = self.deliveries;
        self.finish(|s| s.ready.push_back((body, n)));
    }
}

#[async_trait]
impl Acker for InProcAcker {
    async fn ack(&self) -> Result<(), QueueError> {
        self.finish(|_| {});
        Ok(())
    }
    async fn requeue(&self) -> Result<(), QueueError> {
        let body = self.body.clone();
        let n = self.deliveries;
        let limit = self.q.delivery_limit;
        self.finish(|s| {
            if n >= limit {
                s.dead.push(body);
                s.dead_why.push(None);
            } else {
                s.ready.push_back((body, n))
            }
        });
        Ok(())
    }
    async fn dead_letter(&self, why: &DeadLetter) -> Result<(), QueueError> {
        let body = self.body.clone();
        let why = why.clone();
        self.finish(|s| {
            s.dead.push(body);
            s.dead_why.push(Some(why));
        });
        Ok(())
    }
}

struct InProcConsumer {
    q: InProcQueue,
}

#[async_trait]
impl Consumer for InProcConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>, QueueError> {
        loop {
            let notified = self.q.notify.notified();
            {
                let mut s = self.q.state.lock().expect("queue");
                if let Some((body, n)) = s.ready.pop_front() {
                    s.in_flight += 1;
                    return Ok(Some(Delivery {
                        body: body.clone(),
                        previous_deliveries: n,
                        acker: Box::new(InProcAcker {
                            q: self.q.clone(),
                            body,
                            deliveries: n + 1,
                            done: Mutex::new(false),
                        }),
                    }));
                }
                if s.closed && s.in_flight == 0 {
                    return Ok(None);
                }
            }
            notified.await;
        }
    }
}

#[async_trait]
impl JobQueue for InProcQueue {
    async fn publish(&self, bodies: Vec<Vec<u8>>) -> Result<(), QueueError> {
        let mut s = self.state.lock().expect("queue");
        s.ready.extend(bodies.into_iter().map(|b| (b, 0)));
        drop(s);
        self.notify.notify_waiters();
        Ok(())
    }
    async fn consume(&self, _prefetch: u16) -> Result<Box<dyn Consumer>, QueueError> {
        Ok(Box::new(InProcConsumer { q: self.clone() }))
    }
    async fn requeue_dead(&self, select: &Selector<'_>) -> Result<u64, QueueError> {
        let mut s = self.state.lock().expect("queue");
        let dead = std::mem::take(&mut s.dead);
        let why = std::mem::take(&mut s.dead_why);
        let mut n = 0;
        for (b, w) in dead.into_iter().zip(why) {
            let m = DeadMessage {
                body: b.clone(),
                class: w.as_ref().map(|w| w.class.to_string()),
                reason: w.as_ref().map(|w| w.reason.clone()),
            };
            if select(&m) {
                s.ready.push_back((b, 0));
                n += 1;
            } else {
                s.dead.push(b);
                s.dead_why.push(w);
            }
        }
        drop(s);
        self.notify.notify_waiters();
        Ok(n)
    }
    async fn dead_letters(&self) -> Result<Vec<DeadMessage>, QueueError> {
        let s = self.state.lock().expect("queue");
        Ok(s.dead
            .iter()
            .zip(&s.dead_why)
            .map(|(b, w)| DeadMessage {
                body: b.clone(),
                class: w.as_ref().map(|w| w.class.to_string()),
                reason: w.as_ref().map(|w| w.reason.clone()),
            })
            .collect())
    }
    async fn depth(&self) -> Result<Depth, QueueError> {
        let s = self.state.lock().expect("queue");
        Ok(Depth {
            ready: s.ready.len() as u64,
            consumers: 0,
            dead: s.dead.len() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requeue_limit_dead_letters_and_drains() {
        let q = InProcQueue::new(2);
        q.publish(vec![b"a".to_vec(), b"b".to_vec()]).await.unwrap();
        let mut c = q.consume(1).await.unwrap();
        let d = c.next().await.unwrap().unwrap();
        assert_eq!(d.body, b"a");
        d.acker.ack().await.unwrap();
        let d = c.next().await.unwrap().unwrap();
        assert_eq!((d.body.as_slice(), d.previous_deliveries), (&b"b"[..], 0));
        d.acker.requeue().await.unwrap();
        let d = c.next().await.unwrap().unwrap();
        assert_eq!(d.previous_deliveries, 1);
        d.acker.requeue().await.unwrap(); // second delivery hits the limit of 2
        assert_eq!(q.depth().await.unwrap().dead, 1);
        q.close_when_drained();
        assert!(c.next().await.unwrap().is_none());
        assert_eq!(q.requeue_dead(&|m| m.body == b"b").await.unwrap(), 1);
        let d = c.next().await.unwrap().unwrap();
        drop(d); // dropped without an answer: back to ready
        let d = c.next().await.unwrap().unwrap();
        let why = DeadLetter {
            class: "permanent",
            reason: "bad input".into(),
        };
        d.acker.dead_letter(&why).await.unwrap();
        assert!(c.next().await.unwrap().is_none());
        assert_eq!(q.dead_reasons(), vec![Some(why)]);
    }
}
