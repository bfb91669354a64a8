//! The reactor-hosted server: `Server::bind(addr)?.serve(app)`.
//!
//! `app` sees each HTTP request on a new connection (path, headers, peer address: the
//! seed's `env`) and returns either a [`Handler`] (accept the upgrade) or an HTTP response
//! (reject). The handler lives inline in the loop's slab entry next to its `Driver`.

use std::io;
use std::marker::PhantomData;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::protocol::driver::{Driver, Event, Message, MessageType, ReadyState, SendToken};
use crate::protocol::error::{Error, UsageError, code};
use crate::protocol::frame::Status;
use crate::protocol::handshake::{
    Request, RequestParser, error_response, http_response, is_websocket,
};
use crate::protocol::options::Options;
use crate::reactor::core;
use crate::reactor::epoll::Epoll;
#[cfg(target_os = "linux")]
use crate::reactor::uring::Uring;
use crate::reactor::{
    self, Backend, CloseRequest, Envelope, Io, LoopConfig, LoopStats, Remote, Service,
};

/// What a slow reader's connection gets once its outgoing buffer passes the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackpressurePolicy {
    /// Keep queueing for `grace`; if the buffer is still over the limit then, close with
    /// 1008 and drop the connection.
    Close {
        /// How long the buffer may stay over the limit.
        grace: Duration,
    },
    /// Refuse new sends with [`UsageError::BufferFull`] while over the limit.
    DropNew,
}

/// Server settings. Every limit has a default; see each field.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Event loops (threads). Default: the number of CPUs.
    pub threads: usize,
    /// IO backend. Default [`Backend::Auto`].
    pub backend: Backend,
    /// Driver options (`max_length`, `accept_protocols`, `additional_headers`, head limits).
    pub options: Options,
    /// Most open connections over all loops; beyond, new ones get 503 and are closed.
    /// Default: what the current soft open-file limit allows, minus a reserve
    /// ([`reactor::default_max_connections`]); the limit is not changed, see
    /// [`raise_open_file_limit`](crate::raise_open_file_limit).
    pub max_connections: usize,
    /// Time a client has to complete its upgrade request. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time the peer has to answer our close frame before TCP is dropped. Default 5 s.
    pub close_timeout: Duration,
    /// With `Some(t)`: after `t` without input, send a ping; after another `t` still
    /// without input, close with 1001. Default `None` (off).
    pub idle_timeout: Option<Duration>,
    /// Outgoing bytes a connection may queue before the policy applies. Default 1 MiB.
    pub max_backpressure: usize,
    /// Default: `Close { grace: 10 s }`.
    pub backpressure_policy: BackpressurePolicy,
    /// Size of each loop's read buffer. Default 64 KiB.
    pub read_buffer_size: usize,
    /// TLS for every accepted connection (wss). Default `None`; see [`Server::bind_tls`].
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS settings for `wss://` connections of a [`ClientReactor`](crate::client::ClientReactor).
    /// Default `None`: verify against the system roots.
    #[cfg(feature = "tls")]
    pub client_tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            backend: Backend::Auto,
            options: Options::default(),
            max_connections: reactor::default_max_connections(),
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            idle_timeout: None,
            max_backpressure: 1 << 20,
            backpressure_policy: BackpressurePolicy::Close {
                grace: Duration::from_secs(10),
            },
            read_buffer_size: 64 * 1024,
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "tls")]
            client_tls: None,
        }
    }
}

pub use crate::session::upgrade::HttpResponse;

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
    /// Output that had backed up is fully written.
    fn on_drain(&mut self, ws: &mut Ws<'_>) {
        let _ = ws;
    }
}

/// Commands a [`Sender`] carries to a connection's loop.
/// What a client connection is made of, carried to its loop.
pub(crate) struct ClientInit<H> {
    pub driver: Driver,
    pub handler: H,
    #[cfg(feature = "tls")]
    pub tls: Option<Box<crate::tls::TlsStream>>,
}

pub(crate) enum Command {
    Send(Vec<u8>, MessageType),
    Close(u16, String),
    /// A client connection to open: `(Driver, H)`, boxed so `Sender` needs no type
    /// parameter (one allocation per connect, off the hot path).
    Connect(Box<dyn std::any::Any + Send>),
}

/// The connection handle a [`Handler`] gets: send, close, inspect.
pub struct Ws<'a> {
    driver: &'a mut Driver,
    ctx: &'a Ctx<'a>,
}

struct Ctx<'a> {
    peer: SocketAddr,
    key: usize,
    generation: u32,
    remote: &'a Remote<Command>,
    max_backpressure: usize,
    policy: BackpressurePolicy,
    stats: &'a LoopStats,
    /// Bytes handed to the kernel and not yet sent (completion backends).
    in_flight: usize,
}

impl Ws<'_> {
    fn admit(&self) -> Result<(), Error> {
        let buffered = self.buffered_amount();
        if self.ctx.policy == BackpressurePolicy::DropNew && buffered > self.ctx.max_backpressure {
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

    /// Sends a message back as it came (text as text, binary as binary).
    pub fn send_message(&mut self, message: &Message<'_>) -> Result<SendToken, Error> {
        self.admit()?;
        let result = self.driver.send_message(message);
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

    /// Sends a ping; the pong arrives at [`Handler::on_pong`].
    pub fn send_ping(&mut self, payload: &[u8]) -> Result<SendToken, Error> {
        self.driver.send_ping(payload)
    }

    /// Starts the close handshake.
    pub fn close_connection(&mut self, code: u16, reason: &str) -> Result<SendToken, Error> {
        self.driver.close_connection(code, reason)
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
        self.driver.buffered_amount() + self.ctx.in_flight
    }

    /// The client's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.ctx.peer
    }

    /// A handle other threads can send through.
    pub fn sender(&self) -> Sender {
        Sender {
            remote: self.ctx.remote.clone(),
            key: self.ctx.key,
            generation: self.ctx.generation,
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
}

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

    /// Queues a text message. Fails only if the server has stopped.
    pub fn send_text(&self, text: impl Into<String>) -> io::Result<()> {
        self.post(Command::Send(text.into().into_bytes(), MessageType::Text))
    }

    /// Queues a binary message.
    pub fn send_binary(&self, data: impl Into<Vec<u8>>) -> io::Result<()> {
        self.post(Command::Send(data.into(), MessageType::Binary))
    }

    /// Queues a message of any type (as [`Ws::send`]).
    pub fn send(&self, data: impl Into<Vec<u8>>, kind: MessageType) -> io::Result<()> {
        self.post(Command::Send(data.into(), kind))
    }

    /// Starts the close handshake. A close code that may not be sent or a reason over
    /// 123 bytes fails here with [`io::ErrorKind::InvalidInput`] (wrapping the
    /// [`UsageError`]), since the loop would have no one to report it to.
    pub fn close_connection(&self, code: u16, reason: impl Into<String>) -> io::Result<()> {
        let reason = reason.into();
        let refused = if !crate::protocol::error::is_valid_close_code(code) {
            Some(UsageError::InvalidCloseCode(code))
        } else if reason.len() > 123 {
            Some(UsageError::CloseReasonTooLong)
        } else {
            None
        };
        if let Some(usage) = refused {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                Error::Usage(usage),
            ));
        }
        self.post(Command::Close(code, reason))
    }
}

/// Server-wide counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections open now (including those still in the handshake).
    pub connections_open: usize,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Connections refused with 503 because of `max_connections`.
    pub connections_refused: u64,
    /// Messages received.
    pub messages_in: u64,
    /// Messages sent.
    pub messages_out: u64,
    /// Bytes read from sockets.
    pub bytes_in: u64,
    /// Bytes written to sockets.
    pub bytes_out: u64,
    /// Closed WebSocket connections by close code (as reported to `on_close`).
    pub closes: std::collections::BTreeMap<u16, u64>,
}

/// Controls a running server from any thread.
#[derive(Clone)]
pub struct ServerHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    remotes: Vec<Remote<Command>>,
    stats: Vec<Arc<LoopStats>>,
    threads: Mutex<Vec<JoinHandle<io::Result<()>>>>,
    local_addr: Option<SocketAddr>,
    backend: Backend,
}

/// The one log line saying which backend serves and why, through the [`log`] facade at
/// `info` level (the library never prints; an application that wants the line installs a
/// logger or prints [`ServerHandle::backend`] itself).
fn log_backend(why: &str) {
    log::info!("websocket-driver: serving on {why}");
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.inner.local_addr)
            .finish()
    }
}

impl ServerHandle {
    /// The listening address (`0.0.0.0:0` for a client-only reactor).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .local_addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The backend the loops run on (what `Backend::Auto` resolved to).
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for l in &self.inner.stats {
            s.connections_open += l.connections_open.load(Ordering::Relaxed);
            s.connections_total += l.connections_total.load(Ordering::Relaxed);
            s.connections_refused += l.connections_refused.load(Ordering::Relaxed);
            s.messages_in += l.messages_in.load(Ordering::Relaxed);
            s.messages_out += l.messages_out.load(Ordering::Relaxed);
            s.bytes_in += l.bytes_in.load(Ordering::Relaxed);
            s.bytes_out += l.bytes_out.load(Ordering::Relaxed);
            for (code, n) in l.closes.lock().expect("stats lock").iter() {
                *s.closes.entry(*code).or_default() += n;
            }
        }
        s
    }

    /// Stops accepting, sends 1001 to every connection, waits up to `grace` for them to
    /// close, drops the rest, and returns when every loop has stopped.
    pub fn shutdown(&self, grace: Duration) -> io::Result<()> {
        let deadline = Instant::now() + grace;
        for remote in &self.inner.remotes {
            // A loop that already stopped has nothing left to close.
            let _ = remote.send(Envelope::Shutdown { deadline });
        }
        self.wait()
    }

    /// Queues an outgoing connection on loop `i` (modulo the loop count).
    pub(crate) fn connect_on(
        &self,
        i: usize,
        addr: SocketAddr,
        command: Command,
    ) -> io::Result<()> {
        let remotes = &self.inner.remotes;
        remotes[i % remotes.len()].send(Envelope::Connect { addr, command })
    }

    /// Blocks until every loop has stopped (after a shutdown).
    pub fn wait(&self) -> io::Result<()> {
        let threads = std::mem::take(&mut *self.inner.threads.lock().expect("threads lock"));
        let mut result = Ok(());
        for t in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(io::Error::other("an event loop panicked")),
            }
        }
        result
    }
}

/// A WebSocket server on the reactor.
///
/// ```no_run
/// use websocket_driver::server::{Handler, Server, Upgrade, Ws};
/// use websocket_driver::Message;
///
/// struct Echo;
/// impl Handler for Echo {
///     fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
///         let _ = ws.send_message(&message);
///     }
/// }
///
/// Server::bind("127.0.0.1:9001").unwrap().serve(|_req| Upgrade::Accept(Echo)).unwrap();
/// ```
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    config: ServerConfig,
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Fails with [`io::ErrorKind::AddrInUse`] if a socket already listens on `addr`.
///
/// The loops' listeners share the port through `SO_REUSEPORT`, which would just as well
/// let this server join another process's group (of the same user) and take a share of
/// its connections. A probe bound without `SO_REUSEPORT` (with `SO_REUSEADDR`, as std's
/// listeners, so connections in TIME_WAIT do not count) conflicts with any listener on
/// the address; it is dropped before the real listeners bind.
fn ensure_not_served(addr: SocketAddr) -> io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    match probe.bind(&addr.into()) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{addr} is already in use by another socket: {e}"),
        )),
        other => other,
    }
}

impl Server {
    /// Binds the first listener (port 0 picks a free port), with default settings.
    ///
    /// Fails with [`io::ErrorKind::AddrInUse`] when something (another server, this
    /// process's or not) already listens on the address, even though the listeners use
    /// `SO_REUSEPORT` among themselves.
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<Server> {
        let addr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to bind"))?;
        // Port 0: the kernel picks a port no socket holds (it does not share one through
        // SO_REUSEPORT when choosing); `start` binds the other loops' listeners to it.
        if addr.port() != 0 {
            ensure_not_served(addr)?;
        }
        Ok(Server {
            listener: reuseport_listener(addr)?,
            config: ServerConfig::default(),
        })
    }

    /// Like [`Server::bind`] (and so failing with [`io::ErrorKind::AddrInUse`] the same
    /// way), serving wss with a PEM certificate chain and private key.
    #[cfg(feature = "tls")]
    pub fn bind_tls(
        addr: impl ToSocketAddrs,
        cert_chain: impl AsRef<std::path::Path>,
        private_key: impl AsRef<std::path::Path>,
    ) -> io::Result<Server> {
        let tls = crate::tls::server_config_from_pem(cert_chain, private_key)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut server = Server::bind(addr)?;
        server.config.tls = Some(tls);
        Ok(server)
    }

    /// Serves wss with this rustls configuration (applies to the current settings).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Server {
        self.config.tls = Some(config);
        self
    }

    /// Replaces all settings.
    pub fn config(mut self, config: ServerConfig) -> Server {
        self.config = config;
        self
    }

    /// Sets the number of event loops.
    pub fn threads(mut self, threads: usize) -> Server {
        self.config.threads = threads.max(1);
        self
    }

    /// Sets the backend.
    pub fn backend(mut self, backend: Backend) -> Server {
        self.config.backend = backend;
        self
    }

    /// Sets the driver options.
    pub fn options(mut self, options: Options) -> Server {
        self.config.options = options;
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Starts the loops and serves until [`ServerHandle::shutdown`]; returns the handle at once.
    pub fn start<F, H>(self, app: F) -> io::Result<ServerHandle>
    where
        F: Fn(&UpgradeRequest<'_>) -> Upgrade<H> + Send + Sync + 'static,
        H: Handler,
    {
        let local_addr = self.listener.local_addr()?;
        let threads = self.config.threads.max(1);
        let mut listeners = vec![Some(self.listener)];
        for _ in 1..threads {
            listeners.push(Some(reuseport_listener(local_addr)?));
        }
        spawn(self.config, listeners, app, Some(local_addr))
    }

    /// Starts the loops and blocks until the server is shut down from a [`ServerHandle`]
    /// obtained by [`Server::start`] (use that to stop it).
    pub fn serve<F, H>(self, app: F) -> io::Result<()>
    where
        F: Fn(&UpgradeRequest<'_>) -> Upgrade<H> + Send + Sync + 'static,
        H: Handler,
    {
        self.start(app)?.wait()
    }
}

/// Starts one loop per entry of `listeners` (`None`: a loop for outgoing connections only).
pub(crate) fn spawn<F, H>(
    config: ServerConfig,
    listeners: Vec<Option<TcpListener>>,
    app: F,
    local_addr: Option<SocketAddr>,
) -> io::Result<ServerHandle>
where
    F: Fn(&UpgradeRequest<'_>) -> Upgrade<H> + Send + Sync + 'static,
    H: Handler,
{
    config
        .options
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let (backend, why) = config
        .backend
        .resolve()
        .map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))?;
    let app = Arc::new(app);
    let shared = Arc::new(config);
    let connections = Arc::new(AtomicUsize::new(0));
    let mut remotes = Vec::new();
    let mut stats = Vec::new();
    let mut handles = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let loop_stats = Arc::new(LoopStats::default());
        stats.push(loop_stats.clone());
        let service = WsService {
            app: app.clone(),
            config: shared.clone(),
            stats: loop_stats.clone(),
            pool: Vec::new(),
            #[cfg(feature = "tls")]
            plain: Vec::new(),
            _handler: PhantomData,
        };
        let loop_config = LoopConfig {
            max_connections: shared.max_connections,
            read_buffer_size: shared.read_buffer_size,
            connections: connections.clone(),
        };
        let name = format!("wsd-loop-{i}");
        let (remote, handle) = match backend {
            #[cfg(target_os = "linux")]
            Backend::IoUring => {
                core::spawn::<_, Uring>(name, listener, service, loop_config, loop_stats)?
            }
            _ => core::spawn::<_, Epoll>(name, listener, service, loop_config, loop_stats)?,
        };
        remotes.push(remote);
        handles.push(handle);
    }
    log_backend(&why);
    Ok(ServerHandle {
        inner: Arc::new(HandleInner {
            remotes,
            stats,
            threads: Mutex::new(handles),
            local_addr,
            backend,
        }),
    })
}

// ----- the Service the loops drive -----

/// Buffers kept per loop for drivers' output; larger ones are freed, not pooled.
const POOL_MAX_BUFFERS: usize = 256;
const POOL_MAX_CAPACITY: usize = 256 * 1024;

use crate::session::timers::{Expired, TimerConfig, Timers};
use crate::session::upgrade::{self, Answer, NonUpgrade};

pub(crate) struct WsService<F, H> {
    app: Arc<F>,
    config: Arc<ServerConfig>,
    stats: Arc<LoopStats>,
    pool: Vec<Vec<u8>>,
    /// Scratch for decrypted input (TLS connections), shared by the loop.
    #[cfg(feature = "tls")]
    plain: Vec<u8>,
    _handler: PhantomData<fn() -> H>,
}

pub(crate) struct Conn<H> {
    phase: Phase<H>,
    peer: SocketAddr,
    /// Handshake, close, idle and backpressure deadlines.
    timers: Timers,
    /// Output the kernel holds (io_uring sends not yet completed).
    in_flight: usize,
    /// TLS state for wss (boxed: plain connections pay one pointer).
    #[cfg(feature = "tls")]
    tls: Option<Box<crate::tls::TlsStream>>,
}

impl<H> Conn<H> {
    fn new(phase: Phase<H>, peer: SocketAddr) -> Conn<H> {
        Conn {
            phase,
            peer,
            timers: Timers::new(),
            in_flight: 0,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

enum Phase<H> {
    Handshake(RequestParser),
    Rejecting(Vec<u8>, usize),
    Open(Driver, H),
    Done,
}

impl<F, H> WsService<F, H>
where
    F: Fn(&UpgradeRequest<'_>) -> Upgrade<H> + Send + Sync + 'static,
    H: Handler,
{
    /// The deadlines' durations, from the server's settings.
    fn timer_config(&self) -> TimerConfig {
        timer_config(&self.config)
    }

    /// The handler context for a connection.
    fn ctx<'a>(&'a self, peer: SocketAddr, io: &'a Io<'_, Command>, in_flight: usize) -> Ctx<'a> {
        Ctx {
            peer,
            key: io.key,
            generation: io.generation,
            remote: io.remote,
            max_backpressure: self.config.max_backpressure,
            policy: self.config.backpressure_policy,
            stats: &self.stats,
            in_flight,
        }
    }

    /// Moves plaintext output (driver frames, a reject response) into TLS, so the loop
    /// writes ciphertext. A no-op for plain connections.
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    fn seal(&mut self, conn: &mut Conn<H>) {
        #[cfg(feature = "tls")]
        if let Some(tls) = conn.tls.as_mut() {
            match &mut conn.phase {
                Phase::Open(driver, _) => {
                    let pending = driver.pending_output();
                    if !pending.is_empty() && tls.encrypt(pending).is_ok() {
                        let n = pending.len();
                        driver.consume_output(n);
                    }
                    if driver.is_finished() {
                        tls.close();
                    }
                    self.recycle(driver);
                }
                Phase::Rejecting(response, at)
                    if *at < response.len() && tls.encrypt(&response[*at..]).is_ok() =>
                {
                    *at = response.len();
                    tls.close();
                }
                _ => {}
            }
        }
    }

    /// Bytes queued for this connection outside its driver: handed to the kernel
    /// (io_uring) or encrypted and waiting (TLS).
    fn queued_outside(conn: &Conn<H>) -> usize {
        #[cfg(feature = "tls")]
        let tls = conn.tls.as_ref().map_or(0, |t| t.output().len());
        #[cfg(not(feature = "tls"))]
        let tls = 0;
        conn.in_flight + tls
    }

    fn reject(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, response: Vec<u8>) {
        conn.phase = Phase::Rejecting(response, 0);
        // The response has the close timeout to get out.
        conn.timers.close_started(io.now, &self.timer_config());
        io.set_deadline(conn.timers.poll_timeout());
        io.close(CloseRequest::AfterFlush);
    }

    fn handshake(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, data: &mut [u8]) {
        let Phase::Handshake(parser) = &mut conn.phase else {
            return;
        };
        let (request, used) = match parser.parse(data) {
            Ok(Status::Partial) => return,
            Ok(Status::Complete(request, used)) => (request, used),
            Err(e) => return self.reject(conn, io, error_response(&e)),
        };
        let decision = match (self.app)(&UpgradeRequest {
            request: &request,
            peer: conn.peer,
        }) {
            Upgrade::Accept(handler) => Ok(handler),
            Upgrade::Reject(response) => Err(response),
        };
        let options = &self.config.options;
        let (mut driver, handler) =
            match upgrade::answer(&request, options, decision, NonUpgrade::UpgradeRequired) {
                Answer::Accept(driver, handler) => (driver, handler),
                Answer::Reject(refusal) => return self.reject(conn, io, refusal.response),
            };
        if let Some(buf) = self.pool.pop() {
            driver.provide_output_buffer(buf);
        }
        driver.start_connection();
        conn.phase = Phase::Open(driver, handler);
        conn.timers.opened(io.now, &self.timer_config());
        self.pump(conn, io, &mut data[used..]);
    }

    /// Feeds input to the driver, runs the handler for each event, then settles deadlines
    /// and closing.
    fn pump(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, data: &mut [u8]) {
        let Conn {
            phase: Phase::Open(driver, handler),
            timers,
            ..
        } = conn
        else {
            return;
        };
        let timer_config = self.timer_config();
        let ctx = self.ctx(conn.peer, io, conn.in_flight);
        let mut at = 0;
        loop {
            let (used, event) = driver.poll_event(&mut data[at..]);
            at += used;
            let Some(event) = event else { break };
            let mut ws = Ws { driver, ctx: &ctx };
            match event {
                Event::Open => {
                    // Ends a client's opening handshake deadline; starts the keepalive.
                    timers.opened(io.now, &timer_config);
                    handler.on_open(&mut ws)
                }
                Event::Message(m) => {
                    LoopStats::add(&self.stats.messages_in, 1);
                    handler.on_message(&mut ws, m)
                }
                Event::Ping(p) => handler.on_ping(&mut ws, &p),
                Event::Pong(p) => handler.on_pong(&mut ws, &p),
                Event::Error(e) => handler.on_error(&mut ws, &e),
                Event::Close { code, reason } => {
                    *self
                        .stats
                        .closes
                        .lock()
                        .expect("stats lock")
                        .entry(code)
                        .or_default() += 1;
                    handler.on_close(&mut ws, code, &reason)
                }
            }
        }
        self.settle(conn, io);
    }

    /// Recomputes the deadline and asks for a close once the driver is finished.
    fn settle(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        let Phase::Open(driver, _) = &conn.phase else {
            return;
        };
        let timer_config = self.timer_config();
        let state = driver.ready_state();
        let over =
            driver.buffered_amount() + Self::queued_outside(conn) > self.config.max_backpressure;
        if state == ReadyState::Closing {
            conn.timers.close_started(io.now, &timer_config);
        }
        conn.timers.buffered(io.now, over, &timer_config);
        if state == ReadyState::Closed {
            io.close(CloseRequest::AfterFlush);
            conn.timers.closed();
        }
        io.set_deadline(conn.timers.poll_timeout());
    }

    fn command_on(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, command: Command) {
        let outside = Self::queued_outside(conn);
        let Phase::Open(driver, _) = &mut conn.phase else {
            return;
        };
        let result = match command {
            Command::Send(data, kind) => {
                let over = driver.buffered_amount() + outside > self.config.max_backpressure;
                if over && self.config.backpressure_policy == BackpressurePolicy::DropNew {
                    return;
                }
                let sent = driver.send(&data, kind);
                if sent.is_ok() && !matches!(kind, MessageType::Close(_)) {
                    LoopStats::add(&self.stats.messages_out, 1);
                }
                sent.map(|_| ())
            }
            Command::Close(code, reason) => driver.close_connection(code, &reason).map(|_| ()),
            // Only ever sent as `Envelope::Connect`, handled by `connected`.
            Command::Connect(_) => Ok(()),
        };
        // Errors (sending on a closing connection) have no one to report to: the sender
        // already returned. Events the command caused (a close while connecting) run now.
        let _ = result;
        self.pump(conn, io, &mut []);
    }
}

impl<F, H> WsService<F, H>
where
    F: Fn(&UpgradeRequest<'_>) -> Upgrade<H> + Send + Sync + 'static,
    H: Handler,
{
    fn open_plain(&mut self, io: &mut Io<'_, Command>, peer: SocketAddr) -> Conn<H> {
        let mut conn = Conn::new(
            Phase::Handshake(RequestParser::new(self.config.options.head_limits())),
            peer,
        );
        conn.timers.handshake_started(io.now, &self.timer_config());
        io.set_deadline(conn.timers.poll_timeout());
        conn
    }

    fn connected_plain(
        &mut self,
        io: &mut Io<'_, Command>,
        peer: SocketAddr,
        command: Command,
    ) -> Conn<H> {
        let mut conn = Conn::new(Phase::Done, peer);
        let Command::Connect(init) = command else {
            io.close(CloseRequest::Now);
            return conn;
        };
        let Ok(init) = init.downcast::<ClientInit<H>>() else {
            io.close(CloseRequest::Now);
            return conn;
        };
        let ClientInit {
            mut driver,
            handler,
            #[cfg(feature = "tls")]
            tls,
        } = *init;
        #[cfg(feature = "tls")]
        {
            conn.tls = tls;
        }
        if let Some(buf) = self.pool.pop() {
            driver.provide_output_buffer(buf);
        }
        // The upgrade request is queued; the 101 must arrive within the handshake timeout.
        conn.phase = Phase::Open(driver, handler);
        conn.timers.handshake_started(io.now, &self.timer_config());
        self.settle(&mut conn, io);
        conn
    }

    fn connect_failed_plain(
        &mut self,
        io: &mut Io<'_, Command>,
        command: Command,
        error: io::Error,
    ) {
        let Command::Connect(init) = command else {
            return;
        };
        let Ok(init) = init.downcast::<ClientInit<H>>() else {
            return;
        };
        let (driver, handler) = (init.driver, init.handler);
        let mut conn = Conn::new(
            Phase::Open(driver, handler),
            SocketAddr::from(([0, 0, 0, 0], 0)),
        );
        if let Phase::Open(driver, handler) = &mut conn.phase {
            let ctx = self.ctx(conn.peer, io, 0);
            handler.on_error(&mut Ws { driver, ctx: &ctx }, &Error::Io(error));
            driver.abort(code::ABNORMAL, "connect failed");
        }
        self.pump(&mut conn, io, &mut []);
    }

    fn read_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, data: &mut [u8]) {
        match conn.phase {
            Phase::Handshake(_) => self.handshake(conn, io, data),
            Phase::Open(..) => {
                conn.timers.received(io.now, &self.timer_config());
                self.pump(conn, io, data)
            }
            Phase::Rejecting(..) | Phase::Done => {}
        }
    }

    fn timeout_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        let timer_config = self.timer_config();
        let Phase::Open(driver, _) = &mut conn.phase else {
            // A handshake that took too long (slowloris) or a reject that never flushed.
            io.close(CloseRequest::Now);
            return;
        };
        match conn.timers.handle_timeout(io.now, &timer_config, driver) {
            Expired::Drop(_) => {
                self.pump(conn, io, &mut []);
                io.close(CloseRequest::Now);
            }
            // The idle close's frame goes out; the close timeout bounds it.
            Expired::IdleClose => self.pump(conn, io, &mut []),
            Expired::Ping | Expired::Nothing => self.settle(conn, io),
        }
    }

    fn command_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, command: Command) {
        self.command_on(conn, io, command);
    }

    fn drained_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        let Phase::Open(driver, handler) = &mut conn.phase else {
            return;
        };
        if driver.ready_state() != ReadyState::Open {
            return;
        }
        let ctx = self.ctx(conn.peer, io, conn.in_flight);
        handler.on_drain(&mut Ws { driver, ctx: &ctx });
        self.settle(conn, io);
    }

    fn shutdown_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        match &mut conn.phase {
            Phase::Open(driver, _) => {
                if driver.ready_state() == ReadyState::Open {
                    let _ = driver.close_connection(code::GOING_AWAY, "server shutting down");
                }
                self.pump(conn, io, &mut []);
            }
            Phase::Handshake(_) => io.close(CloseRequest::Now),
            Phase::Rejecting(..) | Phase::Done => {}
        }
    }

    fn output_plain<'s>(&self, conn: &'s Conn<H>) -> &'s [u8] {
        match &conn.phase {
            Phase::Open(driver, _) => driver.pending_output(),
            Phase::Rejecting(response, at) => &response[*at..],
            _ => &[],
        }
    }

    fn consume_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, n: usize) {
        match &mut conn.phase {
            Phase::Open(driver, _) => {
                driver.consume_output(n);
                if conn.timers.is_over_limit()
                    && driver.buffered_amount() <= self.config.max_backpressure
                {
                    conn.timers
                        .buffered(io.now, false, &timer_config(&self.config));
                    self.settle(conn, io);
                    let Phase::Open(driver, _) = &mut conn.phase else {
                        return;
                    };
                    self.recycle(driver);
                    return;
                }
                self.recycle(driver);
            }
            Phase::Rejecting(_, at) => *at += n,
            _ => {}
        }
    }

    fn take_output_plain(
        &mut self,
        conn: &mut Conn<H>,
        _io: &mut Io<'_, Command>,
        spare: Vec<u8>,
    ) -> Option<Vec<u8>> {
        match &mut conn.phase {
            Phase::Open(driver, _) => {
                let taken = driver.take_output(spare)?;
                conn.in_flight += taken.len();
                Some(taken)
            }
            Phase::Rejecting(response, at) => {
                let mut bytes = std::mem::take(response);
                bytes.drain(..*at);
                *at = 0;
                (!bytes.is_empty()).then_some(bytes)
            }
            _ => None,
        }
    }

    fn sent_plain(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, n: usize) {
        conn.in_flight = conn.in_flight.saturating_sub(n);
        if conn.timers.is_over_limit() {
            self.settle(conn, io);
        }
    }

    fn closed_plain(&mut self, mut conn: Conn<H>, io: &mut Io<'_, Command>) {
        if let Phase::Open(driver, _) = &mut conn.phase {
            driver.receive_eof();
            self.pump(&mut conn, io, &mut []);
            if let Phase::Open(driver, _) = &mut conn.phase {
                self.recycle(driver);
            }
        }
        conn.phase = Phase::Done;
    }
}

impl<F, H> Service for WsService<F, H>
where
    F: Fn(&UpgradeRequest<'_>) -> Upgrade<H> + Send + Sync + 'static,
    H: Handler,
{
    type Session = Conn<H>;
    type Command = Command;

    fn open(&mut self, io: &mut Io<'_, Command>, peer: SocketAddr) -> Conn<H> {
        #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
        let mut conn = self.open_plain(io, peer);
        #[cfg(feature = "tls")]
        if let Some(config) = &self.config.tls {
            match crate::tls::TlsStream::server(config.clone()) {
                Ok(tls) => conn.tls = Some(Box::new(tls)),
                Err(_) => io.close(CloseRequest::Now),
            }
        }
        conn
    }

    fn connected(
        &mut self,
        io: &mut Io<'_, Command>,
        peer: SocketAddr,
        command: Command,
    ) -> Conn<H> {
        let mut conn = self.connected_plain(io, peer, command);
        self.seal(&mut conn);
        conn
    }

    fn connect_failed(&mut self, io: &mut Io<'_, Command>, command: Command, error: io::Error) {
        self.connect_failed_plain(io, command, error)
    }

    fn read(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, data: &mut [u8]) {
        #[cfg(feature = "tls")]
        if let Some(tls) = conn.tls.as_mut() {
            let mut plain = std::mem::take(&mut self.plain);
            plain.clear();
            match tls.decrypt(data, &mut plain) {
                Ok(()) => self.read_plain(conn, io, &mut plain),
                Err(e) => {
                    // A TLS failure ends the connection; the alert (if any) goes out first.
                    if let Phase::Open(driver, handler) = &mut conn.phase {
                        let ctx = self.ctx(conn.peer, io, conn.in_flight);
                        handler.on_error(&mut Ws { driver, ctx: &ctx }, &e);
                        driver.abort(code::ABNORMAL, "TLS failure");
                    }
                    self.pump(conn, io, &mut []);
                    io.close(CloseRequest::AfterFlush);
                }
            }
            self.plain = plain;
            self.seal(conn);
            return;
        }
        self.read_plain(conn, io, data)
    }

    fn timeout(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        self.timeout_plain(conn, io);
        self.seal(conn);
    }

    fn command(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, command: Command) {
        self.command_plain(conn, io, command);
        self.seal(conn);
    }

    fn drained(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        self.drained_plain(conn, io);
        self.seal(conn);
    }

    fn shutdown(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        self.shutdown_plain(conn, io);
        self.seal(conn);
    }

    fn output<'s>(&self, conn: &'s Conn<H>) -> &'s [u8] {
        #[cfg(feature = "tls")]
        if let Some(tls) = &conn.tls {
            return tls.output();
        }
        self.output_plain(conn)
    }

    fn consume(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, n: usize) {
        #[cfg(feature = "tls")]
        if let Some(tls) = conn.tls.as_mut() {
            tls.consume(n);
            if conn.timers.is_over_limit() {
                self.settle(conn, io);
            }
            return;
        }
        self.consume_plain(conn, io, n)
    }

    fn take_output(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        spare: Vec<u8>,
    ) -> Option<Vec<u8>> {
        #[cfg(feature = "tls")]
        if let Some(tls) = conn.tls.as_mut() {
            let taken = tls.take_output(spare)?;
            conn.in_flight += taken.len();
            return Some(taken);
        }
        self.take_output_plain(conn, io, spare)
    }

    fn sent(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, n: usize) {
        self.sent_plain(conn, io, n)
    }

    fn closed(&mut self, conn: Conn<H>, io: &mut Io<'_, Command>) {
        self.closed_plain(conn, io)
    }

    fn over_capacity(&self) -> Vec<u8> {
        http_response(
            503,
            &[("Retry-After", "1")],
            "server is at its connection limit",
        )
    }
}

/// The deadlines' durations for a server's settings.
fn timer_config(config: &ServerConfig) -> TimerConfig {
    TimerConfig {
        handshake: config.handshake_timeout,
        close: config.close_timeout,
        idle: config.idle_timeout,
        backpressure_grace: match config.backpressure_policy {
            BackpressurePolicy::Close { grace } => Some(grace),
            BackpressurePolicy::DropNew => None,
        },
    }
}

impl<F, H> WsService<F, H> {
    /// Returns an emptied output buffer to the pool, so idle connections hold none.
    fn recycle(&mut self, driver: &mut Driver) {
        if let Some(buf) = driver.take_output_buffer()
            && self.pool.len() < POOL_MAX_BUFFERS
            && buf.capacity() <= POOL_MAX_CAPACITY
        {
            self.pool.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Idle memory per connection is mostly this slab entry; keep it from creeping up.
    #[test]
    fn connection_state_stays_small() {
        struct Quiet;
        impl super::Handler for Quiet {}
        assert!(std::mem::size_of::<crate::Driver>() <= 200);
        assert!(std::mem::size_of::<super::Conn<Quiet>>() <= 304);
    }
}
