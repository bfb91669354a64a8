//! The axum extractor (`--features hyper`): `websocket_driver::hyper::WebSocketUpgrade` as
//! a handler argument in an axum `Router`, written as axum's own examples are (only the
//! `use` line differs), against tokio-tungstenite clients; subprotocols, pings, closes in
//! both directions, the `Stream`/`Sink` impls, rejections answered over HTTP, and the same
//! extractor on a plain hyper server. Loopback only, ephemeral ports, every test bounded.
#![cfg(feature = "hyper")]

mod adapter_support;

use std::convert::Infallible;

use adapter_support::{
    axum_server, bounded, close_frame, echoes, hyper_server, next_close, pings_on_request,
    pong_answers, raw_exchange, raw_upgrade, refuses_version, tungstenite_client,
};
use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as TMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use websocket_driver::hyper::{CloseFrame, Message, WebSocket, WebSocketUpgrade};

/// What the echo handler saw, for the test to check.
type Seen = mpsc::UnboundedSender<String>;

/// axum's echo handler shape: `recv` until `None`, echo data, report the rest. `close`
/// makes it close with 4000 "bye"; `ping` makes it ping with "srv".
async fn echo(mut socket: WebSocket, seen: Seen) {
    let _ = seen.send(format!(
        "protocol {:?}",
        socket.protocol().map(|p| p.to_str().unwrap().to_string())
    ));
    while let Some(msg) = socket.recv().await {
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => {
                let _ = seen.send(format!("error {e}"));
                continue;
            }
        };
        match msg {
            Message::Text(t) if t == "close" => {
                let frame = CloseFrame {
                    code: 4000,
                    reason: "bye".into(),
                };
                socket.send(Message::Close(Some(frame))).await.unwrap();
            }
            Message::Text(t) if t == "ping" => {
                socket
                    .send(Message::Ping(Bytes::from_static(b"srv")))
                    .await
                    .unwrap();
            }
            Message::Text(_) | Message::Binary(_) => socket.send(msg).await.unwrap(),
            Message::Ping(p) => {
                let _ = seen.send(format!("ping {}", String::from_utf8_lossy(&p)));
            }
            Message::Pong(p) => {
                let _ = seen.send(format!("pong {}", String::from_utf8_lossy(&p)));
            }
            Message::Close(frame) => {
                let _ = seen.send(format!(
                    "close {:?}",
                    frame.map(|f| (f.code, f.reason.to_string()))
                ));
            }
        }
    }
    let _ = seen.send("end".into());
}

fn echo_app() -> (Router, mpsc::UnboundedReceiver<String>) {
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let app = Router::new().route(
        "/ws",
        get(move |ws: WebSocketUpgrade| async move {
            let seen = seen_tx.clone();
            ws.protocols(["chat", "superchat"])
                .on_upgrade(move |socket| echo(socket, seen))
        }),
    );
    (app, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_echo_through_the_extractor() {
    bounded(60, async {
        let (app, mut seen) = echo_app();
        let addr = axum_server(app).await;

        let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "superchat, chat".parse().unwrap());
        let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        assert_eq!(response.status(), 101);
        // As axum agrees: the first of the server's list that the client offered.
        assert_eq!(
            response.headers()["sec-websocket-protocol"]
                .to_str()
                .unwrap(),
            "chat"
        );
        assert_eq!(seen.recv().await.unwrap(), "protocol Some(\"chat\")");

        for data in [
            vec![],
            vec![1u8; 125],
            vec![2u8; 70_000],
            vec![3u8; 4 << 20],
        ] {
            echoes(&mut ws, TMessage::Binary(data.into())).await;
        }
        echoes(&mut ws, TMessage::Text("grüße".into())).await;
        // Pings are answered by the driver and still reported, as in axum.
        pong_answers(&mut ws, b"hi").await;
        assert_eq!(seen.recv().await.unwrap(), "ping hi");
        pings_on_request(&mut ws).await;
        ws.send(TMessage::Pong(b"srv".to_vec().into()))
            .await
            .unwrap();
        assert_eq!(seen.recv().await.unwrap(), "pong srv");

        // The client closes: the handler sees the close frame, then the end.
        ws.close(close_frame(4001, "client done")).await.unwrap();
        assert_eq!(next_close(&mut ws).await.0, 4001, "the close echo");
        assert!(ws.next().await.is_none());
        assert_eq!(
            seen.recv().await.unwrap(),
            "close Some((4001, \"client done\"))"
        );
        assert_eq!(seen.recv().await.unwrap(), "end");

        // The handler closes.
        let mut ws = tungstenite_client(addr, "/ws").await;
        assert_eq!(seen.recv().await.unwrap(), "protocol None");
        ws.send(TMessage::Text("close".into())).await.unwrap();
        assert_eq!(next_close(&mut ws).await, (4000, "bye".to_string()));
        assert!(ws.next().await.is_none());
        assert_eq!(seen.recv().await.unwrap(), "close Some((4000, \"bye\"))");
        assert_eq!(seen.recv().await.unwrap(), "end");
    })
    .await;
}

/// Subprotocols as axum's extractor chooses them: `protocols` takes the server's order,
/// `requested_protocols` lists the client's offer, `set_selected_protocol` overrides
/// (one the client did not offer agrees none), `selected_protocol` tells the choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subprotocols_are_chosen_as_axum_chooses_them() {
    bounded(30, async {
        let (seen_tx, mut seen) = mpsc::unbounded_channel::<String>();
        let app = Router::new().route(
            "/ws",
            get(move |ws: WebSocketUpgrade| {
                let seen = seen_tx.clone();
                async move {
                    let requested: Vec<String> = ws
                        .requested_protocols()
                        .map(|p| p.to_str().unwrap().to_string())
                        .collect();
                    let mut ws = ws.protocols(["b", "a"]);
                    let chosen = format!("{:?}", ws.selected_protocol());
                    ws.set_selected_protocol("z".parse().unwrap());
                    let unoffered = format!("{:?}", ws.selected_protocol());
                    ws.set_selected_protocol("c".parse().unwrap());
                    let _ = seen.send(format!("{requested:?} {chosen} {unoffered}"));
                    ws.on_upgrade(|_socket| async {})
                }
            }),
        );
        let addr = axum_server(app).await;
        let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "a, b, c".parse().unwrap());
        let (_ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        assert_eq!(
            seen.recv().await.unwrap(),
            r#"["a", "b", "c"] Some("b") None"#
        );
        assert_eq!(response.headers()["sec-websocket-protocol"], "c");
    })
    .await;
}

/// `max_frame_size` caps messages whichever way round it is set with `max_message_size`:
/// a message of the cap is echoed, one byte more closes the connection with 1009.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_frame_size_applies_in_either_order() {
    bounded(30, async {
        let (seen_tx, _seen) = mpsc::unbounded_channel();
        let app = Router::new()
            .route(
                "/frame-first",
                get({
                    let seen = seen_tx.clone();
                    move |ws: WebSocketUpgrade| async move {
                        ws.max_frame_size(1000)
                            .max_message_size(1 << 20)
                            .on_upgrade(move |socket| echo(socket, seen))
                    }
                }),
            )
            .route(
                "/message-first",
                get(move |ws: WebSocketUpgrade| async move {
                    ws.max_message_size(1 << 20)
                        .max_frame_size(1000)
                        .on_upgrade(move |socket| echo(socket, seen_tx))
                }),
            );
        let addr = axum_server(app).await;
        for path in ["/frame-first", "/message-first"] {
            let mut ws = tungstenite_client(addr, path).await;
            echoes(&mut ws, TMessage::Binary(vec![1u8; 1000].into())).await;
            ws.send(TMessage::Binary(vec![2u8; 1001].into()))
                .await
                .unwrap();
            assert_eq!(next_close(&mut ws).await.0, 1009, "{path}");
        }
    })
    .await;
}

/// `send` returns once the frame is written, as axum's does: a handler that sends a large
/// message and returns at once still gets all of it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_returns_right_after_send_gets_its_message_out() {
    bounded(30, async {
        let app = Router::new().route(
            "/ws",
            get(|ws: WebSocketUpgrade| async move {
                ws.on_upgrade(|mut socket| async move {
                    let big = Bytes::from(vec![5u8; 8 << 20]);
                    socket.send(Message::Binary(big)).await.unwrap();
                })
            }),
        );
        let addr = axum_server(app).await;
        let mut ws = tungstenite_client(addr, "/ws").await;
        match ws.next().await {
            Some(Ok(TMessage::Binary(b))) => {
                assert_eq!(b.len(), 8 << 20);
                assert!(b.iter().all(|&x| x == 5));
            }
            other => panic!("expected the whole message, got {other:?}"),
        }
    })
    .await;
}

/// A protocol error reaches the handler as `Err`, the peer gets the close frame (1002),
/// and `recv` ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_error_is_an_err_then_the_end() {
    bounded(30, async {
        let (app, mut seen) = echo_app();
        let addr = axum_server(app).await;
        let (mut raw, got) = raw_upgrade(addr, "/ws").await;
        assert!(
            got.starts_with(b"HTTP/1.1 101"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        assert_eq!(seen.recv().await.unwrap(), "protocol None");
        // An unmasked frame from a client.
        raw.write_all(b"\x81\x02hi").await.unwrap();
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).await.unwrap();
        // The close frame: 0x88, length, 1002.
        assert!(rest.len() >= 4, "{rest:?}");
        assert_eq!(&rest[..1], b"\x88");
        assert_eq!(u16::from_be_bytes([rest[2], rest[3]]), 1002);
        assert!(
            seen.recv()
                .await
                .unwrap()
                .starts_with("error protocol error")
        );
        assert!(
            seen.recv().await.unwrap().starts_with("close Some((1002,"),
            "the close after the error"
        );
        assert_eq!(seen.recv().await.unwrap(), "end");
    })
    .await;
}

/// `WebSocket` is a `Stream` of `Result<Message, _>` and a `Sink` of `Message`s: split it
/// and forward with the futures combinators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_as_stream_and_sink() {
    bounded(30, async {
        let app = Router::new().route(
            "/fwd",
            get(|ws: WebSocketUpgrade| async move {
                ws.on_upgrade(|socket| async move {
                    let (mut sink, stream) = socket.split();
                    let mut texts = std::pin::pin!(stream.filter_map(|m| async move {
                        match m {
                            Ok(Message::Text(t)) => Some(Ok(Message::text(format!("fwd {t}")))),
                            _ => None,
                        }
                    }));
                    let _ = sink.send_all(&mut texts).await;
                })
            }),
        );
        let addr = axum_server(app).await;
        let mut ws = tungstenite_client(addr, "/fwd").await;
        for i in 0..10 {
            ws.send(TMessage::Text(format!("m{i}").into()))
                .await
                .unwrap();
        }
        for i in 0..10 {
            assert_eq!(
                ws.next().await.unwrap().unwrap(),
                TMessage::Text(format!("fwd m{i}").into())
            );
        }
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Requests that are not valid upgrades are rejected when the extractor runs, with the
/// crate's HTTP answers; `Option<WebSocketUpgrade>` lets one route serve both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upgrades_are_rejected_over_http() {
    bounded(30, async {
        let (app, _seen) = echo_app();
        let app = app.route(
            "/both",
            get(|ws: Option<WebSocketUpgrade>| async move {
                match ws {
                    Some(ws) => ws.on_upgrade(|_| async {}),
                    None => "plain http".into_response(),
                }
            }),
        );
        let addr = axum_server(app).await;
        let plain = raw_exchange(addr, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(plain.starts_with("HTTP/1.1 400"), "{plain}");
        refuses_version(addr, "/ws", 8).await;
        let both = raw_exchange(addr, b"GET /both HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(both.starts_with("HTTP/1.1 200"), "{both}");
        assert!(both.ends_with("plain http"), "{both}");
        let (_ws, response) = tokio_tungstenite::connect_async(format!("ws://{addr}/both"))
            .await
            .unwrap();
        assert_eq!(response.status(), 101);
    })
    .await;
}

/// Where the extractor answers as the crate's servers do rather than as axum's: 400 for a
/// method other than GET, a duplicate `Host`, a key that is not 16 bytes of base64, and a
/// request hyper cannot upgrade (no `OnUpgrade`, as in a tower `oneshot` test); HTTP/2's
/// extended CONNECT is refused (400). The same request done right upgrades.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upgrades_get_the_crates_answers() {
    use axum::extract::FromRequestParts;
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    let head = |method: &str, extra: &str, key: &str| {
        format!(
            "{method} /any HTTP/1.1\r\nHost: x\r\n{extra}Upgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    bounded(30, async {
        let app = Router::new().route(
            "/any",
            axum::routing::any(|ws: WebSocketUpgrade| async move { ws.on_upgrade(|_| async {}) }),
        );
        let addr = axum_server(app).await;
        for (what, request) in [
            ("POST", head("POST", "", KEY)),
            ("two Hosts", head("GET", "Host: y\r\n", KEY)),
            ("a 15-byte key", head("GET", "", "MTIzNDU2Nzg5MDEyMzQ1")),
            (
                "a key that is not base64",
                head("GET", "", "dGhlIHNhbXBsZSBub25jZQ=!"),
            ),
        ] {
            let response = raw_exchange(addr, request.as_bytes()).await;
            assert!(response.starts_with("HTTP/1.1 400"), "{what}: {response}");
        }
        let response = raw_exchange(addr, head("GET", "", KEY).as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    })
    .await;

    // Requests that no server handed over: no `OnUpgrade` among their extensions.
    let request = |method: hyper::Method, version: hyper::Version| {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri("/any")
            .version(version);
        for (name, value) in [
            ("host", "x"),
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", KEY),
            ("sec-websocket-version", "13"),
        ] {
            builder = builder.header(name, value);
        }
        builder.body(()).unwrap().into_parts().0
    };
    let mut parts = request(hyper::Method::GET, hyper::Version::HTTP_11);
    let Err(refused) = WebSocketUpgrade::from_request_parts(&mut parts, &()).await else {
        panic!("no OnUpgrade: refused");
    };
    assert_eq!(refused.status(), 400, "{:?}", refused.error());
    let mut parts = request(hyper::Method::CONNECT, hyper::Version::HTTP_2);
    let Err(refused) = WebSocketUpgrade::from_request_parts(&mut parts, &()).await else {
        panic!("extended CONNECT: refused");
    };
    assert_eq!(refused.status(), 400, "{:?}", refused.error());
}

/// The same extractor on a plain hyper server: `WebSocketUpgrade::from_request`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extractor_on_plain_hyper() {
    async fn route(mut req: hyper::Request<hyper::body::Incoming>) -> Result<Response, Infallible> {
        Ok(match WebSocketUpgrade::from_request(&mut req) {
            Ok(ws) => ws.on_upgrade(|mut socket| async move {
                while let Some(Ok(msg)) = socket.recv().await {
                    if msg.to_text().is_ok_and(|t| !t.is_empty())
                        && matches!(msg, Message::Text(_))
                        && socket.send(msg).await.is_err()
                    {
                        return;
                    }
                }
            }),
            Err(rejection) => rejection.into_response(),
        })
    }

    bounded(30, async {
        let addr = hyper_server(route).await;
        let mut ws = tungstenite_client(addr, "/").await;
        echoes(&mut ws, TMessage::Text("plain hyper".into())).await;
        let plain = raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(plain.starts_with("HTTP/1.1 400"), "{plain}");
    })
    .await;
}

/// A chat room: each socket's task `select!`s between its `recv` and a broadcast feed, so
/// `recv` is dropped whenever a line from the room arrives first (and `send` whenever the
/// peer speaks first): nothing is lost either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_room_select_over_recv_and_a_feed() {
    use axum::extract::State;
    use tokio::sync::broadcast;

    async fn chat(State(room): State<broadcast::Sender<String>>, ws: WebSocketUpgrade) -> Response {
        ws.on_upgrade(move |mut socket| async move {
            let mut feed = room.subscribe();
            loop {
                tokio::select! {
                    msg = socket.recv() => match msg {
                        Some(Ok(Message::Text(text))) => {
                            let _ = room.send(text.to_string());
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                    line = feed.recv() => match line {
                        Ok(line) => {
                            if socket.send(Message::text(line)).await.is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    },
                }
            }
        })
    }

    bounded(30, async {
        let (room, _) = broadcast::channel(1024);
        let app = Router::new()
            .route("/chat", get(chat))
            .with_state(room.clone());
        let addr = axum_server(app).await;
        let url = format!("ws://{addr}/chat");
        let (mut a, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let (mut b, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        // Both are subscribed once a line from the room reaches each of them.
        while room.receiver_count() < 2 {
            tokio::task::yield_now().await;
        }
        let lines = 200;
        let writer = tokio::spawn(async move {
            for i in 0..lines {
                a.send(TMessage::Text(format!("a{i}").into()))
                    .await
                    .unwrap();
            }
            a
        });
        for i in 0..lines {
            b.send(TMessage::Text(format!("b{i}").into()))
                .await
                .unwrap();
        }
        let mut a = writer.await.unwrap();
        // Each client sees every line, each sender's lines in order.
        for ws in [&mut a, &mut b] {
            let (mut next_a, mut next_b) = (0, 0);
            while next_a < lines || next_b < lines {
                let TMessage::Text(t) = ws.next().await.unwrap().unwrap() else {
                    continue;
                };
                let (who, n) = t.as_str().split_at(1);
                let n: usize = n.parse().unwrap();
                match who {
                    "a" => {
                        assert_eq!(n, next_a);
                        next_a += 1;
                    }
                    _ => {
                        assert_eq!(n, next_b);
                        next_b += 1;
                    }
                }
            }
        }
    })
    .await;
}

/// `WebSocketUpgrade::deflate(true)` (not in axum's extractor) accepts permessage-deflate:
/// a deflate client gets it agreed and its compressible messages come back whole; without
/// the switch the same offer is declined and the connection runs plain.
#[tokio::test]
async fn deflate_is_one_switch_on_the_extractor() {
    use websocket_driver::tokio::WebSocketStream;
    use websocket_driver::{Event, Options};
    bounded(20, async {
        let app = Router::new()
            .route(
                "/deflate",
                get(|ws: WebSocketUpgrade| async move {
                    ws.deflate(true)
                        .on_upgrade(|socket| echo(socket, mpsc::unbounded_channel().0))
                }),
            )
            .route(
                "/plain",
                get(|ws: WebSocketUpgrade| async move {
                    ws.on_upgrade(|socket| echo(socket, mpsc::unbounded_channel().0))
                }),
            );
        let addr = axum_server(app).await;
        let offer = Options::default().deflate(true);
        let text = r#"{"user":"alice","room":"lobby","text":"hello hello hello hello"}"#.repeat(20);
        for (path, agreed) in [("/deflate", true), ("/plain", false)] {
            let url = format!("ws://{addr}{path}");
            let mut ws = WebSocketStream::connect(&url, &offer).await.unwrap();
            assert_eq!(ws.driver().deflate_params().is_some(), agreed, "{path}");
            ws.send_text(&text).await.unwrap();
            loop {
                match ws.next().await {
                    Some(Event::Open) => continue,
                    Some(Event::Message(m)) => {
                        assert_eq!(m.as_bytes(), text.as_bytes(), "{path}");
                        break;
                    }
                    other => panic!("{path}: {other:?}"),
                }
            }
            ws.close_connection(1000, "").await.unwrap();
        }
    })
    .await;
}

/// axum's chat-example shape: `socket.split()`, the sink on one task and the stream on
/// another. The send task waits to write (the client is not reading yet); a message from
/// the client then wakes the receive task, whose poll also writes. Once the client reads,
/// every message the send task sends must arrive (the receive task's poll used to take
/// over the socket's waker, and the send task was never woken: message 4 never came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_send_task_keeps_sending_while_the_receive_task_polls() {
    use std::time::Duration;
    bounded(60, async {
        let app = Router::new().route(
            "/ws",
            get(|ws: WebSocketUpgrade| async move {
                ws.on_upgrade(|socket| async move {
                    let (mut sink, mut stream) = socket.split();
                    let send_task = tokio::spawn(async move {
                        for i in 0..64u8 {
                            let big = Bytes::from(vec![i; 1 << 20]);
                            if sink.send(Message::Binary(big)).await.is_err() {
                                return;
                            }
                        }
                        let _ = sink.send(Message::text("done")).await;
                    });
                    let recv_task =
                        tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
                    let _ = tokio::join!(send_task, recv_task);
                })
            }),
        );
        let addr = axum_server(app).await;
        let mut ws = tungstenite_client(addr, "/ws").await;
        // The server fills the socket buffers; its send task then waits to write.
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The client speaks: the server's receive task wakes (and writes too).
        ws.send(TMessage::Text("hello".into())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        for i in 0..64u8 {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(TMessage::Binary(b)))) => {
                    assert_eq!(b.len(), 1 << 20);
                    assert_eq!(b[0], i);
                }
                Ok(other) => panic!("message {i}: {other:?}"),
                Err(_) => panic!("message {i} never came: the send task was never woken"),
            }
        }
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            TMessage::Text("done".into())
        );
    })
    .await;
}

/// A subprotocol name that is not a token (`v1/json`; RFC 6455 §4.1) is never agreed,
/// and the upgrade goes through without one: it was answered 500 (the driver refuses the
/// name), on every request that offered it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subprotocol_that_is_not_a_token_is_not_agreed_and_not_a_500() {
    bounded(30, async {
        let app = Router::new().route(
            "/ws",
            get(|ws: WebSocketUpgrade| async move {
                ws.protocols(["v1/json", "chat"])
                    .on_upgrade(|_socket| async {})
            }),
        );
        let addr = axum_server(app).await;
        for (offered, agreed) in [("v1/json", None), ("v1/json, chat", Some("chat"))] {
            let request = format!(
                "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Protocol: {offered}\r\n\r\n"
            );
            let answer = raw_exchange(addr, request.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
            let header = answer
                .lines()
                .find_map(|l| l.strip_prefix("sec-websocket-protocol: "));
            assert_eq!(header, agreed, "{answer}");
        }
    })
    .await;
}

// ---- hostile-peer review (adapters) ----

/// axum's `socket.send(msg)` to a client that upgraded and then neither reads nor sends
/// (gone without a FIN): with an idle timeout configured, the send should fail once the
/// idle close has had its close timeout, as the stream's own `send_*` do. `send` is a
/// queue and a flush, and the flush runs no deadlines: the handler waits for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_send_to_a_silent_non_reading_client_ends_at_the_idle_timeout() {
    use std::time::Duration;
    use websocket_driver::tokio::Config;
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let app = Router::new().route(
        "/ws",
        get(move |ws: WebSocketUpgrade| {
            let done_tx = done_tx.clone();
            async move {
                let config = Config::default()
                    .idle_timeout(Duration::from_millis(300))
                    .close_timeout(Duration::from_millis(300));
                ws.config(config).on_upgrade(move |mut socket| async move {
                    // 32 MiB: more than both sockets' buffers hold over loopback.
                    let sent = socket
                        .send(Message::Binary(Bytes::from(vec![7u8; 32 << 20])))
                        .await;
                    let _ = done_tx.send(format!("{sent:?}"));
                })
            }
        }),
    );
    let addr = axum_server(app).await;
    let (raw, _head) = raw_upgrade(addr, "/ws").await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), done.recv()).await;
    assert!(
        matches!(&outcome, Ok(Some(s)) if s.starts_with("Err")),
        "the handler's send to a silent client that never reads is still waiting after 10 s \
         (idle 300 ms, close 300 ms): {outcome:?}"
    );
    drop(raw);
}

// ---- the optional extractor, push-only handlers ----

/// `Option<WebSocketUpgrade>` on a valid upgrade whose `Upgrade` header lists
/// `websocket` among other protocols (RFC 9110 §7.8: a list; RFC 6455 §4.2.1: the field
/// "containing the value websocket"): the plain extractor accepts it (101), and the
/// optional one gives `Some` and upgrades too (it compared the whole value with
/// `websocket`, gave `None`, and the route answered it as plain HTTP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_extractor_sees_websocket_in_an_upgrade_list() {
    bounded(30, async {
        let app = Router::new()
            .route(
                "/both",
                get(|ws: Option<WebSocketUpgrade>| async move {
                    match ws {
                        Some(ws) => ws.on_upgrade(|_| async {}),
                        None => "plain http".into_response(),
                    }
                }),
            )
            .route(
                "/ws",
                get(|ws: WebSocketUpgrade| async move { ws.on_upgrade(|_| async {}) }),
            );
        let addr = axum_server(app).await;
        let request = |path: &str| {
            format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: h2c, websocket\r\n\
                 Connection: keep-alive, Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
        };
        let plain = raw_exchange(addr, request("/ws").as_bytes()).await;
        assert!(
            plain.starts_with("HTTP/1.1 101"),
            "the plain extractor: {plain}"
        );
        let both = raw_exchange(addr, request("/both").as_bytes()).await;
        assert!(
            both.starts_with("HTTP/1.1 101"),
            "Option<WebSocketUpgrade> took the same upgrade for plain HTTP: {both}"
        );
    })
    .await;
}

/// An axum handler that only pushes (a ticker: `socket.send` every 50 ms, never
/// `recv`), with an idle timeout of 200 ms, to a tungstenite client that reads every
/// tick and so answers every ping at once: the client is kept (`send` flushes, and the
/// flush ran the idle deadline even when it did not wait, closing the client with 1001
/// after two idle periods).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_only_handler_keeps_a_client_that_reads_and_pongs() {
    use std::time::Duration;
    use websocket_driver::tokio::Config;
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let app = Router::new().route(
        "/ws",
        get(move |ws: WebSocketUpgrade| {
            let done_tx = done_tx.clone();
            async move {
                let config = Config::default().idle_timeout(Duration::from_millis(200));
                ws.config(config).on_upgrade(move |mut socket| async move {
                    for i in 0..20 {
                        if let Err(e) = socket.send(Message::text(format!("tick {i}"))).await {
                            let _ = done_tx.send(format!("tick {i} failed: {e}"));
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let _ = done_tx.send("all sent".to_string());
                })
            }
        }),
    );
    bounded(30, async {
        let addr = axum_server(app).await;
        let mut client = tungstenite_client(addr, "/ws").await;
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(Ok(msg)) = client.next().await {
                seen.push(format!("{msg:?}"));
                // Talks too, as a live client would.
                if msg.is_text() && client.send(TMessage::Text("ack".into())).await.is_err() {
                    break;
                }
            }
            seen
        });
        let outcome = done.recv().await.unwrap();
        reader.abort();
        assert_eq!(
            outcome, "all sent",
            "the handler's ticks to a live client failed"
        );
    })
    .await;
}
