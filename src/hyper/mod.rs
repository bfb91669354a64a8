//! Upgrading hyper 1.x requests (feature `hyper`), and so axum's: the 101 response comes
//! from the driver's own handshake, and the upgraded stream runs on the
//! [tokio adapter](crate::tokio).
//!
//! Three ways in (the first two drive the connection inline in the caller's task and cost
//! about the same per message; the third puts a connection task and channels in between,
//! which costs more per message):
//!
//! - [`WebSocketUpgrade`]: the axum extractor, with axum's own idiom and types
//!   ([`WebSocket`], [`Message`], [`CloseFrame`], [`Utf8Bytes`]): an axum app switches by
//!   changing `use axum::extract::ws::{…}` to `use websocket_driver::hyper::{…}`.
//!   [`WebSocketUpgrade::from_request`] does the same for a plain hyper request. The
//!   socket is a [`WebSocketStream`] driven inline by the handler's task.
//! - [`serve_stream`] / [`upgrade_stream`]: the inline [`WebSocketStream`] with the
//!   crate's [`Event`](crate::Event)s, for plain hyper.
//! - [`serve`] / [`upgrade`]: the cloneable-sender API ([`WsSender`] + [`WsReceiver`],
//!   a connection task in between), for apps that send from many tasks.
//!
//! axum's WebSocket example, with its `use axum::extract::ws::{Message, WebSocket,
//! WebSocketUpgrade};` line changed and nothing else:
//!
//! ```no_run
//! use websocket_driver::hyper::{Message, WebSocket, WebSocketUpgrade};
//!
//! async fn handler(ws: WebSocketUpgrade) -> axum::response::Response {
//!     ws.on_upgrade(handle_socket)
//! }
//!
//! async fn handle_socket(mut socket: WebSocket) {
//!     while let Some(Ok(msg)) = socket.recv().await {
//!         if let Message::Text(_) | Message::Binary(_) = msg {
//!             if socket.send(msg).await.is_err() {
//!                 return;
//!             }
//!         }
//!     }
//! }
//! # let _ = axum::Router::<()>::new().route("/ws", axum::routing::get(handler));
//! ```
//!
//! Plain hyper, inline:
//!
//! ```no_run
//! use http_body_util::Full;
//! use hyper::body::Bytes;
//! use hyper::{Request, Response};
//! use websocket_driver::{Event, Options};
//!
//! async fn route(mut req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
//!     websocket_driver::hyper::serve_stream(&mut req, &Options::default(), |mut ws| async move {
//!         while let Some(event) = ws.next().await {
//!             if let Event::Message(message) = event {
//!                 let _ = ws.send_message(message).await;
//!             }
//!         }
//!     })
//! }
//! ```
//!
//! The hyper connection must allow upgrades: `http1::Builder::serve_connection(..)
//! .with_upgrades()` (axum's `serve` does). See `examples/echo_hyper.rs`,
//! `examples/echo_axum.rs` and `examples/axum.rs`.
//!
//! How the driver meets hyper: [`upgrade`] converts the hyper request into a
//! [`protocol::handshake::Request`](crate::Request), creates a server [`Driver`] with
//! [`Driver::make_server`] and calls [`Driver::start_connection`], exactly as on any other
//! transport. The driver's queued 101 head is then parsed into the hyper `Response` (so the
//! accept key, subprotocol and `additional_headers` are the driver's) and marked written
//! with [`Driver::consume_output`], since hyper writes the response. When hyper hands over
//! the upgraded IO, the already open driver runs on it through
//! [`WebSocketStream::from_driver`]: on the TCP socket itself when hyper served hyper-util's
//! `TokioIo<TcpStream>`, else inside hyper's upgraded IO (see [`HyperIo`]). Only public
//! driver APIs are used.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use ::hyper::body::Bytes;
use ::hyper::header::{HeaderName, HeaderValue};
use ::hyper::{Request, Response, StatusCode};
use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ::tokio::net::TcpStream;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

use crate::protocol::driver::Driver;
use crate::protocol::error::{Error, HandshakeError, UsageError};
use crate::protocol::handshake;
use crate::protocol::options::Options;
use crate::tokio::{Config, WebSocketStream, WsReceiver, WsSender};

mod axum;

pub use axum::{
    CloseCode, CloseFrame, DefaultOnFailedUpgrade, Message, OnFailedUpgrade, Utf8Bytes, WebSocket,
    WebSocketUpgrade, WebSocketUpgradeRejection,
};

/// The inline stream over a hyper upgrade.
pub type HyperStream = WebSocketStream<HyperIo>;

/// The transport under a [`HyperStream`].
///
/// hyper hands an upgraded connection over as a boxed [`Upgraded`](::hyper::upgrade::Upgraded),
/// which puts a dynamic call and hyper's read-ahead check in front of every read and
/// write. When the server ran on hyper-util's `TokioIo<TcpStream>` (as
/// `examples/echo_hyper.rs` does with `http1::Builder`), the socket is taken back out of
/// it: [`HyperIo::Tcp`], and the bytes hyper had read past the request go to the stream
/// first. Any other transport (TLS, a Unix socket, a test's duplex, and `axum::serve`,
/// whose auto builder hands hyper its own private wrapper of the socket) stays wrapped:
/// [`HyperIo::Upgraded`]. On the TCP
/// socket the stream also raises its receive low-water mark while large frames arrive
/// (see [`WebSocketStream::with_recv_low_water`]).
#[derive(Debug)]
pub enum HyperIo {
    /// The TCP socket hyper served.
    Tcp(TcpStream),
    /// hyper's upgraded IO, for transports other than `TokioIo<TcpStream>`.
    Upgraded(TokioIo<::hyper::upgrade::Upgraded>),
}

impl HyperIo {
    /// The transport, and the bytes hyper read past the request head that belong to it.
    fn from_upgraded(upgraded: ::hyper::upgrade::Upgraded) -> (Self, Bytes) {
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (HyperIo::Tcp(parts.io.into_inner()), parts.read_buf),
            Err(upgraded) => (HyperIo::Upgraded(TokioIo::new(upgraded)), Bytes::new()),
        }
    }

    /// The TCP socket's receive low-water mark (see
    /// [`WebSocketStream::with_recv_low_water`]); hyper's upgraded IO has none to set.
    fn set_low_water(&self, mark: usize) -> io::Result<()> {
        match self {
            HyperIo::Tcp(tcp) => crate::reactor::low_water::set_low_water(tcp, mark),
            HyperIo::Upgraded(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }
}

impl AsyncRead for HyperIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HyperIo::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            HyperIo::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HyperIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HyperIo::Tcp(io) => Pin::new(io).poll_write(cx, buf),
            HyperIo::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HyperIo::Tcp(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            HyperIo::Upgraded(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            HyperIo::Tcp(io) => io.is_write_vectored(),
            HyperIo::Upgraded(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HyperIo::Tcp(io) => Pin::new(io).poll_flush(cx),
            HyperIo::Upgraded(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HyperIo::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            HyperIo::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// The request head as the driver sees it. Header values that are not UTF-8 are kept
/// lossily (the handshake headers are ASCII).
pub fn to_request<B>(req: &Request<B>) -> handshake::Request {
    head_to_request(req.method(), req.uri(), req.version(), req.headers())
}

/// [`to_request`] from the parts of a request head (what an axum extractor sees).
pub(crate) fn head_to_request(
    method: &::hyper::Method,
    uri: &::hyper::Uri,
    version: ::hyper::Version,
    headers: &::hyper::HeaderMap,
) -> handshake::Request {
    let version = match version {
        ::hyper::Version::HTTP_10 => 0,
        ::hyper::Version::HTTP_11 => 1,
        // HTTP/2 and later carry WebSockets differently (RFC 8441): not a valid upgrade here.
        _ => 2,
    };
    handshake::Request {
        method: method.as_str().to_string(),
        path: uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        version,
        headers: headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
    }
}

/// Whether a hyper request asks for a WebSocket upgrade (the seed's `websocket-p`): GET,
/// `Connection: upgrade` and `Upgrade: websocket`.
pub fn is_websocket<B>(req: &Request<B>) -> bool {
    handshake::is_websocket(&to_request(req))
}

type Connected = Result<(WsSender, WsReceiver), Error>;

/// The upgraded connection, once hyper has sent the 101 and handed the stream over.
/// Resolves to the tokio adapter's halves.
pub struct Upgrading {
    inner: Pin<Box<dyn Future<Output = Connected> + Send>>,
}

impl std::fmt::Debug for Upgrading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrading").finish_non_exhaustive()
    }
}

impl Future for Upgrading {
    type Output = Connected;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// Accepts a WebSocket upgrade: returns the 101 response for hyper to send and the
/// future of the connection (await it on a spawned task, after the response has been
/// returned to hyper). Fails with [`Error::Handshake`] for a request that is not a valid
/// upgrade: answer it with [`error_response`].
pub fn upgrade<B>(
    req: &mut Request<B>,
    options: &Options,
) -> Result<(Response<Full<Bytes>>, Upgrading), Error> {
    upgrade_with(req, options, &Config::default())
}

/// [`upgrade`] with the tokio adapter's settings.
pub fn upgrade_with<B>(
    req: &mut Request<B>,
    options: &Options,
    config: &Config,
) -> Result<(Response<Full<Bytes>>, Upgrading), Error> {
    let (response, stream) = upgrade_stream_with(req, options, config)?;
    let inner = Box::pin(async move { stream.await.map(WebSocketStream::spawn) });
    Ok((response, Upgrading { inner }))
}

/// A started server driver for `request` and the 101 response hyper is to write (the
/// driver's own head, marked written).
pub(crate) fn accept_head(
    request: &handshake::Request,
    head_size: usize,
    options: &Options,
) -> Result<(Response<Full<Bytes>>, Driver), Error> {
    check_head_limits(request, head_size, options)?;
    let mut driver = Driver::make_server(request, options)?;
    driver.start_connection();
    let head = driver.pending_output();
    let response = response_from_head(head)?;
    // hyper writes the 101; the driver goes on from the first frame.
    let written = head.len();
    driver.consume_output(written);
    Ok((response, driver))
}

/// The upgraded connection as an inline [`WebSocketStream`], once hyper has sent the 101
/// and handed the stream over.
#[derive(Debug)]
pub struct UpgradingStream {
    on_upgrade: ::hyper::upgrade::OnUpgrade,
    driver: Option<(Driver, Config)>,
}

impl UpgradingStream {
    pub(crate) fn new(
        on_upgrade: ::hyper::upgrade::OnUpgrade,
        driver: Driver,
        config: &Config,
    ) -> Self {
        UpgradingStream {
            on_upgrade,
            driver: Some((driver, config.clone())),
        }
    }
}

impl Future for UpgradingStream {
    type Output = Result<HyperStream, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let upgraded = std::task::ready!(Pin::new(&mut self.on_upgrade).poll(cx))
            .map_err(|e| Error::Io(io::Error::other(e)))?;
        let (driver, config) = self.driver.take().expect("polled after completion");
        let (io, read_ahead) = HyperIo::from_upgraded(upgraded);
        Poll::Ready(Ok(WebSocketStream::from_driver(
            io,
            driver,
            &read_ahead,
            &config,
        )
        .with_low_water_setter(HyperIo::set_low_water)))
    }
}

/// Like [`upgrade`], but the connection is an inline [`WebSocketStream`] (no task, no
/// channels): await the [`UpgradingStream`] on a spawned task after the response has been
/// returned to hyper, and poll the stream there.
pub fn upgrade_stream<B>(
    req: &mut Request<B>,
    options: &Options,
) -> Result<(Response<Full<Bytes>>, UpgradingStream), Error> {
    upgrade_stream_with(req, options, &Config::default())
}

/// [`upgrade_stream`] with the tokio adapter's settings.
pub fn upgrade_stream_with<B>(
    req: &mut Request<B>,
    options: &Options,
    config: &Config,
) -> Result<(Response<Full<Bytes>>, UpgradingStream), Error> {
    let size = head_size(req.method(), req.uri(), req.headers());
    let (response, driver) = accept_head(&to_request(req), size, options)?;
    let on_upgrade = ::hyper::upgrade::on(req);
    Ok((response, UpgradingStream::new(on_upgrade, driver, config)))
}

/// The size of a head hyper parsed, as sent with one space after each colon (hyper keeps
/// neither the raw head nor its spacing): counted in the values' bytes, not in the
/// driver's lossy text of them (a byte that is not UTF-8 is a 3-byte U+FFFD there).
pub(crate) fn head_size(
    method: &::hyper::Method,
    uri: &::hyper::Uri,
    headers: &::hyper::HeaderMap,
) -> usize {
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = method.as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let fields: usize = headers
        .iter()
        .map(|(name, value)| {
            name.as_str().len() + ": ".len() + value.as_bytes().len() + "\r\n".len()
        })
        .sum();
    line + fields + "\r\n".len()
}

/// The options' head limits, as the other servers apply them while they read the head:
/// hyper read it under its own (larger) limits. `head_size`: see [`head_size`].
fn check_head_limits(
    request: &handshake::Request,
    head_size: usize,
    options: &Options,
) -> Result<(), Error> {
    if request.headers.len() > options.max_headers {
        return Err(HandshakeError::TooManyHeaders {
            limit: options.max_headers,
        }
        .into());
    }
    if head_size > options.max_handshake_size {
        return Err(HandshakeError::HeadTooLarge {
            limit: options.max_handshake_size,
        }
        .into());
    }
    Ok(())
}

/// Turns the driver's 101 head into a hyper response with the same headers.
fn response_from_head(head: &[u8]) -> Result<Response<Full<Bytes>>, Error> {
    let bad = |what: &str| Error::Usage(UsageError::InvalidHeader(what.to_string()));
    let lines = head.split(|&b| b == b'\n').count();
    let mut headers = vec![httparse::EMPTY_HEADER; lines];
    let mut parsed = httparse::Response::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) if parsed.code == Some(101) => {}
        _ => return Err(bad("the driver's 101 response")),
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad(h.name))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad(h.name))?;
        response.headers_mut().append(name, value);
    }
    Ok(response)
}

/// The HTTP response for a failed upgrade: 400 with the reason, 426 with
/// `Sec-WebSocket-Version: 13`, 431 for an oversized head, 500 for anything else.
pub fn error_response(error: &Error) -> Response<Full<Bytes>> {
    let status = match error {
        Error::Handshake(e) => e.status(),
        _ => 500,
    };
    let mut response = Response::new(Full::new(Bytes::from(format!("{error}\n"))));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        ::hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if matches!(
        error,
        Error::Handshake(HandshakeError::UnsupportedVersion(_))
    ) {
        headers.insert(
            ::hyper::header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
    }
    response
}

/// Upgrades `req` and runs `app` on the connection in a new task; returns the response
/// for hyper (the 101, or the error response for a bad request). Needs a tokio runtime,
/// as hyper and axum servers have. `app` gets the split API; [`serve_stream`] hands it
/// the inline stream instead.
pub fn serve<B, F, Fut>(req: &mut Request<B>, options: &Options, app: F) -> Response<Full<Bytes>>
where
    F: FnOnce(WsSender, WsReceiver) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    match upgrade(req, options) {
        Ok((response, upgrading)) => {
            ::tokio::spawn(async move {
                if let Ok((tx, rx)) = upgrading.await {
                    app(tx, rx).await;
                }
            });
            response
        }
        Err(e) => error_response(&e),
    }
}

/// Upgrades `req` and runs `app` on the inline [`WebSocketStream`] in a new task (no
/// connection task, no channels); returns the response for hyper (the 101, or the error
/// response for a bad request). Needs a tokio runtime.
pub fn serve_stream<B, F, Fut>(
    req: &mut Request<B>,
    options: &Options,
    app: F,
) -> Response<Full<Bytes>>
where
    F: FnOnce(HyperStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    match upgrade_stream(req, options) {
        Ok((response, upgrading)) => {
            ::tokio::spawn(async move {
                if let Ok(ws) = upgrading.await {
                    app(ws).await;
                }
            });
            response
        }
        Err(e) => error_response(&e),
    }
}
