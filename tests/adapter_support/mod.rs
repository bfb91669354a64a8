//! Helpers shared by the async adapter tests (`tokio_adapter`, `tokio_stream`,
//! `hyper_adapter`, `axum_extractor`): servers on ephemeral loopback ports, a
//! tokio-tungstenite echo peer and the checks made through it, raw upgrade requests, and a
//! hard time limit for every test body.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Error as TError;
use tokio_tungstenite::tungstenite::Message as TMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use websocket_driver::{Error, Event};

/// A tokio-tungstenite client connection.
pub type TClient = tokio_tungstenite::WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Runs a test body with a hard limit (a hang fails instead of blocking CI).
pub async fn bounded<F: Future<Output = ()>>(secs: u64, body: F) {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .expect("test timed out");
}

/// A recognisable payload: byte `i` is `(i * 31 + seed) % 251`.
pub fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + seed) % 251) as u8).collect()
}

/// A listener on an ephemeral loopback port, and its address.
pub async fn listen() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// A server on an ephemeral port that runs `handle` on a task of its own for every
/// connection it accepts.
pub async fn serve_each<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (listener, addr) = listen().await;
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(handle(stream));
        }
    });
    addr
}

/// A server on an ephemeral port that accepts one connection and runs `handle` on it; the
/// task hands back what `handle` returns.
pub async fn serve_one<F, Fut>(handle: F) -> (SocketAddr, JoinHandle<Fut::Output>)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let (listener, addr) = listen().await;
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        handle(stream).await
    });
    (addr, task)
}

/// Reads an HTTP request head (up to its blank line) from `stream`.
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the client closed mid-head");
        head.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(head).unwrap()
}

/// Serves `app` with `axum::serve` on an ephemeral port.
pub async fn axum_server(app: axum::Router) -> SocketAddr {
    let (listener, addr) = listen().await;
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A hyper http1 server with upgrades on an ephemeral port, answering with `route`.
#[cfg(feature = "hyper")]
pub async fn hyper_server<F, Fut, B>(route: F) -> SocketAddr
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Result<hyper::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    serve_each(move |stream| async move {
        let _ = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service_fn(route))
            .with_upgrades()
            .await;
    })
    .await
}

/// A tokio-tungstenite echo server on an ephemeral port: text and binary come back;
/// `close:CODE` makes it close with that code and reason "server says bye".
pub async fn tungstenite_server() -> SocketAddr {
    serve_each(|stream| async move {
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        while let Some(Ok(message)) = ws.next().await {
            match message {
                TMessage::Text(t) if t.as_str().starts_with("close:") => {
                    let code: u16 = t.as_str()[6..].parse().unwrap();
                    let _ = ws.close(close_frame(code, "server says bye")).await;
                }
                m @ (TMessage::Text(_) | TMessage::Binary(_)) => {
                    let sent = ws.send(m).await;
                    if sent.is_err() {
                        break;
                    }
                }
                _ => {}
            }
        }
    })
    .await
}

/// A tokio-tungstenite client on `ws://{addr}{path}` (the 101 response dropped).
pub async fn tungstenite_client(addr: SocketAddr, path: &str) -> TClient {
    tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
        .await
        .unwrap()
        .0
}

/// A close frame for tokio-tungstenite's `close`.
pub fn close_frame(code: u16, reason: &str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    })
}

/// Sends `message` from a tokio-tungstenite peer and checks the next message it gets is
/// `reply`.
pub async fn round_trip<S>(ws: &mut S, message: TMessage, reply: TMessage)
where
    S: Stream<Item = Result<TMessage, TError>> + Sink<TMessage, Error = TError> + Unpin,
{
    ws.send(message).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), reply);
}

/// Sends `message` from a tokio-tungstenite peer and checks it comes back as it was.
pub async fn echoes<S>(ws: &mut S, message: TMessage)
where
    S: Stream<Item = Result<TMessage, TError>> + Sink<TMessage, Error = TError> + Unpin,
{
    round_trip(ws, message.clone(), message).await;
}

/// A ping with `payload` from a tokio-tungstenite peer is answered with a pong carrying it.
pub async fn pong_answers<S>(ws: &mut S, payload: &[u8])
where
    S: Stream<Item = Result<TMessage, TError>> + Sink<TMessage, Error = TError> + Unpin,
{
    let (ping, pong) = (payload.to_vec(), payload.to_vec());
    round_trip(ws, TMessage::Ping(ping.into()), TMessage::Pong(pong.into())).await;
}

/// The echo server pings on request: text "ping" brings a ping with payload "srv".
pub async fn pings_on_request<S>(ws: &mut S)
where
    S: Stream<Item = Result<TMessage, TError>> + Sink<TMessage, Error = TError> + Unpin,
{
    let srv = TMessage::Ping(b"srv".to_vec().into());
    round_trip(ws, TMessage::Text("ping".into()), srv).await;
}

/// `echoes` for a large binary message (a mismatch is not printed).
pub async fn echoes_large<S>(ws: &mut S, data: Vec<u8>)
where
    S: Stream<Item = Result<TMessage, TError>> + Sink<TMessage, Error = TError> + Unpin,
{
    ws.send(TMessage::Binary(data.clone().into()))
        .await
        .unwrap();
    match ws.next().await.unwrap().unwrap() {
        TMessage::Binary(b) => assert!(b[..] == data[..], "the large message came back intact"),
        other => panic!("unexpected {:?}", other.len()),
    }
}

/// The code and reason of the close frame that must be a tokio-tungstenite peer's next
/// message.
pub async fn next_close<S>(ws: &mut S) -> (u16, String)
where
    S: Stream<Item = Result<TMessage, TError>> + Unpin,
{
    match ws.next().await.unwrap().unwrap() {
        TMessage::Close(Some(frame)) => (u16::from(frame.code), frame.reason.to_string()),
        other => panic!("expected the close, got {other:?}"),
    }
}

/// A tokio-tungstenite client asks the echo server at `addr` to close with `code`: the
/// close frame carries the code and "server says bye", then the connection ends.
pub async fn tungstenite_sees_server_close(addr: SocketAddr, code: u16) {
    let mut ws = tungstenite_client(addr, "/").await;
    ws.send(TMessage::Text(format!("close:{code}").into()))
        .await
        .unwrap();
    assert_eq!(
        next_close(&mut ws).await,
        (code, "server says bye".to_string())
    );
    // tungstenite answers the close while it is polled; the server then ends TCP.
    assert!(ws.next().await.is_none());
}

/// An upgrade request for `path` with RFC 6455's example key and the given
/// `Sec-WebSocket-Version`.
pub fn upgrade_request(path: &str, version: u8) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n\r\n"
    )
    .into_bytes()
}

/// A valid upgrade request to `/` of exactly `len` bytes with `extra` header lines
/// (`X-0: 0` …) after the five an upgrade needs and an `X-Pad` line that fills it up: its
/// header count is `6 + extra`. For the head limits at the limit and one over.
pub fn padded_upgrade(len: usize, extra: usize) -> Vec<u8> {
    let mut head = String::from_utf8(upgrade_request("/", 13)).unwrap();
    head.truncate(head.len() - 2);
    for i in 0..extra {
        head.push_str(&format!("X-{i}: {i}\r\n"));
    }
    let pad = len - head.len() - "X-Pad: \r\n\r\n".len();
    head.push_str(&format!("X-Pad: {}\r\n\r\n", "p".repeat(pad)));
    assert_eq!(head.len(), len);
    head.into_bytes()
}

/// [`padded_upgrade`] with its `X-Pad` value in Latin-1 (obs-text, RFC 9110 §5.5: not
/// UTF-8, which the servers keep lossily), the same length on the wire.
pub fn padded_upgrade_latin1(len: usize, extra: usize) -> Vec<u8> {
    let mut head = padded_upgrade(len, extra);
    let pad = head.windows(7).position(|w| w == b"X-Pad: ").unwrap() + 7;
    let end = head.len() - 4;
    head[pad..end].fill(0xe9);
    head
}

/// Options with small head limits for [`answers_heads_at_the_limits`]: 512 bytes, 7 header
/// lines.
pub fn head_limited() -> websocket_driver::Options {
    websocket_driver::Options::default()
        .max_handshake_size(512)
        .max_headers(7)
}

/// A server with [`head_limited`] options answers heads at and over its limits as every
/// server of the crate does: `max_handshake_size` bytes in `max_headers` lines upgraded, a
/// byte or a line more 431; a value that is not UTF-8 (Latin-1 obs-text, which the driver
/// keeps lossily, a 3-byte U+FFFD a byte) counted in the bytes it came as.
pub async fn answers_heads_at_the_limits(addr: SocketAddr) {
    for (len, extra, latin1, want) in [
        (512, 1, false, "101"),
        (513, 1, false, "431"),
        (512, 2, false, "431"),
        (512, 1, true, "101"),
        (513, 1, true, "431"),
    ] {
        let head = match latin1 {
            true => padded_upgrade_latin1(len, extra),
            false => padded_upgrade(len, extra),
        };
        let answer = raw_exchange(addr, &head).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {want} ")),
            "{len} bytes, {} headers, Latin-1 {latin1}: {answer}",
            6 + extra
        );
    }
}

/// An upgrade request with an unsupported `version` to `path` gets a 426 that names
/// version 13.
pub async fn refuses_version(addr: SocketAddr, path: &str, version: u8) {
    let answer = raw_exchange(addr, &upgrade_request(path, version)).await;
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{answer}"
    );
}

/// The events a server saw from a peer that broke the protocol: Open, the protocol error,
/// then Close 1002, and nothing else.
pub fn assert_protocol_error_then_close(events: &[Event<'_>]) {
    assert!(matches!(events[0], Event::Open), "{events:?}");
    assert!(
        matches!(events[1], Event::Error(Error::Protocol(_))),
        "{events:?}"
    );
    assert!(
        matches!(events[2], Event::Close { code: 1002, .. }),
        "{events:?}"
    );
    assert_eq!(events.len(), 3);
}

/// Sends `request` on a new connection and returns the first read of the answer.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(request).await.unwrap();
    let mut got = vec![0u8; 4096];
    let n = raw.read(&mut got).await.unwrap();
    String::from_utf8_lossy(&got[..n]).into_owned()
}

/// A raw connection upgraded to `path` (version 13), and every byte read up to the end of
/// the response head (and any that came with it).
pub async fn raw_upgrade(addr: SocketAddr, path: &str) -> (TcpStream, Vec<u8>) {
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(&upgrade_request(path, 13)).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = raw.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed during the handshake");
        got.extend_from_slice(&buf[..n]);
    }
    (raw, got)
}
