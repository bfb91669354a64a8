//! The axum idiom over the inline stream: the [`WebSocketUpgrade`] extractor and the
//! [`WebSocket`], [`Message`], [`CloseFrame`] and [`Utf8Bytes`] types shaped like
//! `axum::extract::ws`'s, so an axum app switches by changing its `use` line.

use std::borrow::Cow;
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use ::hyper::Request;
use ::hyper::body::Bytes;
use ::hyper::header::HeaderValue;
use ::hyper::http::request::Parts;
use ::hyper::upgrade::OnUpgrade;
use axum_core::body::Body;
use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};

use super::{
    HyperStream, UpgradingStream, accept_head, error_response, head_size, head_to_request,
};
use crate::protocol::driver::{Driver, Event, Message as DriverMessage};
use crate::protocol::error::{Error, HandshakeError, code};
use crate::protocol::handshake;
use crate::protocol::options::Options;
use crate::tokio::Config;
use crate::tokio::{Side, SplitWakers};

/// The axum extractor for a WebSocket upgrade (axum's `WebSocketUpgrade` idiom): take it
/// as a handler argument and answer with [`WebSocketUpgrade::on_upgrade`]. The request is
/// checked when extracted (a bad one is rejected with 400 or 426, as the crate's other
/// servers answer it); the 101 is the driver's own handshake.
///
/// ```no_run
/// use axum::response::Response;
/// use websocket_driver::hyper::{Message, WebSocket, WebSocketUpgrade};
///
/// async fn handler(ws: WebSocketUpgrade) -> Response {
///     ws.protocols(["chat"]).on_upgrade(handle_socket)
/// }
///
/// async fn handle_socket(mut socket: WebSocket) {
///     while let Some(Ok(msg)) = socket.recv().await {
///         if let Message::Text(_) | Message::Binary(_) = msg {
///             if socket.send(msg).await.is_err() {
///                 return;
///             }
///         }
///     }
/// }
/// ```
///
/// For a plain hyper server, [`WebSocketUpgrade::from_request`] makes one from the
/// request.
pub struct WebSocketUpgrade<F = DefaultOnFailedUpgrade> {
    request: handshake::Request,
    /// The head's size in bytes, for the options' limit (see [`head_size`]).
    head_size: usize,
    on_upgrade: OnUpgrade,
    options: Options,
    config: Config,
    on_failed_upgrade: F,
    /// The subprotocols the client offered, in its order.
    requested: Vec<HeaderValue>,
    /// [`WebSocketUpgrade::max_frame_size`], applied over the options at the upgrade.
    max_frame: Option<usize>,
}

impl<F> fmt::Debug for WebSocketUpgrade<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocketUpgrade")
            .field("path", &self.request.path)
            .field("options", &self.options)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Whether a subprotocol name is an HTTP token, as RFC 6455 §4.1 requires.
fn is_token(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(crate::protocol::deflate::is_tchar)
}

impl WebSocketUpgrade {
    fn checked(
        request: handshake::Request,
        head_size: usize,
        on_upgrade: Option<OnUpgrade>,
    ) -> Result<Self, WebSocketUpgradeRejection> {
        Driver::make_server(&request, &Options::default())
            .map_err(|error| WebSocketUpgradeRejection { error })?;
        let on_upgrade = on_upgrade.ok_or_else(|| WebSocketUpgradeRejection {
            error: HandshakeError::BadRequest(
                "the connection cannot be upgraded (a hyper server without .with_upgrades()?)",
            )
            .into(),
        })?;
        let requested = request
            .headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-protocol"))
            .flat_map(|(_, value)| value.split(','))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .filter_map(|token| HeaderValue::from_str(token).ok())
            .collect();
        Ok(WebSocketUpgrade {
            request,
            head_size,
            on_upgrade,
            options: Options::default(),
            config: Config::default(),
            on_failed_upgrade: DefaultOnFailedUpgrade,
            requested,
            max_frame: None,
        })
    }

    /// The extractor for a plain hyper request (what axum does in `FromRequestParts`).
    pub fn from_request<B>(req: &mut Request<B>) -> Result<Self, WebSocketUpgradeRejection> {
        let request = super::to_request(req);
        let size = head_size(req.method(), req.uri(), req.headers());
        Self::checked(request, size, Some(::hyper::upgrade::on(req)))
    }
}

impl<F> WebSocketUpgrade<F> {
    /// The subprotocols this server speaks, in its order of preference: the first of them
    /// the client offered is agreed (as axum's extractor does; the crate's own servers
    /// take the client's order, as the seed does). A name that is not an HTTP token (RFC
    /// 6455 §4.1: `v1/json` is not) is never agreed.
    pub fn protocols<I>(mut self, protocols: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<Cow<'static, str>>,
    {
        let chosen = protocols.into_iter().map(Into::into).find(|p| {
            is_token(p)
                && self
                    .requested
                    .iter()
                    .any(|offered| offered.as_bytes() == p.as_bytes())
        });
        self.select(chosen.as_deref());
        self
    }

    /// The subprotocols the client offered, in its order.
    pub fn requested_protocols(&self) -> impl Iterator<Item = &HeaderValue> {
        self.requested.iter()
    }

    /// Chooses the subprotocol to agree (the latest of this and
    /// [`WebSocketUpgrade::protocols`] counts). Unlike axum's, only one the client offered
    /// is agreed (RFC 6455 §4.2.2: a client fails a handshake that names another): any
    /// other agrees none.
    pub fn set_selected_protocol(&mut self, protocol: HeaderValue) {
        let offered = self.requested.contains(&protocol);
        self.select(protocol.to_str().ok().filter(|_| offered));
    }

    /// The subprotocol chosen so far, if any: what the driver will agree, the first the
    /// client offered that the options accept.
    pub fn selected_protocol(&self) -> Option<&HeaderValue> {
        self.requested.iter().find(|offered| {
            self.options
                .accept_protocols
                .iter()
                .any(|p| p.as_bytes() == offered.as_bytes())
        })
    }

    /// Accepts `protocol` alone (none with `None`, or with a name that is not a token:
    /// RFC 6455 §4.1 allows only tokens, and the driver refuses others, which failed the
    /// upgrade with a 500).
    fn select(&mut self, protocol: Option<&str>) {
        self.options.accept_protocols = protocol
            .filter(|p| is_token(p))
            .map(str::to_string)
            .into_iter()
            .collect();
    }

    /// The largest message accepted (a bigger one closes the connection with 1009).
    /// Default 64 MiB − 1 ([`Options::max_length`]'s default, the seed's `#x3ffffff`).
    pub fn max_message_size(mut self, max: usize) -> Self {
        self.options.max_length = max;
        self
    }

    /// The largest frame accepted. The driver has one limit, on messages (frames are
    /// never larger than the message they carry), so this one caps whole messages too:
    /// the smaller of the two applies, whichever is set first (unlike axum's, a message
    /// fragmented into frames under this size is refused past it).
    pub fn max_frame_size(mut self, max: usize) -> Self {
        self.max_frame = Some(max);
        self
    }

    /// The size of the connection's read buffer ([`Config::read_buffer_size`]).
    pub fn read_buffer_size(mut self, size: usize) -> Self {
        self.config = self.config.read_buffer_size(size);
        self
    }

    /// Accepted for axum compatibility and ignored: frames are written straight from the
    /// driver's output buffer.
    pub fn write_buffer_size(self, size: usize) -> Self {
        let _ = size;
        self
    }

    /// The unwritten output over which sends wait ([`Config::max_backpressure`]; axum's
    /// sends fail there instead).
    pub fn max_write_buffer_size(mut self, max: usize) -> Self {
        self.config.max_backpressure = max;
        self
    }

    /// Accepts a client's permessage-deflate offer (RFC 7692, [`Options::deflate`]; axum's
    /// own extractor has no compression). Off by default.
    pub fn deflate(mut self, on: bool) -> Self {
        self.options = self.options.deflate(on);
        self
    }

    /// All of the driver's options (subprotocols, extra response headers, limits). Their
    /// `accept_protocols` are matched as the driver does: the first the client offered
    /// that is in the list.
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// All of the tokio adapter's settings (backpressure, timeouts, read buffer).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// The request target (path and query) of the upgrade request.
    pub fn path(&self) -> &str {
        &self.request.path
    }

    /// Calls `callback` with the error if the upgrade fails after the 101 (hyper could not
    /// hand the connection over).
    pub fn on_failed_upgrade<C: OnFailedUpgrade>(self, callback: C) -> WebSocketUpgrade<C> {
        WebSocketUpgrade {
            request: self.request,
            head_size: self.head_size,
            on_upgrade: self.on_upgrade,
            options: self.options,
            config: self.config,
            on_failed_upgrade: callback,
            requested: self.requested,
            max_frame: self.max_frame,
        }
    }

    /// Returns the 101 response and, once hyper has sent it and handed the connection over,
    /// runs `callback` with the [`WebSocket`] on a new task. Options that make the handshake
    /// fail (an invalid extra header) are answered with 500.
    #[must_use = "to set up the WebSocket connection, this response must be returned"]
    pub fn on_upgrade<C, Fut>(mut self, callback: C) -> Response
    where
        C: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
        F: OnFailedUpgrade,
    {
        if let Some(max) = self.max_frame {
            self.options.max_length = self.options.max_length.min(max);
        }
        let (response, driver) = match accept_head(&self.request, self.head_size, &self.options) {
            Ok(accepted) => accepted,
            Err(e) => return error_response(&e).map(Body::new),
        };
        let protocol = driver
            .protocol()
            .and_then(|p| HeaderValue::from_str(p).ok());
        let upgrading = UpgradingStream::new(self.on_upgrade, driver, &self.config);
        let on_failed = self.on_failed_upgrade;
        ::tokio::spawn(async move {
            match upgrading.await {
                Ok(inner) => {
                    callback(WebSocket {
                        inner,
                        protocol,
                        done: false,
                        split_wakers: SplitWakers::default(),
                    })
                    .await
                }
                Err(e) => on_failed.call(e),
            }
        });
        response.map(Body::new)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketUpgrade<DefaultOnFailedUpgrade> {
    type Rejection = WebSocketUpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let request = head_to_request(&parts.method, &parts.uri, parts.version, &parts.headers);
        let size = head_size(&parts.method, &parts.uri, &parts.headers);
        let on_upgrade = parts.extensions.remove::<OnUpgrade>();
        Self::checked(request, size, on_upgrade)
    }
}

/// `Option<WebSocketUpgrade>`: `None` for a request that does not ask for a WebSocket at
/// all (no `Upgrade: websocket`), so one route can serve plain HTTP and WebSockets; a
/// request that asks but is invalid is still rejected.
impl<S: Send + Sync> OptionalFromRequestParts<S> for WebSocketUpgrade<DefaultOnFailedUpgrade> {
    type Rejection = WebSocketUpgradeRejection;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        let request = head_to_request(&parts.method, &parts.uri, parts.version, &parts.headers);
        // `websocket` as one token of the list, as the plain extractor checks it
        // (`Upgrade: h2c, websocket` asks for a WebSocket too).
        if !handshake::has_token(&request.headers, "upgrade", "websocket") {
            return Ok(None);
        }
        let size = head_size(&parts.method, &parts.uri, &parts.headers);
        let on_upgrade = parts.extensions.remove::<OnUpgrade>();
        Self::checked(request, size, on_upgrade).map(Some)
    }
}

/// What to do when the upgrade fails after the 101 (see
/// [`WebSocketUpgrade::on_failed_upgrade`]).
pub trait OnFailedUpgrade: Send + 'static {
    /// Called with the error.
    fn call(self, error: Error);
}

impl<F: FnOnce(Error) + Send + 'static> OnFailedUpgrade for F {
    fn call(self, error: Error) {
        self(error)
    }
}

/// The default [`OnFailedUpgrade`]: logs the error at debug level.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct DefaultOnFailedUpgrade;

impl OnFailedUpgrade for DefaultOnFailedUpgrade {
    fn call(self, error: Error) {
        log::debug!("websocket upgrade failed: {error}");
    }
}

/// A request [`WebSocketUpgrade`] refused, answered as the crate's servers answer it
/// (400 with the reason, 426 with `Sec-WebSocket-Version: 13`, 431).
#[derive(Debug)]
pub struct WebSocketUpgradeRejection {
    error: Error,
}

impl WebSocketUpgradeRejection {
    /// Why the request was refused.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The HTTP status it is answered with.
    pub fn status(&self) -> u16 {
        match &self.error {
            Error::Handshake(e) => e.status(),
            _ => 500,
        }
    }
}

impl fmt::Display for WebSocketUpgradeRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for WebSocketUpgradeRejection {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl IntoResponse for WebSocketUpgradeRejection {
    fn into_response(self) -> Response {
        error_response(&self.error).map(Body::new)
    }
}

/// A WebSocket connection in axum's shape: [`WebSocket::recv`] / [`WebSocket::send`] of
/// [`Message`]s, a `Stream` of `Result<Message, Error>` and a `Sink` of [`Message`]s. It
/// is the inline [`WebSocketStream`](crate::tokio::WebSocketStream) underneath
/// ([`WebSocket::into_inner`] gives it, with the crate's [`Event`]s), polled by the
/// handler's task: no task or channel in between.
///
/// Pings are answered and a close echoed by the driver, as in axum; they still come out
/// as [`Message::Ping`] and [`Message::Close`]. A protocol error comes out as `Err` (the
/// close frame failing the connection is already written), then the `Close`, then `None`.
/// Backpressure: a send waits while the unwritten output is over
/// [`Config::max_backpressure`]. Cancel-safe like the stream.
#[derive(Debug)]
pub struct WebSocket {
    inner: HyperStream,
    protocol: Option<HeaderValue>,
    done: bool,
    /// For the `Stream` and `Sink` impls, which `split` puts on two tasks (axum's chat
    /// example): see `SplitWakers`.
    split_wakers: SplitWakers,
}

fn bytes_of(payload: Cow<'static, [u8]>) -> Bytes {
    match payload {
        Cow::Owned(v) => Bytes::from(v),
        Cow::Borrowed(b) => Bytes::from_static(b),
    }
}

/// The axum-shaped item for a driver event (`None`: nothing to hand out).
fn message_of(event: Event<'static>) -> Option<Result<Message, Error>> {
    Some(Ok(match event {
        Event::Open => return None,
        Event::Message(DriverMessage::Text(t)) => Message::Text(Utf8Bytes(t)),
        Event::Message(DriverMessage::Binary(b)) => Message::Binary(bytes_of(b)),
        Event::Ping(p) => Message::Ping(bytes_of(p)),
        Event::Pong(p) => Message::Pong(bytes_of(p)),
        Event::Error(e) => return Some(Err(e)),
        Event::Close { code, .. } if code == code::NO_STATUS => Message::Close(None),
        Event::Close { code, reason } => Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })),
    }))
}

impl WebSocket {
    /// The next message, `Some(Err(_))` for a protocol or transport error, `None` once the
    /// connection is over. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Result<Message, Error>> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, Error>>> {
        loop {
            match self.inner.poll_next_event(cx) {
                Poll::Ready(Some(event)) => {
                    if let Some(item) = message_of(event) {
                        return Poll::Ready(Some(item));
                    }
                }
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Sends a message: text, binary, ping, pong, or a close (`Close(None)` closes with
    /// 1000). Waits while the unwritten output is over the limit, queues the frame, and
    /// returns once it is written and flushed (as axum's `send` does: a handler may return
    /// right after it). Cancel-safe: cancelled after the frame was queued, the frame still
    /// goes out with the next write.
    pub async fn send(&mut self, msg: Message) -> Result<(), Error> {
        self.queue(msg).await?;
        self.inner.flush().await
    }

    async fn queue(&mut self, msg: Message) -> Result<(), Error> {
        match msg {
            Message::Text(t) => self.inner.send_text(t.as_str()).await,
            Message::Binary(b) => self.inner.send_binary(b).await,
            Message::Ping(p) => self.inner.send_ping(p).await,
            Message::Pong(p) => self.inner.send_pong(p).await,
            Message::Close(Some(frame)) => {
                self.inner
                    .close_connection(frame.code, frame.reason.as_str())
                    .await
            }
            Message::Close(None) => self.inner.close_connection(code::NORMAL, "").await,
        }
    }

    /// The agreed subprotocol, if any.
    pub fn protocol(&self) -> Option<&HeaderValue> {
        self.protocol.as_ref()
    }

    /// The inline stream underneath, with the crate's [`Event`]s.
    pub fn into_inner(self) -> HyperStream {
        self.inner
    }

    /// The inline stream underneath.
    pub fn get_mut(&mut self) -> &mut HyperStream {
        &mut self.inner
    }

    /// The inline stream underneath.
    pub fn get_ref(&self) -> &HyperStream {
        &self.inner
    }
}

impl futures_core::Stream for WebSocket {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let waker = this.split_wakers.waker(Side::Receiving, cx).clone();
        this.poll_recv(&mut Context::from_waker(&waker))
    }
}

impl futures_core::FusedStream for WebSocket {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

impl futures_sink::Sink<Message> for WebSocket {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        let waker = this.split_wakers.waker(Side::Sending, cx).clone();
        this.inner.poll_send_ready(&mut Context::from_waker(&waker))
    }

    fn start_send(self: Pin<&mut Self>, msg: Message) -> Result<(), Error> {
        let inner = &mut self.get_mut().inner;
        match msg {
            Message::Text(t) => inner.start_send_with(|d| d.send_text(t.as_str())),
            Message::Binary(b) => inner.start_send_with(|d| d.send_binary(&b)),
            Message::Ping(p) => inner.start_send_with(|d| d.send_ping(&p)),
            Message::Pong(p) => inner.start_send_with(|d| d.send_pong(&p)),
            Message::Close(Some(frame)) => {
                inner.start_send_with(|d| d.close_connection(frame.code, frame.reason.as_str()))
            }
            Message::Close(None) => inner.start_send_with(|d| d.close_connection(code::NORMAL, "")),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        let waker = this.split_wakers.waker(Side::Sending, cx).clone();
        this.inner.poll_flush_all(&mut Context::from_waker(&waker))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        let waker = this.split_wakers.waker(Side::Sending, cx).clone();
        futures_sink::Sink::<DriverMessage<'static>>::poll_close(
            Pin::new(&mut this.inner),
            &mut Context::from_waker(&waker),
        )
    }
}

/// A close code (`u16`, as in axum; see [`crate::code`]).
pub type CloseCode = u16;

/// The code and reason of a close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The close code.
    pub code: CloseCode,
    /// The reason (at most 123 bytes to be sent).
    pub reason: Utf8Bytes,
}

/// Text that is valid UTF-8 (axum's `Utf8Bytes`): borrowed from a `'static` str or owned.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Utf8Bytes(Cow<'static, str>);

impl Utf8Bytes {
    /// From a static str, without a copy.
    pub const fn from_static(s: &'static str) -> Self {
        Utf8Bytes(Cow::Borrowed(s))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Utf8Bytes {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for Utf8Bytes {
    fn from(s: String) -> Self {
        Utf8Bytes(Cow::Owned(s))
    }
}

impl From<&str> for Utf8Bytes {
    fn from(s: &str) -> Self {
        Utf8Bytes(Cow::Owned(s.to_string()))
    }
}

impl From<&String> for Utf8Bytes {
    fn from(s: &String) -> Self {
        Utf8Bytes(Cow::Owned(s.clone()))
    }
}

impl TryFrom<Bytes> for Utf8Bytes {
    type Error = std::str::Utf8Error;

    fn try_from(bytes: Bytes) -> Result<Self, Self::Error> {
        Ok(std::str::from_utf8(&bytes)?.into())
    }
}

impl TryFrom<Vec<u8>> for Utf8Bytes {
    type Error = std::str::Utf8Error;

    fn try_from(v: Vec<u8>) -> Result<Self, Self::Error> {
        String::from_utf8(v)
            .map(Utf8Bytes::from)
            .map_err(|e| e.utf8_error())
    }
}

impl From<Utf8Bytes> for Bytes {
    fn from(s: Utf8Bytes) -> Self {
        match s.0 {
            Cow::Borrowed(s) => Bytes::from_static(s.as_bytes()),
            Cow::Owned(s) => Bytes::from(s),
        }
    }
}

impl From<Utf8Bytes> for String {
    fn from(s: Utf8Bytes) -> Self {
        s.0.into_owned()
    }
}

impl PartialEq<str> for Utf8Bytes {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Utf8Bytes {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Utf8Bytes {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

/// A WebSocket message in axum's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message.
    Text(Utf8Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping (at most 125 bytes). Received pings are answered by the driver.
    Ping(Bytes),
    /// A pong (at most 125 bytes).
    Pong(Bytes),
    /// A close: received, the connection is closing (the driver answers it); sent, starts
    /// the close handshake (`None`: code 1000).
    Close(Option<CloseFrame>),
}

impl Message {
    /// The payload as bytes.
    pub fn into_data(self) -> Bytes {
        match self {
            Message::Text(t) => t.into(),
            Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b,
            Message::Close(None) => Bytes::new(),
            Message::Close(Some(frame)) => frame.reason.into(),
        }
    }

    /// The payload as text; fails for a binary payload that is not UTF-8.
    pub fn into_text(self) -> Result<Utf8Bytes, std::str::Utf8Error> {
        match self {
            Message::Text(t) => Ok(t),
            Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => Utf8Bytes::try_from(b),
            Message::Close(None) => Ok(Utf8Bytes::default()),
            Message::Close(Some(frame)) => Ok(frame.reason),
        }
    }

    /// The payload as `&str`; fails for a binary payload that is not UTF-8.
    pub fn to_text(&self) -> Result<&str, std::str::Utf8Error> {
        match self {
            Message::Text(t) => Ok(t.as_str()),
            Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => std::str::from_utf8(b),
            Message::Close(None) => Ok(""),
            Message::Close(Some(frame)) => Ok(frame.reason.as_str()),
        }
    }

    /// A text message.
    pub fn text<S: Into<Utf8Bytes>>(string: S) -> Message {
        Message::Text(string.into())
    }

    /// A binary message.
    pub fn binary<B: Into<Bytes>>(bin: B) -> Message {
        Message::Binary(bin.into())
    }
}

impl From<String> for Message {
    fn from(s: String) -> Self {
        Message::Text(s.into())
    }
}

impl<'s> From<&'s str> for Message {
    fn from(s: &'s str) -> Self {
        Message::Text(s.into())
    }
}

impl<'b> From<&'b [u8]> for Message {
    fn from(b: &'b [u8]) -> Self {
        Message::Binary(Bytes::copy_from_slice(b))
    }
}

impl From<Bytes> for Message {
    fn from(b: Bytes) -> Self {
        Message::Binary(b)
    }
}

impl From<Vec<u8>> for Message {
    fn from(b: Vec<u8>) -> Self {
        Message::Binary(b.into())
    }
}

impl From<Message> for Vec<u8> {
    fn from(msg: Message) -> Self {
        msg.into_data().to_vec()
    }
}
