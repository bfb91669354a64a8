//! The hyper adapter (`--features hyper`): upgrades in a hyper 1.x server and in an axum
//! app, the 101 built from the driver's handshake, errors answered over HTTP. Loopback
//! only, ephemeral ports, every test bounded.
#![cfg(feature = "hyper")]

mod adapter_support;

use std::convert::Infallible;

use adapter_support::{
    answers_heads_at_the_limits, axum_server, bounded, close_frame, echoes, echoes_large,
    head_limited, hyper_server, next_close, pong_answers, raw_exchange, refuses_version,
    tungstenite_client, upgrade_request,
};
use futures_util::StreamExt;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as TMessage;
use websocket_driver::hyper::{HyperIo, is_websocket, serve, serve_stream};
use websocket_driver::tokio::{WsReceiver, WsSender, connect};
use websocket_driver::{Event, Message, Options};

fn options() -> Options {
    Options::default()
        .accept_protocols(["chat"])
        .additional_header("X-Server", "wsd-hyper")
}

/// Echoes every message back.
async fn echo(tx: WsSender, mut rx: WsReceiver) {
    while let Some(event) = rx.next().await {
        if let Event::Message(message) = event {
            let _ = tx.send_message(message).await;
        }
    }
}

async fn route(mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if !is_websocket(&req) && req.uri().path() == "/" {
        return Ok(Response::new(Full::new(Bytes::from("plain http\n"))));
    }
    Ok(serve(&mut req, &options(), echo))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tungstenite_client_through_hyper() {
    bounded(60, async {
        let addr = hyper_server(route).await;
        let request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://{addr}/echo"),
            )
            .map(|mut r| {
                r.headers_mut()
                    .insert("Sec-WebSocket-Protocol", "other, chat".parse().unwrap());
                r
            })
            .unwrap();
        let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        assert_eq!(response.status(), 101);
        assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
        assert_eq!(response.headers()["x-server"], "wsd-hyper");

        echoes(&mut ws, TMessage::Text("through hyper".into())).await;
        let big: Vec<u8> = (0..16 << 20).map(|i: usize| (i % 253) as u8).collect();
        echoes_large(&mut ws, big).await;
        pong_answers(&mut ws, b"p").await;
        ws.close(close_frame(4001, "")).await.unwrap();
        assert_eq!(next_close(&mut ws).await.0, 4001);
        assert!(ws.next().await.is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_client_through_hyper() {
    bounded(30, async {
        let addr = hyper_server(route).await;
        let (tx, mut rx) = connect(&format!("ws://{addr}/echo"), &Options::default())
            .await
            .unwrap();
        assert_eq!(tx.protocol(), None);
        tx.send_text("hi").await.unwrap();
        tx.send_binary(vec![1u8, 2, 3]).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            if let Event::Message(m) = rx.next().await.unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got[0], Message::Text("hi".into()));
        assert_eq!(got[1], Message::Binary(vec![1u8, 2, 3].into()));
        tx.close_connection(1000, "bye").await.unwrap();
        loop {
            if let Event::Close { code, .. } = rx.next().await.unwrap() {
                assert_eq!(code, 1000);
                break;
            }
        }
        assert!(rx.next().await.is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upgrades_get_http_errors_from_hyper() {
    bounded(30, async {
        let addr = hyper_server(route).await;
        let plain = raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
        let not_ws = raw_exchange(addr, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(not_ws.starts_with("HTTP/1.1 400"), "{not_ws}");
        refuses_version(addr, "/echo", 7).await;
        let ok = raw_exchange(addr, &upgrade_request("/echo", 13)).await;
        assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
        // RFC 6455's example key.
        assert!(ok.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{ok}");
    })
    .await;
}

/// The options' head limits hold through hyper and the axum extractor as on the other
/// servers (hyper's own are far larger), counted in the head's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_limits_of_the_options_hold_through_hyper() {
    async fn limited(mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        Ok(serve(&mut req, &head_limited(), echo))
    }
    async fn extracted(ws: websocket_driver::hyper::WebSocketUpgrade) -> axum::response::Response {
        ws.options(head_limited()).on_upgrade(|_| async {})
    }
    bounded(30, async {
        answers_heads_at_the_limits(hyper_server(limited).await).await;
        let app = axum::Router::new().route("/", axum::routing::get(extracted));
        answers_heads_at_the_limits(axum_server(app).await).await;
    })
    .await;
}

#[test]
fn is_websocket_on_hyper_requests() {
    let upgrade = Request::get("/chat")
        .header("Host", "x")
        .header("Connection", "keep-alive, Upgrade")
        .header("Upgrade", "WebSocket")
        .body(())
        .unwrap();
    assert!(is_websocket(&upgrade));
    let plain = Request::get("/").header("Host", "x").body(()).unwrap();
    assert!(!is_websocket(&plain));
    let post = Request::post("/chat")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .body(())
        .unwrap();
    assert!(!is_websocket(&post));
}

/// The README's axum route, in an axum app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_route() {
    use axum::extract::Request;
    use axum::response::{IntoResponse, Response};

    async fn echo_route(mut req: Request) -> Response {
        serve(&mut req, &Options::default(), echo).into_response()
    }

    bounded(30, async {
        let app = axum::Router::new().route("/echo", axum::routing::get(echo_route));
        let addr = axum_server(app).await;

        let (tx, mut rx) = connect(&format!("ws://{addr}/echo"), &Options::default())
            .await
            .unwrap();
        tx.send_text("from axum").await.unwrap();
        loop {
            if let Event::Message(m) = rx.next().await.unwrap() {
                assert_eq!(m, Message::Text("from axum".into()));
                break;
            }
        }
        tx.close_connection(1000, "").await.unwrap();
        while rx.next().await.is_some() {}

        let mut ws = tungstenite_client(addr, "/echo").await;
        echoes(&mut ws, TMessage::Binary(vec![7u8; 70_000].into())).await;
    })
    .await;
}

/// The inline stream's answer to a peer that sent its first frame in the same write as
/// the upgrade request: the transport it runs on ("tcp" or "upgraded"), then the frame
/// echoed.
async fn transport_then_echo(
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(serve_stream(
        &mut req,
        &Options::default(),
        |mut ws| async move {
            let transport = match ws.get_ref() {
                HyperIo::Tcp(_) => "tcp",
                HyperIo::Upgraded(_) => "upgraded",
            };
            if ws.send_text(transport).await.is_err() {
                return;
            }
            while let Some(event) = ws.next().await {
                if let Event::Message(message) = event {
                    let _ = ws.send_message(message).await;
                }
            }
        },
    ))
}

/// Writes an upgrade request and a masked text frame in one write (so hyper reads the
/// frame along with the request head), then reads the 101 and two unmasked text frames.
async fn upgrade_with_frame<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    text: &str,
) -> [String; 2] {
    let mut request = upgrade_request("/", 13);
    // FIN + text, masked with a zero key (the payload reads as itself).
    request.extend_from_slice(&[0x81, 0x80 | text.len() as u8, 0, 0, 0, 0]);
    request.extend_from_slice(text.as_bytes());
    io.write_all(&request).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]);
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            let mut frames = &got[end + 4..];
            let mut texts = Vec::new();
            while frames.len() >= 2 && frames.len() >= 2 + frames[1] as usize {
                assert_eq!(frames[0], 0x81, "an unmasked, whole text frame");
                let len = frames[1] as usize;
                texts.push(String::from_utf8(frames[2..2 + len].to_vec()).unwrap());
                frames = &frames[2 + len..];
            }
            if texts.len() == 2 {
                return [texts[0].clone(), texts[1].clone()];
            }
        }
        let n = io.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before two frames came: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Served on hyper-util's `TokioIo<TcpStream>`, the stream runs on the TCP socket itself,
/// and the frame hyper read along with the request is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_stream_runs_on_the_tcp_socket() {
    bounded(30, async {
        let addr = hyper_server(transport_then_echo).await;
        let mut raw = TcpStream::connect(addr).await.unwrap();
        let answers = upgrade_with_frame(&mut raw, "sent with the request").await;
        assert_eq!(
            answers,
            ["tcp".to_string(), "sent with the request".to_string()]
        );
    })
    .await;
}

/// Any other transport (an in-memory pipe here) stays in hyper's upgraded IO, with the
/// same behaviour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_stream_on_another_transport_stays_upgraded() {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    bounded(30, async {
        let (mut client, server) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(server), service_fn(transport_then_echo))
                .with_upgrades()
                .await;
        });
        let answers = upgrade_with_frame(&mut client, "through a pipe").await;
        assert_eq!(
            answers,
            ["upgraded".to_string(), "through a pipe".to_string()]
        );
    })
    .await;
}
