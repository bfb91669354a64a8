//! Client connections hosted on the reactor's event loops, with the same [`Handler`]s as
//! server connections.

use std::collections::VecDeque;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(feature = "tls")]
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::protocol::error::Error;
use crate::protocol::handshake::ClientUrl;
use crate::protocol::options::Options;
use crate::reactor::Backend;
use crate::server::{
    Attempt, ClientConnector, ClientInit, Handler, Redial, ServerConfig, ServerHandle, Stats,
    Upgrade, UpgradeRequest, spawn,
};
use crate::session::upgrade::HttpResponse;

#[cfg(feature = "tls")]
use crate::blocking::client::lock;
use crate::client::{addresses, parse_url};
use crate::session::proxy::Proxy;

/// Client connections on event loops of their own: tens of thousands per process, each
/// with a [`Handler`] stored inline, exactly like server connections.
pub struct ClientReactor<H: Handler> {
    handle: ServerHandle,
    connectors: Vec<ClientConnector<H>>,
    options: Options,
    /// Every connection goes through this HTTP proxy's `CONNECT` tunnels, when set.
    proxy: Option<Proxy>,
    #[cfg(feature = "tls")]
    tls: Mutex<Option<Arc<rustls::ClientConfig>>>,
    next: AtomicUsize,
    _handler: PhantomData<fn() -> H>,
}

impl<H: Handler> std::fmt::Debug for ClientReactor<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientReactor")
            .field("backend", &self.handle.backend())
            .finish()
    }
}

impl<H: Handler> ClientReactor<H> {
    /// Starts `config.threads` loops on `config.backend`. `config.options` are the default
    /// options of each connection (`accept_protocols` is the list of offered subprotocols);
    /// the timeouts and backpressure settings apply as on a server.
    pub fn start(config: ServerConfig) -> io::Result<ClientReactor<H>> {
        let options = config.options.clone();
        #[cfg(feature = "tls")]
        let tls = Mutex::new(config.client_tls.clone());
        let loops = (0..config.threads.max(1)).map(|_| None).collect();
        let refuse = |_: &UpgradeRequest<'_>| Upgrade::<H>::Reject(HttpResponse::new(404, ""));
        let (handle, connectors) = spawn(config, loops, refuse, None, None)?;
        Ok(ClientReactor {
            handle,
            connectors,
            options,
            proxy: None,
            #[cfg(feature = "tls")]
            tls,
            next: AtomicUsize::new(0),
            _handler: PhantomData,
        })
    }

    /// Opens every later connection through an HTTP proxy with `CONNECT`
    /// (`http://[user:password@]host:port`, credentials sent as `Proxy-Authorization:
    /// Basic`; see [`Proxy::parse`]). The WebSocket handshake (and TLS for wss) runs through
    /// the tunnel; a proxy answer other than 2xx reaches the handler as
    /// `HandshakeError::ProxyRefused` (status and challenges) and a 1006 close.
    /// [`Ws::peer_addr`] is the proxy's address.
    ///
    /// [`Ws::peer_addr`]: crate::server::Ws::peer_addr
    pub fn proxy(mut self, proxy_url: &str) -> Result<ClientReactor<H>, Error> {
        self.proxy = Some(Proxy::parse(proxy_url)?);
        Ok(self)
    }

    /// Opens a connection to `url` with the default options; `handler` gets its events.
    /// Connection failures reach `handler.on_error` and `on_close` (1006). An error
    /// here (a bad URL, a name that does not resolve, a reactor that has shut down)
    /// means the handler was dropped without being called.
    pub fn connect(&self, url: &str, handler: H) -> Result<(), Error> {
        let options = self.options.clone();
        self.connect_with(url, &options, handler)
    }

    /// Like [`ClientReactor::connect`], with per-connection options. The host is resolved
    /// here, on the calling thread; its addresses are tried in turn, the next one when a
    /// connect is refused or finds no route (`localhost` as `::1`, then `127.0.0.1`).
    /// Through a proxy, only the proxy's name is resolved (its addresses tried in turn the
    /// same way): the target's is the proxy's.
    pub fn connect_with(&self, url: &str, options: &Options, handler: H) -> Result<(), Error> {
        let parsed = parse_url(url)?;
        let (addrs, proxy) = match &self.proxy {
            // The proxy's addresses in turn, as a target's are.
            Some(proxy) => (
                addresses(&proxy.host, proxy.port)?,
                Some(proxy.connect_request(&parsed)),
            ),
            None => (addresses(&parsed.host, parsed.port)?, None),
        };
        self.queue(url, &parsed, options, addrs, proxy, handler)
    }

    /// Opens a connection to `url` at the first of `addrs` that accepts, in order (for
    /// names resolved elsewhere: the URL's host is still the `Host` header and, for wss,
    /// the name the certificate is checked against). Not through the proxy.
    pub fn connect_at(
        &self,
        url: &str,
        addrs: &[SocketAddr],
        options: &Options,
        handler: H,
    ) -> Result<(), Error> {
        if addrs.is_empty() {
            return Err(
                io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to").into(),
            );
        }
        self.queue(
            url,
            &parse_url(url)?,
            options,
            addrs.to_vec(),
            None,
            handler,
        )
    }

    /// Queues the connection on a loop: at `addrs[0]`, the rest tried in turn (through
    /// the proxy, `addrs` is the proxy's address and `proxy` the `CONNECT` request).
    fn queue(
        &self,
        url: &str,
        parsed: &ClientUrl,
        options: &Options,
        addrs: Vec<SocketAddr>,
        proxy: Option<Vec<u8>>,
        handler: H,
    ) -> Result<(), Error> {
        let mut addrs: VecDeque<SocketAddr> = addrs.into();
        let addr = addrs
            .pop_front()
            .expect("callers pass at least one address");
        #[cfg(feature = "tls")]
        let tls = if parsed.secure {
            let mut slot = lock(&self.tls);
            Some(match &*slot {
                Some(config) => config.clone(),
                None => slot
                    .insert(crate::tls::client_config(&crate::tls::Verify::SystemRoots)?)
                    .clone(),
            })
        } else {
            None
        };
        #[cfg(not(feature = "tls"))]
        let _ = parsed;
        let attempt = Attempt::new(
            url,
            options,
            #[cfg(feature = "tls")]
            tls.as_ref(),
        )?;
        // What later attempts are made of, only when there are other addresses.
        let redial = (!addrs.is_empty()).then(|| {
            Box::new(Redial {
                addrs,
                connect_timed_out: false,
                url: url.to_string(),
                options: options.clone(),
                proxy: proxy.clone(),
                #[cfg(feature = "tls")]
                tls,
            })
        });
        let init = ClientInit::new(attempt, handler, proxy, redial);
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.connectors[i % self.connectors.len()].connect(addr, init)?;
        Ok(())
    }

    /// Counters over all loops.
    pub fn stats(&self) -> Stats {
        self.handle.stats()
    }

    /// The backend the loops run on.
    pub fn backend(&self) -> Backend {
        self.handle.backend()
    }

    /// Sends 1001 to every open connection, waits up to `grace`, closes the rest, stops
    /// the loops. A connection still waiting for its 101 ends at once (its handler hears
    /// 1006, "shut down before the connection opened"); a connect not started yet fails
    /// (`on_error`, then 1006), and `connect` refuses new ones from then on. Called from a
    /// handler (on one of these loops), it starts the same and returns without waiting
    /// for the loops, as [`ServerHandle::shutdown`](crate::server::ServerHandle::shutdown)
    /// does.
    pub fn shutdown(&self, grace: Duration) -> io::Result<()> {
        self.handle.shutdown(grace)
    }
}
