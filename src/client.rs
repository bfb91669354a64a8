//! Clients: the seed's `make-client` over a blocking socket with a reader thread
//! ([`BlockingClient`]), and thousands of client connections hosted on event loops
//! ([`ClientReactor`]), both with the same handlers as the server side.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use crate::protocol::error::{Error, UsageError};
use crate::protocol::handshake::ClientUrl;

pub use crate::blocking::client::{BlockingClient, ClientTimeouts};
pub use crate::hosted::client::ClientReactor;

/// Resolves a `ws://` or `wss://` URL to the address to dial.
pub(crate) fn resolve(url: &str) -> Result<(ClientUrl, SocketAddr), Error> {
    let parsed = ClientUrl::parse(url)?;
    if parsed.secure && cfg!(not(feature = "tls")) {
        return Err(
            UsageError::InvalidUrl(format!("{url}: wss:// needs the `tls` feature")).into(),
        );
    }
    let addr = (parsed.host.as_str(), parsed.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} resolves to no address", parsed.host),
            )
        })?;
    Ok((parsed, addr))
}

/// Resolves an HTTP proxy's address.
pub(crate) fn resolve_proxy(proxy: &crate::session::proxy::Proxy) -> io::Result<SocketAddr> {
    (proxy.host.as_str(), proxy.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("proxy {} resolves to no address", proxy.host),
            )
        })
}
