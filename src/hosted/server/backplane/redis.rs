//! The Redis backplane: one Redis pub/sub channel per topic (`prefix` + topic bytes).
//!
//! Two IO threads of its own, so no event loop ever waits on Redis:
//! - the **publisher** drains a bounded queue and sends everything queued as pipelines of
//!   `PUBLISH` commands (one round trip per burst, at most 1 024 messages or 1 MiB each).
//!   When Redis is unreachable it drops what is queued (counted) and retries the
//!   connection with backoff; a `PUBLISH` that Redis refuses (an error reply) costs that
//!   message only. A connection left idle for over a second is checked with a `PING`
//!   before a batch goes on it, so one Redis closed meanwhile does not cost the batch;
//! - the **subscriber** holds a `SUBSCRIBE` connection to the channels this process has
//!   local subscribers for, plus a control channel of its own. It reads with a short
//!   timeout, so it notices a changed set of channels and `stop` by itself; when that set
//!   changes the publisher also publishes to the control channel, which wakes it at once.
//!   A connection silent for a while gets a `PING`, and one that does not answer counts as
//!   lost: the subscriber reconnects with backoff and subscribes to the whole set again.
//!   A `SUBSCRIBE` that Redis refuses (an ACL) is tried again with backoff.
//!
//! A message on the wire is `[1, kind, node id (8 bytes LE), data…]`: the kind keeps text
//! and binary apart, the node id lets a process skip its own messages (it delivered them
//! locally already).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::{
    Client, Connection, ConnectionLike, ErrorKind, IntoConnectionInfo, Msg, ProtocolVersion,
    RedisError, RedisResult, Value,
};

use super::{Backplane, BackplaneStats, Inbound};
use crate::protocol::driver::MessageType;

/// Messages queued for Redis before new ones are dropped.
const DEFAULT_QUEUE_LIMIT: usize = 64 * 1024;
/// Most `PUBLISH` commands in one pipeline.
const MAX_BATCH: usize = 1024;
/// Most bytes (channel names and payloads) in one pipeline, unless its one message is
/// larger: a burst of large messages goes as several round trips rather than one that
/// Redis must read whole before it answers.
const MAX_BATCH_BYTES: usize = 1 << 20;
const FORMAT: u8 = 1;
const HEADER: usize = 10;
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a reply (to a `PUBLISH` pipeline, a `SUBSCRIBE`, a `PING`) may take before
/// the connection counts as lost.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// A publishing connection unused for longer is checked with a `PING` before the next
/// batch: Redis (`timeout`) or a load balancer may have closed it meanwhile.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// How long the subscriber waits for a message before it looks at `stop`, the set of
/// channels and the keepalive again.
const POLL: Duration = Duration::from_millis(250);
/// Silence on the subscriber's connection after which it sends a `PING`: a half-open
/// connection (the host lost power, a NAT dropped the flow) never reports an error.
const KEEPALIVE: Duration = Duration::from_secs(2);
/// A subscriber connection that lasted this long worked: the backoff starts over after it.
const STABLE: Duration = Duration::from_secs(5);
/// How long [`Backplane::stop`] waits for the IO threads to end. They see the stop within
/// [`POLL`] or their current IO's timeout (a pipeline's reply: [`IO_TIMEOUT`]); one still
/// running then is left to end by itself.
const STOP_WAIT: Duration = Duration::from_secs(1);

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
    queue: Mutex<Option<Sender<Out>>>,
    /// The publisher's and the subscriber's threads, until `stop` has joined them.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("redis", &self.client.get_connection_info().addr())
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .field("node", &self.shared.node.load(Ordering::Relaxed))
            .finish()
    }
}

/// What the threads and the loops share.
struct Shared {
    /// This process's id on the wire; 0 until `start` draws it (a program that builds the
    /// backplane and then forks workers gives each its own).
    node: AtomicU64,
    wanted: Mutex<Wanted>,
    /// `wanted` changed since the subscriber last looked.
    changed: AtomicBool,
    /// An `Out::Wake` is queued and the publisher has not taken it yet: another would add
    /// nothing.
    wake_queued: AtomicBool,
    /// Publishes queued and not yet taken by the publisher.
    queued: AtomicUsize,
    stop: AtomicBool,
    sent: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    reconnects: AtomicU64,
}

/// The channels this process has local subscribers for.
#[derive(Default)]
struct Wanted {
    channels: HashSet<Vec<u8>>,
    /// Channels joined or left since the subscriber last looked: it updates those alone,
    /// without going through the whole set.
    dirty: HashSet<Vec<u8>>,
}

impl Shared {
    /// The publisher took `out` off the queue.
    fn taken(&self, out: &Out) {
        match out {
            Out::Publish { .. } => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
            }
            Out::Wake => self.wake_queued.store(false, Ordering::Release),
            Out::Stop => {}
        }
    }
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
    /// answers (within a few seconds); the connections the backplane uses are opened when
    /// the server starts. The database number does not matter: Redis pub/sub ignores it,
    /// so deployments that share a Redis are kept apart by [`prefix`](Self::prefix)
    /// alone. The backplane speaks RESP2 whatever the URL's `protocol` says.
    pub fn connect(url: &str) -> RedisResult<RedisBackplane> {
        let info = url.into_connection_info()?;
        // The subscriber reads confirmations and messages as RESP2 arrays; RESP3 would
        // turn them into push frames.
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP2);
        let client = Client::open(info.set_redis_settings(settings))?;
        let mut probe = open(&client)?;
        probe.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        redis::cmd("PING").exec(&mut probe)?;
        Ok(RedisBackplane::with_client(client))
    }

    /// The backplane for `client`, without touching Redis yet.
    fn with_client(client: Client) -> RedisBackplane {
        RedisBackplane {
            client,
            prefix: b"wsd:".to_vec(),
            queue_limit: DEFAULT_QUEUE_LIMIT,
            shared: Arc::new(Shared {
                node: AtomicU64::new(0),
                wanted: Mutex::default(),
                changed: AtomicBool::new(false),
                wake_queued: AtomicBool::new(false),
                queued: AtomicUsize::new(0),
                stop: AtomicBool::new(false),
                sent: AtomicU64::new(0),
                received: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                reconnects: AtomicU64::new(0),
            }),
            queue: Mutex::new(None),
            threads: Mutex::default(),
        }
    }

    /// Whether the backplane's IO threads have all ended (after the server's shutdown,
    /// which waits for them up to a second; true also before it started).
    pub fn is_stopped(&self) -> bool {
        let threads = self.threads.lock().expect("backplane threads lock");
        threads.iter().all(|t| t.is_finished())
    }

    /// Joins the IO threads that end within `limit`; the others are left running (they
    /// end by themselves, see [`STOP_WAIT`]). Not from one of those threads: a thread that
    /// holds the last reference to the server drops the backplane there.
    fn join_threads(&self, limit: Duration) {
        let mut threads = self.threads.lock().expect("backplane threads lock");
        let me = std::thread::current().id();
        if threads.iter().any(|t| t.thread().id() == me) {
            return;
        }
        let end = Instant::now() + limit;
        while !threads.iter().all(|t| t.is_finished()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(2));
        }
        for t in std::mem::take(&mut *threads) {
            if t.is_finished() {
                // A panic there was logged by the thread itself; nothing more to do.
                let _ = t.join();
            } else {
                log::debug!(
                    "websocket-driver: Redis backplane thread {:?} still in its IO at stop",
                    t.thread().name()
                );
                threads.push(t);
            }
        }
    }

    /// The prefix of every channel name (default `wsd:`): processes that share a prefix
    /// (and a Redis) share topics, whatever database their URLs name. End it with a
    /// delimiter no topic begins with: prefix `a` with topic `bx` is the same channel as
    /// prefix `ab` with topic `x`.
    pub fn prefix(mut self, prefix: impl Into<Vec<u8>>) -> RedisBackplane {
        self.prefix = prefix.into();
        self
    }

    /// Messages queued for Redis before new ones are dropped and counted in
    /// [`BackplaneStats::dropped`] (default 65 536; 0 counts as 1). Nothing is allocated
    /// ahead: a large limit costs only what is actually queued.
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
        let node = self.shared.node.load(Ordering::Relaxed);
        channel.extend_from_slice(format!("\0control:{node:016x}").as_bytes());
        channel
    }

    /// Opens the queue the loops fill and the publisher thread drains.
    fn open_queue(&self) -> Receiver<Out> {
        // Unbounded underneath (nothing allocated ahead); `enqueue` holds it to the limit.
        let (tx, rx) = channel();
        *self.queue.lock().expect("backplane queue lock") = Some(tx);
        rx
    }

    fn enqueue(&self, mut out: Out) -> bool {
        let queue = self.queue.lock().expect("backplane queue lock");
        let Some(tx) = queue.as_ref() else {
            return false;
        };
        if let Out::Publish { payload, .. } = &mut out {
            // Read under the lock `start` opens the queue with, after drawing the id: a
            // publish racing the start carries the id its own subscriber skips (read
            // before the lock, it could be the 0 of a backplane not started, and the
            // message came back to this process a second time).
            payload[2..HEADER]
                .copy_from_slice(&self.shared.node.load(Ordering::Relaxed).to_le_bytes());
        }
        // Only publishes count against the limit: a stop, or the one pending wake-up,
        // always finds room and never takes a publish's.
        let publish = matches!(out, Out::Publish { .. });
        if publish && self.shared.queued.fetch_add(1, Ordering::Relaxed) >= self.queue_limit {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        if tx.send(out).is_err() {
            if publish {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            }
            return false;
        }
        true
    }

    /// `channel` was joined or left.
    fn changed(&self, channel: Vec<u8>, joined: bool) {
        {
            let mut wanted = self.shared.wanted.lock().expect("backplane lock");
            if joined {
                wanted.channels.insert(channel.clone());
            } else {
                wanted.channels.remove(&channel);
            }
            wanted.dirty.insert(channel);
        }
        self.shared.changed.store(true, Ordering::Release);
        // One wake-up queued is enough: the subscriber reads every change when it wakes.
        if !self.shared.wake_queued.swap(true, Ordering::AcqRel) && !self.enqueue(Out::Wake) {
            self.shared.wake_queued.store(false, Ordering::Release);
        }
    }
}

/// A node id for this process: random, or (without randomness) the process id and the
/// clock, which still tell processes apart.
fn draw_node() -> u64 {
    let mut node = [0u8; 8];
    match getrandom::fill(&mut node) {
        Ok(()) => u64::from_le_bytes(node),
        Err(e) => {
            log::warn!(
                "websocket-driver: Redis backplane has no randomness ({e}); its node id comes from the process id and the clock"
            );
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ (u64::from(std::process::id()) << 32)
        }
    }
}

impl Backplane for RedisBackplane {
    fn start(&self, inbound: Inbound) {
        self.shared.node.store(draw_node(), Ordering::Relaxed);
        let rx = self.open_queue();
        let publisher = Publisher {
            client: self.client.clone(),
            shared: self.shared.clone(),
            control: self.control(),
            con: None,
            answered: Instant::now(),
            retry_at: None,
            backoff: BACKOFF_FIRST,
            lost: false,
            refusing: false,
            wake_pending: false,
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
        let mut threads = self.threads.lock().expect("backplane threads lock");
        let spawned = std::thread::Builder::new()
            .name("wsd-redis-pub".into())
            .spawn(move || publisher.run(rx))
            .and_then(|publisher| {
                threads.push(publisher);
                std::thread::Builder::new()
                    .name("wsd-redis-sub".into())
                    .spawn(move || subscriber.run())
            })
            .map(|subscriber| threads.push(subscriber));
        if let Err(e) = spawned {
            log::error!("websocket-driver: the Redis backplane cannot start a thread: {e}");
        }
    }

    fn subscribe(&self, topic: &[u8]) {
        self.changed(self.channel(topic), true);
    }

    fn unsubscribe(&self, topic: &[u8]) {
        self.changed(self.channel(topic), false);
    }

    fn publish(&self, topic: &[u8], data: &[u8], kind: MessageType) {
        let mut payload = Vec::with_capacity(HEADER + data.len());
        payload.push(FORMAT);
        payload.push(match kind {
            MessageType::Text => 1,
            _ => 2,
        });
        // The node id goes in under the queue's lock (`enqueue`).
        payload.extend_from_slice(&[0; 8]);
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
        // The publisher wakes the subscriber on its way out if it can; the subscriber
        // also sees `stop` by itself within `POLL`.
        self.enqueue(Out::Stop);
        *self.queue.lock().expect("backplane queue lock") = None;
        self.join_threads(STOP_WAIT);
    }
}

impl Drop for RedisBackplane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `PUBLISH`es of one pipeline.
#[derive(Default)]
struct Batch {
    items: Vec<(Vec<u8>, Vec<u8>)>,
    bytes: usize,
}

impl Batch {
    /// Whether a message of `len` bytes (channel and payload) joins this batch rather than
    /// the next: a batch holds at most `MAX_BATCH` messages and `MAX_BATCH_BYTES` bytes,
    /// and always its first message, however large.
    fn fits(&self, len: usize) -> bool {
        self.items.is_empty()
            || (self.items.len() < MAX_BATCH && self.bytes + len <= MAX_BATCH_BYTES)
    }

    fn push(&mut self, channel: Vec<u8>, payload: Vec<u8>) {
        self.bytes += channel.len() + payload.len();
        self.items.push((channel, payload));
    }

    fn clear(&mut self) {
        self.items.clear();
        self.bytes = 0;
    }
}

struct Publisher {
    client: Client,
    shared: Arc<Shared>,
    control: Vec<u8>,
    con: Option<Connection>,
    /// When the connection last answered.
    answered: Instant,
    /// While Redis is unreachable: when to try again (until then, drop and count).
    retry_at: Option<Instant>,
    /// The next wait after a failure; back to `BACKOFF_FIRST` only once a pipeline went
    /// through, so a Redis that takes connections and then fails them is not retried
    /// every 50 ms forever.
    backoff: Duration,
    /// A connection was lost or could not be opened: the next one is a reconnection.
    lost: bool,
    /// Redis refused a `PUBLISH` in the last pipeline (warned once, until one goes
    /// through whole).
    refusing: bool,
    /// A wake-up for the subscriber was lost with its connection: send it again.
    wake_pending: bool,
}

impl Publisher {
    fn run(mut self, rx: Receiver<Out>) {
        let mut batch = Batch::default();
        loop {
            let first = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(out) => out,
                Err(RecvTimeoutError::Timeout) => {
                    if self.shared.stop.load(Ordering::Acquire) {
                        return;
                    }
                    // A wake-up lost with its connection goes again once the backoff
                    // allows, not only with the next publish: the subscriber would find
                    // the change by itself, but this also brings the connection back
                    // before the next publish needs it.
                    if self.wake_pending && self.retry_at.is_none_or(|t| Instant::now() >= t) {
                        self.send(&mut batch, false);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.wake_subscriber();
                    return;
                }
            };
            let mut stop = false;
            let mut wake = false;
            for out in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                self.shared.taken(&out);
                match out {
                    Out::Publish { channel, payload } => {
                        if !batch.fits(channel.len() + payload.len()) {
                            self.send(&mut batch, std::mem::take(&mut wake));
                        }
                        batch.push(channel, payload);
                    }
                    Out::Wake => wake = true,
                    Out::Stop => stop = true,
                }
            }
            self.send(&mut batch, wake);
            if stop || self.shared.stop.load(Ordering::Acquire) {
                self.wake_subscriber();
                return;
            }
        }
    }

    /// Publishes `batch` as one pipeline (with a wake-up for the subscriber if `wake`, or
    /// one is pending), or drops it if Redis is unreachable.
    fn send(&mut self, batch: &mut Batch, wake: bool) {
        let wake = wake || std::mem::take(&mut self.wake_pending);
        if batch.items.is_empty() && !wake {
            return;
        }
        let messages = batch.items.len();
        let mut pipe = redis::pipe();
        for (channel, payload) in &batch.items {
            pipe.cmd("PUBLISH").arg(channel).arg(payload);
        }
        if wake {
            pipe.cmd("PUBLISH").arg(&self.control).arg(b"");
        }
        let Some(con) = self.ready() else {
            self.shared
                .dropped
                .fetch_add(messages as u64, Ordering::Relaxed);
            self.wake_pending = wake;
            batch.clear();
            return;
        };
        let mut outcome = Outcome::default();
        let result = publish(con, &pipe, messages, &mut outcome);
        self.shared
            .sent
            .fetch_add(outcome.accepted as u64, Ordering::Relaxed);
        self.shared
            .dropped
            .fetch_add((messages - outcome.accepted) as u64, Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.answered = Instant::now();
                self.backoff = BACKOFF_FIRST;
                match outcome.refusal {
                    Some(e) if !self.refusing => {
                        log::warn!(
                            "websocket-driver: Redis refused a backplane PUBLISH (the message is dropped): {e}"
                        );
                        self.refusing = true;
                    }
                    Some(e) => {
                        log::debug!("websocket-driver: Redis refused a backplane PUBLISH: {e}")
                    }
                    None => self.refusing = false,
                }
            }
            Err(e) => {
                log::warn!("websocket-driver: Redis backplane lost its connection: {e}");
                self.con = None;
                self.failed();
                self.wake_pending = wake;
            }
        }
        batch.clear();
    }

    /// A connection failed or could not be opened: wait before the next, longer each time.
    fn failed(&mut self) {
        self.lost = true;
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// The connection for the next batch. One idle for over `IDLE_CHECK` is checked with a
    /// `PING` first; if Redis closed it, nothing of the batch was sent yet, so it goes on
    /// a new connection at once (still at most once).
    fn ready(&mut self) -> Option<&mut Connection> {
        if let Some(con) = self.con.as_mut()
            && self.answered.elapsed() > IDLE_CHECK
        {
            // Any reply, an error reply included, shows the connection alive.
            match con.req_command(&redis::cmd("PING")) {
                Ok(_) => self.answered = Instant::now(),
                Err(e) => {
                    log::info!(
                        "websocket-driver: Redis backplane's idle connection was closed ({e}); reconnecting"
                    );
                    self.con = None;
                    self.lost = true;
                }
            }
        }
        self.connection()
    }

    /// The connection, reconnecting if the backoff allows.
    fn connection(&mut self) -> Option<&mut Connection> {
        if self.con.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return None;
            }
            match open(&self.client) {
                Ok(con) => {
                    if std::mem::take(&mut self.lost) {
                        self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                        log::info!("websocket-driver: Redis backplane reconnected");
                    }
                    self.retry_at = None;
                    self.answered = Instant::now();
                    self.con = Some(con);
                }
                Err(e) => {
                    log::debug!("websocket-driver: Redis backplane cannot connect: {e}");
                    self.failed();
                    return None;
                }
            }
        }
        self.con.as_mut()
    }

    /// Wakes the subscriber (at shutdown) if a connection is open; it also sees `stop`
    /// by itself, so this is not worth a new connection.
    fn wake_subscriber(&mut self) {
        let control = self.control.clone();
        if let Some(con) = self.con.as_mut() {
            let _ = con.req_command(redis::cmd("PUBLISH").arg(control).arg(b""));
        }
    }
}

/// What Redis answered to the first messages of a pipeline.
#[derive(Default)]
struct Outcome {
    /// `PUBLISH`es of messages that Redis answered without an error.
    accepted: usize,
    /// The first error reply to one of them.
    refusal: Option<RedisError>,
}

/// Sends `pipe` (its first `messages` commands `PUBLISH`es of messages) and reads every
/// reply, each on its own: an error reply costs its message only. Stops at the first
/// failure to read (the crate's pipeline would wait the read timeout once per command on a
/// connection gone silent).
fn publish(
    con: &mut Connection,
    pipe: &redis::Pipeline,
    messages: usize,
    outcome: &mut Outcome,
) -> RedisResult<()> {
    con.send_packed_command(&pipe.get_packed_pipeline())?;
    for n in 0..pipe.len() {
        let reply = con.recv_response()?;
        if n >= messages {
            // The wake-up: if refused, the subscriber still finds the change by itself.
            continue;
        }
        match reply {
            Value::ServerError(e) => {
                outcome.refusal.get_or_insert_with(|| e.into());
            }
            _ => outcome.accepted += 1,
        }
    }
    Ok(())
}

fn open(client: &Client) -> RedisResult<Connection> {
    let con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(con)
}

/// Whether `value` is a pub/sub message rather than a reply.
fn is_message(value: &Value) -> bool {
    matches!(value, Value::Array(items)
        if matches!(items.first(), Some(Value::BulkString(kind)) if kind == b"message"))
}

fn unexpected(what: &str, value: &Value) -> RedisError {
    (
        ErrorKind::Client,
        "unexpected reply on the backplane's subscriber connection",
        format!("{what}: {value:?}"),
    )
        .into()
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
        // `None`: connect at once.
        let mut backoff: Option<Duration> = None;
        let mut lost = false;
        loop {
            if let Some(pause) = backoff {
                self.pause(pause);
            }
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            let next = backoff.map_or(BACKOFF_FIRST, |b| (b * 2).min(BACKOFF_MAX));
            let mut con = match open(&self.client) {
                Ok(con) => con,
                Err(e) => {
                    log::debug!("websocket-driver: Redis backplane subscriber cannot connect: {e}");
                    lost = true;
                    backoff = Some(next);
                    continue;
                }
            };
            if lost {
                self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                log::info!("websocket-driver: Redis backplane subscriber reconnected");
            }
            let opened = Instant::now();
            let result = self.listen(&mut con);
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = result {
                log::warn!("websocket-driver: Redis backplane subscriber lost Redis: {e}");
            }
            lost = true;
            // Only a connection that worked for a while starts the backoff over: one that
            // fails as soon as it is used (Redis hangs up at SUBSCRIBE) is retried ever
            // more slowly, not in a tight loop.
            backoff = if opened.elapsed() >= STABLE {
                None
            } else {
                Some(next)
            };
        }
    }

    /// Sleeps `pause`, or less if the backplane stops.
    fn pause(&self, pause: Duration) {
        let end = Instant::now() + pause;
        while !self.shared.stop.load(Ordering::Acquire) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(POLL));
        }
    }

    /// Subscribes to what is wanted and delivers messages until the connection fails or
    /// the backplane stops (`Ok`).
    fn listen(&self, con: &mut Connection) -> RedisResult<()> {
        // Channels Redis confirmed on this connection.
        let mut active: HashSet<Vec<u8>> = HashSet::new();
        // Channels whose SUBSCRIBE Redis refused, tried again at `retry_at`.
        let mut refused: HashSet<Vec<u8>> = HashSet::new();
        let mut retry_at: Option<Instant> = None;
        let mut retry_backoff = BACKOFF_FIRST;
        let mut everything = true;
        let mut heard = Instant::now();
        con.set_read_timeout(Some(POLL))?;
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let retry = retry_at.is_some_and(|t| Instant::now() >= t);
            // A load first: most turns find nothing changed and need not write the flag.
            let changed = self.shared.changed.load(Ordering::Acquire)
                && self.shared.changed.swap(false, Ordering::AcqRel);
            if changed || everything || retry {
                let refusing = !refused.is_empty();
                let refusal = self.update(con, &mut active, &mut refused, everything, retry)?;
                everything = false;
                heard = Instant::now();
                if let Some(e) = refusal {
                    // Warned once per streak: an ACL that stays wrong is retried every 2 s.
                    if refusing {
                        log::debug!(
                            "websocket-driver: Redis still refuses the backplane's SUBSCRIBE: {e}"
                        );
                    } else {
                        log::warn!(
                            "websocket-driver: Redis refused the backplane's SUBSCRIBE (tried again with backoff): {e}"
                        );
                    }
                }
                if refused.is_empty() {
                    retry_at = None;
                    retry_backoff = BACKOFF_FIRST;
                } else if retry || retry_at.is_none() {
                    retry_at = Some(Instant::now() + retry_backoff);
                    retry_backoff = (retry_backoff * 2).min(BACKOFF_MAX);
                }
            }
            match next_message(con) {
                Ok(message) => {
                    heard = Instant::now();
                    self.on_message(&message);
                }
                Err(e) if e.is_timeout() => {
                    if heard.elapsed() >= KEEPALIVE {
                        self.ping(con)?;
                        heard = Instant::now();
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Brings the connection's subscriptions in line with what is wanted: every channel
    /// (and the control channel) if `everything`, else those changed since the last look,
    /// and the refused ones if `retry`. One `SUBSCRIBE` or `UNSUBSCRIBE` per channel,
    /// pipelined (`MAX_BATCH` a round trip), so each has its own reply: the crate's
    /// `PubSub::subscribe` reads one reply whatever the count and takes an error reply for
    /// success. A refused channel goes to `refused`; returns the first refusal.
    fn update(
        &self,
        con: &mut Connection,
        active: &mut HashSet<Vec<u8>>,
        refused: &mut HashSet<Vec<u8>>,
        everything: bool,
        retry: bool,
    ) -> RedisResult<Option<RedisError>> {
        // (channel, whether to join it)
        let mut todo: Vec<(Vec<u8>, bool)> = Vec::new();
        {
            let mut wanted = self.shared.wanted.lock().expect("backplane lock");
            let dirty = std::mem::take(&mut wanted.dirty);
            if everything {
                refused.clear();
                todo.push((self.control.clone(), true));
                todo.extend(wanted.channels.iter().map(|c| (c.clone(), true)));
            } else {
                let retried = if retry {
                    std::mem::take(refused)
                } else {
                    HashSet::new()
                };
                for channel in dirty.into_iter().chain(retried) {
                    let want = channel == self.control || wanted.channels.contains(&channel);
                    if want == active.contains(&channel) {
                        continue;
                    }
                    if !want {
                        refused.remove(&channel);
                    }
                    todo.push((channel, want));
                }
            }
        }
        // A channel both changed and refused comes twice.
        todo.sort_unstable();
        todo.dedup();
        let mut refusal = None;
        for chunk in todo.chunks(MAX_BATCH) {
            let mut pipe = redis::pipe();
            for (channel, join) in chunk {
                pipe.cmd(if *join { "SUBSCRIBE" } else { "UNSUBSCRIBE" })
                    .arg(channel);
            }
            con.send_packed_command(&pipe.get_packed_pipeline())?;
            con.set_read_timeout(Some(IO_TIMEOUT))?;
            for (channel, join) in chunk {
                let confirmation: &[u8] = if *join { b"subscribe" } else { b"unsubscribe" };
                match self.reply(con)? {
                    Value::ServerError(e) if *join => {
                        refusal.get_or_insert_with(|| RedisError::from(e));
                        refused.insert(channel.clone());
                    }
                    // Still subscribed: its messages find no local subscriber.
                    Value::ServerError(e) => {
                        log::debug!(
                            "websocket-driver: Redis refused a backplane UNSUBSCRIBE: {e:?}"
                        );
                    }
                    Value::Array(items) if matches!(items.first(), Some(Value::BulkString(kind)) if kind == confirmation) => {
                        if *join {
                            refused.remove(channel);
                            active.insert(channel.clone());
                        } else {
                            active.remove(channel);
                        }
                    }
                    other => return Err(unexpected("to (UN)SUBSCRIBE", &other)),
                }
            }
        }
        con.set_read_timeout(Some(POLL))?;
        Ok(refusal)
    }

    /// Asks Redis whether the connection still works (within `IO_TIMEOUT`).
    fn ping(&self, con: &mut Connection) -> RedisResult<()> {
        con.send_packed_command(&redis::cmd("PING").get_packed_command())?;
        con.set_read_timeout(Some(IO_TIMEOUT))?;
        // Any reply will do: `["pong", ""]` while subscribed, an error if refused.
        self.reply(con)?;
        con.set_read_timeout(Some(POLL))?;
        Ok(())
    }

    /// The next reply; messages that arrive before it are delivered.
    fn reply(&self, con: &mut Connection) -> RedisResult<Value> {
        loop {
            let value = con.recv_response()?;
            if !is_message(&value) {
                return Ok(value);
            }
            if let Some(message) = Msg::from_owned_value(value) {
                self.on_message(&message);
            }
        }
    }

    fn on_message(&self, message: &Msg) {
        let Ok(channel) = message.get_channel::<Vec<u8>>() else {
            return;
        };
        if channel != self.control {
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
        if node == self.shared.node.load(Ordering::Relaxed) {
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

/// Waits up to the connection's read timeout for a message. A `PubSub` reads without
/// holding a timeout against the next reply (`recv_response` skips the next value after
/// one), but dropping a `PubSub` unsubscribes the connection from everything: this one is
/// forgotten instead. It holds nothing: nothing was sent through it, so it cached no
/// message.
fn next_message(con: &mut Connection) -> RedisResult<Msg> {
    let mut pubsub = con.as_pubsub();
    let message = pubsub.get_message();
    std::mem::forget(pubsub);
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backplane whose publisher thread never runs, so nothing drains its queue.
    fn undrained(limit: Option<usize>) -> (RedisBackplane, Receiver<Out>) {
        // Nothing listens on port 1: `Client::open` only parses the URL.
        let client = Client::open("redis://127.0.0.1:1/").expect("a valid URL");
        let mut backplane = RedisBackplane::with_client(client);
        if let Some(limit) = limit {
            backplane = backplane.queue_limit(limit);
        }
        let rx = backplane.open_queue();
        (backplane, rx)
    }

    /// Takes everything queued, as the publisher would.
    fn queued(backplane: &RedisBackplane, rx: &Receiver<Out>) -> Vec<u8> {
        rx.try_iter()
            .map(|out| {
                backplane.shared.taken(&out);
                match out {
                    Out::Publish { payload, .. } => payload[HEADER],
                    Out::Wake => b'w',
                    Out::Stop => b's',
                }
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
        let queued = queued(&backplane, &rx);
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
        assert_eq!(
            queued(&backplane, &rx),
            b"123",
            "the queued ones are kept, in order"
        );
        // Drained, the queue takes publishes again.
        backplane.publish(b"room", b"5", MessageType::Binary);
        assert_eq!(backplane.stats().dropped, 1);
        assert_eq!(queued(&backplane, &rx), b"5");
    }

    #[test]
    fn a_limit_of_zero_means_one() {
        let (backplane, rx) = undrained(Some(0));
        backplane.publish(b"room", b"1", MessageType::Text);
        backplane.publish(b"room", b"2", MessageType::Text);
        assert_eq!(backplane.stats().dropped, 1);
        assert_eq!(queued(&backplane, &rx), b"1");
    }

    /// The queue allocates nothing ahead: the largest limit is taken as it is (a queue
    /// of `usize::MAX` preallocated slots could not even be created).
    #[test]
    fn the_largest_limit_allocates_nothing_ahead() {
        let (backplane, rx) = undrained(Some(usize::MAX));
        assert_eq!(backplane.queue_limit, usize::MAX);
        for data in [b"1", b"2", b"3"] {
            backplane.publish(b"room", data, MessageType::Text);
        }
        assert_eq!(backplane.stats().dropped, 0);
        assert_eq!(queued(&backplane, &rx), b"123");
    }

    /// Joins and leaves queue one wake-up while one is pending, and it takes no slot of
    /// the limit: the publishes around it are kept up to the limit, and the one past it
    /// is dropped.
    #[test]
    fn wake_ups_take_no_slot_and_one_is_queued_at_a_time() {
        let (backplane, rx) = undrained(Some(2));
        backplane.subscribe(b"a");
        backplane.subscribe(b"b");
        backplane.publish(b"room", b"1", MessageType::Text);
        backplane.unsubscribe(b"a");
        backplane.publish(b"room", b"2", MessageType::Text);
        assert_eq!(backplane.stats().dropped, 0, "at the limit");
        backplane.publish(b"room", b"3", MessageType::Text);
        assert_eq!(backplane.stats().dropped, 1, "at the limit + 1");
        assert_eq!(queued(&backplane, &rx), b"w12");
        // Taken, the wake-up can be queued again.
        backplane.subscribe(b"c");
        assert_eq!(queued(&backplane, &rx), b"w");
        let wanted = backplane.shared.wanted.lock().unwrap();
        let mut channels: Vec<_> = wanted.channels.iter().cloned().collect();
        channels.sort();
        assert_eq!(channels, [b"wsd:b".to_vec(), b"wsd:c".to_vec()]);
        assert_eq!(wanted.dirty.len(), 3, "a, b and c changed");
    }

    #[test]
    fn after_stop_every_publish_is_dropped() {
        let (backplane, rx) = undrained(Some(8));
        backplane.stop();
        assert_eq!(queued(&backplane, &rx), b"s");
        backplane.publish(b"room", b"1", MessageType::Text);
        assert_eq!(backplane.stats().dropped, 1);
    }

    /// A full queue still takes the stop.
    #[test]
    fn a_full_queue_takes_the_stop() {
        let (backplane, rx) = undrained(Some(1));
        backplane.publish(b"room", b"1", MessageType::Text);
        backplane.stop();
        assert_eq!(queued(&backplane, &rx), b"1s");
    }

    /// A pipeline holds up to 1 MiB of channels and payloads (a message that would take
    /// it past goes to the next), up to 1 024 messages, and always its first message.
    #[test]
    fn a_batch_holds_up_to_1_mib_and_1024_messages() {
        let mut batch = Batch::default();
        assert!(
            batch.fits(MAX_BATCH_BYTES * 4),
            "a large message goes alone"
        );
        batch.push(b"wsd:room".to_vec(), vec![0; MAX_BATCH_BYTES - 100 - 8]);
        assert!(batch.fits(100), "at the limit");
        assert!(!batch.fits(101), "at the limit + 1");
        batch.clear();
        for _ in 0..MAX_BATCH - 1 {
            batch.push(b"c".to_vec(), b"p".to_vec());
        }
        assert!(batch.fits(2), "the 1 024th message");
        batch.push(b"c".to_vec(), b"p".to_vec());
        assert!(!batch.fits(2), "the 1 025th message");
    }

    /// The node id is drawn when the backplane starts, not when it is built: a program
    /// that builds it and then forks its workers gives each its own id.
    #[test]
    fn the_node_id_is_drawn_at_start() {
        let client = Client::open("redis://127.0.0.1:1/").expect("a valid URL");
        let backplane = RedisBackplane::with_client(client);
        assert_eq!(backplane.shared.node.load(Ordering::Relaxed), 0);
        let pubsub = Arc::new(super::super::super::pubsub::PubSub::new(1, None));
        backplane.start(Inbound { pubsub });
        let node = backplane.shared.node.load(Ordering::Relaxed);
        assert_ne!(node, 0);
        assert!(
            backplane
                .control()
                .ends_with(format!("{node:016x}").as_bytes())
        );
        backplane.stop();
    }

    #[test]
    fn messages_are_told_from_replies() {
        let message = Value::Array(vec![
            Value::BulkString(b"message".to_vec()),
            Value::BulkString(b"ch".to_vec()),
            Value::BulkString(b"data".to_vec()),
        ]);
        assert!(is_message(&message));
        let confirmation = Value::Array(vec![
            Value::BulkString(b"subscribe".to_vec()),
            Value::BulkString(b"ch".to_vec()),
            Value::Int(1),
        ]);
        assert!(!is_message(&confirmation));
        assert!(!is_message(&Value::SimpleString("PONG".into())));
    }
}
