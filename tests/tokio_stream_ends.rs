//! How the tokio stream and its split API end when the peer stops cooperating: a flush
//! (or `Sink::close`) after the peer's close to a peer that reads nothing, a client
//! handed over still connecting whose handshake is refused, and output a large send
//! left waiting when the stream moves onto its own task.
#![cfg(feature = "tokio")]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf, duplex,
};
use websocket_driver::tokio::{Config, WebSocketStream};
use websocket_driver::{Driver, Event, Message, MessageType, Options};

/// A server stream over a duplex pipe (of `capacity` bytes each way) with its `Open`
/// taken, and the client's driver and pipe end, the 101 read.
async fn accepted<S>(
    wrap: impl FnOnce(DuplexStream) -> S,
    capacity: usize,
    config: &Config,
) -> (WebSocketStream<S>, Driver, DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (server_end, mut client_end) = duplex(capacity);
    let mut client = Driver::make_client("ws://pipe/", &Options::default()).unwrap();
    client.start_connection();
    let out = client.pending_output().to_vec();
    client.consume_output(out.len());
    client_end.write_all(&out).await.unwrap();
    let mut ws =
        WebSocketStream::accept_with(wrap(server_end), &Options::default(), config, |_| Ok(()))
            .await
            .unwrap();
    assert!(matches!(ws.next().await, Some(Event::Open)));
    let mut head = vec![0u8; 4096];
    let n = client_end.read(&mut head).await.unwrap();
    assert!(matches!(
        client.poll_event(&mut head[..n]).1,
        Some(Event::Open)
    ));
    (ws, client, client_end)
}

/// The server has more output than the pipe takes; the peer sends its close and then
/// reads nothing, keeping the connection. The stream hands out `Close`.
async fn closed_by_a_peer_that_reads_nothing() -> (WebSocketStream<DuplexStream>, DuplexStream) {
    let config = Config::default()
        .close_timeout(Duration::from_secs(1))
        .write_timeout(Duration::from_secs(2));
    let (mut ws, mut client, mut client_end) = accepted(|s| s, 16 * 1024, &config).await;
    ws.send_binary(vec![7u8; 64 * 1024]).await.unwrap();
    assert!(ws.buffered_amount() > 0, "output waits on the peer");
    client.close_connection(1000, "bye").unwrap();
    let out = client.pending_output().to_vec();
    client_end.write_all(&out).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Event::Close { code, .. })) => assert_eq!(code, 1000),
        other => panic!("{other:?}"),
    }
    (ws, client_end)
}

/// After the `Close` and the stream's end (`next` gives up on the write at the close
/// timeout), a flush fails at once: it waited for good (nothing armed a timer).
#[tokio::test(start_paused = true)]
async fn a_flush_after_the_end_to_a_peer_that_reads_nothing_fails() {
    let (mut ws, _client_end) = closed_by_a_peer_that_reads_nothing().await;
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
    let flushed = tokio::time::timeout(Duration::from_secs(60), ws.flush()).await;
    assert!(
        matches!(flushed, Ok(Err(_))),
        "a flush after the end: {flushed:?}"
    );
}

/// `Sink::close` right after the `Close` event (axum's `sender.close()`), `next` not
/// polled again: it ends within the close timeout, with an error (the output never
/// went), where it waited for good.
#[tokio::test(start_paused = true)]
async fn sink_close_after_the_peers_close_to_a_peer_that_reads_nothing_ends() {
    let (mut ws, _client_end) = closed_by_a_peer_that_reads_nothing().await;
    let started = tokio::time::Instant::now();
    let closed = tokio::time::timeout(
        Duration::from_secs(60),
        SinkExt::<Message<'static>>::close(&mut ws),
    )
    .await;
    assert!(matches!(closed, Ok(Err(_))), "Sink::close: {closed:?}");
    assert!(
        started.elapsed() <= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // And the stream ends.
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
}

/// A server on the other end of `server_end` that reads the upgrade request, waits for
/// `go`, refuses with 403, and returns what the client wrote after that.
fn refusing_server(
    mut server_end: DuplexStream,
    go: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = server_end.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request ended early");
            got.extend_from_slice(&buf[..n]);
        }
        let _ = go.await;
        server_end
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                let n = server_end.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                rest.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        rest
    })
}

/// A client handed over still connecting: `SinkExt::send` ("returns once the frame is
/// written") of a message queued behind a handshake that is refused fails; it returned
/// `Ok` for a message that never went out.
#[tokio::test(flavor = "current_thread")]
async fn a_send_behind_a_refused_handshake_fails() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let (client_end, server_end) = duplex(1 << 16);
        let (go, went) = tokio::sync::oneshot::channel();
        let server = refusing_server(server_end, went);
        go.send(()).unwrap();
        let mut driver = Driver::make_client("ws://pipe/", &Options::default()).unwrap();
        driver.start_connection();
        let mut ws = WebSocketStream::from_driver(client_end, driver, &[], &Config::default());
        let flushed = SinkExt::send(&mut ws, Message::Text("hello".into())).await;
        let mut events = Vec::new();
        while let Some(e) = ws.next().await {
            events.push(format!("{e:?}"));
        }
        let rest = server.await.unwrap();
        assert!(flushed.is_err(), "send: {flushed:?}, events {events:?}");
        assert!(events[0].contains("403"), "{events:?}");
        assert!(rest.is_empty(), "written after the refusal: {rest:?}");
    })
    .await
    .expect("hung");
}

/// The same on the split API: the message's receipt fails, and so does a `flush`
/// ("fails if the connection ended with bytes unwritten"), which returned `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_flush_behind_a_refused_handshake_fails() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let (client_end, server_end) = duplex(1 << 16);
        let (go, went) = tokio::sync::oneshot::channel();
        let server = refusing_server(server_end, went);
        let mut driver = Driver::make_client("ws://pipe/", &Options::default()).unwrap();
        driver.start_connection();
        let (tx, mut rx) =
            WebSocketStream::from_driver(client_end, driver, &[], &Config::default()).spawn();
        let receipt = tx
            .send_with_receipt("hello", MessageType::Text)
            .await
            .unwrap();
        go.send(()).unwrap();
        while rx.next().await.is_some() {}
        assert!(
            receipt.await.is_err(),
            "the receipt of a message never written"
        );
        let flushed = tx.flush().await;
        assert!(flushed.is_err(), "flush: {flushed:?}");
        assert!(server.await.unwrap().is_empty());
    })
    .await
    .expect("hung");
}

/// A duplex pipe that takes gathered writes, as a `TcpStream` does (so a large send is
/// written around the driver, straight from its payload).
struct Vectored(DuplexStream);

impl AsyncRead for Vectored {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Vectored {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let joined: Vec<u8> = bufs
            .iter()
            .flat_map(|b| b.iter().copied())
            .take(1 << 20)
            .collect();
        Pin::new(&mut self.get_mut().0).poll_write(cx, &joined)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// A server stream's 1 MiB send to a peer that reads nothing yet waits mostly in the
/// stream, around the driver. Moved onto the split API, `WsSender::buffered_amount`
/// counts it and `flush` waits for it (they said 0 and `Ok` at once); once the peer
/// reads, the flush completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_split_api_counts_and_waits_for_output_left_by_a_large_send() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (mut ws, _client, mut client_end) =
            accepted(Vectored, 16 * 1024, &Config::default()).await;
        ws.send_binary(vec![7u8; 1 << 20]).await.unwrap();
        let before = ws.buffered_amount();
        assert!(before > 1_000_000, "{before}");
        let (tx, _rx) = ws.spawn();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(tx.buffered_amount() > 1_000_000, "{}", tx.buffered_amount());
        let waiting = tokio::time::timeout(Duration::from_millis(500), tx.flush()).await;
        assert!(waiting.is_err(), "flush with 1 MiB unwritten: {waiting:?}");
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0usize;
            while total < (1 << 20) {
                let n = client_end.read(&mut buf).await.unwrap();
                assert!(n > 0);
                total += n;
            }
            client_end
        });
        tx.flush().await.unwrap();
        assert_eq!(tx.buffered_amount(), 0);
        drop(reader.await.unwrap());
    })
    .await
    .expect("hung");
}
