//! The hyper adapter (`--features hyper`): upgrades in a hyper 1.x server and in an axum
//! app, the 101 built from the driver's handshake, errors answered over HTTP. Loopback
//! only, ephemeral ports, every test bounded.
#![cfg(feature = "hyper")]

mod adapter_support;

use std::convert::Infallible;

use adapter_support::{
    axum_server, bounded, close_frame, echoes, echoes_large, hyper_server, next_close,
    pong_answers, raw_exchange, refuses_version, tungstenite_client, upgrade_request,
};
use futures_util::StreamExt;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio_tungstenite::tungstenite::Message as TMessage;
use websocket_driver::hyper::{is_websocket, serve};
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
