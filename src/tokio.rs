//! The driver on tokio (feature `tokio`): WebSockets over any `AsyncRead + AsyncWrite`
//! (`TcpStream`, a TLS stream, a hyper upgrade, a duplex pipe).
//!
//! [`accept`] (server) and [`connect`] / [`client`] (client) complete the opening handshake
//! and return the connection split in two:
//!
//! - [`WsSender`]: cloneable, for any task; async `send_text`, `send_binary`, `send_ping`,
//!   `close_connection`… Each call queues one whole message; it waits while the connection's
//!   outgoing buffer is over [`Config::max_backpressure`] (1 MiB by default).
//! - [`WsReceiver`]: the driver's [`Event`]s in order (`Open`, `Message`, `Ping`, `Pong`,
//!   `Error`, `Close`), through [`WsReceiver::next`] or as a `futures_core::Stream`. `Close`
//!   comes exactly once, then `None`.
//!
//! One spawned task per connection owns the [`Driver`] and the stream: it reads, runs
//! [`Driver::poll_event`], hands owned events to the receiver, applies the senders'
//! commands and writes the driver's output.
//!
//! Input is parsed as the receiver asks for events (like a synchronous read loop): while
//! the connection is open, the task parses the next event only when the receiver waits
//! for one, and applies the commands queued before that first. So an app that answers a
//! message before asking for the next one gets its answer out before anything the
//! following frames cause (a protocol error's close frame, a pong), which keeps the
//! Autobahn suite strict; and a receiver that stops asking stops the reading (TCP pushes
//! back on the peer). Keep polling [`WsReceiver::next`] (in a `select!` beside your other
//! work) for pings to be answered and closes to be seen. Once closing, input is parsed as
//! it comes.
//!
//! Seed-style callbacks: implement [`Handler`] and [`run`] it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), websocket_driver::Error> {
//! use websocket_driver::tokio::{accept, connect};
//! use websocket_driver::{Event, Options};
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9001").await?;
//! let (stream, _) = listener.accept().await?;
//! let (tx, mut rx) = accept(stream, &Options::default()).await?;
//! while let Some(event) = rx.next().await {
//!     if let Event::Message(message) = event {
//!         let _ = tx.send_message(message).await; // echo
//!     }
//! }
//!
//! let (tx, mut rx) = connect("ws://127.0.0.1:9001/", &Options::default()).await?;
//! tx.send_text("Hi").await?;
//! # Ok(()) }
//! ```
//!
//! Cancellation: every `send*` future is cancel-safe. Dropped before it completes, it
//! queued nothing; once it completed, the whole message will be written (or the connection
//! closes). The connection task never writes part of a frame on a caller's behalf, so an
//! aborted task cannot leave a half-sent message on the wire.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use ::tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use ::tokio::net::TcpStream;
use ::tokio::sync::{Notify, mpsc};
use ::tokio::time::{Instant, sleep_until, timeout};

use crate::protocol::driver::{Driver, Event, Message, MessageType, ReadyState, Role};
use crate::protocol::error::{Error, HandshakeError, UsageError, code, is_valid_close_code};
use crate::protocol::frame::Status;
use crate::protocol::handshake::{ClientUrl, Request, RequestParser};
use crate::protocol::options::Options;
use crate::session::timers::{Expired, TimerConfig, Timers};
use crate::session::upgrade::{self, Answer, HttpResponse, NonUpgrade, error_response};

/// Events the receiver may lag behind before the connection stops reading.
const EVENT_QUEUE: usize = 32;
/// Commands senders may queue ahead of the connection task (on top of the byte budget).
const COMMAND_QUEUE: usize = 64;

/// Settings of the tokio adapter, beside the driver's [`Options`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Outgoing bytes (queued by senders and not yet written) over which `send` waits.
    /// Default 1 MiB. A message is admitted while the buffer is at or under the limit,
    /// whatever its own size.
    pub max_backpressure: usize,
    /// Time the peer has to complete the opening handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time the peer has to answer our close frame (and, once closed, to take the last
    /// bytes and end the stream) before it is dropped. Default 5 s.
    pub close_timeout: Duration,
    /// Size of the connection's read buffer. Default 64 KiB.
    pub read_buffer_size: usize,
    /// With `Some(t)`: after `t` without input, send a ping; after another `t` still
    /// without input, close with 1001 "idle timeout" (the close frame then has
    /// [`Config::close_timeout`] to get out). Default `None` (off).
    ///
    /// Input counts when the connection task reads it, and while open it reads only as
    /// the [`WsReceiver`] asks for events: keep polling [`WsReceiver::next`], or a busy
    /// receiver looks like a silent peer.
    pub idle_timeout: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_backpressure: 1 << 20,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            read_buffer_size: 64 * 1024,
            idle_timeout: None,
        }
    }
}

impl Config {
    /// Sets [`Config::max_backpressure`].
    pub fn max_backpressure(mut self, bytes: usize) -> Self {
        self.max_backpressure = bytes;
        self
    }

    /// Sets [`Config::handshake_timeout`].
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`Config::close_timeout`].
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Sets [`Config::read_buffer_size`].
    pub fn read_buffer_size(mut self, bytes: usize) -> Self {
        self.read_buffer_size = bytes.max(1);
        self
    }

    /// Sets [`Config::idle_timeout`] (`None`: off).
    pub fn idle_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.idle_timeout = timeout.into();
        self
    }

    /// The deadlines' durations (the adapter has no backpressure grace: senders wait).
    fn timer_config(&self) -> TimerConfig {
        TimerConfig {
            handshake: self.handshake_timeout,
            close: self.close_timeout,
            idle: self.idle_timeout,
            backpressure_grace: None,
        }
    }
}

// ----- shared state -----

fn state_code(state: ReadyState) -> u8 {
    match state {
        ReadyState::Connecting => 0,
        ReadyState::Open => 1,
        ReadyState::Closing => 2,
        ReadyState::Closed => 3,
    }
}

fn state_from(code: u8) -> ReadyState {
    match code {
        0 => ReadyState::Connecting,
        1 => ReadyState::Open,
        2 => ReadyState::Closing,
        _ => ReadyState::Closed,
    }
}

/// What the connection task publishes for its senders.
#[derive(Debug)]
struct Shared {
    /// Payload bytes senders queued that the task has not handed to the driver yet.
    queued: AtomicUsize,
    /// The driver's unwritten output.
    buffered: AtomicUsize,
    state: AtomicU8,
    /// The task has ended; nothing more will be written.
    finished: AtomicBool,
    /// Woken when the buffer shrinks, the state changes or the task ends.
    changed: Notify,
    /// The receiver waits for an event (receiver to task).
    demand: Notify,
    protocol: Option<String>,
    limit: usize,
}

impl Shared {
    fn total(&self) -> usize {
        self.queued.load(Ordering::Acquire) + self.buffered.load(Ordering::Acquire)
    }

    fn state(&self) -> ReadyState {
        state_from(self.state.load(Ordering::Acquire))
    }

    /// Publishes the driver's buffer and state; wakes waiters when either improved.
    fn publish(&self, driver: &Driver) {
        let buffered = driver.buffered_amount();
        let old = self.buffered.swap(buffered, Ordering::AcqRel);
        let state = state_code(driver.ready_state());
        let old_state = self.state.swap(state, Ordering::AcqRel);
        if buffered < old || state != old_state {
            self.changed.notify_waiters();
        }
    }

    fn finish(&self) {
        self.state
            .store(state_code(ReadyState::Closed), Ordering::Release);
        self.finished.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }
}

/// One whole message for the connection task.
#[derive(Debug)]
enum Command {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(u16, String),
}

impl Command {
    /// Bytes counted against the backpressure budget (control frames count nothing).
    fn cost(&self) -> usize {
        match self {
            Command::Text(t) => t.len(),
            Command::Binary(b) => b.len(),
            _ => 0,
        }
    }
}

// ----- sender -----

/// The sending half of a connection: `Clone + Send + Sync`, for any number of tasks.
///
/// Every `send*` queues one whole message and is cancel-safe (see the module docs). It
/// fails with [`UsageError::NotOpen`] once the connection is closing or closed; a message
/// accepted just before the peer closed is dropped silently, as on the reactor's `Sender`.
#[derive(Debug, Clone)]
pub struct WsSender {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

fn not_open() -> Error {
    UsageError::NotOpen.into()
}

impl WsSender {
    /// Waits until `ready` holds, or fails once the connection can no longer send.
    async fn wait_until(&self, ready: impl Fn(&Shared) -> bool) -> Result<(), Error> {
        loop {
            let notified = self.shared.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if !matches!(
                self.shared.state(),
                ReadyState::Connecting | ReadyState::Open
            ) {
                return Err(not_open());
            }
            if ready(&self.shared) {
                return Ok(());
            }
            notified.await;
        }
    }

    async fn submit(&self, command: Command) -> Result<(), Error> {
        let cost = command.cost();
        if cost > 0 {
            self.wait_until(|s| s.total() <= s.limit).await?;
        } else {
            self.wait_until(|_| true).await?;
        }
        let permit = self.commands.reserve().await.map_err(|_| not_open())?;
        // Nothing awaits from here on: the message is queued whole or not at all.
        self.shared.queued.fetch_add(cost, Ordering::AcqRel);
        permit.send(command);
        Ok(())
    }

    /// Sends `data` as `kind` (the seed's `send`): text must be UTF-8, pings and pongs at
    /// most 125 bytes, `Close(code)` takes the reason as `data`.
    pub async fn send(&self, data: impl Into<Vec<u8>>, kind: MessageType) -> Result<(), Error> {
        let data = data.into();
        match kind {
            MessageType::Text => {
                let text = String::from_utf8(data).map_err(|_| UsageError::InvalidUtf8)?;
                self.send_text(text).await
            }
            MessageType::Binary => self.send_binary(data).await,
            MessageType::Ping => self.send_ping(data).await,
            MessageType::Pong => self.send_pong(data).await,
            MessageType::Close(c) => {
                let reason = String::from_utf8(data).map_err(|_| UsageError::InvalidUtf8)?;
                self.close_connection(c, reason).await
            }
        }
    }

    /// Sends a received message back as it came: text as text, binary as binary.
    pub async fn send_message(&self, message: Message<'_>) -> Result<(), Error> {
        match message {
            Message::Text(t) => self.send_text(t.into_owned()).await,
            Message::Binary(b) => self.send_binary(b.into_owned()).await,
        }
    }

    /// Sends a text message.
    pub async fn send_text(&self, text: impl Into<String>) -> Result<(), Error> {
        self.submit(Command::Text(text.into())).await
    }

    /// Sends a binary message.
    pub async fn send_binary(&self, data: impl Into<Vec<u8>>) -> Result<(), Error> {
        self.submit(Command::Binary(data.into())).await
    }

    /// Sends a ping (at most 125 bytes); the pong arrives as [`Event::Pong`].
    pub async fn send_ping(&self, payload: impl Into<Vec<u8>>) -> Result<(), Error> {
        let payload = payload.into();
        if payload.len() > 125 {
            return Err(UsageError::ControlPayloadTooLong.into());
        }
        self.submit(Command::Ping(payload)).await
    }

    /// Sends an unsolicited pong (a heartbeat that needs no answer).
    pub async fn send_pong(&self, payload: impl Into<Vec<u8>>) -> Result<(), Error> {
        let payload = payload.into();
        if payload.len() > 125 {
            return Err(UsageError::ControlPayloadTooLong.into());
        }
        self.submit(Command::Pong(payload)).await
    }

    /// Starts the close handshake (the seed's `close-connection`): the close frame goes out
    /// after every message queued before it; [`Event::Close`] arrives when the peer answers
    /// (or after [`Config::close_timeout`], with 1006).
    pub async fn close_connection(
        &self,
        code: u16,
        reason: impl Into<String>,
    ) -> Result<(), Error> {
        let reason = reason.into();
        if !is_valid_close_code(code) {
            return Err(UsageError::InvalidCloseCode(code).into());
        }
        if reason.len() > 123 {
            return Err(UsageError::CloseReasonTooLong.into());
        }
        self.submit(Command::Close(code, reason)).await
    }

    /// Waits until everything queued so far has been written to the stream. Fails if the
    /// connection ended with bytes unwritten.
    pub async fn flush(&self) -> Result<(), Error> {
        loop {
            let notified = self.shared.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.shared.total() == 0 {
                return Ok(());
            }
            if self.shared.finished.load(Ordering::Acquire) {
                return Err(not_open());
            }
            notified.await;
        }
    }

    /// Bytes queued and not yet written (the browser API's `bufferedAmount`).
    pub fn buffered_amount(&self) -> usize {
        self.shared.total()
    }

    /// The connection state, as last published by the connection task.
    pub fn ready_state(&self) -> ReadyState {
        self.shared.state()
    }

    /// Whether messages can still be sent.
    pub fn is_open(&self) -> bool {
        self.shared.state() == ReadyState::Open
    }

    /// The agreed subprotocol, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.shared.protocol.as_deref()
    }

    /// `"hybi-13"`.
    pub fn version(&self) -> &'static str {
        "hybi-13"
    }
}

// ----- receiver -----

/// The receiving half of a connection: the driver's events, in order.
///
/// Yields [`Event::Open`] first, then messages, pings, pongs and errors, then exactly one
/// [`Event::Close`], then `None`. Dropping it discards later events; the connection runs
/// on for its senders (and closes with 1000 once they are all dropped too).
#[derive(Debug)]
pub struct WsReceiver {
    events: mpsc::Receiver<Event<'static>>,
    shared: Arc<Shared>,
    /// The connection task was asked for an event that has not come yet.
    requested: bool,
    closed: bool,
}

impl WsReceiver {
    /// The next event, or `None` after [`Event::Close`]. Cancel-safe.
    pub async fn next(&mut self) -> Option<Event<'static>> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// Polls for the next event (what `Stream::poll_next` does).
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event<'static>>> {
        if self.closed {
            return Poll::Ready(None);
        }
        match self.events.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                self.requested = false;
                if matches!(event, Event::Close { .. }) {
                    self.closed = true;
                    self.events.close();
                }
                Poll::Ready(Some(event))
            }
            Poll::Ready(None) => {
                // The task ended without reporting a close (its runtime shut down).
                self.closed = true;
                Poll::Ready(Some(Event::Close {
                    code: code::ABNORMAL,
                    reason: "connection task ended".into(),
                }))
            }
            Poll::Pending => {
                if !self.requested {
                    // Ask the connection task to parse the next event.
                    self.requested = true;
                    self.shared.demand.notify_one();
                }
                Poll::Pending
            }
        }
    }
}

impl futures_core::Stream for WsReceiver {
    type Item = Event<'static>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event<'static>>> {
        self.get_mut().poll_event(cx)
    }
}

impl futures_core::FusedStream for WsReceiver {
    fn is_terminated(&self) -> bool {
        self.closed
    }
}

// ----- seed-style handler -----

/// Seed-style event handlers over the tokio adapter, like the reactor's
/// [`crate::server::Handler`] but async. Every method has an empty default. Run one with
/// [`run`].
///
/// ```no_run
/// use websocket_driver::Message;
/// use websocket_driver::tokio::{Handler, WsSender};
///
/// struct Echo;
/// impl Handler for Echo {
///     async fn on_message(&mut self, ws: &WsSender, message: Message<'static>) {
///         let _ = ws.send_message(message).await;
///     }
/// }
/// ```
pub trait Handler: Send {
    /// The connection is open.
    fn on_open(&mut self, ws: &WsSender) -> impl Future<Output = ()> + Send {
        let _ = ws;
        async {}
    }
    /// A complete message.
    fn on_message(
        &mut self,
        ws: &WsSender,
        message: Message<'static>,
    ) -> impl Future<Output = ()> + Send {
        let _ = (ws, message);
        async {}
    }
    /// The peer broke the protocol or the transport failed (a close follows).
    fn on_error(&mut self, ws: &WsSender, error: &Error) -> impl Future<Output = ()> + Send {
        let _ = (ws, error);
        async {}
    }
    /// The connection closed; called exactly once.
    fn on_close(
        &mut self,
        ws: &WsSender,
        code: u16,
        reason: &str,
    ) -> impl Future<Output = ()> + Send {
        let _ = (ws, code, reason);
        async {}
    }
    /// A ping arrived (the pong is already queued).
    fn on_ping(&mut self, ws: &WsSender, payload: &[u8]) -> impl Future<Output = ()> + Send {
        let _ = (ws, payload);
        async {}
    }
    /// A pong arrived.
    fn on_pong(&mut self, ws: &WsSender, payload: &[u8]) -> impl Future<Output = ()> + Send {
        let _ = (ws, payload);
        async {}
    }
}

/// Runs `handler` on a connection until it closes, and returns the handler.
///
/// ```no_run
/// # use websocket_driver::tokio::{Handler, run, accept};
/// # struct Echo; impl Handler for Echo {}
/// # async fn demo(stream: tokio::net::TcpStream) -> Result<(), websocket_driver::Error> {
/// run(accept(stream, &Default::default()).await?, Echo).await;
/// # Ok(()) }
/// ```
pub async fn run<H: Handler>(connection: (WsSender, WsReceiver), mut handler: H) -> H {
    let (ws, mut events) = connection;
    while let Some(event) = events.next().await {
        match event {
            Event::Open => handler.on_open(&ws).await,
            Event::Message(m) => handler.on_message(&ws, m).await,
            Event::Ping(p) => handler.on_ping(&ws, &p).await,
            Event::Pong(p) => handler.on_pong(&ws, &p).await,
            Event::Error(e) => handler.on_error(&ws, &e).await,
            Event::Close { code, reason } => handler.on_close(&ws, code, &reason).await,
        }
    }
    handler
}

// ----- handshakes -----

async fn reject<S: AsyncWrite + Unpin>(stream: &mut S, response: &[u8]) {
    let _ = stream.write_all(response).await;
    let _ = stream.shutdown().await;
}

fn timed_out(what: &str) -> Error {
    Error::Io(io::Error::new(io::ErrorKind::TimedOut, what.to_string()))
}

/// Reads an upgrade request head; returns it and the bytes that followed it.
async fn read_request<S>(stream: &mut S, options: &Options) -> Result<(Request, Vec<u8>), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut parser = RequestParser::new(options.head_limits());
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(HandshakeError::Incomplete.into());
        }
        match parser.parse(&buf[..n]) {
            Ok(Status::Complete(request, used)) => return Ok((request, buf[used..n].to_vec())),
            Ok(Status::Partial) => continue,
            Err(e) => {
                reject(stream, &error_response(&e)).await;
                return Err(e.into());
            }
        }
    }
}

/// Accepts a WebSocket connection on `stream`: reads the upgrade request, answers it (an
/// HTTP error for a bad one) and starts the connection task. Needs a tokio runtime.
pub async fn accept<S>(stream: S, options: &Options) -> Result<(WsSender, WsReceiver), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    accept_with(stream, options, &Config::default(), |_| Ok(())).await
}

/// [`accept`] with settings and a check: `check` sees the parsed request (path, headers)
/// and may refuse it with an HTTP response, which is sent before the stream closes.
pub async fn accept_with<S, F>(
    mut stream: S,
    options: &Options,
    config: &Config,
    check: F,
) -> Result<(WsSender, WsReceiver), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnOnce(&Request) -> Result<(), HttpResponse>,
{
    let (request, read_ahead) =
        match timeout(config.handshake_timeout, read_request(&mut stream, options)).await {
            Ok(result) => result?,
            Err(_) => return Err(timed_out("handshake timed out")),
        };
    let mut driver =
        match upgrade::answer(&request, options, check(&request), NonUpgrade::BadRequest) {
            Answer::Accept(driver, ()) => driver,
            Answer::Reject(refusal) => {
                reject(&mut stream, &refusal.response).await;
                return Err(refusal.error);
            }
        };
    driver.start_connection();
    Ok(spawn(stream, driver, read_ahead, config))
}

/// Connects to a `ws://` URL over TCP and completes the handshake. For `wss://`, open the
/// TLS stream yourself and use [`client`].
pub async fn connect(url: &str, options: &Options) -> Result<(WsSender, WsReceiver), Error> {
    connect_with(url, options, &Config::default()).await
}

/// [`connect`] with settings.
pub async fn connect_with(
    url: &str,
    options: &Options,
    config: &Config,
) -> Result<(WsSender, WsReceiver), Error> {
    let parsed = ClientUrl::parse(url)?;
    if parsed.secure {
        return Err(UsageError::InvalidUrl(format!(
            "{url} (wss:// needs a TLS stream: connect one and call websocket_driver::tokio::client)"
        ))
        .into());
    }
    let stream = match timeout(
        config.handshake_timeout,
        TcpStream::connect((parsed.host.as_str(), parsed.port)),
    )
    .await
    {
        Ok(stream) => stream?,
        Err(_) => return Err(timed_out("connect timed out")),
    };
    stream.set_nodelay(true)?;
    client_with(stream, url, options, config).await
}

/// Runs the client handshake for `url` over an already connected `stream` (TCP, TLS, a
/// proxy tunnel) and starts the connection task.
pub async fn client<S>(
    stream: S,
    url: &str,
    options: &Options,
) -> Result<(WsSender, WsReceiver), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    client_with(stream, url, options, &Config::default()).await
}

/// [`client`] with settings.
pub async fn client_with<S>(
    mut stream: S,
    url: &str,
    options: &Options,
    config: &Config,
) -> Result<(WsSender, WsReceiver), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut driver = Driver::make_client(url, options)?;
    driver.start_connection();
    let handshake = async {
        stream.write_all(driver.pending_output()).await?;
        let n = driver.pending_output().len();
        driver.consume_output(n);
        stream.flush().await?;
        let mut buf = vec![0u8; 8 * 1024];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                driver.receive_eof();
            }
            let mut at = 0;
            loop {
                let (used, event) = driver.poll_event(&mut buf[at..n]);
                at += used;
                match event {
                    None => break,
                    Some(Event::Open) => return Ok::<_, Error>(buf[at..n].to_vec()),
                    Some(Event::Error(e)) => return Err(e),
                    Some(_) => {}
                }
            }
            if n == 0 || driver.ready_state() == ReadyState::Closed {
                return Err(HandshakeError::Incomplete.into());
            }
        }
    };
    let read_ahead = match timeout(config.handshake_timeout, handshake).await {
        Ok(result) => result?,
        Err(_) => return Err(timed_out("handshake timed out")),
    };
    let mut events = VecDeque::new();
    events.push_back(Event::Open);
    Ok(spawn_with(stream, driver, read_ahead, events, config))
}

/// Runs a started driver over `stream` on a new task, for transports whose handshake
/// happened elsewhere (the hyper adapter uses this). `read_ahead` holds bytes already read
/// from the stream past the handshake. Queued driver events (a server's `Open`) come out
/// of the receiver first.
pub fn spawn<S>(
    stream: S,
    driver: Driver,
    read_ahead: Vec<u8>,
    config: &Config,
) -> (WsSender, WsReceiver)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    spawn_with(stream, driver, read_ahead, VecDeque::new(), config)
}

fn spawn_with<S>(
    stream: S,
    driver: Driver,
    read_ahead: Vec<u8>,
    inbox: VecDeque<Event<'static>>,
    config: &Config,
) -> (WsSender, WsReceiver)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        buffered: AtomicUsize::new(driver.buffered_amount()),
        state: AtomicU8::new(state_code(driver.ready_state())),
        finished: AtomicBool::new(false),
        changed: Notify::new(),
        demand: Notify::new(),
        protocol: driver.protocol().map(str::to_string),
        limit: config.max_backpressure,
    });
    let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
    let end = read_ahead.len();
    let mut buf = read_ahead;
    buf.resize(end.max(config.read_buffer_size.max(1)), 0);
    let connection = Connection {
        driver,
        timers: Timers::new(),
        timer_config: config.timer_config(),
        inbox,
        shared: shared.clone(),
        commands: command_rx,
        events: event_tx,
        config: config.clone(),
        close_seen: false,
        buf,
        start: 0,
        end,
        credit: false,
        receiver_gone: false,
    };
    ::tokio::spawn(connection.run(stream));
    (
        WsSender {
            commands: command_tx,
            shared: shared.clone(),
        },
        WsReceiver {
            events: event_rx,
            shared,
            requested: false,
            closed: false,
        },
    )
}

// ----- the connection task -----

/// Writes some of `output` (`Some(n)`), or flushes when it is empty (`None`). Cancel-safe:
/// a write dropped before completing wrote nothing.
async fn write_or_flush<W: AsyncWrite + Unpin>(
    wr: &mut W,
    output: &[u8],
) -> io::Result<Option<usize>> {
    if output.is_empty() {
        wr.flush().await.map(|()| None)
    } else {
        wr.write(output).await.map(Some)
    }
}

struct Connection {
    driver: Driver,
    /// The close deadline and the idle keepalive.
    timers: Timers,
    timer_config: TimerConfig,
    /// Events taken from the driver, not yet handed to the receiver.
    inbox: VecDeque<Event<'static>>,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event<'static>>,
    config: Config,
    /// A `Close` went into the inbox: nothing may follow it.
    close_seen: bool,
    /// The read buffer; `buf[start..end]` is read and not yet parsed.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The receiver asked for an event and has not been given one since.
    credit: bool,
    receiver_gone: bool,
}

/// The clock the deadlines run on (tokio's, so a paused test clock applies).
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Copies borrowed payloads so an event outlives the read buffer.
fn owned(event: Event<'_>) -> Event<'static> {
    match event {
        Event::Open => Event::Open,
        Event::Message(m) => Event::Message(m.into_owned()),
        Event::Ping(p) => Event::Ping(Cow::Owned(p.into_owned())),
        Event::Pong(p) => Event::Pong(Cow::Owned(p.into_owned())),
        Event::Error(e) => Event::Error(e),
        Event::Close { code, reason } => Event::Close { code, reason },
    }
}

impl Connection {
    fn push(&mut self, event: Event<'_>) {
        match event {
            Event::Close { .. } => self.close_seen = true,
            // A client driver handed over still connecting has just opened.
            Event::Open => self.timers.opened(now(), &self.timer_config),
            _ => {}
        }
        self.inbox.push_back(owned(event));
    }

    /// Moves the events the driver already queued (no input) into the inbox.
    fn drain(&mut self) {
        while let (_, Some(event)) = self.driver.poll_event(&mut []) {
            self.push(event);
        }
    }

    /// Whether the next event may be parsed now.
    ///
    /// While the connection is open, input is parsed one event per request of the
    /// receiver, after the commands queued before that request: an app that answers each
    /// message before asking for the next (an echo) sees its answer go out before whatever
    /// the following frames cause (a protocol error's close, a pong), as with a
    /// synchronous handler. Once closing, nothing can be sent any more, and input is parsed
    /// as it comes (up to the receiver's queue).
    fn may_parse(&self) -> bool {
        self.inbox.is_empty()
            && (self.credit || self.receiver_gone || self.driver.ready_state() != ReadyState::Open)
    }

    /// Parses up to one event from the unparsed input; true if one came.
    fn parse_one(&mut self) -> bool {
        if self.driver.ready_state() == ReadyState::Open {
            // Commands queued before the receiver's request go first.
            while let Ok(command) = self.commands.try_recv() {
                self.apply(command);
            }
        }
        let mut buf = std::mem::take(&mut self.buf);
        let (used, event) = self.driver.poll_event(&mut buf[self.start..self.end]);
        self.start += used;
        let got = match event {
            Some(event) => {
                self.push(event);
                true
            }
            None => false,
        };
        self.buf = buf;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if got {
            self.credit = false;
        }
        got
    }

    /// The transport failed or ended: report the error (if the connection was not closed
    /// already) and let the driver report its close.
    fn transport_ended(&mut self, error: Option<io::Error>) {
        if let Some(e) = error
            && !self.close_seen
        {
            self.inbox.push_back(Event::Error(Error::Io(e)));
        }
        self.driver.receive_eof();
        self.drain();
    }

    fn apply(&mut self, command: Command) {
        let cost = command.cost();
        // Refused commands (the connection closed meanwhile) are dropped.
        let _ = match command {
            Command::Text(t) => self.driver.send_text(&t),
            Command::Binary(b) => self.driver.send_binary(&b),
            Command::Ping(p) => self.driver.send_ping(&p),
            Command::Pong(p) => self.driver.send_pong(&p),
            Command::Close(c, r) => self.driver.close_connection(c, &r),
        };
        self.shared
            .buffered
            .store(self.driver.buffered_amount(), Ordering::Release);
        self.shared.queued.fetch_sub(cost, Ordering::AcqRel);
    }

    /// Hands inbox events to the receiver as far as its queue has room.
    fn try_deliver(&mut self) {
        while let Some(event) = self.inbox.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.inbox.push_front(event);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.receiver_gone = true;
                    self.inbox.clear();
                    return;
                }
            }
        }
    }

    async fn run<S>(mut self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, mut wr) = ::tokio::io::split(stream);
        let shared = self.shared.clone();
        let mut reading = true;
        let mut writing = true;
        let mut flushed = true;
        let mut commands_open = true;
        match self.driver.ready_state() {
            ReadyState::Connecting => self.timers.handshake_started(now(), &self.timer_config),
            _ => self.timers.opened(now(), &self.timer_config),
        }
        loop {
            self.try_deliver();
            if self.may_parse() && self.parse_one() {
                continue;
            }
            self.shared.publish(&self.driver);
            if !writing || self.driver.is_finished() {
                break;
            }
            let state = self.driver.ready_state();
            if self.receiver_gone && !commands_open && state == ReadyState::Open {
                // Nobody can use the connection any more: close it properly.
                let _ = self.driver.close_connection(code::NORMAL, "");
                continue;
            }
            if matches!(state, ReadyState::Closing | ReadyState::Closed) {
                // Once closing, the peer has the close timeout to answer and take the rest.
                self.timers.close_started(now(), &self.timer_config);
            }
            if state == ReadyState::Closed {
                self.timers.closed();
            }
            let deadline = self.timers.poll_timeout().map(Instant::from_std);
            let has_output = !self.driver.pending_output().is_empty();
            let want_input = reading && self.may_parse() && self.start == self.end;
            ::tokio::select! {
                permit = self.events.clone().reserve_owned(), if !self.inbox.is_empty() => {
                    match permit {
                        Ok(permit) => {
                            permit.send(self.inbox.pop_front().expect("the inbox has an event"));
                        }
                        Err(_) => {
                            self.receiver_gone = true;
                            self.inbox.clear();
                        }
                    }
                }
                _ = self.events.closed(), if !self.receiver_gone && self.inbox.is_empty() => {
                    self.receiver_gone = true;
                }
                _ = shared.demand.notified(), if !self.credit => self.credit = true,
                // Write while there is output, then flush (a TLS stream may buffer).
                done = write_or_flush(&mut wr, self.driver.pending_output()),
                    if has_output || !flushed => match done {
                    Ok(Some(0)) => {
                        writing = false;
                        self.transport_ended(Some(io::ErrorKind::WriteZero.into()));
                    }
                    Ok(Some(n)) => {
                        self.driver.consume_output(n);
                        flushed = false;
                    }
                    Ok(None) => flushed = true,
                    Err(e) => {
                        writing = false;
                        self.transport_ended(Some(e));
                    }
                },
                command = self.commands.recv(), if commands_open => match command {
                    Some(command) => self.apply(command),
                    None => commands_open = false,
                },
                read = rd.read(&mut self.buf), if want_input => match read {
                    Ok(0) => {
                        reading = false;
                        self.transport_ended(None);
                    }
                    Ok(n) => {
                        self.start = 0;
                        self.end = n;
                        self.timers.received(now(), &self.timer_config);
                    }
                    Err(e) => {
                        reading = false;
                        self.transport_ended(Some(e));
                    }
                },
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    match self.timers.handle_timeout(now(), &self.timer_config, &mut self.driver) {
                        // The opening or close handshake took too long: drop the peer.
                        Expired::Drop(_) => {
                            self.drain();
                            writing = false;
                        }
                        // A silent peer: the close frame goes out, then the close timeout.
                        Expired::IdleClose => self.drain(),
                        // A keepalive ping is queued (or nothing was due yet).
                        Expired::Ping | Expired::Nothing => {}
                    }
                }
                else => break,
            }
        }
        self.drain();
        // Closed: stop taking commands, tell the senders, hand out the last events while
        // the stream ends.
        self.commands.close();
        self.shared.finish();
        let Connection {
            driver,
            inbox,
            events,
            config,
            mut buf,
            ..
        } = self;
        let linger = async {
            if !writing {
                return;
            }
            let wait_eof = async {
                while reading {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => reading = false,
                        Ok(_) => {}
                    }
                }
            };
            if driver.role() == Role::Server {
                // The server closes TCP first (RFC 6455 §7.1.1) but reads on for a moment,
                // so unread bytes do not turn the close into a reset.
                let _ = timeout(config.close_timeout, wr.shutdown()).await;
                let _ = timeout(config.close_timeout, wait_eof).await;
            } else {
                // The client waits for the server to close first.
                let _ = timeout(config.close_timeout, wait_eof).await;
                let _ = timeout(config.close_timeout, wr.shutdown()).await;
            }
        };
        let flush_events = async {
            for event in inbox {
                if events.send(event).await.is_err() {
                    break;
                }
            }
        };
        ::tokio::join!(linger, flush_events);
    }
}
