//! The seed's `make-client` over a blocking socket: the handshake on the caller's thread,
//! then an I/O thread that reads, fires the events and writes; sends and closes from any
//! thread. See [`BlockingClient`] for how writes wait (flow control).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::blocking::{Timeouts, read_by};
use crate::protocol::driver::{Driver, Message, MessageType, ReadyState, SendToken};
use crate::protocol::error::{Error, HandshakeError, UsageError};
use crate::protocol::handshake::ClientUrl;
use crate::protocol::options::Options;
use crate::session::timers::{Expired, Stall, Timers, earliest};
use crate::websocket::WebSocket;

use crate::client::{addresses, parse_url};
use crate::protocol::frame::Status;
use crate::session::proxy::{self, Proxy};

mod session;

use session::{Session, Shared};

/// Timeouts of a [`BlockingClient`]: the blocking runtime's [`Timeouts`], whose
/// `connect` applies to clients only.
pub type ClientTimeouts = Timeouts;

/// The socket in the I/O thread's poll, and its waker.
const STREAM: mio::Token = mio::Token(0);
const WAKE: mio::Token = mio::Token(1);

/// A client on a blocking socket, like the seed's: `start_connection` connects and
/// performs the handshake on the caller's thread, then an I/O thread fires the events.
/// Sends and `close_connection` work from any thread; handlers run on the I/O thread
/// with the connection locked, so automatic pongs never interleave with user frames.
/// A handler answers through the `&mut Driver` it is given: calling the client itself
/// from a handler (or dropping its last handle there) would wait for that lock forever.
///
/// # Flow control
///
/// Nothing holds the connection lock across a blocking write. After the handshake the
/// socket is non-blocking: a send queues its frame and writes what the socket takes at
/// once, under the lock (a non-blocking write never waits); the rest is written by the
/// I/O thread, which sleeps in a [`mio::Poll`] until the socket is readable or writable.
/// So the I/O thread always keeps reading, and two ends that both send large messages
/// while the other is not reading cannot deadlock. A send returns once its bytes are
/// handed to the socket (on wss: encrypted, which runs up to 256 KiB ahead of the socket),
/// waiting on a condition variable rather than in a write, so each sending thread has at
/// most one message in flight. Queued output that makes no
/// progress for [`Timeouts::write`] fails the connection: `on_error` with a `TimedOut`
/// I/O error, `on_close` 1006, and the waiting sends return that error.
///
/// Frames queued by handlers on the I/O thread (automatic pongs, close replies, sends
/// from `on_message`) do not wait: the I/O thread must keep reading. They are bounded by
/// the write timeout only, so a handler should not answer every message of a peer that
/// reads nothing.
///
/// Write callbacks ([`send_with`](BlockingClient::send_with)) run on the thread whose
/// write finished the message: the sender's when the socket took it at once, the I/O
/// thread's otherwise.
///
/// ```no_run
/// use websocket_driver::client::BlockingClient;
/// use websocket_driver::Options;
///
/// let client = BlockingClient::new("ws://localhost:5000/echo", Options::default()).unwrap();
/// client.on_message(|_ws, message| println!("Got: {:?}", message.as_text()));
/// client.start_connection().unwrap();
/// client.send_text("Hi").unwrap();
/// ```
pub struct BlockingClient {
    shared: Arc<Shared>,
    proxy: Option<Proxy>,
    url: ClientUrl,
    timeouts: ClientTimeouts,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ClientConfig>>,
    io_thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for BlockingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingClient")
            .field("host", &self.url.host)
            .field("port", &self.url.port)
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking handler poisons the lock; the connection state is still consistent
    // (the driver never panics mid-update), so carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes the handshake's output on the still blocking socket (write timeout set), before
/// the I/O thread exists: the bytes are copied out under the lock and written outside it.
fn write_handshake(shared: &Shared, stream: &mut TcpStream) -> io::Result<()> {
    loop {
        let chunk = {
            let mut session = shared.lock();
            let out = session.output()?;
            if out.is_empty() {
                return Ok(());
            }
            out[..out.len().min(64 * 1024)].to_vec()
        };
        stream.write_all(&chunk).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                io::Error::new(io::ErrorKind::TimedOut, "opening handshake write timed out")
            }
            _ => e,
        })?;
        shared.lock().consumed(chunk.len());
    }
}

/// Connects to the first address `host` resolves to that accepts, each given `timeout`
/// (a name with an IPv6 and an IPv4 address, such as `localhost`, reaches a server
/// listening on either); the last failure otherwise.
fn connect_any(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    connect_first(&addresses(host, port)?, timeout)
}

/// Connects to the first of `addrs` that accepts, in order; the last failure otherwise.
fn connect_first(addrs: &[SocketAddr], timeout: Duration) -> io::Result<TcpStream> {
    let mut failure = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
    for addr in addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => failure = e,
        }
    }
    Err(failure)
}

/// A copy of `e` for the `error` callback (the original is returned to the caller).
fn reported(e: &Error) -> Error {
    match e {
        Error::Handshake(h) => Error::Handshake(h.clone()),
        Error::Protocol(p) => Error::Protocol(p.clone()),
        Error::Io(io) => Error::Io(io::Error::new(io.kind(), io.to_string())),
        Error::Tls(tls) => Error::Tls(crate::protocol::error::TlsError::msg(tls.to_string())),
        other => Error::Io(io::Error::other(other.to_string())),
    }
}

impl BlockingClient {
    /// A client for `url` (the seed's `make-client`); nothing is connected, or resolved,
    /// yet: [`BlockingClient::start_connection`] resolves the host and tries its addresses
    /// in turn (through a proxy, only the proxy's name is resolved here; the target's is
    /// the proxy's to resolve).
    pub fn new(url: &str, options: Options) -> Result<BlockingClient, Error> {
        let parsed = parse_url(url)?;
        let driver = Driver::make_client(url, &options)?;
        Ok(BlockingClient {
            shared: Arc::new(Shared {
                session: Mutex::new(Session {
                    ws: WebSocket::new(driver),
                    timers: Timers::new(),
                    timer_config: ClientTimeouts::default().timer_config(),
                    write_timeout: ClientTimeouts::default().write,
                    #[cfg(feature = "tls")]
                    tls: None,
                    #[cfg(feature = "tls")]
                    plain: Vec::new(),
                    stream: None,
                    waker: None,
                    stall: Stall::default(),
                    failed: None,
                    ended: false,
                    started: false,
                }),
                changed: Condvar::new(),
            }),
            proxy: None,
            url: parsed,
            timeouts: ClientTimeouts::default(),
            #[cfg(feature = "tls")]
            tls: None,
            io_thread: Mutex::new(None),
        })
    }

    /// How a `wss://` connection checks the server (default: the system roots).
    #[cfg(feature = "tls")]
    pub fn verify(mut self, verify: &crate::tls::Verify) -> Result<BlockingClient, Error> {
        self.tls = Some(crate::tls::client_config(verify)?);
        Ok(self)
    }

    /// Uses this rustls configuration for `wss://`.
    #[cfg(feature = "tls")]
    pub fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> BlockingClient {
        self.tls = Some(config);
        self
    }

    /// Connects through an HTTP proxy with `CONNECT` (`http://[user:password@]host:port`,
    /// credentials sent as `Proxy-Authorization: Basic`; see [`Proxy::parse`]). The
    /// WebSocket handshake (and TLS for wss) then runs through the tunnel; a proxy answer
    /// other than 2xx is `HandshakeError::ProxyRefused`, with its status and the proxy's
    /// `Proxy-Authenticate`.
    pub fn proxy(mut self, proxy_url: &str) -> Result<BlockingClient, Error> {
        self.proxy = Some(Proxy::parse(proxy_url)?);
        Ok(self)
    }

    /// Sets the timeouts (before `start_connection`).
    pub fn timeouts(mut self, timeouts: ClientTimeouts) -> BlockingClient {
        self.timeouts = timeouts;
        self
    }

    /// Adds a listener for the opening (on the caller's thread, in `start_connection`);
    /// listeners of an event run in the order they were added.
    pub fn on_open(&self, f: impl FnMut(&mut Driver) + Send + 'static) -> &Self {
        self.shared.lock().on_open(f);
        self
    }

    /// Adds a listener for each message, on the I/O thread.
    pub fn on_message(
        &self,
        f: impl for<'m> FnMut(&mut Driver, Message<'m>) + Send + 'static,
    ) -> &Self {
        self.shared.lock().on_message(f);
        self
    }

    /// Adds a listener for a protocol or handshake error (a close follows).
    pub fn on_error(&self, f: impl FnMut(&mut Driver, &Error) + Send + 'static) -> &Self {
        self.shared.lock().on_error(f);
        self
    }

    /// Adds a listener for the close, called exactly once with the code and reason.
    pub fn on_close(&self, f: impl FnMut(&mut Driver, u16, &str) + Send + 'static) -> &Self {
        self.shared.lock().on_close(f);
        self
    }

    /// Adds a listener for each pong's payload.
    pub fn on_pong(&self, f: impl FnMut(&mut Driver, &[u8]) + Send + 'static) -> &Self {
        self.shared.lock().on_pong(f);
        self
    }

    /// Connects, sends the upgrade request, waits for the 101, fires `open`, and starts
    /// the I/O thread. Any failure (the connect, the proxy, TLS, the handshake, setting
    /// up the I/O thread) fires `error` and `close` 1006, once, and is returned. An `open`
    /// listener that panics fails the connection as a listener on the I/O thread does
    /// (close 1011 "a listener panicked" to the server, `close` once here) and
    /// `start_connection` returns that as an error. Messages the server sent in the same
    /// read as its 101 are handed to the I/O thread, like every later one.
    pub fn start_connection(&self) -> Result<(), Error> {
        let started = self.connect_and_open();
        if let Err(e) = &started
            && !matches!(e, Error::Usage(_))
        {
            // Failures the handshake already reported leave the driver closed, and
            // `fail` then does nothing.
            let mut ws = self.shared.lock();
            ws.fail(reported(e), crate::code::ABNORMAL, "");
            if let Some(stream) = ws.stream.take() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        started
    }

    fn connect_and_open(&self) -> Result<(), Error> {
        {
            let mut ws = self.shared.lock();
            if std::mem::replace(&mut ws.started, true) {
                return Err(UsageError::NotOpen.into());
            }
        }
        let mut stream = match &self.proxy {
            None => connect_any(&self.url.host, self.url.port, self.timeouts.connect)?,
            Some(proxy) => {
                // The target's name is the proxy's to resolve.
                let mut stream = connect_any(&proxy.host, proxy.port, self.timeouts.connect)?;
                stream.set_write_timeout(Some(self.timeouts.write))?;
                // The proxy's answer, however it trickles in, within the handshake timeout.
                let deadline =
                    crate::instant::deadline_after(Instant::now(), self.timeouts.handshake);
                tunnel(proxy, &mut stream, &self.url, deadline)?;
                stream
            }
        };
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(self.timeouts.write))?;
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = {
            let mut ws = self.shared.lock();
            ws.timer_config = self.timeouts.timer_config();
            ws.write_timeout = self.timeouts.write;
            let config = ws.timer_config;
            ws.timers.handshake_started(Instant::now(), &config);
            #[cfg(feature = "tls")]
            if self.url.secure {
                let config = match &self.tls {
                    Some(config) => config.clone(),
                    None => crate::tls::client_config(&crate::tls::Verify::SystemRoots)?,
                };
                ws.tls = Some(crate::tls::TlsStream::client(config, &self.url.host)?);
            }
            if !ws.start_connection() {
                return Err(UsageError::NotOpen.into());
            }
            ws.timers.poll_timeout()
        };
        write_handshake(&self.shared, &mut stream)?;
        let behind_101 = loop {
            let n = match read_by(&mut stream, &mut buf, deadline) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    let timed_out =
                        io::Error::new(io::ErrorKind::TimedOut, "opening handshake timed out");
                    return Err(handshake_failed(&mut self.shared.lock(), timed_out));
                }
                Err(e) => return Err(handshake_failed(&mut self.shared.lock(), e)),
            };
            let mut ws = self.shared.lock();
            if n == 0 {
                // A refusal whose body ran to the close is reported as that refusal.
                return Err(ended_before_101(&mut ws));
            }
            let session = &mut *ws;
            let received = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                session.receive_handshake(&mut buf[..n])
            }));
            let Ok(received) = received else {
                // `on_open` panicked (here, on the caller's thread): the connection fails
                // as on the I/O thread, with 1011 to the server and `on_close` once, and
                // `start_connection` reports it.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    ws.ws
                        .abort(crate::code::INTERNAL_ERROR, "a listener panicked")
                }));
                drop(ws);
                let _ = write_handshake(&self.shared, &mut stream);
                let _ = stream.shutdown(Shutdown::Both);
                return Err(io::Error::other("a listener panicked").into());
            };
            if ws.is_handshake_complete() && received.is_ok() {
                // What follows the handshake is the I/O thread's to write, and what the
                // server sent behind its 101 the I/O thread's to read: taken out of the
                // `WebSocket`, where the next call from any thread would read it.
                let config = ws.timer_config;
                ws.timers.opened(Instant::now(), &config);
                break ws.ws.take_unread();
            }
            if received.is_ok() && ws.peer_closed_tls() {
                // On wss the server ended TLS (close_notify) before its 101: no answer can
                // follow, whatever TCP does.
                return Err(ended_before_101(&mut ws));
            }
            drop(ws);
            // The TLS handshake's next flight, or an alert.
            let written = write_handshake(&self.shared, &mut stream);
            let mut ws = self.shared.lock();
            if let Err(e) = received {
                // The handler hears the cause that is returned (a TLS error), not
                // "connection closed during the handshake".
                ws.fail(reported(&e), crate::code::ABNORMAL, "");
                return Err(e);
            }
            if let Err(e) = written {
                ws.receive_error(io::Error::new(e.kind(), e.to_string()));
                return Err(e.into());
            }
            if ws.ready_state() == ReadyState::Closed {
                let why = ws
                    .handshake_error()
                    .cloned()
                    .unwrap_or(HandshakeError::Incomplete);
                return Err(why.into());
            }
        };
        // Open: the socket turns non-blocking and the I/O thread takes over.
        stream.set_nonblocking(true)?;
        let mut conn = mio::net::TcpStream::from_std(stream);
        let poll = mio::Poll::new()?;
        poll.registry().register(
            &mut conn,
            STREAM,
            mio::Interest::READABLE | mio::Interest::WRITABLE,
        )?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKE)?);
        let conn = Arc::new(conn);
        {
            let mut ws = self.shared.lock();
            ws.stream = Some(conn.clone());
            ws.waker = Some(waker);
        }
        let shared = self.shared.clone();
        let io_thread = std::thread::Builder::new()
            .name("wsd-client-io".into())
            .spawn(move || io_loop(shared, conn, poll, buf, behind_101))?;
        *lock(&self.io_thread) = Some(io_thread);
        Ok(())
    }

    /// Runs `f` on the driver, writes what the socket takes now, and (once open) waits
    /// until the returned send is handed to the socket (see [`BlockingClient`]).
    fn submit(
        &self,
        f: impl FnOnce(&mut WebSocket) -> Result<SendToken, Error>,
    ) -> Result<SendToken, Error> {
        let mut ws = self.shared.lock();
        let token = f(&mut ws)?;
        ws.track();
        if ws.stream.is_none() {
            // Not open yet: queued, written once the handshake is done.
            return Ok(token);
        }
        ws.write_ready();
        self.shared.changed.notify_all();
        if ws.has_output() || ws.ready_state() != ReadyState::Open {
            // The I/O thread times what is left (and a close).
            ws.wake();
        }
        loop {
            if ws.is_sent(token) {
                return Ok(token);
            }
            if let Some((kind, why)) = &ws.failed {
                return Err(io::Error::new(*kind, why.clone()).into());
            }
            if ws.ended {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the connection ended before the message was written",
                )
                .into());
            }
            ws = self.shared.wait(ws);
        }
    }

    /// Sends `data` as `kind` (queued if not yet open). Returns once the bytes are handed
    /// to the socket; an error if the connection fails first (a write timeout, say).
    pub fn send(&self, data: &[u8], kind: MessageType) -> Result<SendToken, Error> {
        self.submit(|ws| ws.send(data, kind))
    }

    /// Sends `data` as `kind`; `on_written` runs once its bytes are handed to the socket
    /// (the seed's `(send ws data :callback fn)`), on whichever thread writes them: this
    /// one when the socket takes them at once, the I/O thread otherwise.
    pub fn send_with(
        &self,
        data: &[u8],
        kind: MessageType,
        on_written: impl FnOnce(&mut Driver) + Send + 'static,
    ) -> Result<SendToken, Error> {
        self.submit(|ws| ws.send_with(data, kind, on_written))
    }

    /// Sends a text message.
    pub fn send_text(&self, text: &str) -> Result<SendToken, Error> {
        self.submit(|ws| ws.send_text(text))
    }

    /// Sends a binary message.
    pub fn send_binary(&self, data: &[u8]) -> Result<SendToken, Error> {
        self.submit(|ws| ws.send_binary(data))
    }

    /// Sends a ping; `on_pong` runs on the I/O thread when the matching pong arrives, or the
    /// pong of a later ping (see [`WebSocket::send_ping`](crate::WebSocket::send_ping)).
    pub fn send_ping(
        &self,
        payload: &[u8],
        on_pong: impl FnOnce(&mut Driver) + Send + 'static,
    ) -> Result<SendToken, Error> {
        self.submit(|ws| ws.send_ping(payload, on_pong))
    }

    /// The connection state.
    pub fn ready_state(&self) -> ReadyState {
        self.shared.lock().ready_state()
    }

    /// The agreed subprotocol.
    pub fn protocol(&self) -> Option<String> {
        self.shared.lock().protocol().map(str::to_string)
    }

    /// Performs the close handshake: sends the close frame, waits up to the close timeout
    /// for the server's reply (and its TCP close), then closes TCP. `close` fires once.
    pub fn close_connection(&self, code: u16, reason: &str) -> Result<(), Error> {
        let sent = self.submit(|ws| ws.close_connection(code, reason));
        if let Err(Error::Usage(_)) = sent {
            return sent.map(|_| ());
        }
        if sent.is_ok() {
            let deadline = crate::instant::deadline_after(Instant::now(), self.timeouts.close);
            if self.wait_closed(self.timeouts.close) {
                self.shared.lock().close_tls();
            }
            self.wait_ended(deadline.saturating_duration_since(Instant::now()));
        }
        self.shutdown();
        sent.map(|_| ())
    }

    /// Blocks until the I/O thread is done (the server closed TCP after the close
    /// handshake, or the connection failed or timed out) or `timeout` passes: the server
    /// closes TCP first (RFC 6455 §7.1.1), so the client does not hold its TIME_WAIT.
    fn wait_ended(&self, timeout: Duration) {
        self.wait_for(timeout, |ws| ws.ended || ws.stream.is_none());
    }

    /// Blocks until the connection is closed or `timeout` passes; returns whether closed.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |ws| ws.ready_state() == ReadyState::Closed)
    }

    /// Blocks until `done` holds for the session or `timeout` passes; returns whether it
    /// held.
    fn wait_for(&self, timeout: Duration, done: impl Fn(&Session) -> bool) -> bool {
        let deadline = crate::instant::deadline_after(Instant::now(), timeout);
        let mut ws = self.shared.lock();
        while !done(&ws) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            ws = self
                .shared
                .changed
                .wait_timeout(ws, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Closes TCP and joins the I/O thread (which reports `close` 1006 if no close
    /// handshake happened).
    fn shutdown(&self) {
        let stream = {
            let mut session = self.shared.lock();
            // What the I/O thread's handlers queued last (a close reply) may not be written
            // yet: hand it to the socket before shutting it (on wss, then close_notify).
            session.close_tls();
            session.stream.clone()
        };
        if let Some(stream) = stream {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let io_thread = lock(&self.io_thread).take();
        if let Some(io_thread) = io_thread
            && io_thread.thread().id() != std::thread::current().id()
        {
            let _ = io_thread.join();
        }
    }
}

impl Drop for BlockingClient {
    fn drop(&mut self) {
        if self.ready_state() == ReadyState::Open {
            let _ = self.close_connection(crate::code::NORMAL, "");
        } else {
            self.shutdown();
        }
    }
}

/// The server's input ended before its 101 (EOF, or on wss its close_notify): the handler
/// hears it, and the same is returned (a refusal whose body ran to the end, else
/// `Incomplete`).
fn ended_before_101(session: &mut Session) -> Error {
    session.receive_eof();
    session
        .handshake_error()
        .cloned()
        .unwrap_or(HandshakeError::Incomplete)
        .into()
}

/// The transport failed with `error` before the 101: the handler hears why, and the same
/// cause is returned (the refusal, where the server had refused and its body was cut
/// short; else `error`).
fn handshake_failed(session: &mut Session, error: io::Error) -> Error {
    session.receive_error(io::Error::new(error.kind(), error.to_string()));
    match session.handshake_error() {
        Some(refusal) => refusal.clone().into(),
        None => error.into(),
    }
}

/// The I/O thread: reads until the connection ends and writes what senders left behind,
/// sleeping in `poll` until the socket is ready, a sender wakes it, or the next deadline
/// of the session's timers or of the write timeout.
fn io_loop(
    shared: Arc<Shared>,
    stream: Arc<mio::net::TcpStream>,
    poll: mio::Poll,
    buf: Vec<u8>,
    behind_101: Vec<u8>,
) {
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        read_until_end(&shared, &stream, poll, buf, behind_101)
    }));
    if ran.is_err() {
        // A listener panicked on this thread (the panic hook has reported it). Without
        // this the thread was gone and the client hung: no close, senders waiting for
        // good. The connection fails as an internal error (1011 to the server, `on_close`
        // here, once), and the I/O ends as for any other failure. A listener that panics
        // again meanwhile changes nothing more.
        let mut session = shared.lock();
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            session
                .ws
                .abort(crate::code::INTERNAL_ERROR, "a listener panicked");
            session.write_ready();
        }));
        end(&shared, session, &stream);
    }
}

fn read_until_end(
    shared: &Arc<Shared>,
    stream: &Arc<mio::net::TcpStream>,
    mut poll: mio::Poll,
    mut buf: Vec<u8>,
    mut behind_101: Vec<u8>,
) {
    let mut events = mio::Events::with_capacity(4);
    {
        // What the server sent behind its 101 (decrypted on wss), taken by
        // `start_connection`: its events run here, on this thread, as every later
        // message's do.
        let mut guard = shared.lock();
        let session = &mut *guard;
        session.ws.receive(&mut behind_101);
        session.write_ready();
        session.track();
        if session.peer_closed_tls() {
            // The server's close_notify came in the same read as the 101.
            session.receive_eof();
            return end(shared, guard, stream);
        }
        shared.changed.notify_all();
    }
    loop {
        let read = (&**stream).read(&mut buf);
        let mut guard = shared.lock();
        let session = &mut *guard;
        match read {
            Ok(n) if n > 0 => {
                let received = session.receive(&mut buf[..n]);
                // On wss, a failed decrypt leaves an alert for the server: it goes too.
                session.write_ready();
                session.track();
                if let Err(e) = received {
                    // Undecryptable input: the connection is over, and the handler hears
                    // why.
                    session.ws.fail(e, crate::code::ABNORMAL, "");
                    return end(shared, guard, stream);
                }
                if session.peer_closed_tls() {
                    session.receive_eof();
                    return end(shared, guard, stream);
                }
                shared.changed.notify_all();
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(_) => {
                session.receive_eof();
                return end(shared, guard, stream);
            }
            // The socket failed (a reset): reported as itself.
            Err(e) => {
                session.ws.receive_error(e);
                return end(shared, guard, stream);
            }
        }
        // Input drained: write what the socket takes, then look at the deadlines.
        session.write_ready();
        let now = Instant::now();
        session.check_stall(now);
        session.track();
        if session.timers.poll_timeout().is_some_and(|d| d <= now) {
            let config = session.timer_config;
            // A server still taking queued output counts as alive (see `Delivery`).
            let ours = session.has_output();
            let fd = std::os::fd::AsFd::as_fd(&**stream);
            let delivery = || crate::reactor::tcp_info::delivery_with_ours(fd, ours);
            let session = &mut *session;
            let expired = session.timers.handle_timeout_with_delivery(
                now,
                &config,
                session.ws.driver(),
                delivery,
            );
            // Run the handlers for what the timers did (an abort's close).
            session.ws.receive(&mut []);
            session.write_ready();
            session.track();
            if let Expired::Drop(_) = expired {
                // The close took too long: drop the server.
                return end(shared, guard, stream);
            }
            shared.changed.notify_all();
            continue;
        }
        shared.changed.notify_all();
        let deadline = earliest(
            session.timers.poll_timeout(),
            session.stall.deadline(session.write_timeout),
        );
        drop(guard);
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, timeout)
            && e.kind() != io::ErrorKind::Interrupted
        {
            let mut session = shared.lock();
            session.receive_eof();
            return end(shared, session, stream);
        }
    }
}

/// The I/O thread's end: nothing more is written; waiting senders and closers wake up.
fn end(shared: &Shared, mut session: MutexGuard<'_, Session>, stream: &mio::net::TcpStream) {
    let _ = stream.shutdown(Shutdown::Both);
    session.ended = true;
    drop(session);
    shared.changed.notify_all();
}

/// Opens a `CONNECT` tunnel through `proxy` to `target` on `stream`, by `deadline`.
fn tunnel(
    proxy: &Proxy,
    stream: &mut TcpStream,
    target: &ClientUrl,
    deadline: Instant,
) -> Result<(), Error> {
    stream.write_all(&proxy.connect_request(target))?;
    // Read byte by byte: nothing past the proxy's head may be consumed, it belongs to the
    // tunnel (a few hundred bytes, once per connection).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match read_by(stream, &mut byte, Some(deadline))? {
            None => {
                return Err(
                    io::Error::new(io::ErrorKind::TimedOut, "proxy tunnel timed out").into(),
                );
            }
            Some(0) => return Err(HandshakeError::Incomplete.into()),
            Some(_) => {}
        }
        head.push(byte[0]);
        // A head ends with a line: parsed at each line's end (not at each byte, which
        // would scan it over and over), and once past the limit, to refuse it.
        if (byte[0] == b'\n' || head.len() > proxy::MAX_RESPONSE_HEAD)
            && let Status::Complete(..) = proxy::parse_response(&head)?
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused address is skipped for the next one (`localhost` as `::1`, then
    /// `127.0.0.1`, against a server on IPv4 only); with none accepting, the last failure.
    #[test]
    fn connect_first_tries_each_address_in_turn() {
        let refused = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let listening = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let good = listening.local_addr().unwrap();
        let timeout = Duration::from_secs(5);
        let stream = connect_first(&[refused, good], timeout).unwrap();
        assert_eq!(stream.peer_addr().unwrap(), good);
        let err = connect_first(&[refused], timeout).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }
}
