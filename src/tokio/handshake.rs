//! The opening handshakes: [`WebSocketStream::accept`] on the server side,
//! [`WebSocketStream::connect`] and [`WebSocketStream::client`] on the client side, and the
//! split-API functions over them ([`accept`], [`connect`], [`client`]…).

use std::io;

use ::tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use ::tokio::net::TcpStream;
use ::tokio::time::{Instant, timeout, timeout_at};

use super::config::Config;
use super::receiver::WsReceiver;
use super::sender::WsSender;
use super::stream::WebSocketStream;
use crate::protocol::driver::{Driver, Event, ReadyState};
use crate::protocol::error::{Error, HandshakeError, UsageError};
use crate::protocol::frame::Status;
use crate::protocol::handshake::{ClientUrl, Request, RequestParser};
use crate::protocol::options::Options;
use crate::session::upgrade::{self, Answer, HttpResponse, NonUpgrade, error_response};

async fn reject<S: AsyncWrite + Unpin>(stream: &mut S, response: &[u8]) {
    let _ = stream.write_all(response).await;
    let _ = stream.shutdown().await;
}

pub(super) fn timed_out(what: &str) -> Error {
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

fn tcp_url(url: &str, hint: &str) -> Result<ClientUrl, Error> {
    let parsed = ClientUrl::parse(url)?;
    if parsed.secure {
        return Err(UsageError::InvalidUrl(format!("{url} ({hint})")).into());
    }
    Ok(parsed)
}

async fn tcp_connect(url: &ClientUrl, config: &Config) -> Result<TcpStream, Error> {
    let stream = match timeout(
        config.handshake_timeout,
        TcpStream::connect((url.host.as_str(), url.port)),
    )
    .await
    {
        Ok(stream) => stream?,
        Err(_) => return Err(timed_out("connect timed out")),
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocketStream<S> {
    /// Accepts a WebSocket connection on `io`: reads the upgrade request, answers it (the
    /// 101 is written before this returns; an HTTP error for a bad one) and returns the
    /// open stream (its first event is `Open`).
    pub async fn accept(io: S, options: &Options) -> Result<Self, Error> {
        Self::accept_with(io, options, &Config::default(), |_| Ok(())).await
    }

    /// [`WebSocketStream::accept`] with settings and a check: `check` sees the parsed
    /// request (path, headers) and may refuse it with an HTTP response, which is sent
    /// before the stream closes.
    pub async fn accept_with<F>(
        mut io: S,
        options: &Options,
        config: &Config,
        check: F,
    ) -> Result<Self, Error>
    where
        F: FnOnce(&Request) -> Result<(), HttpResponse>,
    {
        // One deadline for the whole handshake: the request, then the 101 or the
        // refusal (a peer that sends a bad request and reads nothing holds no task longer).
        let by = deadline_after(config.handshake_timeout);
        let (request, read_ahead) = match timeout_at(by, read_request(&mut io, options)).await {
            Ok(result) => result?,
            Err(_) => return Err(timed_out("handshake timed out")),
        };
        let mut driver =
            match upgrade::answer(&request, options, check(&request), NonUpgrade::BadRequest) {
                Answer::Accept(driver, ()) => driver,
                Answer::Reject(refusal) => {
                    let _ = timeout_at(by, reject(&mut io, &refusal.response)).await;
                    return Err(refusal.error);
                }
            };
        driver.start_connection();
        let mut ws = Self::from_driver(io, driver, &read_ahead, config);
        // The 101 goes out now: the handshake is complete when this returns.
        match timeout_at(by, ws.flush()).await {
            Ok(result) => result?,
            Err(_) => return Err(timed_out("handshake timed out")),
        }
        Ok(ws)
    }

    /// Runs the client handshake for `url` over an already connected `io` (TCP, TLS, a
    /// proxy tunnel) and returns the open stream (its first event is `Open`).
    pub async fn client(io: S, url: &str, options: &Options) -> Result<Self, Error> {
        Self::client_with(io, url, options, &Config::default()).await
    }

    /// [`WebSocketStream::client`] with settings.
    pub async fn client_with(
        mut io: S,
        url: &str,
        options: &Options,
        config: &Config,
    ) -> Result<Self, Error> {
        let mut driver = Driver::make_client(url, options)?;
        driver.start_connection();
        let handshake = async {
            io.write_all(driver.pending_output()).await?;
            let n = driver.pending_output().len();
            driver.consume_output(n);
            io.flush().await?;
            let mut buf = vec![0u8; 8 * 1024];
            loop {
                let n = io.read(&mut buf).await?;
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
        Ok(Self::from_driver(io, driver, &read_ahead, config).with_open_first())
    }
}

impl WebSocketStream<TcpStream> {
    /// Connects to a `ws://` URL over TCP and completes the handshake. For `wss://`, open
    /// the TLS stream yourself and use [`WebSocketStream::client`]. The socket is this
    /// crate's own, so the stream sets its receive low-water mark while large frames arrive
    /// ([`WebSocketStream::with_recv_low_water`]).
    pub async fn connect(url: &str, options: &Options) -> Result<Self, Error> {
        Self::connect_with(url, options, &Config::default()).await
    }

    /// [`WebSocketStream::connect`] with settings.
    pub async fn connect_with(
        url: &str,
        options: &Options,
        config: &Config,
    ) -> Result<Self, Error> {
        Self::connect_tcp(
            url,
            options,
            config,
            "wss:// needs a TLS stream: connect one and call WebSocketStream::client",
        )
        .await
    }

    /// Both `connect`s: `hint` says what to do instead for `wss://`.
    async fn connect_tcp(
        url: &str,
        options: &Options,
        config: &Config,
        hint: &str,
    ) -> Result<Self, Error> {
        let parsed = tcp_url(url, hint)?;
        let stream = tcp_connect(&parsed, config).await?;
        Self::client_with(stream, url, options, config)
            .await
            .map(Self::with_recv_low_water)
    }
}

/// Accepts a WebSocket connection on `stream`: reads the upgrade request, answers it (an
/// HTTP error for a bad one) and starts the connection task. Needs a tokio runtime.
/// [`WebSocketStream::accept`] does the same without the task.
pub async fn accept<S>(stream: S, options: &Options) -> Result<(WsSender, WsReceiver), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    accept_with(stream, options, &Config::default(), |_| Ok(())).await
}

/// [`accept`] with settings and a check: `check` sees the parsed request (path, headers)
/// and may refuse it with an HTTP response, which is sent before the stream closes.
pub async fn accept_with<S, F>(
    stream: S,
    options: &Options,
    config: &Config,
    check: F,
) -> Result<(WsSender, WsReceiver), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnOnce(&Request) -> Result<(), HttpResponse>,
{
    WebSocketStream::accept_with(stream, options, config, check)
        .await
        .map(WebSocketStream::spawn)
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
    WebSocketStream::connect_tcp(
        url,
        options,
        config,
        "wss:// needs a TLS stream: connect one and call websocket_driver::tokio::client",
    )
    .await
    .map(WebSocketStream::spawn)
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
    stream: S,
    url: &str,
    options: &Options,
    config: &Config,
) -> Result<(WsSender, WsReceiver), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    WebSocketStream::client_with(stream, url, options, config)
        .await
        .map(WebSocketStream::spawn)
}

/// `after` from now on tokio's clock; far in the future (as `tokio::time::timeout` puts
/// it) when that overflows (`Duration::MAX` means never).
fn deadline_after(after: std::time::Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(86_400 * 365 * 30))
}
