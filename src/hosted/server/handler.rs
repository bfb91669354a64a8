//! What the application implements and holds: the upgrade decision, the [`Handler`]
//! callbacks, the [`Ws`] handle inside them and the cross-thread [`Sender`].

use super::HttpResponse;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::protocol::driver::{
    Driver, Message, MessageType, ReadyState, Role, SendToken, check_sendable,
};
use crate::protocol::error::{Error, UsageError, code};
use crate::protocol::frame::OpCode;
use crate::protocol::handshake::{Request, is_websocket};
use crate::reactor::{Envelope, LoopStats, Remote};
use crate::session::PongWaiters;

use super::pubsub::{LoopTopics, Origin, PubSub, Publication, PublicationRun, Publisher, Topic};

/// The app's answer to a request.
#[derive(Debug)]
pub enum Upgrade<H> {
    /// Accept the upgrade; `H` handles the connection.
    Accept(H),
    /// Answer with this HTTP response and close.
    Reject(HttpResponse),
}

/// What the app sees of a request: the parsed head and the peer's address.
#[derive(Debug)]
pub struct UpgradeRequest<'a> {
    /// Method, path, headers.
    pub request: &'a Request,
    /// The client's address.
    pub peer: SocketAddr,
}

impl UpgradeRequest<'_> {
    /// The request target (path and query).
    pub fn path(&self) -> &str {
        &self.request.path
    }

    /// A header value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.request.header(name)
    }

    /// Whether this is a WebSocket upgrade request.
    pub fn is_websocket(&self) -> bool {
        is_websocket(self.request)
    }
}

/// Per-connection event handler. Every method has an empty default.
///
/// Handlers run on their connection's event loop. A panic in one (or in a callback it
/// gave, or in the server's upgrade closure for its request) fails that connection by
/// default: the handler is dropped without another call (no `on_close`), the connection
/// leaves its topics, its peer gets what was already queued and then close 1011 "the
/// handler panicked" (500 when the upgrade closure panicked), and the server closes TCP;
/// [`Stats::handler_panics`](super::Stats::handler_panics) counts it. The loop and its
/// other connections go on. [`ServerConfig::panic_policy`](super::ServerConfig::panic_policy)
/// set to [`PanicPolicy::EndLoop`](super::PanicPolicy::EndLoop) ends the loop instead.
pub trait Handler: Send + 'static {
    /// The connection is open.
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        let _ = ws;
    }
    /// A complete message (borrowed from the read buffer when it arrived whole).
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = (ws, message);
    }
    /// The peer broke the protocol (a close follows).
    fn on_error(&mut self, ws: &mut Ws<'_>, error: &Error) {
        let _ = (ws, error);
    }
    /// The connection closed; called exactly once.
    fn on_close(&mut self, ws: &mut Ws<'_>, code: u16, reason: &str) {
        let _ = (ws, code, reason);
    }
    /// A ping arrived (the pong is already queued).
    fn on_ping(&mut self, ws: &mut Ws<'_>, payload: &[u8]) {
        let _ = (ws, payload);
    }
    /// A pong arrived.
    fn on_pong(&mut self, ws: &mut Ws<'_>, payload: &[u8]) {
        let _ = (ws, payload);
    }
    /// Output that had to wait is now fully written: the socket did not take it all at
    /// once (its kernel buffer was full), or it went over the cap (sends were refused with
    /// [`UsageError::BufferFull`](crate::UsageError::BufferFull)). A producer that stopped
    /// at a refused send sends the rest from here. It may run when no send was refused.
    fn on_drain(&mut self, ws: &mut Ws<'_>) {
        let _ = ws;
    }
}

/// Commands a [`Sender`] carries to a connection's loop.
/// What a client connection is made of, carried to its loop.
pub(crate) struct ClientInit<H> {
    pub driver: Driver,
    pub handler: H,
    /// The `CONNECT` request when the connection goes through a proxy.
    pub proxy: Option<Vec<u8>>,
    #[cfg(feature = "tls")]
    pub tls: Option<Box<crate::tls::TlsStream>>,
    /// The addresses to try next if this one refuses the connect (the rest of what the
    /// host resolved to), with what a fresh attempt is made of.
    pub redial: Option<Box<Redial>>,
}

/// What a client connection's attempts are made of (its URL, options and TLS settings),
/// and the addresses still to try. Each attempt is made afresh: an earlier one may have
/// handed its bytes to a send that failed.
pub(crate) struct Redial {
    pub addrs: VecDeque<SocketAddr>,
    /// The handshake deadline passed before the connect completed (nothing was
    /// written): this address is given up for the next one, as a refused one is.
    pub connect_timed_out: bool,
    pub url: String,
    pub options: crate::protocol::options::Options,
    /// The `CONNECT` request when `addrs` are a proxy's: each attempt tunnels again.
    pub proxy: Option<Vec<u8>>,
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// One attempt's state: a driver with its upgrade request queued, and TLS for wss.
pub(crate) struct Attempt {
    pub driver: Driver,
    #[cfg(feature = "tls")]
    pub tls: Option<Box<crate::tls::TlsStream>>,
}

impl Attempt {
    /// A fresh attempt at `url`: its driver, and TLS state with `tls` (wss).
    pub fn new(
        url: &str,
        options: &crate::protocol::options::Options,
        #[cfg(feature = "tls")] tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Attempt, Error> {
        let mut driver = Driver::make_client(url, options)?;
        driver.start_connection();
        #[cfg(feature = "tls")]
        let tls = match (tls, driver.url()) {
            (Some(config), Some(url)) => Some(Box::new(crate::tls::TlsStream::client(
                config.clone(),
                &url.host,
            )?)),
            _ => None,
        };
        Ok(Attempt {
            driver,
            #[cfg(feature = "tls")]
            tls,
        })
    }
}

impl Redial {
    /// A fresh attempt's driver and TLS state.
    fn attempt(&self) -> Result<Attempt, Error> {
        Attempt::new(
            &self.url,
            &self.options,
            #[cfg(feature = "tls")]
            self.tls.as_ref(),
        )
    }

    /// Whether a connect that failed with `error` may be tried at the next address: it
    /// was refused, had no route or timed out (not a shutdown). A redial is kept only
    /// until the connection's first bytes are written, so a later timeout (a server that
    /// took the connection and never answered) is not retried.
    pub fn retries(&self, error: &io::Error) -> bool {
        !self.addrs.is_empty()
            && matches!(
                error.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
                    | io::ErrorKind::AddrNotAvailable
                    | io::ErrorKind::TimedOut
            )
    }

    /// A fresh attempt at the next address, made of `handler`; `Err(handler)` if one
    /// cannot be made (then the failure is reported).
    pub fn next<H>(mut self: Box<Self>, handler: H) -> Result<(SocketAddr, ClientInit<H>), H> {
        let Some(addr) = self.addrs.pop_front() else {
            return Err(handler);
        };
        let Ok(attempt) = self.attempt() else {
            return Err(handler);
        };
        self.connect_timed_out = false;
        let proxy = self.proxy.clone();
        let redial = (!self.addrs.is_empty()).then_some(self);
        Ok((addr, ClientInit::new(attempt, handler, proxy, redial)))
    }
}

impl<H> ClientInit<H> {
    /// A connection made of `attempt` and `handler`, through the proxy with `proxy` (the
    /// `CONNECT` request), with the addresses left to try in `redial`.
    pub fn new(
        attempt: Attempt,
        handler: H,
        proxy: Option<Vec<u8>>,
        redial: Option<Box<Redial>>,
    ) -> ClientInit<H> {
        ClientInit {
            driver: attempt.driver,
            handler,
            proxy,
            #[cfg(feature = "tls")]
            tls: attempt.tls,
            redial,
        }
    }
}

pub(crate) enum Command {
    Send(Vec<u8>, MessageType),
    Close(u16, String),
    /// A `Sender`'s send was refused by the cap: under `BackpressurePolicy::Close` with
    /// no grace the connection closes with 1008 (the loop never saw the refused message).
    Refused,
    /// A published message for this loop's subscribers of its topic.
    Publish(Arc<Publication>),
    /// Consecutive publications to one topic, merged on the loop that delivers them.
    PublishRun(PublicationRun),
}

/// The connection handle a [`Handler`] gets: send, close, inspect.
pub struct Ws<'a> {
    pub(super) driver: &'a mut Driver,
    pub(super) ctx: &'a Ctx<'a>,
}

/// What a [`Ws`] knows of its connection beyond the driver.
pub(super) struct Ctx<'a> {
    pub peer: SocketAddr,
    pub key: usize,
    pub generation: u32,
    pub remote: &'a Remote<Command>,
    pub max_backpressure: usize,
    /// Close with 1008 at the first send refused by the cap.
    pub close_on_limit: bool,
    pub stats: &'a LoopStats,
    /// Output queued outside the driver: handed to the kernel and not yet sent
    /// (completion backends), or sealed into TLS records not yet written.
    pub outside: usize,
    pub callbacks: &'a RefCell<Callbacks>,
    pub gauges: &'a RefCell<Gauges>,
    /// The loop's topic index, its place among the loops, and the server's pub/sub.
    pub topics: &'a RefCell<LoopTopics>,
    pub loop_index: usize,
    pub pubsub: &'a Arc<PubSub>,
    /// The receive buffer of the read being delivered, when it can be lent.
    pub input: &'a Lendable,
}

/// The receive buffer a read came in, while its input is delivered, when the transport
/// can give the buffer away (the reactor, without TLS): the first message sent back from
/// it that is at least as large as the transport asks goes out from there, in place,
/// instead of being copied into the output (see `Driver::send_received`). At most one per
/// read. io_uring keeps the buffer until the send completes, so it asks for half of it
/// (a reply holds at most twice its size); epoll takes it back right after its write.
#[derive(Debug, Default)]
pub(super) struct Lendable(Cell<Loan>);

/// Where a read's receive buffer stands while its input is delivered.
#[derive(Debug, Default, Clone, Copy)]
enum Loan {
    /// No buffer to lend (not a lendable read, or not delivering one).
    #[default]
    None,
    /// The buffer's address and length, and the smallest reply that may claim it.
    Offered { base: usize, len: usize, min: usize },
    /// A reply claimed it; the driver gets it when the read's delivery ends.
    Claimed,
}

impl Lendable {
    /// `buffer` may be lent, to a reply of at least `min` bytes, until
    /// [`Lendable::withdraw`].
    pub fn offer(&self, buffer: &[u8], min: usize) {
        self.0.set(Loan::Offered {
            base: buffer.as_ptr() as usize,
            len: buffer.len(),
            min,
        });
    }

    /// Ends the offer; returns whether a reply claimed the buffer.
    pub fn withdraw(&self) -> bool {
        matches!(self.0.replace(Loan::None), Loan::Claimed)
    }

    /// Claims the buffer for a reply of `payload` if the payload lies in it and is large
    /// enough; returns where the payload starts in it.
    fn claim(&self, payload: &[u8]) -> Option<usize> {
        let Loan::Offered { base, len, min } = self.0.get() else {
            return None;
        };
        // Addresses only compared, never dereferenced.
        let addr = payload.as_ptr() as usize;
        if addr < base || addr + payload.len() > base + len || payload.len() < min {
            return None;
        }
        self.0.set(Loan::Claimed);
        Some(addr - base)
    }
}

/// A write-completion or pong callback of a hosted connection.
pub(super) type WsCallback = Box<dyn FnOnce(&mut Ws<'_>) + Send>;

/// The callbacks a loop's connections wait on, by slab key. Most connections have none,
/// so they live here rather than in each connection's state.
pub(super) type Callbacks = HashMap<usize, Pending>;

/// Takes what `take` gives from `key`'s callbacks, and drops the entry once it is empty,
/// so that a loop with no callbacks waiting skips its checks (`run_written`'s first test).
pub(super) fn take_callbacks<R: Default>(
    callbacks: &mut Callbacks,
    key: usize,
    take: impl FnOnce(&mut Pending) -> R,
) -> R {
    let Some(pending) = callbacks.get_mut(&key) else {
        return R::default();
    };
    let taken = take(pending);
    if pending.is_empty() {
        callbacks.remove(&key);
    }
    taken
}

/// One connection's callbacks.
#[derive(Default)]
pub(super) struct Pending {
    /// Write callbacks in send order, with the token that says when they are due.
    pub written: VecDeque<(SendToken, WsCallback)>,
    /// Pong callbacks, in ping order.
    pub pongs: PongWaiters<WsCallback>,
}

impl Pending {
    /// The next write callback whose bytes `driver` has handed to the transport.
    pub fn next_written(&mut self, driver: &Driver) -> Option<WsCallback> {
        match self.written.front() {
            Some((token, _)) if driver.is_sent(*token) => self.written.pop_front().map(|(_, f)| f),
            _ => None,
        }
    }

    /// The callbacks of the pings a pong with `payload` answers, oldest first.
    pub fn take_pongs(&mut self, payload: &[u8]) -> Vec<WsCallback> {
        self.pongs.answered(payload).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.written.is_empty() && self.pongs.is_empty()
    }
}

impl Ws<'_> {
    /// The cap: a send while the output is over the limit is refused (and, under
    /// `BackpressurePolicy::Close { grace: ZERO }`, the connection closed with 1008).
    fn admit(&mut self) -> Result<(), Error> {
        let buffered = self.buffered_amount();
        if buffered > self.ctx.max_backpressure {
            if self.ctx.close_on_limit {
                self.driver
                    .abort(code::POLICY_VIOLATION, "outgoing buffer limit exceeded");
            }
            return Err(UsageError::BufferFull {
                buffered,
                limit: self.ctx.max_backpressure,
            }
            .into());
        }
        Ok(())
    }

    fn counted(&self, result: Result<SendToken, Error>) -> Result<SendToken, Error> {
        if result.is_ok() {
            LoopStats::add(&self.ctx.stats.messages_out, 1);
        }
        result
    }

    /// Sends `data` as `kind` (the seed's `send`).
    pub fn send(&mut self, data: &[u8], kind: MessageType) -> Result<SendToken, Error> {
        self.admit()?;
        let result = self.driver.send(data, kind);
        self.counted(result)
    }

    /// Sends a message back as it came (text as text, binary as binary). A large message
    /// sent back while it is delivered may go out from the buffer it arrived in, without
    /// a copy (see [`Stats::replies_in_place`](super::Stats::replies_in_place)).
    pub fn send_message(&mut self, message: &Message<'_>) -> Result<SendToken, Error> {
        self.admit()?;
        if let Some(token) = self.send_in_place(message) {
            return self.counted(Ok(token));
        }
        let result = self.driver.send_message(message);
        self.counted(result)
    }

    /// Queues `message` to go out from the receive buffer it arrived in, if that buffer
    /// can be lent (see [`Lendable`]).
    fn send_in_place(&mut self, message: &Message<'_>) -> Option<SendToken> {
        let (opcode, payload) = match message {
            Message::Text(text) => (OpCode::Text, text.as_bytes()),
            Message::Binary(data) => (OpCode::Binary, &data[..]),
        };
        // A claim the driver then refuses (a client, a connection with deflate) only
        // means the buffer goes back to the ring unused: `Driver::hand_received` returns it.
        let start = self.ctx.input.claim(payload)?;
        self.driver.send_received(opcode, start, payload.len())
    }

    /// Sends a message taken by value: a large owned payload (a message that arrived in
    /// pieces and was reassembled, or a buffer built for sending) is written from its own
    /// allocation instead of being copied into the output (see
    /// [`Driver::send_message_owned`](crate::Driver::send_message_owned)); an echo of a
    /// 1 MiB message copies it once (reassembly) instead of twice.
    pub fn send_message_owned(&mut self, message: Message<'_>) -> Result<SendToken, Error> {
        self.admit()?;
        if let Some(token) = self.send_in_place(&message) {
            return self.counted(Ok(token));
        }
        let result = self.driver.send_message_owned(message);
        self.counted(result)
    }

    /// Sends a text message.
    pub fn send_text(&mut self, text: &str) -> Result<SendToken, Error> {
        self.admit()?;
        let result = self.driver.send_text(text);
        self.counted(result)
    }

    /// Sends a binary message.
    pub fn send_binary(&mut self, data: &[u8]) -> Result<SendToken, Error> {
        self.admit()?;
        let result = self.driver.send_binary(data);
        self.counted(result)
    }

    /// Sends `data` as `kind` and runs `on_written` once its bytes are handed to the
    /// transport (the seed's `(send ws data :callback fn)`). The callback never runs if
    /// the connection closes first.
    pub fn send_with(
        &mut self,
        data: &[u8],
        kind: MessageType,
        on_written: impl FnOnce(&mut Ws<'_>) + Send + 'static,
    ) -> Result<SendToken, Error> {
        let token = self.send(data, kind)?;
        self.ctx
            .callbacks
            .borrow_mut()
            .entry(self.ctx.key)
            .or_default()
            .written
            .push_back((token, Box::new(on_written)));
        Ok(token)
    }

    /// Sends a ping; `on_pong` runs when a pong with the same payload arrives (the seed's
    /// `(send-ping ws msg fn)`), or the pong of a later ping, which answers the earlier
    /// ones too (RFC 6455 §5.5.3 lets a peer answer only the latest of several unanswered
    /// pings; this crate does so once 16 KiB of its output waits); the callbacks run in ping
    /// order, before [`Handler::on_pong`]. It never runs if the connection closes first.
    pub fn send_ping(
        &mut self,
        payload: &[u8],
        on_pong: impl FnOnce(&mut Ws<'_>) + Send + 'static,
    ) -> Result<SendToken, Error> {
        let token = self.driver.send_ping(payload)?;
        self.ctx
            .callbacks
            .borrow_mut()
            .entry(self.ctx.key)
            .or_default()
            .pongs
            .push(payload.to_vec(), Box::new(on_pong));
        Ok(token)
    }

    /// Starts the close handshake. A server connection leaves all its topics at once.
    pub fn close_connection(&mut self, code: u16, reason: &str) -> Result<SendToken, Error> {
        let token = self.driver.close_connection(code, reason)?;
        if self.driver.role() == Role::Server && self.driver.ready_state() != ReadyState::Open {
            // It takes no more publications: it leaves its topics now, so that
            // `is_subscribed`, `topics` and `subscribers` say so in this same call.
            self.ctx.topics.borrow_mut().leave_all(
                self.ctx.pubsub,
                self.ctx.loop_index,
                self.ctx.key,
            );
        }
        Ok(token)
    }

    /// The agreed subprotocol.
    pub fn protocol(&self) -> Option<&str> {
        self.driver.protocol()
    }

    /// `"hybi-13"`.
    pub fn version(&self) -> &'static str {
        self.driver.version()
    }

    /// The connection state.
    pub fn ready_state(&self) -> ReadyState {
        self.driver.ready_state()
    }

    /// Bytes queued and not yet written.
    pub fn buffered_amount(&self) -> usize {
        self.driver.buffered_amount() + self.ctx.outside
    }

    /// The client's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.ctx.peer
    }

    /// Subscribes this connection to `topic` (bytes, at most
    /// [`MAX_TOPIC_LEN`](super::MAX_TOPIC_LEN)): it gets every message published to it from
    /// now on. Returns false if it already was subscribed. A closing connection leaves
    /// all its topics.
    pub fn subscribe(&mut self, topic: impl AsRef<[u8]>) -> Result<bool, Error> {
        if self.driver.role() != Role::Server {
            return Err(UsageError::ClientCannotSubscribe.into());
        }
        if self.driver.ready_state() != ReadyState::Open {
            return Err(UsageError::NotOpen.into());
        }
        self.ctx.topics.borrow_mut().subscribe(
            self.ctx.pubsub,
            self.ctx.loop_index,
            self.ctx.key,
            topic.as_ref(),
        )
    }

    /// Unsubscribes this connection from `topic`; false if it was not subscribed.
    pub fn unsubscribe(&mut self, topic: impl AsRef<[u8]>) -> bool {
        self.ctx.topics.borrow_mut().unsubscribe(
            self.ctx.pubsub,
            self.ctx.loop_index,
            self.ctx.key,
            topic.as_ref(),
        )
    }

    /// Whether this connection is subscribed to `topic`.
    pub fn is_subscribed(&self, topic: impl AsRef<[u8]>) -> bool {
        self.ctx
            .topics
            .borrow()
            .is_subscribed(self.ctx.key, topic.as_ref())
    }

    /// The topics this connection is subscribed to (in no particular order).
    pub fn topics(&self) -> Vec<Topic> {
        self.ctx.topics.borrow().topics(self.ctx.key)
    }

    /// Publishes `data` as `kind` (text or binary) to every subscriber of `topic` on
    /// every loop but this connection, encoded once (see
    /// [`Publisher::publish`](super::Publisher::publish) for ordering and slow subscribers).
    pub fn publish(
        &mut self,
        topic: impl AsRef<[u8]>,
        data: &[u8],
        kind: MessageType,
    ) -> Result<(), Error> {
        self.publish_from(topic.as_ref(), data, kind, Some(self.ctx.key))
    }

    /// Publishes to every subscriber of `topic`, this connection included.
    pub fn publish_all(
        &mut self,
        topic: impl AsRef<[u8]>,
        data: &[u8],
        kind: MessageType,
    ) -> Result<(), Error> {
        self.publish_from(topic.as_ref(), data, kind, None)
    }

    fn publish_from(
        &mut self,
        topic: &[u8],
        data: &[u8],
        kind: MessageType,
        exclude: Option<usize>,
    ) -> Result<(), Error> {
        self.ctx.pubsub.publish(
            topic,
            data,
            kind,
            Some(Origin {
                loop_index: self.ctx.loop_index,
                exclude,
            }),
        )?;
        LoopStats::add(&self.ctx.stats.published, 1);
        Ok(())
    }

    /// Subscribers of `topic` over the whole server, now.
    pub fn subscribers(&self, topic: impl AsRef<[u8]>) -> usize {
        self.ctx.pubsub.subscribers(topic.as_ref())
    }

    /// A handle that publishes from any thread (to every subscriber).
    pub fn publisher(&self) -> Publisher {
        Publisher {
            pubsub: self.ctx.pubsub.clone(),
        }
    }

    /// A handle other threads can send through.
    pub fn sender(&self) -> Sender {
        let gauge = self
            .ctx
            .gauges
            .borrow_mut()
            .entry(self.ctx.key)
            .or_insert_with(|| {
                Arc::new(Gauge {
                    queued: AtomicUsize::new(0),
                    backlog: AtomicUsize::new(self.buffered_amount()),
                    limit: self.ctx.max_backpressure,
                    close_on_limit: self.ctx.close_on_limit,
                    close_posted: AtomicBool::new(false),
                    gone: AtomicBool::new(false),
                })
            })
            .clone();
        Sender {
            remote: self.ctx.remote.clone(),
            key: self.ctx.key,
            generation: self.ctx.generation,
            gauge,
        }
    }
}

/// Sends to one connection from any thread (`Send + Clone`). Commands go through the
/// owning loop's queue and wake it; a connection that has since closed ignores them.
#[derive(Clone)]
pub struct Sender {
    remote: Remote<Command>,
    key: usize,
    generation: u32,
    gauge: Arc<Gauge>,
}

/// What the [`Sender`]s of one connection share with its loop, so the cap on its output
/// covers what other threads queued for it too.
pub(super) struct Gauge {
    /// Bytes of messages in the loop's inbox for this connection.
    pub queued: AtomicUsize,
    /// The connection's unsent output, as the loop last saw it.
    pub backlog: AtomicUsize,
    pub limit: usize,
    /// A refused send closes the connection (`BackpressurePolicy::Close` with no grace).
    pub close_on_limit: bool,
    /// The close was posted: one is enough (a sender retrying in a loop would otherwise
    /// fill the inbox with them before the loop gets to the first).
    pub close_posted: AtomicBool,
    /// The loop let go of the connection (closed): sends fail at once.
    pub gone: AtomicBool,
}

/// The gauges of a loop's connections that have [`Sender`]s, by slab key.
pub(super) type Gauges = HashMap<usize, Arc<Gauge>>;

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("key", &self.key)
            .field("generation", &self.generation)
            .finish()
    }
}

impl Sender {
    fn post(&self, command: Command) -> io::Result<()> {
        self.remote.send(Envelope::Conn {
            key: self.key,
            generation: self.generation,
            command,
        })
    }

    /// Queues a text message (see [`Sender::send`]).
    pub fn send_text(&self, text: impl Into<String>) -> io::Result<()> {
        self.send(text.into().into_bytes(), MessageType::Text)
    }

    /// Queues a binary message (see [`Sender::send`]).
    pub fn send_binary(&self, data: impl Into<Vec<u8>>) -> io::Result<()> {
        self.send(data.into(), MessageType::Binary)
    }

    /// Queues a message of any type (as [`Ws::send`]). A message that cannot be sent as
    /// `kind` (text that is not UTF-8, a ping over 125 bytes, a close code that may not
    /// be sent) fails here with [`io::ErrorKind::InvalidInput`] wrapping the
    /// [`UsageError`], since the loop would have no one to report it to. The connection's
    /// output cap (`ServerConfig::max_backpressure`) counts what senders have queued and
    /// not yet handed to the loop: while the two together are over it, this fails with
    /// [`io::ErrorKind::WouldBlock`] wrapping [`UsageError::BufferFull`] and queues
    /// nothing. Once the connection has closed and its loop let go of it, this fails
    /// with [`io::ErrorKind::NotConnected`] wrapping [`UsageError::NotOpen`]; a message
    /// sent while it was closing is dropped by its loop. It also fails if the server has
    /// stopped.
    pub fn send(&self, data: impl Into<Vec<u8>>, kind: MessageType) -> io::Result<()> {
        let data = data.into();
        check_sendable(&data, kind)
            .map_err(|usage| io::Error::new(io::ErrorKind::InvalidInput, Error::Usage(usage)))?;
        let gauge = &self.gauge;
        if gauge.gone.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                Error::Usage(UsageError::NotOpen),
            ));
        }
        let buffered = gauge.queued.load(Ordering::Acquire) + gauge.backlog.load(Ordering::Acquire);
        if buffered > gauge.limit {
            if gauge.close_on_limit && !gauge.close_posted.swap(true, Ordering::AcqRel) {
                // The policy closes at the first refused send: the loop does it. (A loop
                // that has stopped has nothing left to close.)
                let _ = self.post(Command::Refused);
            }
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                Error::Usage(UsageError::BufferFull {
                    buffered,
                    limit: gauge.limit,
                }),
            ));
        }
        let len = data.len();
        gauge.queued.fetch_add(len, Ordering::AcqRel);
        self.post(Command::Send(data, kind)).inspect_err(|_| {
            gauge.queued.fetch_sub(len, Ordering::AcqRel);
        })
    }

    /// Starts the close handshake. A close code that may not be sent or a reason over
    /// 123 bytes fails here with [`io::ErrorKind::InvalidInput`] (wrapping the
    /// [`UsageError`]), since the loop would have no one to report it to.
    pub fn close_connection(&self, code: u16, reason: impl Into<String>) -> io::Result<()> {
        let reason = reason.into();
        check_sendable(reason.as_bytes(), MessageType::Close(code))
            .map_err(|usage| io::Error::new(io::ErrorKind::InvalidInput, Error::Usage(usage)))?;
        self.post(Command::Close(code, reason))
    }
}

#[cfg(test)]
mod tests {
    use super::{Callbacks, Pending, WsCallback, take_callbacks};

    fn callback() -> WsCallback {
        Box::new(|_| {})
    }

    /// Each attempt at a proxy's next address tunnels again: the `CONNECT` request goes
    /// with it (the second attempt went to the proxy without one).
    #[test]
    fn a_redial_through_a_proxy_keeps_its_connect_request() {
        let addrs: Vec<std::net::SocketAddr> = vec![
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ];
        let request = b"CONNECT target:80 HTTP/1.1\r\nHost: target:80\r\n\r\n".to_vec();
        let redial = Box::new(super::Redial {
            addrs: addrs.clone().into(),
            connect_timed_out: false,
            url: "ws://target/".to_string(),
            options: crate::protocol::options::Options::default(),
            proxy: Some(request.clone()),
            #[cfg(feature = "tls")]
            tls: None,
        });
        let Ok((addr, init)) = redial.next(()) else {
            panic!("a second attempt");
        };
        assert_eq!(addr, addrs[0]);
        assert_eq!(init.proxy.as_deref(), Some(&request[..]));
        let Ok((addr, init)) = init.redial.expect("one address left").next(()) else {
            panic!("a third attempt");
        };
        assert_eq!(addr, addrs[1]);
        assert_eq!(init.proxy.as_deref(), Some(&request[..]));
        assert!(init.redial.is_none());
    }

    /// The entry goes with its last callback (and stays while one waits), so an idle
    /// loop's map is empty again.
    #[test]
    fn a_connections_entry_goes_with_its_last_callback() {
        let mut callbacks = Callbacks::new();
        let mut pending = Pending::default();
        pending.pongs.push(b"a".to_vec(), callback());
        pending.pongs.push(b"b".to_vec(), callback());
        callbacks.insert(7, pending);
        let answered = take_callbacks(&mut callbacks, 7, |p| p.take_pongs(b"a"));
        assert_eq!(answered.len(), 1);
        assert!(callbacks.contains_key(&7), "b still waits");
        let answered = take_callbacks(&mut callbacks, 7, |p| p.take_pongs(b"b"));
        assert_eq!(answered.len(), 1);
        assert!(callbacks.is_empty(), "the emptied entry is gone");
        let none = take_callbacks(&mut callbacks, 7, |p| p.take_pongs(b"b"));
        assert!(none.is_empty());
    }
}
