//! Pub/sub across server processes: the [`Backplane`] seam, and (feature `redis`) its
//! Redis implementation.
//!
//! A server with a backplane tells it when the process gains its first local subscriber
//! of a topic and loses its last ([`Backplane::subscribe`] / [`Backplane::unsubscribe`]),
//! and hands it every message published on this process ([`Backplane::publish`]); the
//! local subscribers get the message at once, without waiting for the round trip. What
//! the backplane receives from other processes it passes to [`Inbound::deliver`], which
//! reaches this process's subscribers only (it is never sent on again), encoded once.
//!
//! Every method is called from the event loops and must not block: a backplane queues
//! work for IO threads of its own. Delivery across processes is at-most-once: what the
//! backplane cannot send (its engine unreachable, its queue full) it drops and counts.

use std::sync::Arc;

use super::pubsub::PubSub;
use crate::protocol::driver::MessageType;
use crate::protocol::error::Error;

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
pub use self::redis::RedisBackplane;

/// Carries published messages between server processes (see the module documentation).
pub trait Backplane: Send + Sync + 'static {
    /// Starts the backplane's IO; messages from other processes go to `inbound`. Called
    /// once, when the server starts.
    fn start(&self, inbound: Inbound);
    /// This process now has a local subscriber of `topic` (the first one joined).
    fn subscribe(&self, topic: &[u8]);
    /// This process's last local subscriber of `topic` left.
    fn unsubscribe(&self, topic: &[u8]);
    /// A message published on this process, for the others. Must not block.
    fn publish(&self, topic: &[u8], data: &[u8], kind: MessageType);
    /// The backplane's counters.
    fn stats(&self) -> BackplaneStats {
        BackplaneStats::default()
    }
    /// The server is shutting down: stop the IO. Called once every loop has ended;
    /// the server's `shutdown` returns after it, so it may wait (briefly) for the
    /// backplane's threads to end.
    fn stop(&self) {}
}

/// What a backplane has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackplaneStats {
    /// Messages sent to the other processes.
    pub sent: u64,
    /// Messages received from the other processes.
    pub received: u64,
    /// Messages for the other processes that were dropped (engine unreachable or
    /// refusing them, queue full).
    pub dropped: u64,
    /// Times the backplane reconnected after losing its engine, counted per connection:
    /// the Redis backplane's publisher and subscriber each count their own, so one outage
    /// counts up to 2 (the publisher reconnects only when it has something to send).
    pub reconnects: u64,
}

/// Where a backplane delivers messages from other processes: this process's subscribers.
#[derive(Clone)]
pub struct Inbound {
    pub(crate) pubsub: Arc<PubSub>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").finish_non_exhaustive()
    }
}

impl Inbound {
    /// Delivers a message from another process to this process's subscribers of `topic`
    /// (encoded once; not sent to the backplane again). Returns whether any local
    /// subscriber exists.
    pub fn deliver(&self, topic: &[u8], data: &[u8], kind: MessageType) -> Result<bool, Error> {
        self.pubsub.publish_local(topic, data, kind)
    }
}
