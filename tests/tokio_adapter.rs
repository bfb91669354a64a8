//! The tokio adapter (`--features tokio`) against itself (the project's own client driver
//! on `connect`), against the project's blocking server, and against tokio-tungstenite in
//! both directions: text, binary, 16 MiB, ping/pong, close codes, backpressure,
//! cancellation of a task mid-send, write receipts and pong futures, and clients through an
//! HTTP `CONNECT` proxy. Loopback only, ephemeral ports, every test bounded.
#![cfg(feature = "tokio")]

mod adapter_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use adapter_support::{
    answers_heads_at_the_limits, assert_protocol_error_then_close, bounded, close_frame, echoes,
    echoes_large, head_limited, next_close, pattern, pings_on_request, pong_answers, raw_upgrade,
    read_head, serve_each, serve_one, tungstenite_client, tungstenite_sees_server_close,
    tungstenite_server, upgrade_request,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as TMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use websocket_driver::server::HttpResponse;
use websocket_driver::tokio::{
    Config, Handler, WsReceiver, WsSender, accept, accept_with, connect, connect_via_proxy, run,
};
use websocket_driver::{
    Error, Event, HandshakeError, Message, MessageType, Options, ReadyState, UsageError,
};

const BIG: usize = 16 << 20;

/// Echo app on the adapter. `close:CODE` makes the server close with that code; `ping`
/// makes it ping the client with payload "srv".
async fn echo_app(tx: WsSender, mut rx: WsReceiver) {
    while let Some(event) = rx.next().await {
        match event {
            Event::Message(Message::Text(t)) if t.starts_with("close:") => {
                let code: u16 = t[6..].parse().unwrap();
                tx.close_connection(code, "server says bye").await.unwrap();
            }
            Event::Message(Message::Text(t)) if t == "ping" => {
                tx.send_ping("srv").await.unwrap();
            }
            Event::Message(m) => {
                let _ = tx.send_message(m).await;
            }
            _ => {}
        }
    }
}

/// The adapter's echo server on an ephemeral port.
async fn adapter_server() -> SocketAddr {
    serve_each(|stream| async move {
        if let Ok((tx, rx)) = accept(stream, &Options::default()).await {
            echo_app(tx, rx).await;
        }
    })
    .await
}

/// The next message event, skipping Open, pings and pongs.
async fn next_message(rx: &mut WsReceiver) -> Message<'static> {
    loop {
        match rx.next().await.expect("connection ended") {
            Event::Message(m) => return m,
            Event::Close { code, reason } => panic!("closed {code} {reason}"),
            Event::Error(e) => panic!("error {e}"),
            _ => {}
        }
    }
}

/// Waits for the Close event and checks nothing follows it.
async fn expect_close(rx: &mut WsReceiver) -> (u16, String) {
    loop {
        match rx.next().await.expect("Close comes before the end") {
            Event::Close { code, reason } => {
                assert!(rx.next().await.is_none(), "nothing after Close");
                assert!(rx.next().await.is_none(), "still nothing after Close");
                return (code, reason);
            }
            Event::Error(e) => panic!("error before close: {e}"),
            _ => {}
        }
    }
}

/// Text, binary, 16 MiB both kinds, a ping answered by the peer, and a client-side close
/// with an application code: the adapter's client against any echo server.
async fn client_exchange(url: String) {
    let (tx, mut rx) = connect(&url, &Options::default()).await.unwrap();
    assert!(matches!(rx.next().await, Some(Event::Open)));
    assert_eq!(tx.ready_state(), ReadyState::Open);

    tx.send_text("héllo").await.unwrap();
    assert_eq!(next_message(&mut rx).await, Message::Text("héllo".into()));
    tx.send_binary(vec![0u8, 1, 2, 255]).await.unwrap();
    assert_eq!(
        next_message(&mut rx).await,
        Message::Binary(vec![0u8, 1, 2, 255].into())
    );
    tx.send(b"typed".to_vec(), MessageType::Text).await.unwrap();
    assert_eq!(next_message(&mut rx).await, Message::Text("typed".into()));

    let big = pattern(BIG, 7);
    tx.send_binary(big.clone()).await.unwrap();
    match next_message(&mut rx).await {
        Message::Binary(b) => assert!(b[..] == big[..], "16 MiB binary came back intact"),
        other => panic!("expected binary, got {:?}", other.is_text()),
    }
    let big_text: String = "wsd-".repeat(BIG / 4);
    tx.send_text(big_text.clone()).await.unwrap();
    match next_message(&mut rx).await {
        Message::Text(t) => assert!(t == big_text, "16 MiB text came back intact"),
        _ => panic!("expected text"),
    }

    tx.send_ping("are you there").await.unwrap();
    loop {
        match rx.next().await.unwrap() {
            Event::Pong(p) => {
                assert_eq!(&p[..], b"are you there");
                break;
            }
            Event::Ping(_) | Event::Message(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    tx.flush().await.unwrap();
    tx.close_connection(4000, "client done").await.unwrap();
    let (code, _) = expect_close(&mut rx).await;
    assert_eq!(code, 4000, "the server echoes the close code");
    assert!(matches!(
        tx.send_text("late").await,
        Err(Error::Usage(UsageError::NotOpen))
    ));
}

/// The server closes with `code`; the adapter's client reports it.
async fn client_sees_server_close(url: String, code: u16) {
    let (tx, mut rx) = connect(&url, &Options::default()).await.unwrap();
    tx.send_text(format!("close:{code}")).await.unwrap();
    let (got, reason) = expect_close(&mut rx).await;
    assert_eq!(got, code);
    assert_eq!(reason, "server says bye");
}

/// `client_exchange` against the echo server at `addr`, then the server closes with each
/// of `codes` in turn.
async fn client_against(addr: SocketAddr, codes: [u16; 2]) {
    client_exchange(format!("ws://{addr}/echo")).await;
    for code in codes {
        client_sees_server_close(format!("ws://{addr}/"), code).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_client_against_adapter_server() {
    bounded(60, async {
        client_against(adapter_server().await, [1001, 3000]).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_client_against_tungstenite_server() {
    bounded(60, async {
        client_against(tungstenite_server().await, [4999, 1008]).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_client_against_blocking_server() {
    bounded(60, async {
        let server = websocket_driver::blocking::BlockingServer::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        std::thread::spawn(move || {
            let _ = server.serve(|_req, ws| {
                ws.on_message(|ws, m| {
                    let _ = ws.send_message(&m);
                });
            });
        });
        client_exchange(format!("ws://{addr}/")).await;
    })
    .await;
}

/// A server-side ping from the adapter: the client's automatic pong comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_server_pings_tungstenite_client() {
    bounded(30, async {
        let (addr, server) = serve_one(|stream| async move {
            let (tx, mut rx) = accept(stream, &Options::default()).await.unwrap();
            assert!(matches!(rx.next().await, Some(Event::Open)));
            tx.send_ping(vec![1u8, 2, 3]).await.unwrap();
            match rx.next().await.unwrap() {
                Event::Pong(p) => assert_eq!(&p[..], &[1, 2, 3]),
                other => panic!("unexpected {other:?}"),
            }
            tx.close_connection(1000, "").await.unwrap();
            expect_close(&mut rx).await
        })
        .await;
        let mut ws = tungstenite_client(addr, "/").await;
        let mut pinged = false;
        while let Some(message) = ws.next().await {
            match message.unwrap() {
                TMessage::Ping(p) => {
                    assert_eq!(&p[..], &[1, 2, 3]);
                    pinged = true;
                }
                TMessage::Close(frame) => {
                    assert_eq!(u16::from(frame.unwrap().code), 1000);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(pinged);
        assert_eq!(server.await.unwrap().0, 1000);
    })
    .await;
}

/// tokio-tungstenite's client against the adapter's server: text, binary, 16 MiB, ping,
/// a client close with a code, and server closes with codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tungstenite_client_against_adapter_server() {
    bounded(60, async {
        let addr = adapter_server().await;
        let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat"))
            .await
            .unwrap();
        assert_eq!(response.status(), 101);

        echoes(&mut ws, TMessage::Text("hello".into())).await;
        echoes(&mut ws, TMessage::Binary(vec![9u8; 1000].into())).await;
        echoes_large(&mut ws, pattern(BIG, 3)).await;
        pong_answers(&mut ws, b"tick").await;
        // The server pings on request; tungstenite answers by itself.
        pings_on_request(&mut ws).await;
        ws.close(close_frame(4123, "bye")).await.unwrap();
        loop {
            match ws.next().await {
                Some(Ok(TMessage::Close(Some(frame)))) => {
                    assert_eq!(u16::from(frame.code), 4123);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{e}"),
                None => break,
            }
        }

        for code in [1000u16, 1001, 3001] {
            tungstenite_sees_server_close(addr, code).await;
        }
    })
    .await;
}

/// The adapter's server sees the client's close code and reason, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_server_reports_client_close_code() {
    /// An adapter server for one connection that reports how it closed.
    async fn close_reporter() -> (SocketAddr, tokio::task::JoinHandle<(u16, String)>) {
        serve_one(|stream| async move {
            let (_tx, mut rx) = accept(stream, &Options::default()).await.unwrap();
            expect_close(&mut rx).await
        })
        .await
    }
    bounded(30, async {
        let (addr, server) = close_reporter().await;
        let (tx, mut rx) = connect(&format!("ws://{addr}/"), &Options::default())
            .await
            .unwrap();
        tx.close_connection(3456, "going").await.unwrap();
        assert_eq!(expect_close(&mut rx).await.0, 3456);
        assert_eq!(server.await.unwrap(), (3456, "going".to_string()));

        // A transport that just ends is 1006.
        let (addr, server) = close_reporter().await;
        drop(tungstenite_client(addr, "/").await);
        assert_eq!(server.await.unwrap().0, 1006);
    })
    .await;
}

/// A peer that breaks the protocol: Error, then Close with the code the driver sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_error_reports_error_then_close() {
    bounded(30, async {
        let (addr, server) = serve_one(|stream| async move {
            let (_tx, mut rx) = accept(stream, &Options::default()).await.unwrap();
            let mut events = Vec::new();
            while let Some(event) = rx.next().await {
                events.push(event);
            }
            events
        })
        .await;
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(&upgrade_request("/", 13)).await.unwrap();
        // An unmasked text frame from a client: 1002.
        raw.write_all(b"\x81\x02hi").await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut got)).await;
        assert_protocol_error_then_close(&server.await.unwrap());
        assert!(got.starts_with(b"HTTP/1.1 101"));
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let close = &got[head_end..];
        assert_eq!(close[0], 0x88, "a close frame follows the 101");
        assert_eq!(&close[2..4], &1002u16.to_be_bytes());
    })
    .await;
}

/// Requests that are not valid upgrades get an HTTP error and `accept` fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upgrades_are_answered_with_http_errors() {
    bounded(30, async {
        async fn answer(request: &[u8], check_404: bool) -> (String, bool) {
            let (addr, server) = serve_one(move |stream| async move {
                let result = accept_with(stream, &Options::default(), &Config::default(), |req| {
                    if check_404 && req.path != "/chat" {
                        Err(HttpResponse::new(404, "no such room"))
                    } else {
                        Ok(())
                    }
                })
                .await;
                result.is_err()
            })
            .await;
            let mut raw = TcpStream::connect(addr).await.unwrap();
            raw.write_all(request).await.unwrap();
            let mut got = Vec::new();
            raw.read_to_end(&mut got).await.unwrap();
            (
                String::from_utf8_lossy(&got).into_owned(),
                server.await.unwrap(),
            )
        }
        let (text, failed) = answer(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(failed);
        let (text, failed) = answer(&upgrade_request("/", 8), false).await;
        assert!(text.starts_with("HTTP/1.1 426"), "{text}");
        assert!(text.contains("Sec-WebSocket-Version: 13"));
        assert!(failed);
        let (text, failed) = answer(&upgrade_request("/lobby", 13), true).await;
        assert!(text.starts_with("HTTP/1.1 404"), "{text}");
        assert!(failed);

        // The client side of a refused handshake.
        let (addr, _) = serve_one(|stream| async move {
            let _ = accept_with(stream, &Options::default(), &Config::default(), |_| {
                Err(HttpResponse::new(403, "go away"))
            })
            .await;
        })
        .await;
        match connect(&format!("ws://{addr}/"), &Options::default()).await {
            Err(Error::Handshake(e)) => assert!(e.to_string().contains("403"), "{e}"),
            other => panic!("expected a handshake error, got {:?}", other.is_ok()),
        }
    })
    .await;
}

/// The head limits on `accept`, counted in the head's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_limits_at_the_limit_and_one_over() {
    bounded(30, async {
        let addr = serve_each(|stream| async move {
            if let Ok((tx, rx)) = accept(stream, &head_limited()).await {
                echo_app(tx, rx).await;
            }
        })
        .await;
        answers_heads_at_the_limits(addr).await;
    })
    .await;
}

/// Subprotocol negotiation goes through the adapter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subprotocol_is_agreed() {
    bounded(30, async {
        let (addr, _) = serve_one(|stream| async move {
            let options = Options::default().accept_protocols(["chat.v2"]);
            let (tx, rx) = accept(stream, &options).await.unwrap();
            assert_eq!(tx.protocol(), Some("chat.v2"));
            echo_app(tx, rx).await;
        })
        .await;
        let options = Options::default().accept_protocols(["chat.v1", "chat.v2"]);
        let (tx, mut rx) = connect(&format!("ws://{addr}/"), &options).await.unwrap();
        assert_eq!(tx.protocol(), Some("chat.v2"));
        assert_eq!(tx.version(), "hybi-13");
        tx.close_connection(1000, "").await.unwrap();
        assert_eq!(expect_close(&mut rx).await.0, 1000);
    })
    .await;
}

/// Seed-style handler: on_open, on_message, on_close each run, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_callbacks_run() {
    #[derive(Default)]
    struct Recorder {
        log: Vec<String>,
    }
    impl Handler for Recorder {
        async fn on_open(&mut self, ws: &WsSender) {
            self.log.push("open".into());
            let _ = ws.send_text("welcome").await;
        }
        async fn on_message(&mut self, ws: &WsSender, message: Message<'static>) {
            self.log
                .push(format!("message {}", message.as_text().unwrap()));
            let _ = ws.send_message(message).await;
        }
        async fn on_close(&mut self, _ws: &WsSender, code: u16, reason: &str) {
            self.log.push(format!("close {code} {reason}"));
        }
    }
    bounded(30, async {
        let (addr, server) = serve_one(|stream| async move {
            run(
                accept(stream, &Options::default()).await.unwrap(),
                Recorder::default(),
            )
            .await
            .log
        })
        .await;
        let mut ws = tungstenite_client(addr, "/").await;
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            TMessage::Text("welcome".into())
        );
        echoes(&mut ws, TMessage::Text("one".into())).await;
        ws.close(close_frame(1000, "done")).await.unwrap();
        while ws.next().await.is_some() {}
        assert_eq!(
            server.await.unwrap(),
            vec!["open", "message one", "close 1000 done"]
        );
    })
    .await;
}

/// Senders are cloneable and usable from other tasks; messages arrive whole, each task's
/// in its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_from_many_tasks() {
    bounded(60, async {
        let addr = tungstenite_server().await;
        let (tx, mut rx) = connect(&format!("ws://{addr}/"), &Options::default())
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for t in 0..4 {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200 {
                    tx.send_text(format!("{t}:{i}")).await.unwrap();
                }
            }));
        }
        let mut next = [0usize; 4];
        for _ in 0..800 {
            let m = next_message(&mut rx).await;
            let (t, i) = m.as_text().unwrap().split_once(':').unwrap();
            let (t, i): (usize, usize) = (t.parse().unwrap(), i.parse().unwrap());
            assert_eq!(next[t], i, "task {t}'s messages in order");
            next[t] += 1;
        }
        for task in tasks {
            task.await.unwrap();
        }
        tx.close_connection(1000, "").await.unwrap();
        expect_close(&mut rx).await;
    })
    .await;
}

/// The adapter's client on `ws://{addr}/` with `config`.
async fn client_with_config(addr: SocketAddr, config: &Config) -> (WsSender, WsReceiver) {
    let stream = TcpStream::connect(addr).await.unwrap();
    websocket_driver::tokio::client_with(
        stream,
        &format!("ws://{addr}/"),
        &Options::default(),
        config,
    )
    .await
    .unwrap()
}

/// A tokio-tungstenite peer reads `count` binary messages of `size` bytes, message `i`
/// being `pattern(size, i)`: whole, intact and in order.
async fn receives_patterns<S>(peer: &mut S, count: usize, size: usize)
where
    S: futures_util::Stream<Item = Result<TMessage, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    for i in 0..count {
        match peer.next().await.unwrap().unwrap() {
            TMessage::Binary(b) => {
                assert_eq!(b.len(), size, "message {i} whole");
                assert!(b[..] == pattern(size, i)[..], "message {i} intact");
            }
            other => panic!("message {i}: expected binary, got {other:?}"),
        }
    }
}

/// Backpressure and cancellation: against a peer that does not read, `send` waits once
/// the buffer is over the limit; a task aborted while sending, and a send cancelled by a
/// timeout, leave the stream consistent: the peer later gets exactly the messages whose
/// `send` completed, whole and in order, then later messages and a clean close.
async fn cancellation_mid_send<S>(tx: WsSender, mut rx: WsReceiver, mut peer: S)
where
    S: futures_util::Stream<Item = Result<TMessage, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<TMessage, Error = tokio_tungstenite::tungstenite::Error>
        + Unpin,
{
    const SIZE: usize = 256 * 1024;
    let completed = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (tx, completed) = (tx.clone(), completed.clone());
        tokio::spawn(async move {
            for i in 0.. {
                tx.send_binary(pattern(SIZE, i)).await.unwrap();
                completed.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    // The peer reads nothing: the socket buffers fill, then the adapter's buffer passes
    // the limit and the sender blocks.
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = completed.load(Ordering::SeqCst);
        if now == last && tx.buffered_amount() > 64 * 1024 {
            break;
        }
        last = now;
    }
    assert!(!sender.is_finished());
    sender.abort();
    assert!(sender.await.unwrap_err().is_cancelled());
    // A send cancelled by a timeout queues nothing either.
    let timed_out =
        tokio::time::timeout(Duration::from_millis(100), tx.send_binary(vec![0xEE; SIZE])).await;
    assert!(timed_out.is_err(), "send waits while over the limit");
    let sent = completed.load(Ordering::SeqCst);
    assert!(sent > 0);

    // Now the peer reads everything: exactly the completed messages, whole and in order.
    receives_patterns(&mut peer, sent, SIZE).await;
    // The connection still works after the cancellations.
    tx.send_text("after").await.unwrap();
    assert_eq!(
        peer.next().await.unwrap().unwrap(),
        TMessage::Text("after".into())
    );
    peer.send(TMessage::Text("still here".into()))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut rx).await,
        Message::Text("still here".into())
    );
    tx.close_connection(1000, "done").await.unwrap();
    assert_eq!(next_close(&mut peer).await.0, 1000);
    // Polling on lets tungstenite send its close reply.
    assert!(peer.next().await.is_none());
    assert_eq!(expect_close(&mut rx).await.0, 1000);
    assert_eq!(tx.buffered_amount(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_mid_send_adapter_server() {
    bounded(60, async {
        let (addr, server) = serve_one(|stream| async move {
            let config = Config::default().max_backpressure(64 * 1024);
            websocket_driver::tokio::accept_with(stream, &Options::default(), &config, |_| Ok(()))
                .await
                .unwrap()
        })
        .await;
        let peer = tungstenite_client(addr, "/").await;
        let (tx, rx) = server.await.unwrap();
        cancellation_mid_send(tx, rx, peer).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_mid_send_adapter_client() {
    bounded(60, async {
        let (addr, server) = serve_one(tokio_tungstenite::accept_async).await;
        let config = Config::default().max_backpressure(64 * 1024);
        let (tx, rx) = client_with_config(addr, &config).await;
        let peer = server.await.unwrap().unwrap();
        cancellation_mid_send(tx, rx, peer).await;
    })
    .await;
}

/// A dropped receiver leaves the senders working; dropping every half closes with 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_both_halves_closes_normally() {
    bounded(30, async {
        let (addr, server) = serve_one(|stream| async move {
            let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
            let mut seen = Vec::new();
            while let Some(Ok(message)) = ws.next().await {
                seen.push(message);
            }
            seen
        })
        .await;
        let (tx, rx) = connect(&format!("ws://{addr}/"), &Options::default())
            .await
            .unwrap();
        drop(rx);
        tx.send_text("still sending").await.unwrap();
        drop(tx);
        let seen = server.await.unwrap();
        assert_eq!(seen[0], TMessage::Text("still sending".into()));
        match &seen[1] {
            TMessage::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1000),
            other => panic!("unexpected {other:?}"),
        }
    })
    .await;
}

/// A close handshake the peer never answers ends after the close timeout with 1006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_close_times_out() {
    bounded(30, async {
        let (addr, _) = serve_one(|mut stream| async move {
            // Answer the upgrade by hand, then read and ignore everything.
            let mut buf = vec![0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .trim()
                .to_string();
            let accept = websocket_driver::protocol::handshake::accept_key(&key);
            stream
                .write_all(
                    format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                         Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            while stream.read(&mut buf).await.unwrap_or(0) > 0 {}
        })
        .await;
        let config = Config::default().close_timeout(Duration::from_millis(300));
        let (tx, mut rx) = client_with_config(addr, &config).await;
        tx.close_connection(1000, "").await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(expect_close(&mut rx).await.0, 1006);
        assert!(started.elapsed() < Duration::from_secs(5));
    })
    .await;
}

/// An adapter server whose connections have an idle timeout (pings once silent, closes
/// with 1001 after a second silent period).
async fn idle_server(idle: Duration) -> SocketAddr {
    let config = Config::default().idle_timeout(idle);
    serve_each(move |stream| {
        let config = config.clone();
        async move {
            if let Ok((tx, rx)) =
                accept_with(stream, &Options::default(), &config, |_| Ok(())).await
            {
                echo_app(tx, rx).await;
            }
        }
    })
    .await
}

/// The idle keepalive: a peer that answers pings stays open over several idle periods;
/// a peer that completed the handshake and then only reads gets a ping after one idle
/// period and a close 1001 "idle timeout" after the second, then the end of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_pings_then_closes_a_silent_peer() {
    bounded(60, async {
        let idle = Duration::from_millis(250);
        let addr = idle_server(idle).await;

        // The adapter's own client answers pings (the driver queues the pong).
        let (tx, mut rx) = connect(&format!("ws://{addr}/"), &Options::default())
            .await
            .unwrap();
        assert!(matches!(rx.next().await, Some(Event::Open)));
        let mut pings = 0;
        while pings < 4 {
            match rx.next().await.unwrap() {
                Event::Ping(p) => {
                    assert!(p.is_empty(), "keepalive pings are empty");
                    pings += 1;
                }
                other => panic!("expected only pings while silent, got {other:?}"),
            }
        }
        // Four idle periods later it is still open and echoes.
        assert!(tx.is_open());
        tx.send_text("still here").await.unwrap();
        assert_eq!(
            next_message(&mut rx).await,
            Message::Text("still here".into())
        );
        tx.close_connection(1000, "").await.unwrap();
        assert_eq!(expect_close(&mut rx).await.0, 1000);

        // A raw socket that upgrades, then reads and never writes. The clock starts before
        // the request: the server's idle clock starts later, so this is a true lower bound.
        let requested = std::time::Instant::now();
        let (mut raw, mut seen) = raw_upgrade(addr, "/").await;
        let mut buf = [0u8; 256];
        let head_end = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(seen.starts_with(b"HTTP/1.1 101 "));
        let mut frames = seen.split_off(head_end);
        loop {
            let n = raw.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            frames.extend_from_slice(&buf[..n]);
        }
        let closed_after = requested.elapsed();
        assert_eq!(
            &frames[..2],
            [0x89, 0x00],
            "an empty ping first: {frames:?}"
        );
        assert_eq!(&frames[2..6], [0x88, 2 + 12, 0x03, 0xe9], "then close 1001");
        assert_eq!(&frames[6..], b"idle timeout");
        // The close came after two idle periods, not one (the upper bound only guards
        // against a hang).
        assert!(closed_after >= 2 * idle, "{closed_after:?}");
        assert!(closed_after < Duration::from_secs(20), "{closed_after:?}");
    })
    .await;
}

/// The idle keepalive pauses while the application holds input back: a server app busy
/// for six idle periods without polling its receiver (so the peer's pongs stay unread)
/// does not close a live peer with 1001; once it asks again, the connection is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_not_polled_does_not_close_a_live_peer_as_idle() {
    bounded(30, async {
        let idle = Duration::from_millis(150);
        let (addr, app) = serve_one(move |stream| async move {
            let config = Config::default().idle_timeout(idle);
            let (tx, mut rx) = accept_with(stream, &Options::default(), &config, |_| Ok(()))
                .await
                .unwrap();
            assert!(matches!(rx.next().await, Some(Event::Open)));
            // Busy elsewhere: the receiver is not polled.
            tokio::time::sleep(idle * 6).await;
            assert!(tx.is_open(), "closed while the app was busy");
            tx.send_text("still here").await.unwrap();
            tx.close_connection(1000, "").await.unwrap();
            let mut events = Vec::new();
            while let Some(event) = rx.next().await {
                events.push(event);
            }
            events
        })
        .await;
        // A peer that reads all the time (and so answers every ping at once).
        let (mut peer, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .unwrap();
        let mut texts = Vec::new();
        while let Some(Ok(message)) = peer.next().await {
            if let TMessage::Text(t) = message {
                texts.push(t.to_string());
            }
        }
        assert_eq!(texts, ["still here"]);
        let events = app.await.unwrap();
        assert!(
            matches!(events.last(), Some(Event::Close { code: 1000, .. })),
            "{events:?}"
        );
    })
    .await;
}

// ----- receipts and pong futures -----

type Peer = tokio_tungstenite::WebSocketStream<TcpStream>;

/// The adapter's client connected to a tokio-tungstenite peer that the test drives by
/// hand (it reads, and so answers pings, only when the test polls it).
async fn hand_driven_peer() -> (WsSender, WsReceiver, Peer) {
    let (addr, peer) = serve_one(|stream| async move {
        // Room for the unbuffered message in one frame.
        let config = WebSocketConfig::default()
            .max_frame_size(Some(2 * unbuffered()))
            .max_message_size(Some(2 * unbuffered()));
        tokio_tungstenite::accept_async_with_config(stream, Some(config))
            .await
            .unwrap()
    })
    .await;
    let (tx, rx) = connect(&format!("ws://{addr}/"), &Options::default())
        .await
        .unwrap();
    (tx, rx, peer.await.unwrap())
}

/// Polls the receiver on a task of its own (pongs and closes are read only as it asks)
/// and forwards its events.
fn forward_events(mut rx: WsReceiver) -> tokio::sync::mpsc::UnboundedReceiver<Event<'static>> {
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = rx.next().await {
            let _ = events_tx.send(event);
        }
    });
    events
}

/// More than loopback socket buffers hold: its frame is written only as the peer reads.
/// (32 MiB was not enough where `tcp_rmem` lets a receive buffer grow to 32 MiB.)
fn unbuffered() -> usize {
    (tcp_buffer_max("tcp_wmem") + tcp_buffer_max("tcp_rmem") + (16 << 20)).max(32 << 20)
}

fn is_not_open(result: Result<(), Error>) -> bool {
    matches!(result, Err(Error::Usage(UsageError::NotOpen)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipt_resolves_once_the_frame_is_written() {
    bounded(60, async {
        let (tx, mut rx, mut peer) = hand_driven_peer().await;
        assert!(matches!(rx.next().await, Some(Event::Open)));

        // A small message: written at once, and the peer gets it.
        let receipt = tx
            .send_with_receipt("small", MessageType::Text)
            .await
            .unwrap();
        receipt.await.unwrap();
        assert_eq!(
            peer.next().await.unwrap().unwrap(),
            TMessage::Text("small".into())
        );

        // A message larger than the socket buffers: queued at once, but its receipt waits
        // while the peer reads nothing, and resolves as the peer takes the whole message.
        let big = pattern(unbuffered(), 3);
        let mut receipt = tx
            .send_with_receipt(big.clone(), MessageType::Binary)
            .await
            .unwrap();
        let early = tokio::time::timeout(Duration::from_millis(300), &mut receipt).await;
        assert!(
            early.is_err(),
            "the receipt waits for the frame to be written"
        );
        assert!(tx.buffered_amount() > 0);
        let (received, written) = tokio::join!(peer.next(), receipt);
        written.unwrap();
        match received.unwrap().unwrap() {
            TMessage::Binary(b) => assert!(b[..] == big[..], "the peer got it whole"),
            other => panic!("unexpected {other:?}"),
        }

        // Once the peer has closed, a confirmed send is refused outright.
        peer.close(None).await.unwrap();
        assert_eq!(expect_close(&mut rx).await.0, 1005);
        let refused = tx.send_with_receipt("late", MessageType::Text).await;
        assert!(matches!(refused, Err(Error::Usage(UsageError::NotOpen))));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipt_fails_when_the_peer_goes_before_the_frame_is_written() {
    bounded(60, async {
        let (tx, rx, peer) = hand_driven_peer().await;
        let _events = forward_events(rx);
        let mut receipt = tx
            .send_with_receipt(pattern(unbuffered(), 5), MessageType::Binary)
            .await
            .unwrap();
        let early = tokio::time::timeout(Duration::from_millis(300), &mut receipt).await;
        assert!(
            early.is_err(),
            "the peer reads nothing: the frame is not written"
        );
        // The peer goes away with our bytes unread (a reset): the frame never gets out.
        drop(peer);
        assert!(is_not_open(receipt.await), "the receipt fails");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_resolves_with_the_pong() {
    bounded(60, async {
        let url = format!("ws://{}/", tungstenite_server().await);
        let (tx, rx) = connect(&url, &Options::default()).await.unwrap();
        let mut events = forward_events(rx);

        let first = tx.ping("one").await.unwrap();
        let second = tx.ping("two").await.unwrap();
        let (first, second) = tokio::join!(first, second);
        first.unwrap();
        second.unwrap();
        // The pongs also come out of the receiver, in order.
        let mut pongs = Vec::new();
        while pongs.len() < 2 {
            match events.recv().await.unwrap() {
                Event::Pong(p) => pongs.push(p.into_owned()),
                Event::Open => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(pongs, [b"one".to_vec(), b"two".to_vec()]);

        assert!(matches!(
            tx.ping(vec![0u8; 126]).await,
            Err(Error::Usage(UsageError::ControlPayloadTooLong))
        ));
        tx.close_connection(1000, "").await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_fails_when_the_peer_closes_first() {
    bounded(60, async {
        // The peer closes with a close frame, never having read the ping.
        let (tx, rx, mut peer) = hand_driven_peer().await;
        let mut events = forward_events(rx);
        let mut pong = tx.ping("anyone").await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(200), &mut pong).await;
        assert!(early.is_err(), "no pong while the peer reads nothing");
        peer.close(None).await.unwrap();
        assert!(is_not_open(pong.await), "closed before the pong");
        loop {
            match events.recv().await.unwrap() {
                Event::Close { code, .. } => break assert_eq!(code, 1005),
                Event::Open => {}
                other => panic!("unexpected {other:?}"),
            }
        }

        // The peer drops the connection without a close frame.
        let (tx, rx, peer) = hand_driven_peer().await;
        let _events = forward_events(rx);
        let pong = tx.ping("anyone").await.unwrap();
        drop(peer);
        assert!(is_not_open(pong.await), "dropped before the pong");
    })
    .await;
}

// ----- through an HTTP CONNECT proxy -----

/// A tiny HTTP `CONNECT` proxy on an ephemeral port. It answers 200 and copies bytes both
/// ways when the request's `Proxy-Authorization` equals `authorization`, 407 otherwise;
/// it reports each request head it reads.
async fn connect_proxy(
    authorization: &'static str,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (heads_tx, heads) = tokio::sync::mpsc::unbounded_channel();
    let addr = serve_each(move |mut client| {
        let heads_tx = heads_tx.clone();
        async move {
            let head = read_head(&mut client).await;
            let _ = heads_tx.send(head.clone());
            let target = head
                .strip_prefix("CONNECT ")
                .and_then(|rest| rest.split(' ').next())
                .expect("a CONNECT request")
                .to_string();
            let authorized = head.lines().any(|line| {
                line.split_once(':').is_some_and(|(name, value)| {
                    name.eq_ignore_ascii_case("proxy-authorization")
                        && value.trim() == authorization
                })
            });
            if !authorized {
                let refusal = "HTTP/1.1 407 Proxy Authentication Required\r\n\
                               Proxy-Authenticate: Basic realm=\"test\"\r\n\
                               Content-Length: 0\r\n\r\n";
                let _ = client.write_all(refusal.as_bytes()).await;
                let _ = client.shutdown().await;
                return;
            }
            let mut server = TcpStream::connect(&target).await.unwrap();
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .unwrap();
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        }
    })
    .await;
    (addr, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_through_connect_proxy() {
    bounded(60, async {
        let server = adapter_server().await;
        // base64("alice:secret")
        let (proxy, mut heads) = connect_proxy("Basic YWxpY2U6c2VjcmV0").await;
        let url = format!("ws://{server}/echo");
        let (tx, mut rx) = connect_via_proxy(
            &url,
            &format!("http://alice:secret@{proxy}"),
            &Options::default(),
            &Config::default(),
        )
        .await
        .unwrap();
        let head = heads.recv().await.unwrap();
        assert!(
            head.starts_with(&format!("CONNECT {server} HTTP/1.1\r\nHost: {server}\r\n")),
            "{head}"
        );

        // Messages round-trip through the tunnel, a big one included.
        assert!(matches!(rx.next().await, Some(Event::Open)));
        tx.send_text("through the proxy").await.unwrap();
        assert_eq!(
            next_message(&mut rx).await,
            Message::Text("through the proxy".into())
        );
        let big = pattern(1 << 20, 9);
        tx.send_binary(big.clone()).await.unwrap();
        assert_eq!(next_message(&mut rx).await, Message::Binary(big.into()));
        tx.close_connection(1000, "bye").await.unwrap();
        assert_eq!(expect_close(&mut rx).await.0, 1000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refusal_is_reported() {
    bounded(60, async {
        let server = adapter_server().await;
        let (proxy, mut heads) = connect_proxy("Basic YWxpY2U6c2VjcmV0").await;
        let url = format!("ws://{server}/");
        for proxy_url in [
            format!("http://alice:wrong@{proxy}"),
            format!("http://{proxy}"),
        ] {
            let refused =
                connect_via_proxy(&url, &proxy_url, &Options::default(), &Config::default()).await;
            assert!(
                matches!(
                    &refused,
                    Err(Error::Handshake(HandshakeError::ProxyRefused { status: 407, authenticate }))
                        if authenticate == "Basic realm=\"test\""
                ),
                "{proxy_url}: {:?}",
                refused.map(|_| ())
            );
            heads.recv().await.unwrap();
        }
        // wss:// is refused before connecting: TLS goes through `tunnel` and `client`.
        let wss = connect_via_proxy(
            &format!("wss://{server}/"),
            &format!("http://{proxy}"),
            &Options::default(),
            &Config::default(),
        )
        .await;
        assert!(matches!(wss, Err(Error::Usage(UsageError::InvalidUrl(_)))));
    })
    .await;
}

/// `connect_via_proxy` gives the tunnel the handshake timeout (as its docs say): a proxy
/// that reads the `CONNECT` and trickles an answer that never ends its head is cut off
/// then with a timed-out error (1 s here; the trickle lasts 20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_proxy_is_cut_off_by_the_handshake_timeout() {
    bounded(30, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let trickler = tokio::spawn(async move {
            let (mut client, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0);
                head.extend_from_slice(&buf[..n]);
            }
            for byte in b"HTTP/1.1 200 Connection established but slowly"
                .iter()
                .cycle()
                .take(100)
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if client.write_all(&[*byte]).await.is_err() {
                    break;
                }
            }
        });
        let started = std::time::Instant::now();
        let result = connect_via_proxy(
            "ws://127.0.0.1:9/",
            &format!("http://{proxy}"),
            &Options::default(),
            &Config::default().handshake_timeout(Duration::from_secs(1)),
        )
        .await;
        let took = started.elapsed();
        assert!(
            matches!(&result, Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut),
            "{:?}",
            result.map(|_| ())
        );
        assert!(took < Duration::from_secs(3), "{took:?}");
        trickler.abort();
    })
    .await;
}

/// The largest size the kernel lets a TCP buffer autotune to (`tcp_wmem` / `tcp_rmem`'s
/// last field), or 16 MiB where that cannot be read.
fn tcp_buffer_max(sysctl: &str) -> usize {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{sysctl}"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|n| n.parse().ok()))
        .unwrap_or(16 << 20)
}

/// A server task that sends 1 MiB messages in a loop to a tokio-tungstenite client that
/// does not read: once the kernel's buffers and the adapter's budget are full, the send
/// future stays pending; when the client reads, every message arrives in order, intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_wait_while_a_tungstenite_client_does_not_read() {
    const MESSAGE: usize = 1 << 20;
    const MESSAGES: usize = 96;
    bounded(60, async {
        let completed = Arc::new(AtomicUsize::new(0));
        let limit = Config::default().max_backpressure;
        let (sender_tx, sender_rx) = tokio::sync::oneshot::channel();
        let (addr, server) = {
            let completed = completed.clone();
            serve_one(|stream| async move {
                let (tx, _rx) = accept(stream, &Options::default()).await.unwrap();
                let _ = sender_tx.send(tx.clone());
                for i in 0..MESSAGES {
                    tx.send_binary(pattern(MESSAGE, i)).await.unwrap();
                    completed.fetch_add(1, Ordering::SeqCst);
                }
                tx.close_connection(1000, "done").await.unwrap();
                let _ = tx.flush().await;
            })
            .await
        };
        let mut client = tungstenite_client(addr, "/").await;
        let tx = sender_rx.await.unwrap();

        // Do not read: wait until the sends stop completing.
        let mut last = usize::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = completed.load(Ordering::SeqCst);
            if now == last {
                break;
            }
            last = now;
        }
        // The next send stays pending.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stuck = completed.load(Ordering::SeqCst);
        assert_eq!(
            stuck, last,
            "a send completed while the client read nothing"
        );
        let buffered = tx.buffered_amount();
        let kernel = tcp_buffer_max("tcp_wmem") + tcp_buffer_max("tcp_rmem");
        eprintln!(
            "backpressure: {stuck} of {MESSAGES} sends completed ({} MiB); \
             adapter buffer {} KiB; kernel buffers at most {} MiB",
            (stuck * MESSAGE) >> 20,
            buffered >> 10,
            kernel >> 20
        );
        assert!(stuck < MESSAGES, "every send completed: nothing waited");
        // The adapter holds at most the limit plus the one message admitted under it.
        assert!(buffered <= limit + MESSAGE, "adapter buffer {buffered}");
        // Completed sends are what the adapter and the socket buffers hold.
        assert!(
            stuck * MESSAGE <= limit + MESSAGE + kernel,
            "{stuck} MiB completed past the limit and the socket buffers"
        );

        // Now read: everything arrives, in order, then the close.
        receives_patterns(&mut client, MESSAGES, MESSAGE).await;
        assert_eq!(next_close(&mut client).await.0, 1000);
        server.await.unwrap();
        assert_eq!(completed.load(Ordering::SeqCst), MESSAGES);
    })
    .await;
}

/// A client frame (FIN, mask key 0, so the payload is as written) with a short payload.
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    frame
}

/// The peer sends two messages with its upgrade request and then resets the connection.
/// The server app takes `Open` and then only sends (it does not poll the receiver): once
/// a write fails, its sends must fail too, not be accepted and then hang forever; and the
/// input read before the failure still comes out of the receiver, then the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_fail_after_a_write_error_while_input_waits() {
    bounded(30, async {
        let (addr, server) = serve_one(|stream| async move {
            let (tx, mut rx) = accept(stream, &Options::default()).await.unwrap();
            assert!(matches!(rx.next().await, Some(Event::Open)));
            let mut accepted = 0usize;
            let outcome = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    tx.send_binary(vec![7u8; 64 * 1024]).await?;
                    accepted += 1;
                }
                #[allow(unreachable_code)]
                Ok::<(), Error>(())
            })
            .await;
            let flushed = tokio::time::timeout(Duration::from_secs(2), tx.flush()).await;
            (outcome, accepted, tx.ready_state(), flushed, rx)
        })
        .await;
        let mut raw = TcpStream::connect(addr).await.unwrap();
        let mut request = upgrade_request("/", 13);
        request.extend(masked_frame(1, b"one"));
        request.extend(masked_frame(1, b"two"));
        raw.write_all(&request).await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = raw.read(&mut buf).await.unwrap();
            assert!(n > 0);
            head.extend_from_slice(&buf[..n]);
        }
        // A reset: the server's next write fails.
        socket2::SockRef::from(&raw)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(raw);
        let (outcome, accepted, state, flushed, mut rx) = server.await.unwrap();
        assert!(
            matches!(outcome, Ok(Err(Error::Usage(UsageError::NotOpen)))),
            "sends after the write failure: {outcome:?} ({accepted} accepted, state {state:?}, \
             flush: {flushed:?})"
        );
        let mut rest = Vec::new();
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
            rest.push(format!("{event:?}"));
        }
        assert!(rest.len() >= 3, "{rest:?}");
        assert!(rest[0].contains("\"one\""), "{rest:?}");
        assert!(rest[1].contains("\"two\""), "{rest:?}");
        assert!(rest.last().unwrap().starts_with("Close"), "{rest:?}");
    })
    .await;
}

/// A send made after the sender's own `close_connection` returned must fail like any send
/// on a closing connection, not report Ok for a message that is then dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_after_the_own_close_is_refused() {
    bounded(30, async {
        let url = format!("ws://{}/", tungstenite_server().await);
        let (tx, rx) = connect(&url, &Options::default()).await.unwrap();
        let _events = forward_events(rx);
        tx.close_connection(1000, "bye").await.unwrap();
        let late = tx.send_text("after the close").await;
        assert!(
            matches!(late, Err(Error::Usage(UsageError::NotOpen))),
            "send after close_connection: {late:?}"
        );
    })
    .await;
}

/// A client that streams to an echo server from one task and reads the echoes in another
/// (what the split API is for) must not lock up once its output reaches the byte budget:
/// it streams for a second, then everything it sent must get out and come back. (The
/// connection task held input back while its output was over the limit, so it stopped
/// reading the echoes while the server, blocked writing them, stopped reading it.)
async fn stream_against_echo(url: String) {
    let (tx, mut rx) = connect(&url, &Options::default()).await.unwrap();
    let reader = tokio::spawn(async move {
        let mut echoes = 0usize;
        loop {
            match rx.next().await {
                Some(Event::Message(_)) => echoes += 1,
                Some(Event::Close { .. }) | None => break echoes,
                Some(_) => {}
            }
        }
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pusher = {
        let (tx, stop) = (tx.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let send = tx.send_binary(vec![1u8; 16 * 1024]);
                if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(500), send).await {
                    sent += 1;
                }
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = pusher.await.unwrap();
    let drained = tokio::time::timeout(Duration::from_secs(10), tx.flush()).await;
    let left = tx.buffered_amount();
    tx.close_connection(1000, "").await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), reader).await;
    assert!(
        matches!(drained, Ok(Ok(()))),
        "sent {sent}, our output stuck at {left} bytes (flush: {drained:?}); echoed {echoed:?}"
    );
    // Every message came back, before the peer's close.
    assert_eq!(echoed.unwrap().unwrap(), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_to_a_tungstenite_echo_server_does_not_deadlock() {
    bounded(
        60,
        stream_against_echo(format!("ws://{}/", tungstenite_server().await)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_to_an_adapter_echo_server_does_not_deadlock() {
    bounded(
        60,
        stream_against_echo(format!("ws://{}/", adapter_server().await)),
    )
    .await;
}

/// The split API's connection task runs the write timeout too: a peer that reads nothing
/// fails a send's receipt once the socket has taken nothing for `write_timeout`, and the
/// receiver hears why (a `TimedOut` error, then 1006).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_reads_nothing_fails_the_split_api_at_the_write_timeout() {
    bounded(60, async {
        let (addr, peer) =
            serve_one(
                |stream| async move { tokio_tungstenite::accept_async(stream).await.unwrap() },
            )
            .await;
        let timeout = Duration::from_millis(500);
        let config = Config::default().write_timeout(timeout);
        let (tx, rx) = client_with_config(addr, &config).await;
        let _peer = peer.await.unwrap();
        let mut events = forward_events(rx);
        let started = tokio::time::Instant::now();
        let receipt = tx
            .send_with_receipt(pattern(unbuffered(), 5), MessageType::Binary)
            .await
            .unwrap();
        assert!(is_not_open(receipt.await), "the receipt fails");
        assert!(started.elapsed() >= timeout);
        let mut seen = Vec::new();
        while let Some(event) = events.recv().await {
            seen.push(event);
        }
        assert!(
            matches!(
                seen.as_slice(),
                [Event::Open, Event::Error(Error::Io(e)), Event::Close { code: 1006, .. }]
                    if e.kind() == std::io::ErrorKind::TimedOut
            ),
            "{seen:?}"
        );
        assert!(is_not_open(tx.send_text("late").await));
    })
    .await;
}

/// A peer that answers only the latest of two pings (RFC 6455 §5.5.3 allows it): the one
/// pong answers both receipts, not only its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pong_for_the_latest_ping_answers_the_earlier_ones_too() {
    bounded(60, async {
        let (tx, rx, mut peer) = hand_driven_peer().await;
        let _events = forward_events(rx);
        let first = tx.ping("one").await.unwrap();
        let second = tx.ping("two").await.unwrap();
        // Both pings written (so both wait for a pong: `ping` returns once the ping is
        // queued, and a pong read before "two" is applied would be unsolicited, as it was
        // once under CI's load). The peer has read neither; its pong answers the latest.
        tx.flush().await.unwrap();
        peer.send(TMessage::Pong("two".into())).await.unwrap();
        let (first, second) = tokio::join!(first, second);
        first.unwrap();
        second.unwrap();
        tx.close_connection(1000, "").await.unwrap();
    })
    .await;
}

// ----- flush and control frames, sends that wait for a slot -----

/// Whether the peer's socket holds any byte now (a non-blocking `recv(MSG_PEEK)`).
fn peer_has_bytes(peer: &Peer) -> bool {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    match socket2::SockRef::from(peer.get_ref()).peek(&mut buf) {
        Ok(n) => n > 0,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("peek: {e}"),
    }
}

/// `flush` waits for a queued ping, close or message to be written: each reached the
/// peer's socket when it returns (a control frame counted nothing, and `flush` returned
/// while it was still in the command channel). One thread, so the connection task runs
/// only while the test awaits.
async fn flush_waits_for(send: impl AsyncFnOnce(&WsSender)) {
    let (tx, rx, peer) = hand_driven_peer().await;
    let _events = forward_events(rx);
    // The task settles: Open handed out, nothing left to write.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!peer_has_bytes(&peer));
    send(&tx).await;
    tx.flush().await.unwrap();
    // The kernel's moment, without yielding to the connection task.
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        peer_has_bytes(&peer),
        "flush returned before the frame was written"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn flush_waits_for_a_queued_ping_a_close_and_a_message() {
    bounded(30, async {
        flush_waits_for(async |tx| drop(tx.ping("two").await.unwrap())).await;
        flush_waits_for(async |tx| tx.send_pong("").await.unwrap()).await;
        flush_waits_for(async |tx| tx.close_connection(1000, "bye").await.unwrap()).await;
        flush_waits_for(async |tx| tx.send_text("two").await.unwrap()).await;
    })
    .await;
}

/// A send that waited for a channel slot while the task read the peer's close fails (it
/// was accepted, then dropped unsent, and a `flush` after it waited for the task's end and
/// then reported success); the messages queued before the close was read go out, and
/// `flush` says so at once.
#[tokio::test(flavor = "current_thread")]
async fn a_send_that_waited_for_a_slot_past_the_peers_close_fails_and_so_does_flush() {
    bounded(30, async {
        let (tx, mut rx, mut peer) = hand_driven_peer().await;
        assert!(matches!(rx.next().await, Some(Event::Open)));
        // The peer closes; the task parses it once the receiver asks.
        peer.close(None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(rx.poll_event(&mut cx).is_pending());
        // The app fills the command channel without yielding; the next send waits for a
        // slot, during which the task reads the close.
        for i in 0..64 {
            tx.send_text(format!("m{i}")).await.unwrap();
        }
        let late = tx.send_text("late").await;
        let state = tx.ready_state();
        assert!(
            late.is_err() || state == ReadyState::Open,
            "send returned {late:?} with the connection already {state:?}"
        );
        let flushed = tokio::time::timeout(Duration::from_secs(3), tx.flush()).await;
        assert!(matches!(flushed, Ok(Ok(()))), "flush: {flushed:?}");
        let mut got = Vec::new();
        while let Some(Ok(message)) = peer.next().await {
            match message {
                TMessage::Text(t) => got.push(t.to_string()),
                TMessage::Close(_) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        let sent: Vec<String> = (0..64).map(|i| format!("m{i}")).collect();
        assert_eq!(got, sent, "every message accepted went out, and only those");
    })
    .await;
}

// ----- review of the split API -----

/// `Config::handshake_timeout` bounds the opening handshake, a refused one too: a peer
/// that sends an upgrade request the server refuses (here: no `Upgrade` header) and then
/// reads nothing must not hold `accept_with` past the timeout while the refusal waits to be
/// written. (A duplex pipe with a small buffer stands for a transport whose buffers are
/// full; over TCP the same happens with a refusal body larger than the socket buffers.)
#[tokio::test(start_paused = true)]
async fn a_refusal_to_a_peer_that_reads_nothing_ends_at_the_handshake_timeout() {
    let (near, mut far) = tokio::io::duplex(64);
    far.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let config = Config::default().handshake_timeout(Duration::from_secs(3));
    let options = Options::default();
    let accepting = accept_with(near, &options, &config, |_| Ok(()));
    let result = tokio::time::timeout(Duration::from_secs(60), accepting).await;
    assert!(
        result.is_ok(),
        "accept_with still running 60 s in, with a handshake timeout of 3 s"
    );
    drop(far);
}
