//! The hyper adapter (`--features hyper`): upgrades in a hyper 1.x server and in an axum
//! app, the 101 built from the driver's handshake, errors answered over HTTP. Loopback
//! only, ephemeral ports, every test bounded.
#![cfg(feature = "hyper")]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message as TMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use websocket_driver::hyper::{is_websocket, serve};
use websocket_driver::tokio::connect;
use websocket_driver::{Event, Message, Options};

async fn bounded<F: Future<Output = ()>>(secs: u64, body: F) {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .expect("test timed out");
}

fn options() -> Options {
    Options::default()
        .accept_protocols(["chat"])
        .additional_header("X-Server", "wsd-hyper")
}

async fn route(mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if !is_websocket(&req) && req.uri().path() == "/" {
        return Ok(Response::new(Full::new(Bytes::from("plain http\n"))));
    }
    Ok(serve(&mut req, &options(), |tx, mut rx| async move {
        while let Some(event) = rx.next().await {
            if let Event::Message(message) = event {
                let _ = tx.send_message(message).await;
            }
        }
    }))
}

/// A hyper http1 server with upgrades on an ephemeral port.
async fn hyper_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(route))
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(request).await.unwrap();
    let mut got = vec![0u8; 4096];
    let n = raw.read(&mut got).await.unwrap();
    String::from_utf8_lossy(&got[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tungstenite_client_through_hyper() {
    bounded(60, async {
        let addr = hyper_server().await;
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

        ws.send(TMessage::Text("through hyper".into()))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            TMessage::Text("through hyper".into())
        );
        let big: Vec<u8> = (0..16 << 20).map(|i: usize| (i % 253) as u8).collect();
        ws.send(TMessage::Binary(big.clone().into())).await.unwrap();
        match ws.next().await.unwrap().unwrap() {
            TMessage::Binary(b) => assert!(b[..] == big[..]),
            other => panic!("unexpected {:?}", other.len()),
        }
        ws.send(TMessage::Ping(b"p".to_vec().into())).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            TMessage::Pong(b"p".to_vec().into())
        );
        ws.close(Some(CloseFrame {
            code: CloseCode::from(4001),
            reason: "".into(),
        }))
        .await
        .unwrap();
        match ws.next().await.unwrap().unwrap() {
            TMessage::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4001),
            other => panic!("unexpected {other:?}"),
        }
        assert!(ws.next().await.is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_client_through_hyper() {
    bounded(30, async {
        let addr = hyper_server().await;
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
        let addr = hyper_server().await;
        let plain = raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
        let not_ws = raw_exchange(addr, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(not_ws.starts_with("HTTP/1.1 400"), "{not_ws}");
        let version = raw_exchange(
            addr,
            b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 7\r\n\r\n",
        )
        .await;
        assert!(version.starts_with("HTTP/1.1 426"), "{version}");
        assert!(
            version
                .to_ascii_lowercase()
                .contains("sec-websocket-version: 13")
        );
        let ok = raw_exchange(
            addr,
            b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
        // RFC 6455's example key.
        assert!(ok.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{ok}");
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

    async fn echo(mut req: Request) -> Response {
        serve(&mut req, &Options::default(), |tx, mut rx| async move {
            while let Some(event) = rx.next().await {
                if let Event::Message(message) = event {
                    let _ = tx.send_message(message).await;
                }
            }
        })
        .into_response()
    }

    bounded(30, async {
        let app = axum::Router::new().route("/echo", axum::routing::get(echo));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

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

        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/echo"))
            .await
            .unwrap();
        ws.send(TMessage::Binary(vec![7u8; 70_000].into()))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            TMessage::Binary(vec![7u8; 70_000].into())
        );
    })
    .await;
}
