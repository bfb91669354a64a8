//! The Redis backplane: one Redis pub/sub channel per topic (`prefix` + topic bytes).
//!
//! Two IO threads of its own, so no event loop ever waits on Redis:
//! - the **publisher** drains a bounded queue and sends everything queued as one pipeline
//!   of `PUBLISH` commands (one round trip per burst); when Redis is unreachable it drops
//!   what is queued (counted) and retries the connection with backoff;
//! - the **subscriber** holds a `SUBSCRIBE` connection to the channels this process has
//!   local subscribers for, plus a control channel of its own. When that set changes, the
//!   publisher publishes to the control channel, which wakes the subscriber (blocked
//!   reading) to subscribe or unsubscribe; after losing Redis it reconnects with backoff
//!   and subscribes to the whole set again.
//!
//! A message on the wire is `[1, kind, node id (8 bytes LE), data…]`: the kind keeps text
//! and binary apart, the node id lets a process skip its own messages (it delivered them
//! locally already).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::{Client, Connection, RedisResult};

use super::{Backplane, BackplaneStats, Inbound};
use crate::protocol::driver::MessageType;

/// Messages queued for Redis before new ones are dropped.
const DEFAULT_QUEUE_LIMIT: usize = 64 * 1024;
/// Most `PUBLISH` commands in one pipeline.
const MAX_BATCH: usize = 1024;
const FORMAT: u8 = 1;
const HEADER: usize = 10;
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a `PUBLISH` pipeline may take before the connection counts as lost.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Pub/sub across processes through Redis (feature `redis`); see the module
/// documentation of [`Backplane`] for the semantics.
///
/// ```no_run
/// # use websocket_driver::server::{RedisBackplane, Server, Upgrade, Handler};
/// # struct H; impl Handler for H {}
/// let backplane = RedisBackplane::connect("redis://127.0.0.1:6379/")?.prefix("chat:");
/// Server::bind("127.0.0.1:9002")?
///     .backplane(backplane)
///     .serve(|_| Upgrade::Accept(H))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct RedisBackplane {
    client: Client,
    prefix: Vec<u8>,
    queue_limit: usize,
    shared: Arc<Shared>,
    queue: Mutex<Option<SyncSender<Out>>>,
}

impl std::fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("redis", &self.client.get_connection_info().addr())
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .field("node", &self.shared.node)
            .finish()
    }
}

/// What the threads and the loops share.
struct Shared {
    node: u64,
    /// Channels this process has local subscribers for.
    wanted: Mutex<HashSet<Vec<u8>>>,
    /// `wanted` changed since the subscriber last looked.
    changed: AtomicBool,
    stop: AtomicBool,
    sent: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    reconnects: AtomicU64,
}

enum Out {
    Publish {
        channel: Vec<u8>,
        payload: Vec<u8>,
    },
    /// `wanted` changed: wake the subscriber.
    Wake,
    Stop,
}

impl RedisBackplane {
    /// Checks the URL (`redis://host:port/` or `redis://host:port/db`) and that Redis
    /// answers; the connections the backplane uses are opened when the server starts.
    pub fn connect(url: &str) -> RedisResult<RedisBackplane> {
        let client = Client::open(url)?;
        let mut probe = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        redis::cmd("PING").exec(&mut probe)?;
        RedisBackplane::with_client(client)
    }

    /// The backplane for `client`, without touching Redis yet.
    fn with_client(client: Client) -> RedisResult<RedisBackplane> {
        let mut node = [0u8; 8];
        getrandom::fill(&mut node).map_err(|e| {
            redis::RedisError::from(std::io::Error::other(format!("no randomness: {e}")))
        })?;
        Ok(RedisBackplane {
            client,
            prefix: b"wsd:".to_vec(),
            queue_limit: DEFAULT_QUEUE_LIMIT,
            shared: Arc::new(Shared {
                node: u64::from_le_bytes(node),
                wanted: Mutex::default(),
                changed: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                sent: AtomicU64::new(0),
                received: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                reconnects: AtomicU64::new(0),
            }),
            queue: Mutex::new(None),
        })
    }

    /// The prefix of every channel name (default `wsd:`): processes that share a prefix
    /// share topics.
    pub fn prefix(mut self, prefix: impl Into<Vec<u8>>) -> RedisBackplane {
        self.prefix = prefix.into();
        self
    }

    /// Messages queued for Redis before new ones are dropped and counted in
    /// [`BackplaneStats::dropped`] (default 65 536; 0 counts as 1).
    pub fn queue_limit(mut self, limit: usize) -> RedisBackplane {
        self.queue_limit = limit.max(1);
        self
    }

    fn channel(&self, topic: &[u8]) -> Vec<u8> {
        let mut channel = Vec::with_capacity(self.prefix.len() + topic.len());
        channel.extend_from_slice(&self.prefix);
        channel.extend_from_slice(topic);
        channel
    }

    /// The private channel that wakes this process's subscriber thread.
    fn control(&self) -> Vec<u8> {
        let mut channel = self.prefix.clone();
        channel.extend_from_slice(format!("\0control:{:016x}", self.shared.node).as_bytes());
        channel
    }

    /// Opens the bounded queue the loops fill and the publisher thread drains.
    fn open_queue(&self) -> Receiver<Out> {
        let (tx, rx) = sync_channel(self.queue_limit);
        *self.queue.lock().expect("backplane queue lock") = Some(tx);
        rx
    }

    fn enqueue(&self, out: Out) -> bool {
        let queue = self.queue.lock().expect("backplane queue lock");
        match queue.as_ref().map(|q| q.try_send(out)) {
            Some(Ok(())) => true,
            Some(Err(TrySendError::Full(_) | TrySendError::Disconnected(_))) | None => false,
        }
    }

    fn changed(&self) {
        self.shared.changed.store(true, Ordering::Release);
        // A full queue means the publisher is busy: it looks at `changed` after the batch.
        self.enqueue(Out::Wake);
    }
}

impl Backplane for RedisBackplane {
    fn start(&self, inbound: Inbound) {
        let rx = self.open_queue();
        let publisher = Publisher {
            client: self.client.clone(),
            shared: self.shared.clone(),
            control: self.control(),
            con: None,
            retry_at: None,
            backoff: BACKOFF_FIRST,
        };
        let subscriber = Subscriber {
            client: self.client.clone(),
            shared: self.shared.clone(),
            control: self.control(),
            prefix: self.prefix.clone(),
            inbound,
        };
        // If a thread cannot be spawned the backplane stays silent (publishes are counted
        // as dropped); the server itself runs on.
        let spawned = std::thread::Builder::new()
            .name("wsd-redis-pub".into())
            .spawn(move || publisher.run(rx))
            .and_then(|_| {
                std::thread::Builder::new()
                    .name("wsd-redis-sub".into())
                    .spawn(move || subscriber.run())
            });
        if let Err(e) = spawned {
            log::error!("websocket-driver: the Redis backplane cannot start a thread: {e}");
        }
    }

    fn subscribe(&self, topic: &[u8]) {
        let channel = self.channel(topic);
        self.shared
            .wanted
            .lock()
            .expect("backplane lock")
            .insert(channel);
        self.changed();
    }

    fn unsubscribe(&self, topic: &[u8]) {
        let channel = self.channel(topic);
        self.shared
            .wanted
            .lock()
            .expect("backplane lock")
            .remove(&channel);
        self.changed();
    }

    fn publish(&self, topic: &[u8], data: &[u8], kind: MessageType) {
        let mut payload = Vec::with_capacity(HEADER + data.len());
        payload.push(FORMAT);
        payload.push(match kind {
            MessageType::Text => 1,
            _ => 2,
        });
        payload.extend_from_slice(&self.shared.node.to_le_bytes());
        payload.extend_from_slice(data);
        let out = Out::Publish {
            channel: self.channel(topic),
            payload,
        };
        if !self.enqueue(out) {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn stats(&self) -> BackplaneStats {
        BackplaneStats {
            sent: self.shared.sent.load(Ordering::Relaxed),
            received: self.shared.received.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            reconnects: self.shared.reconnects.load(Ordering::Relaxed),
        }
    }

    fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        // The publisher wakes the subscriber on its way out (if the queue is full, it
        // sees `stop` after the batch).
        self.enqueue(Out::Stop);
        *self.queue.lock().expect("backplane queue lock") = None;
    }
}

impl Drop for RedisBackplane {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Publisher {
    client: Client,
    shared: Arc<Shared>,
    control: Vec<u8>,
    con: Option<Connection>,
    /// While Redis is unreachable: when to try again (until then, drop and count).
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Publisher {
    fn run(mut self, rx: Receiver<Out>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let first = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(out) => out,
                Err(RecvTimeoutError::Timeout) => {
                    if self.shared.stop.load(Ordering::Acquire) {
                        return;
                    }
                    // A wake-up for the subscriber thread that failed (Redis cut this
                    // connection) goes again once the backoff allows, not only with the
                    // next publish: a node that only listens would otherwise never join
                    // a new topic's channel.
                    if self.shared.changed.load(Ordering::Acquire)
                        && self.retry_at.is_none_or(|t| Instant::now() >= t)
                    {
                        self.send(&mut batch);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.wake_subscriber();
                    return;
                }
            };
            let mut stop = false;
            for out in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match out {
                    Out::Publish { channel, payload } => batch.push((channel, payload)),
                    Out::Wake => {}
                    Out::Stop => stop = true,
                }
                if batch.len() == MAX_BATCH {
                    self.send(&mut batch);
                }
            }
            self.send(&mut batch);
            if stop || self.shared.stop.load(Ordering::Acquire) {
                self.wake_subscriber();
                return;
            }
        }
    }

    /// Publishes `batch` as one pipeline (with a wake-up for the subscriber if the set of
    /// channels changed), or drops it if Redis is unreachable.
    fn send(&mut self, batch: &mut Vec<(Vec<u8>, Vec<u8>)>) {
        let wake = self.shared.changed.swap(false, Ordering::AcqRel);
        if batch.is_empty() && !wake {
            return;
        }
        let mut pipe = redis::pipe();
        for (channel, payload) in batch.iter() {
            pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
        }
        if wake {
            pipe.cmd("PUBLISH").arg(&self.control).arg(b"").ignore();
        }
        let result = match self.connection() {
            Some(con) => pipe.exec(con),
            None => Err(redis::RedisError::from(std::io::Error::other(
                "Redis unreachable",
            ))),
        };
        match result {
            Ok(()) => {
                self.shared
                    .sent
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                if self.con.take().is_some() {
                    log::warn!("websocket-driver: Redis backplane lost its connection: {e}");
                    self.retry_at = Some(Instant::now() + self.backoff);
                }
                self.shared
                    .dropped
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if wake {
                    // Try again with the next batch.
                    self.shared.changed.store(true, Ordering::Release);
                }
            }
        }
        batch.clear();
    }

    /// The connection, reconnecting if the backoff allows.
    fn connection(&mut self) -> Option<&mut Connection> {
        if self.con.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return None;
            }
            match open(&self.client) {
                Ok(con) => {
                    if self.retry_at.take().is_some() {
                        self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                        log::info!("websocket-driver: Redis backplane reconnected");
                    }
                    self.backoff = BACKOFF_FIRST;
                    self.con = Some(con);
                }
                Err(_) => {
                    self.retry_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    return None;
                }
            }
        }
        self.con.as_mut()
    }

    fn wake_subscriber(&mut self) {
        let control = self.control.clone();
        if let Some(con) = self.connection() {
            let _ = redis::cmd("PUBLISH").arg(control).arg(b"").exec(con);
        }
    }
}

fn open(client: &Client) -> RedisResult<Connection> {
    let con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(con)
}

struct Subscriber {
    client: Client,
    shared: Arc<Shared>,
    control: Vec<u8>,
    prefix: Vec<u8>,
    inbound: Inbound,
}

impl Subscriber {
    fn run(self) {
        let mut backoff = BACKOFF_FIRST;
        let mut lost = false;
        while !self.shared.stop.load(Ordering::Acquire) {
            let result = self.client.get_connection_with_timeout(CONNECT_TIMEOUT);
            let mut con = match result {
                Ok(con) => con,
                Err(_) => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            if lost {
                self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            backoff = BACKOFF_FIRST;
            if let Err(e) = self.listen(&mut con) {
                if !self.shared.stop.load(Ordering::Acquire) {
                    log::warn!("websocket-driver: Redis backplane subscriber lost Redis: {e}");
                }
                lost = true;
            }
        }
    }

    /// Subscribes to what is wanted and delivers messages until the connection fails or
    /// the backplane stops.
    fn listen(&self, con: &mut Connection) -> RedisResult<()> {
        // Blocking reads: the control channel wakes this thread when there is work.
        con.set_read_timeout(None)?;
        let mut pubsub = con.as_pubsub();
        pubsub.subscribe(&self.control)?;
        let mut active: HashSet<Vec<u8>> = HashSet::new();
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let wanted = self.shared.wanted.lock().expect("backplane lock").clone();
            let join: Vec<&Vec<u8>> = wanted.difference(&active).collect();
            if !join.is_empty() {
                pubsub.subscribe(&join)?;
            }
            let leave: Vec<&Vec<u8>> = active.difference(&wanted).collect();
            if !leave.is_empty() {
                pubsub.unsubscribe(&leave)?;
            }
            active = wanted;
            let message = pubsub.get_message()?;
            let channel: Vec<u8> = message.get_channel()?;
            if channel == self.control {
                continue;
            }
            self.deliver(&channel, message.get_payload_bytes());
        }
    }

    fn deliver(&self, channel: &[u8], payload: &[u8]) {
        let Some(topic) = channel.strip_prefix(&self.prefix[..]) else {
            return;
        };
        if payload.len() < HEADER || payload[0] != FORMAT {
            log::warn!("websocket-driver: Redis backplane ignored a message it cannot read");
            return;
        }
        let node = u64::from_le_bytes(payload[2..HEADER].try_into().expect("8 bytes"));
        if node == self.shared.node {
            // Delivered locally when it was published.
            return;
        }
        let kind = match payload[1] {
            1 => MessageType::Text,
            _ => MessageType::Binary,
        };
        self.shared.received.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.inbound.deliver(topic, &payload[HEADER..], kind) {
            log::warn!("websocket-driver: Redis backplane message refused: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backplane whose publisher thread never runs, so nothing drains its queue.
    fn undrained(limit: Option<usize>) -> (RedisBackplane, Receiver<Out>) {
        // Nothing listens on port 1: `Client::open` only parses the URL.
        let client = Client::open("redis://127.0.0.1:1/").expect("a valid URL");
        let mut backplane = RedisBackplane::with_client(client).expect("a backplane");
        if let Some(limit) = limit {
            backplane = backplane.queue_limit(limit);
        }
        let rx = backplane.open_queue();
        (backplane, rx)
    }

    fn queued(rx: &Receiver<Out>) -> Vec<u8> {
        rx.try_iter()
            .map(|out| match out {
                Out::Publish { payload, .. } => payload[HEADER],
                Out::Wake => b'w',
                Out::Stop => b's',
            })
            .collect()
    }

    #[test]
    fn the_queue_holds_the_default_limit_and_drops_the_next_publish() {
        let (backplane, rx) = undrained(None);
        assert_eq!(backplane.queue_limit, 65_536);
        for _ in 0..DEFAULT_QUEUE_LIMIT {
            backplane.publish(b"room", b"x", MessageType::Text);
        }
        assert_eq!(backplane.stats().dropped, 0);
        backplane.publish(b"room", b"y", MessageType::Text);
        assert_eq!(backplane.stats().dropped, 1);
        let queued = queued(&rx);
        assert_eq!(queued.len(), DEFAULT_QUEUE_LIMIT);
        assert!(queued.iter().all(|&b| b == b'x'));
    }

    #[test]
    fn the_queue_holds_the_set_limit_and_drops_the_next_publish() {
        let (backplane, rx) = undrained(Some(3));
        for data in [b"1", b"2", b"3"] {
            backplane.publish(b"room", data, MessageType::Binary);
        }
        assert_eq!(backplane.stats().dropped, 0, "at the limit");
        backplane.publish(b"room", b"4", MessageType::Binary);
        assert_eq!(backplane.stats().dropped, 1, "at the limit + 1");
        assert_eq!(queued(&rx), b"123", "the queued ones are kept, in order");
        // Drained, the queue takes publishes again.
        backplane.publish(b"room", b"5", MessageType::Binary);
        assert_eq!(backplane.stats().dropped, 1);
        assert_eq!(queued(&rx), b"5");
    }

    #[test]
    fn a_limit_of_zero_means_one() {
        let (backplane, rx) = undrained(Some(0));
        backplane.publish(b"room", b"1", MessageType::Text);
        backplane.publish(b"room", b"2", MessageType::Text);
        assert_eq!(backplane.stats().dropped, 1);
        assert_eq!(queued(&rx), b"1");
    }

    #[test]
    fn after_stop_every_publish_is_dropped() {
        let (backplane, rx) = undrained(Some(8));
        backplane.stop();
        assert_eq!(queued(&rx), b"s");
        backplane.publish(b"room", b"1", MessageType::Text);
        assert_eq!(backplane.stats().dropped, 1);
    }
}
