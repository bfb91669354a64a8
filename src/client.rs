//! Clients: the seed's `make-client` over a blocking socket with a reader thread
//! ([`BlockingClient`]), and thousands of client connections hosted on event loops
//! ([`ClientReactor`]), both with the same handlers as the server side.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use crate::protocol::error::{Error, UsageError};
use crate::protocol::handshake::ClientUrl;

pub use crate::blocking::client::{BlockingClient, ClientTimeouts};
pub use crate::hosted::client::ClientReactor;

/// Parses a `ws://` or `wss://` URL for a client (`wss://` needs the `tls` feature).
/// Nothing is resolved: through a proxy, the target's name is the proxy's to resolve.
pub(crate) fn parse_url(url: &str) -> Result<ClientUrl, Error> {
    let parsed = ClientUrl::parse(url)?;
    if parsed.secure && cfg!(not(feature = "tls")) {
        return Err(
            UsageError::InvalidUrl(format!("{url}: wss:// needs the `tls` feature")).into(),
        );
    }
    Ok(parsed)
}

/// Every address `host` resolves to, in the resolver's order (never empty).
pub(crate) fn addresses(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        ));
    }
    Ok(addrs)
}
