//! The seed's `make-client` over a blocking socket: the handshake on the caller's thread,
//! then a reader thread that fires the events; sends and closes from any thread.

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
use crate::session::timers::{Expired, TimerConfig, Timers};
use crate::websocket::WebSocket;

use crate::client::{resolve, resolve_proxy};
use crate::protocol::frame::Status;
use crate::session::proxy::{self, Proxy};

/// Timeouts of a [`BlockingClient`]: the blocking runtime's [`Timeouts`], whose
/// `connect` applies to clients only.
pub type ClientTimeouts = Timeouts;

/// The connection state the reader thread and senders share, under one lock.
struct Session {
    ws: WebSocket,
    /// The connection's deadlines; the reader thread sleeps until the next one.
    timers: Timers,
    timer_config: TimerConfig,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::TlsStream>,
    /// Decrypted input, reused across reads (wss only).
    #[cfg(feature = "tls")]
    plain: Vec<u8>,
}

impl std::ops::Deref for Session {
    type Target = WebSocket;
    fn deref(&self) -> &WebSocket {
        &self.ws
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut WebSocket {
        &mut self.ws
    }
}

impl Session {
    /// Tells the timers the state the driver is in now.
    fn track(&mut self) {
        match self.ws.ready_state() {
            ReadyState::Closing => self
                .timers
                .close_started(Instant::now(), &self.timer_config),
            ReadyState::Closed => self.timers.closed(),
            _ => {}
        }
    }

    /// Feeds bytes read from the socket (decrypting them first on wss).
    fn receive(&mut self, data: &mut [u8]) -> Result<(), Error> {
        self.timers.received(Instant::now(), &self.timer_config);
        #[cfg(feature = "tls")]
        if let Some(tls) = self.tls.as_mut() {
            self.plain.clear();
            let decrypted = tls.decrypt(data, &mut self.plain);
            self.ws.receive(&mut self.plain);
            return decrypted;
        }
        self.ws.receive(data);
        Ok(())
    }
}

struct Shared {
    ws: Mutex<Session>,
    stream: Mutex<Option<TcpStream>>,
    finished: Condvar,
}

/// A client on a blocking socket, like the seed's: `start_connection` connects and
/// performs the handshake on the caller's thread, then a reader thread fires the events.
/// Sends and `close_connection` work from any thread; handlers run on the reader thread
/// with the connection locked, so automatic pongs never interleave with user frames.
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
    addr: SocketAddr,
    proxy: Option<Proxy>,
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    url: ClientUrl,
    timeouts: ClientTimeouts,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ClientConfig>>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for BlockingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking handler poisons the lock; the connection state is still consistent
    // (the driver never panics mid-update), so carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes everything the driver has queued (through TLS on wss).
fn flush(session: &mut Session, stream: &mut TcpStream) -> io::Result<()> {
    #[cfg(feature = "tls")]
    if let Some(tls) = session.tls.as_mut() {
        let pending = session.ws.pending_output();
        if !pending.is_empty() {
            let n = pending.len();
            tls.encrypt(pending)?;
            session.ws.consume_output(n);
        }
        while !tls.output().is_empty() {
            let n = stream.write(tls.output())?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            tls.consume(n);
        }
        return Ok(());
    }
    crate::blocking::flush(stream, &mut session.ws)
}

impl BlockingClient {
    /// A client for `url` (the seed's `make-client`); nothing is connected yet.
    pub fn new(url: &str, options: Options) -> Result<BlockingClient, Error> {
        let (parsed, addr) = resolve(url)?;
        let driver = Driver::make_client(url, &options)?;
        Ok(BlockingClient {
            shared: Arc::new(Shared {
                ws: Mutex::new(Session {
                    ws: WebSocket::new(driver),
                    timers: Timers::new(),
                    timer_config: ClientTimeouts::default().timer_config(),
                    #[cfg(feature = "tls")]
                    tls: None,
                    #[cfg(feature = "tls")]
                    plain: Vec::new(),
                }),
                stream: Mutex::new(None),
                finished: Condvar::new(),
            }),
            addr,
            proxy: None,
            url: parsed,
            timeouts: ClientTimeouts::default(),
            #[cfg(feature = "tls")]
            tls: None,
            reader: Mutex::new(None),
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
    /// other than 2xx is `HandshakeError::ProxyRefused(status)`.
    pub fn proxy(mut self, proxy_url: &str) -> Result<BlockingClient, Error> {
        self.proxy = Some(Proxy::parse(proxy_url)?);
        Ok(self)
    }

    /// Sets the timeouts (before `start_connection`).
    pub fn timeouts(mut self, timeouts: ClientTimeouts) -> BlockingClient {
        self.timeouts = timeouts;
        self
    }

    /// Called when the connection opens (on the caller's thread, in `start_connection`).
    pub fn on_open(&self, f: impl FnMut(&mut Driver) + Send + 'static) -> &Self {
        lock(&self.shared.ws).on_open(f);
        self
    }

    /// Called with each message, on the reader thread.
    pub fn on_message(
        &self,
        f: impl for<'m> FnMut(&mut Driver, Message<'m>) + Send + 'static,
    ) -> &Self {
        lock(&self.shared.ws).on_message(f);
        self
    }

    /// Called on a protocol or handshake error (a close follows).
    pub fn on_error(&self, f: impl FnMut(&mut Driver, &Error) + Send + 'static) -> &Self {
        lock(&self.shared.ws).on_error(f);
        self
    }

    /// Called exactly once with the close code and reason.
    pub fn on_close(&self, f: impl FnMut(&mut Driver, u16, &str) + Send + 'static) -> &Self {
        lock(&self.shared.ws).on_close(f);
        self
    }

    /// Called with each pong's payload.
    pub fn on_pong(&self, f: impl FnMut(&mut Driver, &[u8]) + Send + 'static) -> &Self {
        lock(&self.shared.ws).on_pong(f);
        self
    }

    /// Connects, sends the upgrade request, waits for the 101, fires `open`, and starts
    /// the reader thread. A failed handshake fires `error` and `close` and is returned.
    pub fn start_connection(&self) -> Result<(), Error> {
        let mut stream = match &self.proxy {
            None => TcpStream::connect_timeout(&self.addr, self.timeouts.connect)?,
            Some(proxy) => {
                let addr = resolve_proxy(proxy)?;
                let mut stream = TcpStream::connect_timeout(&addr, self.timeouts.connect)?;
                stream.set_read_timeout(Some(self.timeouts.handshake))?;
                tunnel(proxy, &mut stream, &self.url)?;
                stream
            }
        };
        stream.set_nodelay(true)?;
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = {
            let mut ws = lock(&self.shared.ws);
            ws.timer_config = self.timeouts.timer_config();
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
            flush(&mut ws, &mut stream)?;
            ws.timers.poll_timeout()
        };
        loop {
            let n = match read_by(&mut stream, &mut buf, deadline) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    lock(&self.shared.ws).receive_eof();
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "opening handshake timed out",
                    )
                    .into());
                }
                Err(e) => {
                    lock(&self.shared.ws).receive_eof();
                    return Err(e.into());
                }
            };
            let mut ws = lock(&self.shared.ws);
            if n == 0 {
                ws.receive_eof();
                return Err(HandshakeError::Incomplete.into());
            }
            let received = ws.receive(&mut buf[..n]);
            flush(&mut ws, &mut stream)?;
            if let Err(e) = received {
                ws.receive_eof();
                return Err(e);
            }
            if ws.is_handshake_complete() {
                let config = ws.timer_config;
                ws.timers.opened(Instant::now(), &config);
                break;
            }
            if ws.ready_state() == ReadyState::Closed {
                let why = ws
                    .handshake_error()
                    .cloned()
                    .unwrap_or(HandshakeError::Incomplete);
                return Err(why.into());
            }
        }
        let reader_stream = stream.try_clone()?;
        *lock(&self.shared.stream) = Some(stream);
        let shared = self.shared.clone();
        let reader = std::thread::Builder::new()
            .name("wsd-client-reader".into())
            .spawn(move || read_loop(shared, reader_stream, buf))?;
        *lock(&self.reader) = Some(reader);
        Ok(())
    }

    fn with_driver<T>(
        &self,
        f: impl FnOnce(&mut WebSocket) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut ws = lock(&self.shared.ws);
        let result = f(&mut ws)?;
        ws.track();
        if let Some(stream) = lock(&self.shared.stream).as_mut() {
            flush(&mut ws, stream)?;
        }
        Ok(result)
    }

    /// Sends `data` as `kind` (queued if not yet open).
    pub fn send(&self, data: &[u8], kind: MessageType) -> Result<SendToken, Error> {
        self.with_driver(|ws| ws.send(data, kind))
    }

    /// Sends `data` as `kind`; `on_written` runs once its bytes are handed to the socket
    /// (the seed's `(send ws data :callback fn)`), on whichever thread writes them: this
    /// one when the socket takes them at once.
    pub fn send_with(
        &self,
        data: &[u8],
        kind: MessageType,
        on_written: impl FnOnce(&mut Driver) + Send + 'static,
    ) -> Result<SendToken, Error> {
        self.with_driver(|ws| ws.send_with(data, kind, on_written))
    }

    /// Sends a text message.
    pub fn send_text(&self, text: &str) -> Result<SendToken, Error> {
        self.with_driver(|ws| ws.send_text(text))
    }

    /// Sends a binary message.
    pub fn send_binary(&self, data: &[u8]) -> Result<SendToken, Error> {
        self.with_driver(|ws| ws.send_binary(data))
    }

    /// Sends a ping; `on_pong` runs on the reader thread when the matching pong arrives.
    pub fn send_ping(
        &self,
        payload: &[u8],
        on_pong: impl FnOnce(&mut Driver) + Send + 'static,
    ) -> Result<SendToken, Error> {
        self.with_driver(|ws| ws.send_ping(payload, on_pong))
    }

    /// The connection state.
    pub fn ready_state(&self) -> ReadyState {
        lock(&self.shared.ws).ready_state()
    }

    /// The agreed subprotocol.
    pub fn protocol(&self) -> Option<String> {
        lock(&self.shared.ws).protocol().map(str::to_string)
    }

    /// Performs the close handshake: sends the close frame, waits up to the close timeout
    /// for the server's reply (and its TCP close), then closes TCP. `close` fires once.
    pub fn close_connection(&self, code: u16, reason: &str) -> Result<(), Error> {
        self.with_driver(|ws| ws.close_connection(code, reason).map(|_| ()))?;
        self.wait_closed(self.timeouts.close);
        self.shutdown();
        Ok(())
    }

    /// Blocks until the connection is closed or `timeout` passes; returns whether closed.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut ws = lock(&self.shared.ws);
        while ws.ready_state() != ReadyState::Closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            ws = self
                .shared
                .finished
                .wait_timeout(ws, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Closes TCP and joins the reader thread (which reports `close` 1006 if no close
    /// handshake happened).
    fn shutdown(&self) {
        if let Some(stream) = lock(&self.shared.stream).take() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let reader = lock(&self.reader).take();
        if let Some(reader) = reader
            && reader.thread().id() != std::thread::current().id()
        {
            let _ = reader.join();
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

/// The reader thread: reads until the connection ends, sleeping at most until the next
/// deadline of the session's timers (a close started on another thread while it sleeps
/// is timed from its next wake; `close_connection` bounds that wait itself).
fn read_loop(shared: Arc<Shared>, mut stream: TcpStream, mut buf: Vec<u8>) {
    loop {
        let deadline = lock(&shared.ws).timers.poll_timeout();
        let n = match read_by(&mut stream, &mut buf, deadline) {
            Ok(Some(n)) => n,
            Ok(None) => {
                let mut guard = lock(&shared.ws);
                let session = &mut *guard;
                let config = session.timer_config;
                let expired =
                    session
                        .timers
                        .handle_timeout(Instant::now(), &config, session.ws.driver());
                // Run the handlers for what the timers did (an abort's close).
                session.ws.receive(&mut []);
                let flushed = match lock(&shared.stream).as_mut() {
                    Some(writer) => flush(session, writer).is_ok(),
                    None => false,
                };
                session.track();
                if session.ready_state() == ReadyState::Closed {
                    shared.finished.notify_all();
                }
                if let Expired::Drop(_) = expired {
                    // The close took too long: drop the server.
                    if let Some(stream) = lock(&shared.stream).as_ref() {
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                    return;
                }
                if !flushed && session.ready_state() != ReadyState::Closed {
                    session.receive_eof();
                    shared.finished.notify_all();
                    return;
                }
                continue;
            }
            Err(_) => 0,
        };
        let mut ws = lock(&shared.ws);
        if n == 0 {
            ws.receive_eof();
            shared.finished.notify_all();
            return;
        }
        let received = ws.receive(&mut buf[..n]);
        let flushed = received.is_ok()
            && match lock(&shared.stream).as_mut() {
                Some(writer) => flush(&mut ws, writer).is_ok(),
                None => false,
            };
        ws.track();
        if ws.ready_state() == ReadyState::Closed {
            shared.finished.notify_all();
        }
        if !flushed && ws.ready_state() != ReadyState::Closed {
            ws.receive_eof();
            shared.finished.notify_all();
            return;
        }
    }
}

/// Opens a `CONNECT` tunnel through `proxy` to `target` on `stream`.
fn tunnel(proxy: &Proxy, stream: &mut TcpStream, target: &ClientUrl) -> Result<(), Error> {
    stream.write_all(&proxy.connect_request(target))?;
    // Read byte by byte: nothing past the proxy's head may be consumed, it belongs to the
    // tunnel (a few hundred bytes, once per connection).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte)? == 0 {
            return Err(HandshakeError::Incomplete.into());
        }
        head.push(byte[0]);
        if let Status::Complete(..) = proxy::parse_response(&head)? {
            return Ok(());
        }
    }
}
