//! The reactor-hosted server: `Server::bind(addr)?.serve(app)`.
//!
//! `app` sees each HTTP request on a new connection (path, headers, peer address: the
//! seed's `env`) and returns either a [`Handler`] (accept the upgrade) or an HTTP response
//! (reject). The handler lives inline in the loop's slab entry next to its `Driver`.

mod backplane;
mod config;
mod handle;
mod handler;
mod pubsub;
pub(crate) mod service;
mod tunnel;

use service::WsService;

#[cfg(feature = "redis")]
pub use backplane::RedisBackplane;
pub use backplane::{Backplane, BackplaneStats, Inbound};
pub use config::{BackpressurePolicy, PanicPolicy, ServerConfig};
pub use handle::{ServerHandle, Stats};
pub(crate) use handler::{Attempt, ClientInit, Command, Redial};
pub use handler::{Handler, Sender, Upgrade, UpgradeRequest, Ws};
pub use pubsub::{MAX_TOPIC_LEN, Publisher, Topic};

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use crate::protocol::options::Options;
use crate::reactor::core;
use crate::reactor::epoll::Epoll;
#[cfg(target_os = "linux")]
use crate::reactor::uring::Uring;
use crate::reactor::{Backend, Connector, LoopConfig, LoopStats};

pub use crate::session::upgrade::HttpResponse;

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
pub struct Server {
    listener: TcpListener,
    config: ServerConfig,
    backplane: Option<Arc<dyn Backplane>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("config", &self.config)
            .field("backplane", &self.backplane.is_some())
            .finish()
    }
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
            backplane: None,
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

    /// Carries publishes to and from other server processes through `backplane` (for
    /// example `RedisBackplane`, feature `redis`), so topics span every process.
    #[cfg_attr(
        feature = "redis",
        doc = "\nSee [`RedisBackplane`] for the one that ships with this crate."
    )]
    pub fn backplane(mut self, backplane: impl Backplane) -> Server {
        self.backplane = Some(Arc::new(backplane));
        self
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
        spawn(
            self.config,
            listeners,
            app,
            Some(local_addr),
            self.backplane,
        )
        .map(|(handle, _)| handle)
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

/// How a client reactor asks one loop to open a connection.
pub(crate) type ClientConnector<H> = Connector<ClientInit<H>, Command>;

/// Starts one loop per entry of `listeners` (`None`: a loop for outgoing connections only).
/// Returns the handle and, per loop, the queue for outgoing connections.
pub(crate) fn spawn<F, H>(
    config: ServerConfig,
    listeners: Vec<Option<TcpListener>>,
    app: F,
    local_addr: Option<SocketAddr>,
    backplane: Option<Arc<dyn Backplane>>,
) -> io::Result<(ServerHandle, Vec<ClientConnector<H>>)>
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
    let pubsub = Arc::new(pubsub::PubSub::new(listeners.len(), backplane.clone()));
    let mut remotes = Vec::new();
    let mut connectors = Vec::new();
    let mut stats = Vec::new();
    let mut handles = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let loop_stats = Arc::new(LoopStats::default());
        stats.push(loop_stats.clone());
        let service = WsService::new(
            app.clone(),
            shared.clone(),
            loop_stats.clone(),
            (i, pubsub.clone()),
        );
        let loop_config = LoopConfig {
            max_connections: shared.max_connections,
            read_buffer_size: shared.read_buffer_size,
            busy_poll: shared.busy_poll,
            isolate_panics: shared.panic_policy == PanicPolicy::CloseConnection,
            connections: connections.clone(),
        };
        let name = format!("wsd-loop-{i}");
        let spawned = match backend {
            #[cfg(target_os = "linux")]
            Backend::IoUring => {
                core::spawn::<_, Uring>(name, listener, service, loop_config, loop_stats)
            }
            _ => core::spawn::<_, Epoll>(name, listener, service, loop_config, loop_stats),
        };
        let spawned = match spawned {
            Ok(spawned) => spawned,
            Err(error) => {
                // The loops already started stop (nothing else could reach them), and a
                // publish made on one meanwhile finds the loops it can reach.
                pubsub.set_remotes(remotes.clone());
                pubsub.stop();
                handle::stop_loops(&remotes, std::time::Instant::now());
                let _ = handle::join_loops(handles);
                return Err(error);
            }
        };
        remotes.push(spawned.remote);
        connectors.push(spawned.connector);
        handles.push(spawned.thread);
    }
    pubsub.set_remotes(remotes.clone());
    if let Some(backplane) = &backplane {
        backplane.start(backplane::Inbound {
            pubsub: pubsub.clone(),
        });
    }
    let handle = ServerHandle::new(remotes, stats, handles, local_addr, backend, &why, pubsub);
    Ok((handle, connectors))
}
