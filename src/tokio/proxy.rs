//! Clients through HTTP proxies: [`connect_via_proxy`] for `ws://`, [`tunnel`] to build
//! anything else (TLS for `wss://`) on a `CONNECT` tunnel. The protocol part is
//! [`session::proxy`](crate::session::proxy).

use ::tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use ::tokio::net::TcpStream;
use ::tokio::time::timeout;

use super::config::Config;
use super::handshake::{client_with, timed_out};
use super::receiver::WsReceiver;
use super::sender::WsSender;
use crate::protocol::error::{Error, HandshakeError, UsageError};
use crate::protocol::frame::Status;
use crate::protocol::handshake::ClientUrl;
use crate::protocol::options::Options;
use crate::session::proxy::{MAX_RESPONSE_HEAD, Proxy, parse_response};

/// [`connect_with`](super::connect_with) through an HTTP proxy: connects to the proxy,
/// asks it for a `CONNECT` tunnel to `url`'s host and port, and runs the WebSocket
/// handshake through the tunnel.
///
/// `proxy` is `http://[user:password@]host[:port]` (as for
/// [`BlockingClient::proxy`](crate::client::BlockingClient::proxy)); credentials go out as
/// `Proxy-Authorization: Basic`. A proxy that refuses (407 for missing or wrong
/// credentials) fails with [`HandshakeError::ProxyRefused`]: its status and its
/// `Proxy-Authenticate` challenges. Connecting to the proxy, the tunnel and the WebSocket
/// handshake each have [`Config::handshake_timeout`]. For `wss://`, connect and
/// [`tunnel`] yourself, then run TLS and [`client`](super::client) over the stream.
///
/// ```no_run
/// # async fn demo() -> Result<(), websocket_driver::Error> {
/// use websocket_driver::tokio::{Config, connect_via_proxy};
/// let (tx, mut rx) = connect_via_proxy(
///     "ws://chat.example/room",
///     "http://alice:secret@proxy.internal:3128",
///     &Default::default(),
///     &Config::default(),
/// )
/// .await?;
/// # Ok(()) }
/// ```
pub async fn connect_via_proxy(
    url: &str,
    proxy: &str,
    options: &Options,
    config: &Config,
) -> Result<(WsSender, WsReceiver), Error> {
    let proxy = Proxy::parse(proxy)?;
    if ClientUrl::parse(url)?.secure {
        return Err(UsageError::InvalidUrl(format!(
            "{url} (wss:// needs TLS through the tunnel: use websocket_driver::tokio::tunnel)"
        ))
        .into());
    }
    let mut stream = match timeout(
        config.handshake_timeout,
        TcpStream::connect((proxy.host.as_str(), proxy.port)),
    )
    .await
    {
        Ok(stream) => stream?,
        Err(_) => return Err(timed_out("connect to the proxy timed out")),
    };
    stream.set_nodelay(true)?;
    match timeout(config.handshake_timeout, tunnel(&mut stream, &proxy, url)).await {
        Ok(result) => result?,
        Err(_) => return Err(timed_out("proxy tunnel timed out")),
    }
    client_with(stream, url, options, config).await
}

/// Asks the HTTP proxy at the other end of `stream` for a `CONNECT` tunnel to the host and
/// port of the WebSocket URL `url`, and waits for its 2xx. Afterwards `stream` reaches
/// that server: run TLS (for `wss://`) and [`client`](super::client) over it.
///
/// Fails with [`HandshakeError::ProxyRefused`] when the proxy answers another status,
/// [`HandshakeError::Incomplete`] when it closes first, and
/// [`HandshakeError::BadResponse`] when it sends bytes past its answer before the client
/// spoke (no WebSocket or TLS server does). No timeout of its own: wrap it in one.
pub async fn tunnel<S>(stream: &mut S, proxy: &Proxy, url: &str) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let target = ClientUrl::parse(url)?;
    stream.write_all(&proxy.connect_request(&target)).await?;
    stream.flush().await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(HandshakeError::Incomplete.into());
        }
        head.extend_from_slice(&buf[..n]);
        match parse_response(&head)? {
            Status::Partial => debug_assert!(head.len() < MAX_RESPONSE_HEAD),
            Status::Complete(_, used) if used == head.len() => return Ok(()),
            Status::Complete(..) => {
                return Err(HandshakeError::BadResponse(
                    "the proxy sent data through the tunnel before the client did",
                )
                .into());
            }
        }
    }
}
