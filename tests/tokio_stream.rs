//! The inline `WebSocketStream` (`--features tokio`): interop with tokio-tungstenite in
//! both directions, the `Stream`/`Sink` impls, protocol errors answered before the stream
//! ends, backpressure (sends wait, and reading stops while a non-reading peer's pongs
//! pile up), and cancellation safety of `next` and `send`. The cancellation and
//! backpressure tests run over an in-memory duplex pipe on a current-thread runtime,
//! dropping futures after a single poll (`now_or_never`): deterministic, no clocks.
#![cfg(feature = "tokio")]

mod adapter_support;
mod common;

use std::borrow::Cow;
use std::net::SocketAddr;

use adapter_support::{
    assert_protocol_error_then_close, bounded, close_frame, echoes, pattern, pings_on_request,
    pong_answers, read_head, serve_each, serve_one, tungstenite_client,
    tungstenite_sees_server_close, tungstenite_server,
};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, duplex};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as TMessage;
use websocket_driver::protocol::frame::header_len;
use websocket_driver::tokio::{Config, WebSocketStream};
use websocket_driver::{
    Driver, Error, Event, HandshakeError, Message, Options, ReadyState, UsageError,
};

/// The message an event carries (anything else fails the test).
fn message(event: Event<'static>) -> Message<'static> {
    match event {
        Event::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// A client driver for `url`, started, its upgrade request written to `io`.
async fn send_client_request<W: AsyncWrite + Unpin>(io: &mut W, url: &str) -> Driver {
    let mut client = Driver::make_client(url, &Options::default()).unwrap();
    client.start_connection();
    io.write_all(&common::take_output(&mut client))
        .await
        .unwrap();
    client
}

/// Echo on the inline stream. `close:CODE` makes the server close with that code; `ping`
/// makes it ping the client with payload "srv".
async fn echo(mut ws: WebSocketStream<TcpStream>) -> Option<(u16, String)> {
    let mut close = None;
    while let Some(event) = ws.next().await {
        match event {
            Event::Message(Message::Text(t)) if t.starts_with("close:") => {
                let code: u16 = t[6..].parse().unwrap();
                ws.close_connection(code, "server says bye").await.unwrap();
            }
            Event::Message(Message::Text(t)) if t == "ping" => ws.send_ping("srv").await.unwrap(),
            Event::Message(m) => ws.send_message(m).await.unwrap(),
            Event::Close { code, reason } => close = Some((code, reason)),
            _ => {}
        }
    }
    close
}

/// Message sizes around the receive low-water mark (128 KiB still to come), each followed
/// by a small one that a mark left raised would hold back.
const AROUND_THE_MARK: [usize; 6] = [200_000, 1, 131_072 + 65_536, 1, 131_071 + 65_536, 1];

/// A stream echo server on an ephemeral port, with the receive low-water mark
/// (`with_recv_low_water`: a mark left raised would hold back the message after a large
/// one); each connection's close code and reason come out of the channel.
async fn stream_server() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(u16, String)>,
) {
    let (closes_tx, closes) = tokio::sync::mpsc::unbounded_channel();
    let addr = serve_each(move |tcp| {
        let closes = closes_tx.clone();
        async move {
            let ws = WebSocketStream::accept(tcp, &Options::default())
                .await
                .unwrap()
                .with_recv_low_water();
            if let Some(close) = echo(ws).await {
                let _ = closes.send(close);
            }
        }
    })
    .await;
    (addr, closes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tungstenite_client_against_stream_server() {
    bounded(60, async {
        let (addr, mut closes) = stream_server().await;
        let mut ws = tungstenite_client(addr, "/").await;
        let sizes = [0, 1, 125, 126, 65_535, 65_536, 1 << 20, 16 << 20];
        for (i, len) in sizes.into_iter().chain(AROUND_THE_MARK).enumerate() {
            echoes(&mut ws, TMessage::Binary(pattern(len, i).into())).await;
        }
        echoes(&mut ws, TMessage::Text("héllo €".into())).await;
        // The driver answers pings; the server pings on request.
        pong_answers(&mut ws, b"p1").await;
        pings_on_request(&mut ws).await;
        // The client closes; the stream answers and reports the code.
        ws.close(close_frame(4001, "client done")).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
        assert_eq!(closes.recv().await.unwrap(), (4001, "client done".into()));

        // Server-initiated close.
        tungstenite_sees_server_close(addr, 4002).await;
        assert_eq!(closes.recv().await.unwrap().0, 4002);
    })
    .await;
}

/// A server that refuses the upgrade with a body in two parts after its head, then
/// closes: the client's error carries the whole body, not what came with the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_client_reports_a_refusals_body_that_came_after_its_head() {
    bounded(60, async {
        let (addr, _server) = serve_one(|mut s| async move {
            read_head(&mut s).await;
            s.set_nodelay(true).unwrap();
            for part in [
                "HTTP/1.1 401 Unauthorized\r\n\r\n",
                "token expired, ",
                "renew",
            ] {
                s.write_all(part.as_bytes()).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await;
        let Err(err) =
            WebSocketStream::connect(&format!("ws://{addr}/"), &Options::default()).await
        else {
            panic!("a refused upgrade connected");
        };
        assert!(
            matches!(&err, Error::Handshake(HandshakeError::UnexpectedStatus { status: 401, body })
                if body == "token expired, renew"),
            "{err:?}"
        );
    })
    .await;
}

/// The stream as a client, through the `Stream` and `Sink` impls: a burst queued with
/// `feed` goes out on `flush`, the echoes come back in order, `close` starts the close
/// handshake and the stream ends after the `Close` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_client_with_sink_and_stream() {
    bounded(60, async {
        let addr = tungstenite_server().await;
        let mut ws = WebSocketStream::connect(&format!("ws://{addr}/"), &Options::default())
            .await
            .unwrap();
        assert!(matches!(ws.next().await.unwrap(), Event::Open));
        for i in 0..100 {
            let message = if i % 2 == 0 {
                Message::Text(format!("m{i}").into())
            } else {
                Message::Binary(pattern(i * 100, i).into())
            };
            ws.feed(message).await.unwrap();
        }
        assert!(ws.buffered_amount() > 0, "feed queues without writing");
        SinkExt::<Message<'_>>::flush(&mut ws).await.unwrap();
        assert_eq!(ws.buffered_amount(), 0);
        for i in 0..100 {
            let expected = if i % 2 == 0 {
                Message::Text(format!("m{i}").into())
            } else {
                Message::Binary(pattern(i * 100, i).into())
            };
            match StreamExt::next(&mut ws).await.unwrap() {
                Event::Message(m) => assert_eq!(m, expected, "echo {i}"),
                other => panic!("unexpected {other:?}"),
            }
        }
        // `connect` sets the receive low-water mark: large messages (1 MiB is more than
        // the socket has queued when its first part is read), then those around the mark,
        // each followed by a small one.
        let large = [1 << 20, 1, 4 << 20, 7];
        for (i, len) in large.into_iter().chain(AROUND_THE_MARK).enumerate() {
            let sent = pattern(len, i);
            ws.send_binary(&sent).await.unwrap();
            match StreamExt::next(&mut ws).await.unwrap() {
                Event::Message(Message::Binary(echo)) => assert!(echo == sent, "echo of {len}"),
                other => panic!("unexpected {other:?}"),
            }
        }
        SinkExt::<Message<'_>>::close(&mut ws).await.unwrap();
        assert_eq!(ws.ready_state(), ReadyState::Closing);
        assert!(matches!(
            ws.send_text("late").await,
            Err(Error::Usage(UsageError::NotOpen))
        ));
        match ws.next().await.unwrap() {
            Event::Close { code, .. } => assert_eq!(code, 1000),
            other => panic!("expected the close, got {other:?}"),
        }
        assert!(ws.next().await.is_none());
        assert!(futures_util::stream::FusedStream::is_terminated(&ws));
    })
    .await;
}

/// A frame the server must refuse (unmasked): the stream reports the error, then the
/// close, and the close frame with 1002 reaches the peer, followed by the end of TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_error_close_frame_reaches_the_peer() {
    bounded(30, async {
        let (addr, server) = serve_one(|tcp| async move {
            let mut ws = WebSocketStream::accept(tcp, &Options::default())
                .await
                .unwrap();
            let mut events = Vec::new();
            while let Some(event) = ws.next().await {
                events.push(event);
            }
            events
        })
        .await;
        let mut raw = TcpStream::connect(addr).await.unwrap();
        let mut client = send_client_request(&mut raw, &format!("ws://{addr}/")).await;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        let mut opened = false;
        let mut close = None;
        // An unmasked text frame from a client.
        let mut sent_bad = false;
        while close.is_none() {
            let n = raw.read(&mut buf).await.unwrap();
            assert!(n > 0, "EOF before the close frame");
            got.extend_from_slice(&buf[..n]);
            let mut at = 0;
            loop {
                let (used, event) = client.poll_event(&mut got[at..]);
                at += used;
                match event {
                    Some(Event::Open) => opened = true,
                    Some(Event::Close { code, .. }) => close = Some(code),
                    Some(_) => {}
                    None => break,
                }
            }
            got.drain(..at);
            if opened && !sent_bad {
                raw.write_all(b"\x81\x02hi").await.unwrap();
                sent_bad = true;
            }
        }
        assert_eq!(close, Some(1002));
        // The server closes TCP first.
        while raw.read(&mut buf).await.unwrap() > 0 {}
        drop(raw);
        assert_protocol_error_then_close(&server.await.unwrap());
    })
    .await;
}

// ----- over a duplex pipe, deterministic -----

/// A server stream on one end of an in-memory pipe of `capacity` bytes each way (its
/// `Open` taken), and a hand-driven client driver (already open) on the other.
async fn piped(capacity: usize, config: &Config) -> (WebSocketStream<DuplexStream>, Peer) {
    piped_with(capacity, &Options::default(), config).await
}

async fn piped_with(
    capacity: usize,
    options: &Options,
    config: &Config,
) -> (WebSocketStream<DuplexStream>, Peer) {
    let (server_end, mut client_end) = duplex(capacity);
    let client = send_client_request(&mut client_end, "ws://pipe/").await;
    let ws = WebSocketStream::accept_with(server_end, options, config, |_| Ok(()))
        .await
        .unwrap();
    let mut ws = ws;
    assert!(matches!(ws.next().await, Some(Event::Open)));
    let mut peer = Peer {
        io: client_end,
        driver: client,
        input: Vec::new(),
    };
    assert!(matches!(peer.next_event().await, Event::Open));
    (ws, peer)
}

/// The client end of a pipe, driven by hand.
struct Peer {
    io: DuplexStream,
    driver: Driver,
    input: Vec<u8>,
}

impl Peer {
    /// The next event from the server, reading as needed.
    async fn next_event(&mut self) -> Event<'static> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (used, event) = self.driver.poll_event(&mut self.input);
            let event = event.map(|e| match e {
                Event::Message(m) => Event::Message(m.into_owned()),
                Event::Ping(p) => Event::Ping(p.into_owned().into()),
                Event::Pong(p) => Event::Pong(p.into_owned().into()),
                Event::Open => Event::Open,
                Event::Error(e) => Event::Error(e),
                Event::Close { code, reason } => Event::Close { code, reason },
            });
            self.input.drain(..used);
            if let Some(event) = event {
                return event;
            }
            let n = self.io.read(&mut buf).await.unwrap();
            if n == 0 {
                self.driver.receive_eof();
            }
            self.input.extend_from_slice(&buf[..n]);
        }
    }

    /// Queues a message on the client driver: text of `len` characters cycling through
    /// `text`, or where that is `None` the binary `pattern(len, seed)`. Returns the message
    /// the server should get.
    fn queue_message(
        &mut self,
        text: Option<[char; 3]>,
        len: usize,
        seed: usize,
    ) -> Message<'static> {
        match text {
            Some(chars) => {
                let text: String = (0..len).map(|k| chars[k % 3]).collect();
                self.driver.send_text(&text).unwrap();
                Message::Text(text.into())
            }
            None => {
                self.driver.send_binary(&pattern(len, seed)).unwrap();
                Message::Binary(pattern(len, seed).into())
            }
        }
    }

    /// Writes the frames the client driver has queued.
    async fn send_queued(&mut self) {
        let out = common::take_output(&mut self.driver);
        self.io.write_all(&out).await.unwrap();
    }

    /// Writes the frames the client driver has queued on a task of its own, `chunk` bytes
    /// at a time (`usize::MAX`: all at once), yielding after each, and hands the peer back
    /// when done.
    fn spawn_writer(mut self, chunk: usize) -> JoinHandle<Peer> {
        let wire = common::take_output(&mut self.driver);
        tokio::spawn(async move {
            for piece in wire.chunks(chunk) {
                self.io.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            self
        })
    }
}

/// Drops `next()` after every single poll while the peer writes its frames a few bytes at
/// a time: each dropped future is a cancellation at a different point of a frame, and
/// every message still comes out once, whole and in order.
#[tokio::test(flavor = "current_thread")]
async fn next_is_cancel_safe() {
    bounded(60, async {
        let (mut ws, mut peer) = piped(1024, &Config::default()).await;
        let sizes = [0, 1, 7, 125, 126, 1000, 65_535, 65_536, 200_000];
        let mut expected = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let text = (i % 3 == 0).then_some(['a', 'é', '€']);
            expected.push(peer.queue_message(text, len, i));
            peer.driver.send_ping(format!("p{i}").as_bytes()).unwrap();
        }
        // 7 bytes at a time: frame headers and payloads split everywhere.
        let writer = peer.spawn_writer(7);
        let mut messages = Vec::new();
        let mut pings = 0;
        let mut cancelled = 0;
        while messages.len() < expected.len() || pings < sizes.len() {
            match ws.next().now_or_never() {
                Some(Some(Event::Message(m))) => messages.push(m),
                Some(Some(Event::Ping(p))) => {
                    assert_eq!(&p[..], format!("p{pings}").as_bytes());
                    pings += 1;
                }
                Some(Some(Event::Open)) => {}
                Some(other) => panic!("unexpected {other:?}"),
                None => {
                    cancelled += 1;
                    tokio::task::yield_now().await;
                }
            }
        }
        assert!(cancelled > 100, "only {cancelled} cancellations");
        assert_eq!(messages.len(), expected.len());
        for (i, (got, want)) in messages.iter().zip(&expected).enumerate() {
            assert!(got == want, "message {i} differs");
        }
        // The pongs went out in order, and the connection still works both ways.
        let mut peer = writer.await.unwrap();
        for i in 0..sizes.len() {
            loop {
                // The stream writes its pongs when polled; the peer reads them.
                let _ = ws.next().now_or_never();
                if let Some(event) = peer.next_event().now_or_never() {
                    assert!(
                        matches!(&event, Event::Pong(p) if p[..] == *format!("p{i}").as_bytes()),
                        "{event:?}"
                    );
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        ws.send_text("still here").await.unwrap();
        assert_eq!(
            message(peer.next_event().await),
            Message::Text("still here".into())
        );
    })
    .await;
}

/// `recv` lends events out of the read buffer, under the same cancellation as `next`
/// (dropped after every poll while the peer trickles its frames); its `Reply` queues
/// answers that the next `recv` writes. Binary messages whose frame fits the read buffer
/// are borrowed, not copied, however they were cut.
#[tokio::test(flavor = "current_thread")]
async fn recv_lends_events_and_is_cancel_safe() {
    bounded(60, async {
        let (mut ws, mut peer) = piped(1024, &Config::default()).await;
        let sizes = [1, 7, 125, 126, 1000, 65_536, 200_000];
        let mut expected = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let text = (i % 2 == 0).then_some(['x', 'ß', '€']);
            expected.push(peer.queue_message(text, len, i));
        }
        let writer = peer.spawn_writer(5);
        let mut got = 0;
        let mut cancelled = 0;
        while got < expected.len() {
            let received = ws.recv().now_or_never();
            let Some(received) = received else {
                cancelled += 1;
                tokio::task::yield_now().await;
                continue;
            };
            let (event, mut reply) = received.expect("the connection is open");
            match event {
                Event::Message(m) => {
                    assert!(m == expected[got], "message {got} differs");
                    // A binary frame up to twice the read buffer's size is read whole
                    // before it is parsed, so it is lent however it was cut (text is
                    // checked as it arrives; a larger frame arrives in its message's own
                    // buffer).
                    let fits = sizes[got] + 14 <= 2 * 64 * 1024;
                    assert!(
                        m.is_text() || !fits || matches!(m, Message::Binary(Cow::Borrowed(_))),
                        "message {got} was copied"
                    );
                    reply.send_message(&m).unwrap();
                    got += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(cancelled > 100, "only {cancelled} cancellations");
        // The echoes come back whole and in order (the stream writes them as it is polled).
        let mut peer = writer.await.unwrap();
        for (i, want) in expected.iter().enumerate() {
            let event = loop {
                let _ = ws.recv().now_or_never();
                if let Some(event) = peer.next_event().now_or_never() {
                    break event;
                }
                tokio::task::yield_now().await;
            };
            assert!(matches!(&event, Event::Message(m) if m == want), "echo {i}");
        }

        // A message that arrives in one read is lent from the read buffer, not copied.
        peer.driver.send_binary(&pattern(300, 9)).unwrap();
        peer.driver.send_ping(b"lent").unwrap();
        peer.send_queued().await;
        let (event, _) = ws.recv().await.unwrap();
        assert!(
            matches!(event, Event::Message(Message::Binary(Cow::Borrowed(b))) if b == &pattern(300, 9)[..]),
            "{event:?}"
        );
        let (event, _) = ws.recv().await.unwrap();
        assert!(
            matches!(event, Event::Ping(Cow::Borrowed(b"lent"))),
            "{event:?}"
        );
        // Closing: the reply refuses once the connection is closing.
        ws.close_connection(1000, "").await.unwrap();
        peer.driver.send_text("after our close").unwrap();
        peer.send_queued().await;
        let (event, mut reply) = ws.recv().await.unwrap();
        assert!(matches!(event, Event::Message(_)), "{event:?}");
        assert!(matches!(
            reply.send_text("no"),
            Err(Error::Usage(UsageError::NotOpen))
        ));
    })
    .await;
}

/// A frame over twice the read buffer's size (`recv`) or over its size (`next`) is not
/// read into it whole: the rest of its payload is received straight into the message's own
/// buffer, which is handed out as it is (owned, not a copy). `recv` lends a frame up to
/// twice the buffer's size from the buffer grown for it. Text too, checked as it arrives.
/// Either way the bytes are right.
#[tokio::test(flavor = "current_thread")]
async fn frames_larger_than_the_read_buffer_arrive_in_their_own_buffer() {
    bounded(60, async {
        let config = Config::default().read_buffer_size(1024);
        for borrow in [true, false] {
            let (mut ws, mut peer) = piped(4096, &config).await;
            let sizes = [50_000, 1000, 150_000, 2040, 2041, 70_000];
            let mut expected = Vec::new();
            for (i, &len) in sizes.iter().enumerate() {
                let text = (i == 5).then_some(['x', 'ß', '€']);
                expected.push(peer.queue_message(text, len, i));
            }
            let writer = peer.spawn_writer(3000);
            for (i, &len) in sizes.iter().enumerate() {
                let m = if borrow {
                    let (event, _) = ws.recv().await.unwrap();
                    match event {
                        Event::Message(m) => {
                            // 2040 bytes and an 8-byte header fill twice the 1024-byte
                            // buffer exactly; one byte more does not fit.
                            assert_eq!(
                                matches!(m, Message::Binary(Cow::Borrowed(_))),
                                len + 8 <= 2048,
                                "message {i} of {len} bytes"
                            );
                            m.into_owned()
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                } else {
                    message(ws.next().await.unwrap())
                };
                assert!(m == expected[i], "message {i} of {len} bytes ({borrow})");
            }
            writer.await.unwrap();
        }
    })
    .await;
}

/// The stream reads a frame whole before parsing it only up to what the driver accepts:
/// one over `max_length` fails the connection (1009) as soon as its header is in, without
/// waiting for a payload that fits the read buffer; one at the limit comes out.
#[tokio::test(flavor = "current_thread")]
async fn a_frame_over_max_length_fails_at_its_header() {
    bounded(60, async {
        let options = Options::default().max_length(100);
        for (len, fails) in [(100, false), (101, true)] {
            let (mut ws, mut peer) = piped_with(4096, &options, &Config::default()).await;
            peer.driver.send_binary(&pattern(len, 3)).unwrap();
            let wire = common::take_output(&mut peer.driver);
            // Only the header of the frame over the limit: one read whole would wait for
            // the payload.
            let cut = if fails { 2 + 4 } else { wire.len() };
            peer.io.write_all(&wire[..cut]).await.unwrap();
            let event = ws.next().await.unwrap();
            if fails {
                assert!(
                    matches!(&event, Event::Error(Error::Protocol(e)) if e.close_code() == 1009),
                    "{event:?}"
                );
            } else {
                assert!(
                    matches!(&event, Event::Message(Message::Binary(b)) if b[..] == pattern(len, 3)[..]),
                    "{event:?}"
                );
            }
        }
    })
    .await;
}

/// A large message with nothing queued before it is written straight from the caller's
/// payload; what the transport does not take yet is kept and still goes out before
/// anything queued after it (a pong, the next message).
#[tokio::test(flavor = "current_thread")]
async fn large_sends_written_around_the_driver_keep_frame_order() {
    bounded(60, async {
        let (mut ws, mut peer) = piped(16 * 1024, &Config::default()).await;
        ws.send_binary(pattern(100_000, 1)).await.unwrap();
        // The pipe took 16 KiB of the frame (header: 10 bytes).
        assert_eq!(ws.buffered_amount(), 100_010 - 16 * 1024);
        peer.driver.send_ping(b"p").unwrap();
        peer.send_queued().await;
        assert!(matches!(ws.next().await.unwrap(), Event::Ping(p) if &p[..] == b"p"));
        ws.send_text("after").await.unwrap();
        let reader = async {
            let events = [
                peer.next_event().await,
                peer.next_event().await,
                peer.next_event().await,
            ];
            (events, peer)
        };
        let (flushed, (events, _peer)) = tokio::join!(ws.flush(), reader);
        flushed.unwrap();
        assert!(
            matches!(&events[0], Event::Message(Message::Binary(b)) if b[..] == pattern(100_000, 1)[..]),
            "the large message first, whole"
        );
        assert!(matches!(&events[1], Event::Pong(p) if &p[..] == b"p"), "then the pong");
        assert_eq!(message(events.into_iter().nth(2).unwrap()), Message::Text("after".into()));
        assert_eq!(ws.buffered_amount(), 0);
    })
    .await;
}

/// Against a peer that does not read: a send admitted under the limit queues its whole
/// frame at once; the next one waits, and dropped while waiting it queues nothing. When
/// the peer reads, it gets exactly the completed sends, whole and in order.
#[tokio::test(flavor = "current_thread")]
async fn send_is_cancel_safe() {
    const SIZE: usize = 256 * 1024;
    bounded(60, async {
        let config = Config::default().max_backpressure(16 * 1024);
        let (mut ws, mut peer) = piped(64 * 1024, &config).await;
        // Under the limit: completes at once, with the frame queued whole (the pipe takes
        // 64 KiB of it).
        ws.send_binary(pattern(SIZE, 1))
            .now_or_never()
            .expect("a send under the limit completes at once")
            .unwrap();
        let buffered = ws.buffered_amount();
        assert!(buffered > 16 * 1024, "{buffered}");
        // Over the limit: pending; dropped after each poll, it queues nothing, however
        // many times it is tried.
        for _ in 0..10 {
            assert!(ws.send_binary(pattern(SIZE, 2)).now_or_never().is_none());
            assert!(ws.send_text("nor this").now_or_never().is_none());
            assert_eq!(ws.buffered_amount(), buffered);
            tokio::task::yield_now().await;
        }
        // A send waiting in a select! that another branch wins is cancelled the same way.
        tokio::select! {
            biased;
            _ = std::future::ready(()) => {}
            _ = ws.send_binary(pattern(SIZE, 3)) => panic!("sent over the limit"),
        }
        assert_eq!(ws.buffered_amount(), buffered);

        // The peer reads; the stream writes while it is polled (a third send waits for
        // room, then goes out after the first).
        let third = async {
            ws.send_binary(pattern(100, 4)).await.unwrap();
            ws.flush().await.unwrap();
            ws
        };
        let reader = async {
            let first = peer.next_event().await;
            let second = peer.next_event().await;
            (first, second, peer)
        };
        let (mut ws, (first, second, mut peer)) = tokio::join!(third, reader);
        assert_eq!(message(first), Message::Binary(pattern(SIZE, 1).into()));
        assert_eq!(message(second), Message::Binary(pattern(100, 4).into()));
        assert_eq!(ws.buffered_amount(), 0);

        // Both ways still work.
        peer.driver.send_text("from the peer").unwrap();
        peer.send_queued().await;
        assert_eq!(
            message(ws.next().await.unwrap()),
            Message::Text("from the peer".into())
        );
    })
    .await;
}

/// A peer that floods pings and never reads: the stream answers while the pongs fit under
/// the limit, then stops reading (the peer's writes block on the full pipe) instead of
/// buffering pongs without end.
#[tokio::test(flavor = "current_thread")]
async fn reading_stops_while_unread_output_is_over_the_limit() {
    const LIMIT: usize = 4 * 1024;
    bounded(60, async {
        let config = Config::default().max_backpressure(LIMIT);
        let (mut ws, mut peer) = piped(8 * 1024, &config).await;
        let pings = 10_000;
        for i in 0..pings {
            peer.driver.send_ping(&pattern(100, i)).unwrap();
        }
        let writer = peer.spawn_writer(usize::MAX);
        let mut seen = 0;
        let mut idle = 0;
        // Poll until nothing moves any more (the writer blocked, the stream over the
        // limit): 1000 rounds without an event.
        while idle < 1000 {
            match ws.next().now_or_never() {
                Some(Some(Event::Ping(_))) => {
                    seen += 1;
                    idle = 0;
                }
                Some(other) => panic!("unexpected {other:?}"),
                None => idle += 1,
            }
            tokio::task::yield_now().await;
        }
        assert!(!writer.is_finished(), "the peer's writes are held back");
        assert!(seen < pings, "every ping was read ({seen})");
        // One parse past the limit at most: a pong is 102 bytes.
        assert!(
            ws.buffered_amount() <= LIMIT + 102,
            "{} bytes of pongs buffered",
            ws.buffered_amount()
        );
        writer.abort();
    })
    .await;
}

/// A stream handed a client driver that is still connecting runs the handshake itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_driver_runs_a_client_handshake() {
    bounded(30, async {
        let addr = tungstenite_server().await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut driver =
            Driver::make_client(&format!("ws://{addr}/"), &Options::default()).unwrap();
        driver.start_connection();
        let mut ws = WebSocketStream::from_driver(tcp, driver, &[], &Config::default());
        assert_eq!(ws.ready_state(), ReadyState::Connecting);
        ws.send_text("queued while connecting").await.unwrap();
        assert!(matches!(ws.next().await.unwrap(), Event::Open));
        assert_eq!(
            message(ws.next().await.unwrap()),
            Message::Text("queued while connecting".into())
        );
        ws.close_connection(1000, "").await.unwrap();
        assert!(matches!(
            ws.next().await.unwrap(),
            Event::Close { code: 1000, .. }
        ));
        assert!(ws.next().await.is_none());
    })
    .await;
}

/// Sends over the limit while a handed-over client driver is still connecting wait for
/// the handshake, which the waiting send reads itself (nothing else can while it holds
/// the stream): they complete once the server's 101 arrives, and `Open` still comes out
/// of `next` first. Run on a thread of its own, so a send that spins instead of waiting
/// fails the test rather than hanging it.
#[test]
fn sends_over_the_limit_while_connecting_wait_for_the_handshake() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let addr = tungstenite_server().await;
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut driver =
                Driver::make_client(&format!("ws://{addr}/"), &Options::default()).unwrap();
            driver.start_connection();
            let config = Config::default().max_backpressure(1024);
            let mut ws = WebSocketStream::from_driver(tcp, driver, &[], &config);
            for i in 0..3u8 {
                ws.send_binary(vec![i; 1000]).await.unwrap();
            }
            assert!(matches!(ws.next().await.unwrap(), Event::Open));
            for i in 0..3u8 {
                assert_eq!(
                    message(ws.next().await.unwrap()),
                    Message::Binary(vec![i; 1000].into())
                );
            }
            ws.close_connection(1000, "").await.unwrap();
            while ws.next().await.is_some() {}
        });
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the sends neither completed nor failed within 20 s");
}

/// The split API runs on the stream: `spawn` hands the connection to a task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_moves_the_stream_onto_the_split_api() {
    bounded(30, async {
        let (addr, mut closes) = stream_server().await;
        let ws = WebSocketStream::connect(&format!("ws://{addr}/"), &Options::default())
            .await
            .unwrap();
        let (tx, mut rx) = ws.spawn();
        assert!(matches!(rx.next().await.unwrap(), Event::Open));
        let sender = tx.clone();
        tokio::spawn(async move { sender.send_text("from another task").await.unwrap() });
        assert_eq!(
            message(rx.next().await.unwrap()),
            Message::Text("from another task".into())
        );
        tx.close_connection(1000, "bye").await.unwrap();
        while rx.next().await.is_some() {}
        assert_eq!(closes.recv().await.unwrap(), (1000, "bye".into()));
    })
    .await;
}

/// A transport error reaches the application as itself (`Error::Io` with its kind), after
/// the messages that arrived before it, then the close 1006 and the end of the stream.
#[tokio::test(flavor = "current_thread")]
async fn a_transport_error_is_reported_as_itself_after_earlier_messages() {
    let (mut client, server) = common::open_pair(&Options::default(), &Options::default());
    client.send_text("before the reset").unwrap();
    let input = common::take_output(&mut client);
    let mut ws =
        WebSocketStream::from_driver(Recording::resetting(input), server, &[], &Config::default());
    assert_eq!(
        message(ws.next().await.unwrap()),
        Message::Text(Cow::Borrowed("before the reset"))
    );
    match ws.next().await.unwrap() {
        Event::Error(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        other => panic!("expected the reset, got {other:?}"),
    }
    assert!(matches!(
        ws.next().await.unwrap(),
        Event::Close { code: 1006, .. }
    ));
    assert!(ws.next().await.is_none());
}

/// A write that fails (the peer reset) does not throw away what was already read: the
/// peer's later message and its Close, which came in the same read, still come out, and
/// the stream ends.
#[tokio::test(flavor = "current_thread")]
async fn a_failed_write_keeps_the_input_already_read() {
    let (mut client, server) = common::open_pair(&Options::default(), &Options::default());
    client.send_text("one").unwrap();
    client.send_text("two").unwrap();
    client.close_connection(1000, "bye").unwrap();
    let input = common::take_output(&mut client);
    let transport = Recording {
        writes_fail: true,
        ..Recording::new(input)
    };
    let mut ws = WebSocketStream::from_driver(transport, server, &[], &Config::default());
    assert_eq!(
        message(ws.next().await.unwrap()),
        Message::Text(Cow::Borrowed("one"))
    );
    // Queued, and its write fails (here or at the next read).
    let _ = ws.send_text("echo").await;
    assert_eq!(
        message(ws.next().await.unwrap()),
        Message::Text(Cow::Borrowed("two"))
    );
    match ws.next().await.unwrap() {
        Event::Close { code, reason } => assert_eq!((code, &reason[..]), (1000, "bye")),
        other => panic!("expected the peer's close, got {other:?}"),
    }
    assert!(ws.next().await.is_none());
}

/// A transport that hands over `input` as fast as it is read, then has nothing more (reads
/// stay pending) or, `resetting`, fails every read with a reset; it takes every write
/// whole, recording each write's size and bytes in a log that outlives it (a stream handed
/// to a task keeps its transport).
struct Recording {
    input: Vec<u8>,
    reset_at_end: bool,
    /// Every write fails (`BrokenPipe`): the peer reset after sending `input`.
    writes_fail: bool,
    log: std::sync::Arc<std::sync::Mutex<Writes>>,
}

#[derive(Default)]
struct Writes {
    sizes: Vec<usize>,
    bytes: Vec<u8>,
}

impl Recording {
    fn new(input: Vec<u8>) -> Self {
        Recording {
            input,
            reset_at_end: false,
            writes_fail: false,
            log: Default::default(),
        }
    }

    fn resetting(input: Vec<u8>) -> Self {
        Recording {
            reset_at_end: true,
            ..Recording::new(input)
        }
    }

    /// The size of each write so far.
    fn writes(&self) -> Vec<usize> {
        self.log.lock().unwrap().sizes.clone()
    }

    /// Every byte written so far.
    fn written(&self) -> Vec<u8> {
        self.log.lock().unwrap().bytes.clone()
    }
}

impl tokio::io::AsyncRead for Recording {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.input.is_empty() && self.reset_at_end {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
        }
        if self.input.is_empty() {
            return std::task::Poll::Pending;
        }
        let n = self.input.len().min(buf.remaining());
        buf.put_slice(&self.input[..n]);
        self.input.drain(..n);
        std::task::Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Recording {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.writes_fail {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let mut log = self.log.lock().unwrap();
        log.sizes.push(buf.len());
        log.bytes.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.writes_fail {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let n = bufs.iter().map(|b| b.len()).sum();
        let mut log = self.log.lock().unwrap();
        log.sizes.push(n);
        for b in bufs {
            log.bytes.extend_from_slice(b);
        }
        std::task::Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The messages in `wire` as the client driver parses them.
fn client_messages(client: &mut Driver, wire: &mut [u8]) -> Vec<Message<'static>> {
    let mut got = Vec::new();
    let mut at = 0;
    loop {
        let (used, event) = client.poll_event(&mut wire[at..]);
        at += used;
        match event {
            Some(Event::Message(m)) => got.push(m.into_owned()),
            Some(other) => panic!("unexpected {other:?}"),
            None => return got,
        }
    }
}

/// A pipelining peer's burst, read at once, is answered with one write: `recv` hands out
/// the events already read before it writes what the replies queued, and writes it all
/// (in order) once the read buffer holds no more events.
#[tokio::test(flavor = "current_thread")]
async fn a_burst_read_at_once_is_answered_in_one_write() {
    let (mut client, server) = common::open_pair(&Options::default(), &Options::default());
    let sent: Vec<String> = (0..8)
        .map(|i| format!("message {i:02} of the burst"))
        .collect();
    for text in &sent {
        client.send_text(text).unwrap();
    }
    let input = common::take_output(&mut client);
    let mut ws =
        WebSocketStream::from_driver(Recording::new(input), server, &[], &Config::default());
    for text in &sent {
        let (event, mut reply) = ws.recv().await.unwrap();
        match event {
            Event::Message(m) => {
                assert_eq!(m.as_text(), Some(text.as_str()));
                reply.send_message(&m).unwrap();
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            ws.get_ref().writes().is_empty(),
            "written before the burst was handed out"
        );
    }
    // The read buffer is empty: this `recv` writes the eight echoes, then waits for input.
    assert!(ws.recv().now_or_never().is_none());
    let mut wire = ws.get_ref().written();
    assert_eq!(ws.get_ref().writes(), [wire.len()]);
    let echoed = client_messages(&mut client, &mut wire);
    let echoed: Vec<_> = echoed
        .iter()
        .map(|m| m.as_text().unwrap().to_string())
        .collect();
    assert_eq!(echoed, sent);
}

/// Text read through `recv` is lent as the driver checked it (borrowed, not copied), and a
/// whole text frame with bad UTF-8 gives the error with the close frame (1007) already
/// written when it comes out: a caller that stops at the error has still closed properly.
/// Then the close, then the end.
#[tokio::test(flavor = "current_thread")]
async fn recv_lends_checked_text_and_writes_the_close_for_bad_utf8_at_once() {
    let (mut client, server) = common::open_pair(&Options::default(), &Options::default());
    client.send_text("héllo, ok").unwrap();
    let mut input = common::take_output(&mut client);
    input.extend_from_slice(&common::client_frame(0x81, &[b'a', 0xff, b'b']));
    input.extend_from_slice(&common::client_frame(0x81, b"never read"));
    let mut ws =
        WebSocketStream::from_driver(Recording::new(input), server, &[], &Config::default());
    match ws.recv().await.unwrap().0 {
        Event::Message(Message::Text(Cow::Borrowed(text))) => assert_eq!(text, "héllo, ok"),
        other => panic!("expected borrowed text, got {other:?}"),
    }
    match ws.recv().await.unwrap().0 {
        Event::Error(Error::Protocol(e)) => {
            assert_eq!(e, websocket_driver::ProtocolError::InvalidUtf8)
        }
        other => panic!("expected the UTF-8 error, got {other:?}"),
    }
    let frames = common::parse_frames(&ws.get_ref().written());
    assert_eq!(frames.len(), 1, "only the close frame: {frames:?}");
    assert_eq!(frames[0].close_code(), Some(1007));
    match ws.recv().await.unwrap().0 {
        Event::Close { code, .. } => assert_eq!(code, 1007),
        other => panic!("expected the close, got {other:?}"),
    }
    assert!(ws.recv().await.is_none());
}

/// Answers a server stream to 100 questions of 20 B, read at once: each with 1 000 B of
/// text (under the size written straight from the payload, so it is queued), except the
/// 66th, which gets `last` bytes. Returns the index of the first event that came out
/// after a write, with that write's size, once every answer reached the client whole and
/// in order.
async fn first_write_with_answers(last: usize) -> (usize, usize) {
    let (mut client, server) = common::open_pair(&Options::default(), &Options::default());
    for i in 0..100 {
        client
            .send_text(&format!("question number {i:03}"))
            .unwrap();
    }
    let input = common::take_output(&mut client);
    let mut ws =
        WebSocketStream::from_driver(Recording::new(input), server, &[], &Config::default());
    let answers: Vec<String> = (0..100)
        .map(|i| "a".repeat(if i == 65 { last } else { 1000 }))
        .collect();
    let mut first_write = None;
    for (i, answer) in answers.iter().enumerate() {
        let (event, mut reply) = ws.recv().await.unwrap();
        assert!(matches!(event, Event::Message(_)), "{event:?}");
        reply.send_text(answer).unwrap();
        if first_write.is_none()
            && let Some(&n) = ws.get_ref().writes().first()
        {
            first_write = Some((i, n));
        }
    }
    assert!(ws.recv().now_or_never().is_none());
    let mut wire = ws.get_ref().written();
    let got = client_messages(&mut client, &mut wire);
    let got: Vec<_> = got.iter().map(|m| m.as_text().unwrap()).collect();
    assert_eq!(got, answers);
    first_write.expect("the answers were written")
}

/// Answers wait for the read buffer to run out only up to 64 KiB unwritten. 65 answers of
/// 1 004 B on the wire and one of 276 B make exactly 65 536 B: held, so the 67th event
/// still comes out unwritten, and the 68th after one write of all 67 answers. One byte
/// more (a 66th answer of 277 B on the wire) and the 67th event comes out after one write
/// of the 65 537 B before it.
#[tokio::test(flavor = "current_thread")]
async fn answers_wait_for_the_read_buffer_up_to_64_kib() {
    // A 272 B text frame from a server: 4 B of header (2 + 2 for a length over 125).
    assert_eq!(first_write_with_answers(272).await, (67, 65_536 + 1004));
    assert_eq!(first_write_with_answers(273).await, (66, 65_537));
}

/// The same with owned events: answers fed to the `Sink` (queued, not written) go out in
/// one write when `next` finds no more events read.
#[tokio::test(flavor = "current_thread")]
async fn answers_fed_between_nexts_go_out_in_one_write() {
    let (mut client, server) = common::open_pair(&Options::default(), &Options::default());
    for i in 0..8 {
        client.send_binary(&pattern(20, i)).unwrap();
    }
    let input = common::take_output(&mut client);
    let mut ws =
        WebSocketStream::from_driver(Recording::new(input), server, &[], &Config::default());
    for i in 0..8 {
        let m = message(ws.next().await.unwrap());
        assert_eq!(m, Message::Binary(pattern(20, i).into()));
        ws.feed(m).await.unwrap();
        assert!(
            ws.get_ref().writes().is_empty(),
            "written before the burst was handed out"
        );
    }
    assert!(ws.next().now_or_never().is_none());
    let mut wire = ws.get_ref().written();
    assert_eq!(ws.get_ref().writes(), [wire.len()]);
    let echoed = client_messages(&mut client, &mut wire);
    let want: Vec<Message<'static>> = (0..8)
        .map(|i| Message::Binary(pattern(20, i).into()))
        .collect();
    assert_eq!(echoed, want);
}

/// The split sender's byte limit holds against many senders at once: senders that passed
/// the limit's check while the command channel was full (64 small sends queued before the
/// connection task ran) still count against it when they get a slot, so a peer that reads
/// nothing holds at most one message over the limit, not one per sender.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_split_senders_stay_within_one_message_of_the_limit() {
    const LIMIT: usize = 100_000;
    const BIG: usize = 60_000;
    let (_client, server) = common::open_pair(&Options::default(), &Options::default());
    // The far end is kept and never read: nothing written drains.
    let (near, _far) = duplex(1024);
    let config = Config::default().max_backpressure(LIMIT);
    let ws = WebSocketStream::from_driver(near, server, &[], &config);
    let (tx, _rx) = ws.spawn();
    for _ in 0..64 {
        tx.send_binary(vec![0u8; 1]).await.unwrap();
    }
    // Each is polled once here, before the connection task runs: it finds the output
    // under the limit and waits for a slot in the full channel.
    let mut senders: futures_util::stream::FuturesUnordered<_> = (0..10u8)
        .map(|i| {
            let tx = tx.clone();
            async move { tx.send_binary(vec![i; BIG]).await }
        })
        .collect();
    assert!(senders.next().now_or_never().is_none());
    let mut sent = 0;
    let _ = tokio::time::timeout(std::time::Duration::from_millis(300), async {
        while let Some(result) = senders.next().await {
            result.unwrap();
            sent += 1;
        }
    })
    .await;
    let held = tx.buffered_amount();
    assert!(
        held <= LIMIT + BIG,
        "{held} bytes held for a peer that reads nothing (limit {LIMIT}, {sent} sent)"
    );
    assert!(sent >= 1, "no big message was accepted");
}

/// The byte limit holds against senders on other threads while the connection task hands
/// commands to the driver on its own: a sender reads the queued and buffered counts while
/// the task moves a command from one to the other, and must see it in at least one of
/// them (read the wrong way round, it could see it in neither and let a second message
/// past the limit). Repeated, since each round has one crossing of the limit to race on.
#[test]
fn split_senders_on_other_threads_stay_within_one_message_of_the_limit() {
    const LIMIT: usize = 8_000;
    const MESSAGE: usize = 1_000;
    const SENDERS: usize = 6;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..150 {
        runtime.block_on(async {
            let (_client, server) = common::open_pair(&Options::default(), &Options::default());
            // The far end is kept and never read: nothing written drains.
            let (near, _far) = duplex(1024);
            let config = Config::default().max_backpressure(LIMIT);
            let ws = WebSocketStream::from_driver(near, server, &[], &config);
            let (tx, _rx) = ws.spawn();
            let senders: Vec<_> = (0..SENDERS)
                .map(|_| {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        while tx.send_binary(vec![7u8; MESSAGE]).await.is_ok() {}
                    })
                })
                .collect();
            // Until the senders have taken the output past the limit.
            tokio::time::timeout(std::time::Duration::from_secs(20), async {
                while tx.buffered_amount() <= LIMIT {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("the senders reach the limit");
            // A send is queued whole or not at all, so aborting the waiting ones leaves
            // what was admitted; the task applies it and goes idle.
            for sender in &senders {
                sender.abort();
            }
            for sender in senders {
                let _ = sender.await;
            }
            // A reading taken while the task hands a command over may count it twice; an
            // admission past the limit shows in every reading.
            let mut held = usize::MAX;
            for _ in 0..5 {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                held = held.min(tx.buffered_amount());
            }
            // A queued message counts its payload, a buffered one its frame: the headers
            // (4 bytes each here) of every message admitted may come on top.
            let headers = 4 * (LIMIT / MESSAGE + 2);
            assert!(
                held <= LIMIT + MESSAGE + headers,
                "round {round}: {held} bytes held (limit {LIMIT}, messages of {MESSAGE})"
            );
        });
    }
}

/// Senders waiting on backpressure are released (with `NotOpen`) when the connection
/// task is dropped without ending itself: here its runtime shuts down under it.
#[tokio::test(flavor = "current_thread")]
async fn senders_waiting_on_a_dropped_connection_task_are_released() {
    let (give, take) = std::sync::mpsc::channel();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let owner = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (_client, server) = common::open_pair(&Options::default(), &Options::default());
        // The far end is never read: the output stays over the limit.
        let (near, far) = duplex(1024);
        let config = Config::default().max_backpressure(1000);
        let halves = runtime
            .block_on(async { WebSocketStream::from_driver(near, server, &[], &config).spawn() });
        give.send(halves).unwrap();
        // The task runs only while this runtime is driven.
        runtime.block_on(async {
            tokio::task::yield_now().await;
        });
        stopped.recv().unwrap();
        drop(runtime);
        drop(far);
    });
    let (tx, _rx) = take.recv().unwrap();
    tx.send_binary(vec![1u8; 2000]).await.unwrap();
    let waiting = tokio::spawn({
        let tx = tx.clone();
        async move { tx.send_binary(vec![2u8; 2000]).await }
    });
    tokio::task::yield_now().await;
    assert!(
        !waiting.is_finished(),
        "the second send waits over the limit"
    );
    stop.send(()).unwrap();
    owner.join().unwrap();
    let sent = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("the waiting send was released")
        .unwrap();
    assert!(
        matches!(sent, Err(Error::Usage(UsageError::NotOpen))),
        "{sent:?}"
    );
}

/// `Config::handshake_timeout` bounds the opening handshake on both sides, with paused
/// time: a server whose client sends half a request and then nothing gives up when the
/// timeout passes (not a tick before), and so does a client whose server never answers.
#[tokio::test(start_paused = true)]
async fn the_handshake_timeout_bounds_both_sides() {
    let timeout = std::time::Duration::from_secs(3);
    let config = Config::default().handshake_timeout(timeout);
    let options = Options::default();
    // A handshake that fails with a timeout exactly `timeout` after `started`.
    let timed_out = |result: Result<WebSocketStream<DuplexStream>, Error>, started| {
        let err = result.expect_err("the handshake times out");
        assert!(
            matches!(&err, Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut),
            "{err}"
        );
        assert_eq!(tokio::time::Instant::elapsed(&started), timeout);
    };
    // Server side: half a request.
    let (near, mut far) = duplex(4096);
    far.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    timed_out(
        WebSocketStream::accept_with(near, &options, &config, |_| Ok(())).await,
        started,
    );
    // Client side: a server that reads the request and never answers.
    let (near, _far) = duplex(4096);
    let started = tokio::time::Instant::now();
    timed_out(
        WebSocketStream::client_with(near, "ws://example.com/", &options, &config).await,
        started,
    );
    drop(far);
}

/// Queues `sent` through a split sender before its connection task runs (a current-thread
/// runtime: the task runs only when this one yields), then lets the task write them.
/// Returns the sizes of its writes, once every message reached the client whole and in
/// order.
async fn split_sender_writes(sent: &[String]) -> Vec<usize> {
    let (mut client, server) = common::open_pair(&Options::default(), &Options::default());
    let transport = Recording::new(Vec::new());
    let log = transport.log.clone();
    let ws = WebSocketStream::from_driver(transport, server, &[], &Config::default());
    let (tx, _rx) = ws.spawn();
    for text in sent {
        tx.send_text(text.as_str()).await.unwrap();
    }
    texts_written(&log, &mut client, sent).await
}

/// Lets the connection task behind `log` run until it has written a server frame for each
/// of `sent`; checks that `client` reads exactly those texts, whole and in order, and
/// returns the sizes of the writes.
async fn texts_written(
    log: &std::sync::Mutex<Writes>,
    client: &mut Driver,
    sent: &[String],
) -> Vec<usize> {
    let wire_len: usize = sent
        .iter()
        .map(|s| header_len(s.len() as u64, false) + s.len())
        .sum();
    for _ in 0..1000 {
        if log.lock().unwrap().bytes.len() >= wire_len {
            break;
        }
        tokio::task::yield_now().await;
    }
    let Writes { sizes, mut bytes } = std::mem::take(&mut *log.lock().unwrap());
    let got: Vec<String> = client_messages(client, &mut bytes)
        .iter()
        .map(|m| m.as_text().unwrap().to_string())
        .collect();
    assert_eq!(got, sent);
    sizes
}

/// Messages queued through the split sender while the connection task waits are written
/// together: the task takes the commands already queued before it writes, so 50 sends
/// made at once cost one write, not 50.
#[tokio::test(flavor = "current_thread")]
async fn sends_queued_at_once_through_the_split_sender_share_one_write() {
    let sent: Vec<String> = (0..50).map(|i| format!("queued message {i:02}")).collect();
    let writes = split_sender_writes(&sent).await;
    assert_eq!(writes.len(), 1, "write sizes: {writes:?}");
}

/// ... up to 256 KiB of output: of five queued messages of 100 000 B, the first write
/// takes three (the task stops taking commands once the output reaches 256 KiB, and
/// writes), the next the other two.
#[tokio::test(flavor = "current_thread")]
async fn the_split_sender_gathers_up_to_256_kib_per_write() {
    let sent: Vec<String> = (0..5u8)
        .map(|i| char::from(b'a' + i).to_string().repeat(100_000))
        .collect();
    let writes = split_sender_writes(&sent).await;
    assert_eq!(writes, [3 * 100_010, 2 * 100_010]);
}

/// A pipelining peer's burst, read at once, is echoed through the split API in one or two
/// writes, not one per message: an app that answers each message before asking for the
/// next has its answers applied before the next event is parsed, and the events still in
/// the read buffer are handed out before the answers are written.
#[tokio::test(flavor = "current_thread")]
async fn a_burst_echoed_through_the_split_api_is_answered_in_one_or_two_writes() {
    let (mut client, server) = common::open_pair(&Options::default(), &Options::default());
    let sent: Vec<String> = (0..8).map(|i| format!("pipelined message {i}")).collect();
    for text in &sent {
        client.send_text(text).unwrap();
    }
    let transport = Recording::new(common::take_output(&mut client));
    let log = transport.log.clone();
    let ws = WebSocketStream::from_driver(transport, server, &[], &Config::default());
    let (tx, mut rx) = ws.spawn();
    // The app on a task of its own, as a server's per-connection handler would be.
    let count = sent.len();
    let app = tokio::spawn(async move {
        for _ in 0..count {
            let message = message(rx.next().await.unwrap());
            tx.send_message(message).await.unwrap();
        }
        (tx, rx)
    });
    let _halves = app.await.unwrap();
    // The read buffer is empty now: the task writes the answers, then waits for input.
    let sizes = texts_written(&log, &mut client, &sent).await;
    // The last answer may go alone: its event left with no more input waiting.
    assert!(sizes.len() <= 2, "write sizes: {sizes:?}");
}

/// A close this side started, answered a second later by a peer that then never closes
/// TCP: the stream still ends within `Config::close_timeout` of the answer. (The close
/// handshake's own deadline, a second earlier, fires first; the timer must then be armed
/// again for the later one, or nothing wakes the task.) Paused time: no real waiting.
#[tokio::test(start_paused = true)]
async fn a_close_answered_late_still_ends_within_the_close_timeout() {
    let (client, mut server) = common::open_pair(&Options::default(), &Options::default());
    let (near, mut far) = duplex(64 * 1024);
    let mut ws = WebSocketStream::from_driver(near, client, &[], &Config::default());
    ws.close_connection(1000, "bye").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let mut buf = vec![0; 4096];
    let n = far.read(&mut buf).await.unwrap();
    let events = common::feed(&mut server, &buf[..n]);
    assert!(events.iter().any(|e| e.is_close()), "{events:?}");
    far.write_all(&common::take_output(&mut server))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while ws.next().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the stream never ended");
    assert!(started.elapsed() <= Config::default().close_timeout);
    drop(far);
}

/// The idle close's events come out when it happens, even with part of a binary frame
/// waiting in the read buffer (the stream reads a binary frame whole before the
/// driver sees it): not only once the close deadline drops the connection.
#[tokio::test(start_paused = true)]
async fn an_idle_close_is_reported_with_a_frame_half_read() {
    let (near, mut far) = duplex(64 * 1024);
    let idle = std::time::Duration::from_secs(1);
    let config = Config {
        idle_timeout: Some(idle),
        ..Config::default()
    };
    let server = common::open_server(&Options::default());
    let mut ws = WebSocketStream::from_driver(near, server, &[], &config);
    // The client starts a 30 000-byte binary frame and stops after 1 000 bytes.
    let mut frame = common::client_frame(0x82, &vec![7; 30_000]);
    frame.truncate(1_000);
    far.write_all(&frame).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut events = Vec::new();
    while let Some(event) = ws.next().await {
        let close = matches!(event, Event::Close { .. });
        events.push(format!("{event:?}"));
        if close {
            break;
        }
    }
    assert!(
        events.last().is_some_and(|e| e.contains("1001")),
        "{events:?}"
    );
    // Two idle periods (a ping, then the close), not the close timeout on top.
    assert!(started.elapsed() < 2 * idle + std::time::Duration::from_millis(500));
    drop(far);
}

// ---- hostile-peer review (adapters) ----

/// A peer that stops reading and stops sending (gone without a FIN) while the app is
/// blocked in a send over the limit: the idle keepalive runs inside `send` (its ping, then
/// its close), so the send fails after two idle periods, and `next` then reports the
/// idle close (1001) once the close timeout drops the peer.
#[tokio::test(start_paused = true)]
async fn a_send_blocked_on_a_silent_non_reading_peer_ends_at_the_idle_timeout() {
    let idle = std::time::Duration::from_secs(1);
    let config = Config::default()
        .max_backpressure(16 * 1024)
        .idle_timeout(idle);
    let (mut ws, peer) = piped(64 * 1024, &config).await;
    let started = tokio::time::Instant::now();
    let sent = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        loop {
            if let Err(e) = ws.send_binary(vec![1u8; 8 * 1024]).await {
                return e;
            }
        }
    })
    .await
    .expect("the send waited for good");
    assert!(
        matches!(sent, Error::Usage(UsageError::NotOpen)),
        "{sent:?}"
    );
    let took = started.elapsed();
    let close = tokio::time::timeout(std::time::Duration::from_secs(60), ws.next())
        .await
        .expect("next waited for good");
    assert!(
        matches!(
            close,
            Some(Event::Close {
                code: 1001 | 1006,
                ..
            })
        ),
        "{close:?}"
    );
    // The idle close left the connection closing at 2 x idle: the send should fail then,
    // not a close timeout later (it waits on for the close deadline's wake-up).
    assert!(
        took <= 2 * idle + std::time::Duration::from_millis(100),
        "the send failed only after {took:?}"
    );
    drop(peer);
}

/// The same silent, non-reading peer while the app is in `flush` (axum's `send` is a
/// queue and a flush, and so is `SinkExt::send`): the deadlines should run there too, as
/// they do in `send`, so the flush fails once the idle close's close timeout has passed.
/// `poll_flush_all` runs no timers: the flush waits for good, idle keepalive or not.
#[tokio::test(start_paused = true)]
async fn a_flush_to_a_silent_non_reading_peer_ends_at_the_idle_timeout() {
    let idle = std::time::Duration::from_secs(1);
    let config = Config::default().idle_timeout(idle);
    let (mut ws, peer) = piped(64 * 1024, &config).await;
    // Under the 1 MiB limit: queued at once; far more than the pipe holds.
    ws.send_binary(vec![1u8; 512 * 1024]).await.unwrap();
    let flushed = tokio::time::timeout(std::time::Duration::from_secs(60), ws.flush()).await;
    assert!(
        matches!(flushed, Ok(Err(_))),
        "the flush to a peer that never reads waited 60 s, past the idle timeout ({idle:?} \
         x 2) and the close timeout: {flushed:?}"
    );
    drop(peer);
}

/// `Sink::close` (axum's `socket.close()`) to a peer that never reads: the close frame
/// cannot get out, so the close timeout should end it; it waits for good.
#[tokio::test(start_paused = true)]
async fn sink_close_to_a_non_reading_peer_ends_within_the_close_timeout() {
    let (mut ws, peer) = piped(64 * 1024, &Config::default()).await;
    ws.send_binary(vec![1u8; 512 * 1024]).await.unwrap();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        SinkExt::<Message<'static>>::close(&mut ws),
    )
    .await;
    assert!(
        closed.is_ok(),
        "Sink::close to a peer that never reads waited 60 s (close timeout: 5 s)"
    );
    drop(peer);
}

// ---- the write timeout ----

/// Sends 8 KiB messages until one fails; the error and when it came (paused time).
async fn send_until_refused(
    ws: &mut WebSocketStream<DuplexStream>,
) -> (Error, tokio::time::Instant) {
    tokio::time::timeout(std::time::Duration::from_secs(600), async {
        loop {
            if let Err(e) = ws.send_binary(vec![1u8; 8 * 1024]).await {
                return (e, tokio::time::Instant::now());
            }
        }
    })
    .await
    .expect("the send waited for good")
}

/// After a write timeout: the error (a `TimedOut` I/O error), then `Close` 1006, then the
/// end of the stream.
async fn assert_timed_out_then_1006(ws: &mut WebSocketStream<DuplexStream>) {
    let mut events = Vec::new();
    while let Some(event) = tokio::time::timeout(std::time::Duration::from_secs(600), ws.next())
        .await
        .expect("next waited for good")
    {
        events.push(event);
    }
    assert!(
        matches!(
            events.as_slice(),
            [Event::Error(Error::Io(e)), Event::Close { code: 1006, .. }]
                if e.kind() == std::io::ErrorKind::TimedOut
        ),
        "{events:?}"
    );
}

/// A peer that reads nothing (and sends nothing; no idle keepalive) while the app is blocked
/// in a send over the limit: the send fails once the transport has taken nothing for the
/// write timeout, not before, and `next` reports why.
#[tokio::test(start_paused = true)]
async fn a_send_to_a_peer_that_reads_nothing_fails_at_the_write_timeout() {
    assert_eq!(
        Config::default().write_timeout,
        std::time::Duration::from_secs(30)
    );
    let timeout = std::time::Duration::from_secs(2);
    let config = Config::default()
        .max_backpressure(16 * 1024)
        .write_timeout(timeout);
    let (mut ws, peer) = piped(64 * 1024, &config).await;
    let started = tokio::time::Instant::now();
    let (error, failed_at) = send_until_refused(&mut ws).await;
    assert!(
        matches!(error, Error::Usage(UsageError::NotOpen)),
        "{error:?}"
    );
    // The pipe filled at once (no time passes but the runtime's own): the stall began then.
    let took = failed_at - started;
    assert!(
        took >= timeout && took <= timeout + std::time::Duration::from_millis(50),
        "failed after {took:?}"
    );
    assert_timed_out_then_1006(&mut ws).await;
    drop(peer);
}

/// At the limit: a peer that takes a little every `timeout - 100 ms` is never cut off (each
/// byte it takes starts the clock over), however long that goes on; once it stops, the
/// connection fails `timeout` after the last byte it took.
#[tokio::test(start_paused = true)]
async fn a_peer_reading_slowly_is_kept_and_one_that_stops_is_cut_at_the_write_timeout() {
    let timeout = std::time::Duration::from_secs(2);
    let pause = timeout - std::time::Duration::from_millis(100);
    let config = Config::default()
        .max_backpressure(16 * 1024)
        .write_timeout(timeout);
    let (mut ws, mut peer) = piped(64 * 1024, &config).await;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 1024];
        for _ in 0..10 {
            tokio::time::sleep(pause).await;
            let n = peer.io.read(&mut buf).await.unwrap();
            assert!(n > 0);
        }
        // Stops reading, still connected.
        (peer, tokio::time::Instant::now())
    });
    let started = tokio::time::Instant::now();
    let (error, failed_at) = send_until_refused(&mut ws).await;
    assert!(
        matches!(error, Error::Usage(UsageError::NotOpen)),
        "{error:?}"
    );
    let (peer, last_read) = reader.await.unwrap();
    assert!(
        failed_at - started >= pause * 10,
        "cut off after {:?} while the peer was still reading",
        failed_at - started
    );
    let after = failed_at - last_read;
    assert!(
        after >= timeout && after <= timeout + std::time::Duration::from_millis(50),
        "failed {after:?} after the peer's last read"
    );
    assert_timed_out_then_1006(&mut ws).await;
    drop(peer);
}

/// A peer reading a long download more slowly than the app sends it, and sending nothing:
/// the keepalive's ping waits behind the queued output, yet the peer is alive, since it
/// keeps taking output (once every half idle period here). It is kept for six idle periods
/// (the plain rule closed it after two); once it stops reading it takes nothing more, and
/// the idle close comes within two idle periods of its last read.
#[tokio::test(start_paused = true)]
async fn a_slow_reader_of_a_download_is_kept_by_the_idle_keepalive_until_it_stops() {
    let idle = std::time::Duration::from_secs(1);
    let config = Config::default()
        .max_backpressure(16 * 1024)
        .idle_timeout(idle);
    let (mut ws, mut peer) = piped(64 * 1024, &config).await;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 1024];
        for _ in 0..12 {
            tokio::time::sleep(idle / 2).await;
            let n = peer.io.read(&mut buf).await.unwrap();
            assert!(n > 0);
        }
        // Stops reading, still connected.
        (peer, tokio::time::Instant::now())
    });
    let started = tokio::time::Instant::now();
    let (error, failed_at) = send_until_refused(&mut ws).await;
    assert!(
        matches!(error, Error::Usage(UsageError::NotOpen)),
        "{error:?}"
    );
    let (peer, last_read) = reader.await.unwrap();
    assert!(
        failed_at - started >= 6 * idle,
        "closed after {:?} while the peer was still reading",
        failed_at - started
    );
    let after = failed_at - last_read;
    assert!(
        after <= 2 * idle + std::time::Duration::from_millis(100),
        "closed {after:?} after the peer's last read"
    );
    let close = tokio::time::timeout(std::time::Duration::from_secs(60), ws.next())
        .await
        .expect("next waited for good");
    assert!(
        matches!(close, Some(Event::Close { code: 1001, .. })),
        "{close:?}"
    );
    drop(peer);
}

/// The same peer while the app waits in `flush` with less than the limit queued (axum's
/// `send` and `SinkExt::send` end in a flush): the flush fails at the write timeout.
#[tokio::test(start_paused = true)]
async fn a_flush_to_a_peer_that_reads_nothing_fails_at_the_write_timeout() {
    let timeout = std::time::Duration::from_secs(2);
    let config = Config::default().write_timeout(timeout);
    let (mut ws, peer) = piped(64 * 1024, &config).await;
    // Under the 1 MiB limit: queued at once; far more than the pipe holds.
    ws.send_binary(vec![1u8; 512 * 1024]).await.unwrap();
    let started = tokio::time::Instant::now();
    let flushed = tokio::time::timeout(std::time::Duration::from_secs(600), ws.flush())
        .await
        .expect("the flush waited for good");
    assert!(flushed.is_err(), "{flushed:?}");
    let took = started.elapsed();
    assert!(
        took >= timeout - std::time::Duration::from_millis(50)
            && took <= timeout + std::time::Duration::from_millis(50),
        "failed after {took:?}"
    );
    assert_timed_out_then_1006(&mut ws).await;
    drop(peer);
}

/// `Duration::MAX` means never: a send to a peer that reads nothing still waits after
/// an hour (and arming the deadline does not overflow).
#[tokio::test(start_paused = true)]
async fn a_write_timeout_of_duration_max_means_never() {
    let config = Config::default()
        .max_backpressure(16 * 1024)
        .write_timeout(std::time::Duration::MAX);
    let (mut ws, peer) = piped(64 * 1024, &config).await;
    let waited = tokio::time::timeout(std::time::Duration::from_secs(3600), async {
        loop {
            ws.send_binary(vec![1u8; 8 * 1024]).await.unwrap();
        }
    })
    .await;
    assert!(waited.is_err(), "the send ended");
    assert_eq!(ws.ready_state(), ReadyState::Open);
    drop(peer);
}
// ---- the write timeout: an app busy elsewhere, a transport that buffers ----

/// The app is busy elsewhere (not polling the stream) for longer than the write timeout
/// while output waits; the peer reads everything it was given meanwhile, and more room
/// is there at once. The next poll of the stream must write, not fail the connection: the
/// transport did not refuse anything for the write timeout, nobody asked it.
#[tokio::test(start_paused = true)]
async fn a_peer_that_read_while_the_app_was_busy_is_not_cut_off_by_flush() {
    let timeout = std::time::Duration::from_secs(2);
    let config = Config::default().write_timeout(timeout);
    let (mut ws, mut peer) = piped(64 * 1024, &config).await;
    let len = 256 * 1024;
    // Under the 1 MiB limit: queued at once; the pipe takes 64 KiB, the rest waits.
    ws.send_binary(vec![1u8; len]).await.unwrap();
    assert!(ws.buffered_amount() > 0);
    let reader = tokio::spawn(async move {
        // The peer reads all along.
        match peer.next_event().await {
            Event::Message(m) => assert_eq!(m.as_bytes().len(), len),
            other => panic!("{other:?}"),
        }
        peer
    });
    // Busy with something else (a slow database call, say) for longer than the timeout.
    tokio::time::sleep(timeout * 2).await;
    let flushed = ws.flush().await;
    assert!(flushed.is_ok(), "cut off though the peer read: {flushed:?}");
    let _peer = reader.await.unwrap();
}

/// The same through `next` (an app that handles each message slowly before asking for
/// the next).
#[tokio::test(start_paused = true)]
async fn a_peer_that_read_while_the_app_was_busy_is_not_cut_off_by_next() {
    let timeout = std::time::Duration::from_secs(2);
    let config = Config::default().write_timeout(timeout);
    let (mut ws, mut peer) = piped(64 * 1024, &config).await;
    let len = 256 * 1024;
    ws.send_binary(vec![1u8; len]).await.unwrap();
    let reader = tokio::spawn(async move {
        match peer.next_event().await {
            Event::Message(m) => assert_eq!(m.as_bytes().len(), len),
            other => panic!("{other:?}"),
        }
        peer.driver.send_text("next request").unwrap();
        peer.send_queued().await;
        peer
    });
    tokio::time::sleep(timeout * 2).await;
    let event = tokio::time::timeout(std::time::Duration::from_secs(600), ws.next())
        .await
        .unwrap();
    assert!(
        matches!(event, Some(Event::Message(_))),
        "cut off though the peer read: {event:?}"
    );
    let _peer = reader.await.unwrap();
}

/// A transport with a send buffer of its own in front of the pipe, as TLS has (tokio-rustls
/// takes plaintext into records up to its buffer limit, writes them out as the socket
/// takes them, and its `poll_flush` writes out the rest).
struct Layered {
    inner: DuplexStream,
    out: Vec<u8>,
    cap: usize,
}

impl Layered {
    fn poll_drain(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while !self.out.is_empty() {
            let n =
                std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            self.out.drain(..n);
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncRead for Layered {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Layered {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let std::task::Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        let take = buf.len().min(this.cap - this.out.len());
        if take == 0 {
            // The drain above is pending on the pipe: woken when the peer reads.
            return std::task::Poll::Pending;
        }
        this.out.extend_from_slice(&buf[..take]);
        std::task::Poll::Ready(Ok(take))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        std::pin::Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        std::pin::Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// A server stream over a [`Layered`] transport (64 KiB of its own buffer in front of a
/// 4 KiB pipe), its `Open` taken, and the hand-driven client on the other end.
async fn layered_pair(config: &Config) -> (WebSocketStream<Layered>, Peer) {
    let (server_end, mut client_end) = duplex(4 * 1024);
    let client = send_client_request(&mut client_end, "ws://pipe/").await;
    let layered = Layered {
        inner: server_end,
        out: Vec::new(),
        cap: 64 * 1024,
    };
    let mut ws = WebSocketStream::accept_with(layered, &Options::default(), config, |_| Ok(()))
        .await
        .unwrap();
    assert!(matches!(ws.next().await, Some(Event::Open)));
    let mut peer = Peer {
        io: client_end,
        driver: client,
        input: Vec::new(),
    };
    assert!(matches!(peer.next_event().await, Event::Open));
    (ws, peer)
}

/// A flush that the write timeout ends must fail ("a send or flush waiting on it fails"),
/// also where the transport, not the stream, still holds the output (a buffering layer
/// whose `poll_flush` waits on a peer that reads nothing).
#[tokio::test(start_paused = true)]
async fn a_flush_ended_by_the_write_timeout_does_not_report_success() {
    let timeout = std::time::Duration::from_secs(2);
    let config = Config::default().write_timeout(timeout);
    let (mut ws, peer) = layered_pair(&config).await;
    // The peer reads nothing from now on. 32 KiB: all taken by the transport's buffer, 4 KiB
    // of it by the pipe.
    ws.send_binary(vec![1u8; 32 * 1024]).await.unwrap();
    let flushed = tokio::time::timeout(std::time::Duration::from_secs(600), ws.flush())
        .await
        .unwrap();
    assert!(
        flushed.is_err(),
        "flush reported {flushed:?}; the stream is {:?} and 28 KiB never left",
        ws.ready_state()
    );
    drop(peer);
}

/// A peer that reads 1 KiB every 100 ms (10 KiB/s, never pausing for more than 100 ms)
/// through a transport that buffers 64 KiB (as TLS does): the last 64 KiB leave the
/// transport's buffer in its `poll_flush`, 6.4 s at that rate, and a wake-up of that flush
/// counts as progress, so a 2 s write timeout does not cut the reader off.
#[tokio::test(start_paused = true)]
async fn a_slow_reader_behind_a_buffering_transport_is_not_cut_off_during_its_flush() {
    let timeout = std::time::Duration::from_secs(2);
    let config = Config::default().write_timeout(timeout);
    let (mut ws, mut peer) = layered_pair(&config).await;
    let len = 128 * 1024;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 1024];
        let mut total = 0;
        while total < len + 10 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let n = peer.io.read(&mut buf).await.unwrap();
            assert!(n > 0, "the server gave up after {total} B");
            total += n;
        }
        peer
    });
    ws.send_binary(vec![1u8; len]).await.unwrap();
    let started = tokio::time::Instant::now();
    let flushed = tokio::time::timeout(std::time::Duration::from_secs(600), ws.flush())
        .await
        .unwrap();
    assert!(
        flushed.is_ok() && ws.ready_state() == ReadyState::Open,
        "cut off after {:?} though the peer read 1 KiB every 100 ms: {flushed:?}, {:?}",
        started.elapsed(),
        ws.ready_state()
    );
    // The flush waited on the transport's buffer for well over the write timeout.
    assert!(started.elapsed() > 2 * timeout, "{:?}", started.elapsed());
    let _peer = reader.await.unwrap();
}

// ---- wakes of the flush watch that are not progress ----

/// `Layered` for writes; reads come from a pipe of their own (so the peer can fill it
/// while the write pipe stays full).
struct LayeredWithInput {
    out: Layered,
    input: DuplexStream,
}

impl tokio::io::AsyncRead for LayeredWithInput {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().input).poll_read(cx, buf)
    }
}

impl AsyncWrite for LayeredWithInput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().out).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().out).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().out).poll_shutdown(cx)
    }
}

/// A peer that reads nothing from the start but sends `per_burst` binary messages of
/// `len` bytes every `pause`, behind a [`Layered`] transport whose input comes from a pipe
/// of `input_pipe` bytes: our 32 KiB sit in the transport's buffer, its write pipe full.
/// Asserts that the write timeout ends the connection (`TimedOut`, within `window`) and
/// returns how long that took.
async fn flooding_peer_is_cut_off(
    config: &Config,
    input_pipe: usize,
    (per_burst, len, pause): (usize, usize, std::time::Duration),
    window: std::time::Duration,
) -> std::time::Duration {
    let (out_end, mut peer_out) = duplex(4 * 1024);
    let (in_end, mut peer_in) = duplex(input_pipe);
    let mut client = send_client_request(&mut peer_in, "ws://pipe/").await;
    let transport = LayeredWithInput {
        out: Layered {
            inner: out_end,
            out: Vec::new(),
            cap: 64 * 1024,
        },
        input: in_end,
    };
    let mut ws = WebSocketStream::accept_with(transport, &Options::default(), config, |_| Ok(()))
        .await
        .unwrap();
    assert!(matches!(ws.next().await, Some(Event::Open)));
    let mut response = vec![0u8; 4096];
    let n = peer_out.read(&mut response).await.unwrap();
    assert!(matches!(
        client.poll_event(&mut response[..n]).1,
        Some(Event::Open)
    ));
    // All taken by the transport's buffer, 4 KiB of it by the pipe.
    ws.send_binary(vec![1u8; 32 * 1024]).await.unwrap();
    assert_eq!(ws.buffered_amount(), 0);
    let _flooder = tokio::spawn(async move {
        let payload = vec![7u8; len];
        loop {
            for _ in 0..per_burst {
                client.send_binary(&payload).unwrap();
            }
            let bytes = common::take_output(&mut client);
            if peer_in.write_all(&bytes).await.is_err() {
                break;
            }
            tokio::time::sleep(pause).await;
        }
        drop(peer_out);
    });
    let started = tokio::time::Instant::now();
    let mut messages = 0u64;
    let ended = tokio::time::timeout(window, async {
        loop {
            match ws.next().await {
                Some(Event::Message(_)) => messages += 1,
                other => return other,
            }
        }
    })
    .await;
    assert!(
        matches!(ended, Ok(Some(Event::Error(Error::Io(ref e)))) if e.kind() == std::io::ErrorKind::TimedOut),
        "after {:?} ({messages} messages read) the peer that read nothing is still \
         connected: {ended:?}, {:?}",
        started.elapsed(),
        ws.ready_state()
    );
    started.elapsed()
}

/// A flooding peer that reads nothing, with a 64-byte read buffer: the reads use up the
/// task's coop budget; a flush polled with no budget left gets `Pending` and its waker
/// woken by tokio (a forced yield), which the flush watch must not take for the
/// transport's socket taking bytes ("only one that stopped" is cut off: this one is).
#[tokio::test(start_paused = true)]
async fn a_flooding_peer_that_reads_nothing_behind_a_buffering_transport_is_cut_off() {
    let timeout = std::time::Duration::from_secs(2);
    let config = Config::default()
        .write_timeout(timeout)
        .read_buffer_size(64);
    let burst = (2000, 10, std::time::Duration::from_millis(100));
    let took =
        flooding_peer_is_cut_off(&config, 1 << 20, burst, std::time::Duration::from_secs(60)).await;
    assert!(
        took <= timeout + std::time::Duration::from_millis(200),
        "{took:?}"
    );
}

/// The same with the default 64 KiB read buffer: a peer that sends 9 MiB every 500 ms
/// (so a task poll finds 128 reads' worth of input) and reads nothing.
#[tokio::test(start_paused = true)]
async fn a_flooding_peer_is_cut_off_with_the_default_read_buffer() {
    let config = Config::default().write_timeout(std::time::Duration::from_secs(2));
    let burst = (9 * 1024, 1024, std::time::Duration::from_millis(500));
    flooding_peer_is_cut_off(&config, 16 << 20, burst, std::time::Duration::from_secs(10)).await;
}

// ---- push-only apps and flushes ----

/// A push-only app (it sends and flushes, never calls `next`, as an axum ticker whose
/// `send` is a queue and a flush) to a peer that reads everything and answers every ping
/// at once: the idle keepalive takes only a peer that went silent. The app reads no input,
/// so the peer's pongs go unheard; the deadlines run only while a flush waits on a full
/// transport (they ran in every flush, and closed this peer with 1001 after two idle
/// periods).
#[tokio::test(start_paused = true)]
async fn a_push_only_app_that_flushes_keeps_a_responsive_peer_under_idle_timeout() {
    let idle = std::time::Duration::from_secs(5);
    let config = Config::default().idle_timeout(idle);
    let (mut ws, mut peer) = piped(1 << 20, &config).await;
    let mut failed = None;
    for i in 0..60 {
        let sent = ws.send_text(format!("tick {i}")).await;
        let flushed = ws.flush().await;
        if sent.is_err() || flushed.is_err() {
            failed = Some((i, sent, flushed));
            break;
        }
        // The peer reads everything the app wrote, answers pings at once, and talks.
        while let Some(event) = peer.next_event().now_or_never() {
            if let Event::Close { code, reason } = event {
                panic!("the server closed a responsive peer after {i} s: {code} {reason:?}");
            }
        }
        peer.driver.send_text("still here").unwrap();
        peer.send_queued().await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    assert!(
        failed.is_none(),
        "a peer that answered every ping and sent a message every second was cut off \
         (idle {idle:?}): {failed:?}"
    );
}

/// The same push-only app without the flush: no deadline runs, the peer is kept.
#[tokio::test(start_paused = true)]
async fn a_push_only_app_that_does_not_flush_keeps_a_responsive_peer() {
    let idle = std::time::Duration::from_secs(5);
    let config = Config::default().idle_timeout(idle);
    let (mut ws, mut peer) = piped(1 << 20, &config).await;
    for i in 0..60 {
        ws.send_text(format!("tick {i}")).await.unwrap();
        while peer.next_event().now_or_never().is_some() {}
        peer.driver.send_text("still here").unwrap();
        peer.send_queued().await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// A client driver handed over still connecting (`from_driver`): `flush` writes everything
/// queued so far (and `SinkExt::send` returns once the frame is written), so it reads the
/// server's 101 itself, then writes the message held behind the handshake; the app may
/// then wait elsewhere, holding the stream (flush returned `Ok` with the message still
/// held, and the server never got it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_of_a_connecting_client_writes_the_queued_message() {
    bounded(30, async {
        let (client_end, server_end) = duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut ws = tokio_tungstenite::accept_async(server_end).await.unwrap();
            ws.next().await
        });
        let mut driver = Driver::make_client("ws://pipe/", &Options::default()).unwrap();
        driver.start_connection();
        let mut ws = WebSocketStream::from_driver(client_end, driver, &[], &Config::default());
        SinkExt::send(&mut ws, Message::Text("hello".into()))
            .await
            .unwrap();
        ws.flush().await.unwrap();
        // The app now waits on something else, holding the stream.
        let got = tokio::time::timeout(std::time::Duration::from_secs(2), server).await;
        assert!(
            matches!(&got, Ok(Ok(Some(Ok(TMessage::Text(t))))) if t.as_str() == "hello"),
            "flush returned Ok but the server got nothing in 2 s: {got:?}; still buffered: {}",
            ws.buffered_amount()
        );
    })
    .await;
}

// ----- review of the split API -----

/// `WsSender::flush` "waits until everything queued so far has been written": a message
/// another task queues after the flush began is not part of it. Here the peer reads
/// exactly the frame queued before the flush, and the flush must then return, whatever
/// the later message does.
#[tokio::test(flavor = "current_thread")]
async fn split_flush_does_not_wait_for_messages_queued_after_it() {
    let (_client, server) = common::open_pair(&Options::default(), &Options::default());
    // A transport that holds 16 bytes: frames get out only as the peer reads.
    let (near, mut far) = duplex(16);
    let ws = WebSocketStream::from_driver(near, server, &[], &Config::default());
    let (tx, _rx) = ws.spawn();
    tx.send_binary(vec![1u8; 100]).await.unwrap(); // 102 bytes on the wire
    let flushing = tokio::spawn({
        let tx = tx.clone();
        async move { tx.flush().await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!flushing.is_finished(), "nothing was read yet");
    // Another task queues a message after the flush began.
    tx.send_binary(vec![2u8; 100]).await.unwrap();
    // The peer reads exactly the first frame: everything queued before the flush is
    // written to the transport.
    let mut first = vec![0u8; 102];
    far.read_exact(&mut first).await.unwrap();
    assert_eq!(&first[2..], &[1u8; 100][..]);
    let flushed = tokio::time::timeout(std::time::Duration::from_secs(2), flushing).await;
    assert!(
        matches!(flushed, Ok(Ok(Ok(())))),
        "flush still waiting 2 s after its bytes were written ({} bytes of the later \
         message unwritten): {flushed:?}",
        tx.buffered_amount()
    );
}

/// With permessage-deflate, a compressible message takes fewer bytes once the connection
/// task hands it to the driver than it counted while queued: the output falls under the
/// limit, and a send waiting on the limit must go on (`Config::max_backpressure`: "a
/// message is admitted while the buffer is at or under the limit").
#[tokio::test(flavor = "current_thread")]
async fn a_split_send_waiting_on_the_limit_is_woken_when_compression_shrinks_the_output() {
    let options = Options::default().deflate(true);
    let (_client, server) = common::open_pair(&options, &options);
    // The far end is kept and never read.
    let (near, _far) = duplex(64);
    let config = Config::default().max_backpressure(1000);
    let ws = WebSocketStream::from_driver(near, server, &[], &config);
    let (tx, _rx) = ws.spawn();
    // Incompressible bytes fill the transport; the rest stays buffered, under the limit.
    let noise: Vec<u8> = (0..300u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    tx.send_binary(noise).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let before = tx.buffered_amount();
    assert!(before > 0 && before <= 1000, "{before}");
    // A compressible message, admitted under the limit: queued, it counts 5000 bytes, so
    // the next send waits.
    tx.send_binary(vec![0u8; 5000]).await.unwrap();
    let mut third = Box::pin(tx.send_binary(vec![3u8; 10]));
    assert!(
        third.as_mut().now_or_never().is_none(),
        "over the limit while queued"
    );
    // The task compresses it to a few bytes: the output is under the limit again.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let after = tx.buffered_amount();
    assert!(after <= 1000, "{after}");
    let sent = tokio::time::timeout(std::time::Duration::from_secs(2), third).await;
    assert!(
        matches!(sent, Ok(Ok(()))),
        "the send still waits with {after} bytes unwritten (limit 1000): {sent:?}"
    );
}

/// `WsSender::is_open` says "whether messages can still be sent": not once the sender's
/// own close is queued, when every send is refused with `NotOpen`.
#[tokio::test(flavor = "current_thread")]
async fn split_is_open_is_false_once_a_close_is_queued() {
    let (_client, server) = common::open_pair(&Options::default(), &Options::default());
    let (near, _far) = duplex(1 << 16);
    let ws = WebSocketStream::from_driver(near, server, &[], &Config::default());
    let (tx, _rx) = ws.spawn();
    tx.close_connection(1000, "").await.unwrap();
    let refused = tx.send_text("after the close").await;
    assert!(
        matches!(refused, Err(Error::Usage(UsageError::NotOpen))),
        "{refused:?}"
    );
    assert!(
        !tx.is_open(),
        "is_open() is true (ready_state {:?}) while sends are refused with NotOpen",
        tx.ready_state()
    );
}
