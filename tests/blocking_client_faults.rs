//! BlockingClient timeouts and close paths against raw servers that misbehave.

mod common;
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use websocket_driver::client::{BlockingClient, ClientTimeouts};
use websocket_driver::{Error, Options};

/// Reads an HTTP head byte by byte (nothing past it), up to its blank line.
fn read_head_bytes(stream: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    head
}

/// A server that answers the upgrade, then reads (and drops) everything and never writes
/// nor closes, for `hold`.
fn silent_after_upgrade(hold: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let head = read_head_bytes(&mut s);
        s.write_all(&common::response_for(&head, "")).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let until = Instant::now() + hold;
        let mut buf = [0u8; 65536];
        while Instant::now() < until {
            if let Ok(0) = s.read(&mut buf) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    addr
}

fn record(client: &BlockingClient) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let (e, c) = (tx.clone(), tx);
    client.on_error(move |_, err| {
        let _ = e.send(format!("error {err}"));
    });
    client.on_close(move |_, code, reason| {
        let _ = c.send(format!("close {code} {reason}"));
    });
    rx
}

/// The server never answers our close: close_connection returns after the close timeout,
/// `on_close` 1006 once; a thread sending meanwhile is not stuck.
#[test]
fn client_close_unanswered_with_a_concurrent_sender() {
    let addr = silent_after_upgrade(Duration::from_secs(10));
    let client = Arc::new(
        BlockingClient::new(&format!("ws://{addr}/"), Options::default())
            .unwrap()
            .timeouts(ClientTimeouts {
                close: Duration::from_millis(300),
                ..ClientTimeouts::default()
            }),
    );
    let events = record(&client);
    client.start_connection().unwrap();
    let sender = {
        let client = client.clone();
        std::thread::spawn(move || {
            let mut sent = 0u32;
            while client.send_text("chatter").is_ok() {
                sent += 1;
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    client.close_connection(1000, "bye").unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "close_connection took {took:?}"
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(sender.join().unwrap());
    });
    rx.recv_timeout(Duration::from_secs(3))
        .expect("the sender thread is stuck");
    let first = events.recv_timeout(Duration::from_secs(3)).unwrap();
    assert!(first.starts_with("close 1006"), "{first}");
    assert!(events.recv_timeout(Duration::from_millis(300)).is_err());
}

/// Over wss, a server that takes TCP and the ClientHello and then says nothing: the handshake
/// timeout ends start_connection with TimedOut, reported as such, then 1006.
#[test]
#[cfg(feature = "tls")]
fn wss_peer_that_stops_mid_handshake_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _): (TcpStream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        std::thread::sleep(Duration::from_secs(5));
    });
    let client = BlockingClient::new(
        &format!("wss://127.0.0.1:{}/", addr.port()),
        Options::default(),
    )
    .unwrap()
    .verify(&websocket_driver::tls::Verify::DangerouslyDisabled)
    .unwrap()
    .timeouts(ClientTimeouts {
        handshake: Duration::from_millis(300),
        ..ClientTimeouts::default()
    });
    let events = record(&client);
    let started = Instant::now();
    let err = client.start_connection().unwrap_err();
    let took = started.elapsed();
    // The server holds on for 5 s: ending well before is the timeout's doing.
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(
        matches!(&err, Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "{err}"
    );
    let first = events.recv_timeout(Duration::from_secs(1)).unwrap();
    assert!(first.contains("timed out"), "{first}");
    assert!(
        events
            .recv_timeout(Duration::from_secs(1))
            .unwrap()
            .starts_with("close 1006")
    );
    assert!(events.recv_timeout(Duration::from_millis(200)).is_err());
}

/// Idle keepalive on the client against a server that never answers: ping, then 1001
/// "idle timeout", once; dropping the client does not hang.
#[test]
fn client_idle_timeout() {
    let addr = silent_after_upgrade(Duration::from_secs(10));
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default())
        .unwrap()
        .timeouts(ClientTimeouts {
            idle: Some(Duration::from_millis(200)),
            close: Duration::from_millis(300),
            ..ClientTimeouts::default()
        });
    let events = record(&client);
    // Before `start_connection`, which starts the idle clock inside: a true lower bound.
    let started = Instant::now();
    client.start_connection().unwrap();
    let first = events.recv_timeout(Duration::from_secs(3)).unwrap();
    assert_eq!(first, "close 1001 idle timeout");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    let dropped = Instant::now();
    drop(client);
    assert!(
        dropped.elapsed() < Duration::from_secs(2),
        "{:?}",
        dropped.elapsed()
    );
    assert!(events.recv_timeout(Duration::from_millis(200)).is_err());
}

/// A server that answers the upgrade with the 101 and `after` in one write, then reads
/// (and drops) everything for `hold`.
fn upgrade_then(after: Vec<u8>, hold: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let head = read_head_bytes(&mut s);
        let mut out = common::response_for(&head, "");
        out.extend_from_slice(&after);
        s.write_all(&out).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let until = Instant::now() + hold;
        let mut buf = [0u8; 65536];
        while Instant::now() < until {
            if let Ok(0) = s.read(&mut buf) {
                break;
            }
        }
    });
    addr
}

/// `on_message` runs on the I/O thread, for a message in the same TCP read as the 101 too,
/// also when the application sends at once after `start_connection` (the send's write
/// used to read the kept input on the sender's thread first, in 10 of 10 rounds).
#[test]
fn message_behind_the_101_runs_on_the_io_thread() {
    for round in 0..10 {
        let addr = upgrade_then(vec![0x81, 2, b'h', b'i'], Duration::from_millis(300));
        let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default()).unwrap();
        let (tx, rx) = mpsc::channel();
        client.on_message(move |_, m| {
            let _ = tx.send((
                m.as_text().map(str::to_string),
                std::thread::current().name().map(str::to_string),
            ));
        });
        client.start_connection().unwrap();
        if round > 0 {
            client.send_text("x").unwrap();
        }
        let (text, thread) = rx.recv_timeout(Duration::from_secs(3)).unwrap();
        assert_eq!(text.as_deref(), Some("hi"));
        assert_eq!(thread.as_deref(), Some("wsd-client-io"), "round {round}");
    }
}

/// A listener that panics on a message behind the 101 fails the connection on the I/O
/// thread (1011, `on_close` once): the panic does not come out of a send the
/// application makes right after `start_connection`.
#[test]
fn a_panic_on_a_message_behind_the_101_does_not_reach_a_sender() {
    let addr = upgrade_then(vec![0x81, 2, b'h', b'i'], Duration::from_secs(2));
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default()).unwrap();
    client.on_message(|_, _| panic!("a listener bug (on purpose)"));
    let (tx, closes) = mpsc::channel();
    client.on_close(move |_, code, _| {
        let _ = tx.send(code);
    });
    client.start_connection().unwrap();
    let sent = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| client.send_text("x")));
    assert!(sent.is_ok(), "the listener's panic came out of send_text");
    assert_eq!(closes.recv_timeout(Duration::from_secs(5)), Ok(1011));
    assert!(closes.recv_timeout(Duration::from_millis(200)).is_err());
}

/// A refusal whose body runs to a close that never comes (no Content-Length, TCP held
/// open): the handshake timeout ends it, and `on_error` and `start_connection` report
/// the same cause, the refusal (the handler heard the 503, the caller a timeout).
#[test]
fn a_refusal_held_open_reports_one_cause() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_head_bytes(&mut s);
        s.write_all(b"HTTP/1.1 503 Service Unavailable\r\n\r\nbusy")
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
    });
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default())
        .unwrap()
        .timeouts(ClientTimeouts {
            handshake: Duration::from_millis(500),
            ..ClientTimeouts::default()
        });
    let (tx, heard) = mpsc::channel();
    client.on_error(move |_, e| {
        let _ = tx.send(format!("{e:?}"));
    });
    let err = client.start_connection().unwrap_err();
    assert!(
        matches!(&err, Error::Handshake(websocket_driver::HandshakeError::UnexpectedStatus { status: 503, body }) if body == "busy"),
        "{err:?}"
    );
    assert_eq!(heard.try_iter().collect::<Vec<_>>(), [format!("{err:?}")]);
}

/// A one-connection wss server: the TLS handshake, the upgrade request, then (when
/// `answer`) the 101 and a close_notify sealed into one write; TCP held open for `hold`.
#[cfg(feature = "tls")]
fn wss_close_notify_server(
    name: &str,
    answer: bool,
    hold: Duration,
) -> (SocketAddr, std::path::PathBuf) {
    let (cert, key) = support::self_signed_pem(name);
    let config = websocket_driver::tls::server_config_from_pem(&cert, &key).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        let (mut tls, head) = support::tls_accept_head(&mut socket, config);
        if answer {
            tls.writer()
                .write_all(&common::response_for(&head, ""))
                .unwrap();
        }
        tls.send_close_notify();
        let mut records = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut records).unwrap();
        }
        socket.write_all(&records).unwrap();
        std::thread::sleep(hold);
    });
    (addr, cert)
}

/// A wss client of `addr` that trusts `cert`.
#[cfg(feature = "tls")]
fn wss_client(addr: SocketAddr, cert: std::path::PathBuf) -> BlockingClient {
    BlockingClient::new(
        &format!("wss://127.0.0.1:{}/", addr.port()),
        Options::default(),
    )
    .unwrap()
    .verify(&websocket_driver::tls::Verify::CaFile(cert))
    .unwrap()
}

/// On wss, a close_notify in the same read as the 101 ends the connection at once (1006),
/// as one in a later read does; the client stayed open until the server dropped TCP.
#[test]
#[cfg(feature = "tls")]
fn wss_close_notify_in_the_same_read_as_the_101_ends_the_connection() {
    let (addr, cert) =
        wss_close_notify_server("bcf-101-close-notify", true, Duration::from_secs(6));
    let client = wss_client(addr, cert);
    let (tx, closes) = mpsc::channel();
    client.on_close(move |_, code, _| {
        let _ = tx.send(code);
    });
    client.start_connection().unwrap();
    assert_eq!(closes.recv_timeout(Duration::from_secs(3)), Ok(1006));
}

/// On wss, a close_notify before any 101: `start_connection` fails at once (it waited
/// for TCP's end or the handshake timeout).
#[test]
#[cfg(feature = "tls")]
fn wss_close_notify_before_the_101_fails_the_start_at_once() {
    let (addr, cert) =
        wss_close_notify_server("bcf-close-notify-before-101", false, Duration::from_secs(4));
    let client = wss_client(addr, cert);
    let started = Instant::now();
    let result = client.start_connection();
    let took = started.elapsed();
    assert!(
        matches!(
            result,
            Err(Error::Handshake(
                websocket_driver::HandshakeError::Incomplete
            ))
        ),
        "{result:?}"
    );
    // The server holds TCP for 4 s; the default handshake timeout is longer.
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

/// What a client whose listener panics during `start_connection` (on a message that came
/// in the same read as the 101, or in `on_open`) goes through: whether `start_connection`
/// returned, the first event within 2 s, how long the drop took, any event after it.
fn panic_during_start(
    after_101: Vec<u8>,
    setup: impl FnOnce(&BlockingClient),
) -> (
    bool,
    Result<String, mpsc::RecvTimeoutError>,
    Duration,
    Result<String, mpsc::RecvTimeoutError>,
) {
    let addr = upgrade_then(after_101, Duration::from_secs(10));
    let client = BlockingClient::new(&format!("ws://{addr}/"), Options::default())
        .unwrap()
        .timeouts(ClientTimeouts {
            close: Duration::from_secs(3),
            ..ClientTimeouts::default()
        });
    setup(&client);
    let events = record(&client);
    let started =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| client.start_connection()));
    let first = events.recv_timeout(Duration::from_secs(2));
    let dropped = Instant::now();
    drop(client);
    let took = dropped.elapsed();
    let later = events.recv_timeout(Duration::from_millis(200));
    (started.is_ok(), first, took, later)
}

/// README ("On the threads of `BlockingClient` ... a panicking listener fails only its
/// connection: close 1011 "a listener panicked" to the peer, `on_close` once"), and
/// `on_message` runs on the I/O thread, a message in the same read as the 101 too (it ran
/// on the caller's thread inside `start_connection`, outside the I/O thread's
/// `catch_unwind`: the panic escaped `start_connection`, `on_close` never ran, and
/// dropping the client waited out the whole close timeout).
#[test]
fn panic_on_a_message_behind_the_101_still_closes_once() {
    let (returned, first, took, later) =
        panic_during_start(vec![0x81, 4, b'b', b'o', b'o', b'm'], |client| {
            client.on_message(|_, m| {
                if m.as_text() == Some("boom") {
                    panic!("a listener bug");
                }
            });
        });
    let seen = format!("returned {returned}, first {first:?}, drop took {took:?}, later {later:?}");
    assert!(
        returned,
        "the listener's panic escaped start_connection: {seen}"
    );
    assert_eq!(
        first.as_deref(),
        Ok("close 1011 a listener panicked"),
        "{seen}"
    );
    assert!(later.is_err(), "one close only: {seen}");
    assert!(took < Duration::from_secs(2), "{seen}");
}

/// The same for a panicking `on_open` (which runs in `start_connection`): the connection
/// fails with 1011, `on_close` runs exactly once, `start_connection` returns an error and
/// the drop is quick (`on_close` never ran, and the drop took the close timeout).
#[test]
fn panic_in_on_open_still_closes_once() {
    let (returned, first, took, later) = panic_during_start(Vec::new(), |client| {
        client.on_open(|_| panic!("a listener bug"));
    });
    let seen = format!("returned {returned}, first {first:?}, drop took {took:?}, later {later:?}");
    assert!(
        returned,
        "the listener's panic escaped start_connection: {seen}"
    );
    assert_eq!(
        first.as_deref(),
        Ok("close 1011 a listener panicked"),
        "{seen}"
    );
    let closes = [&first, &later]
        .iter()
        .filter(|e| e.as_deref().is_ok_and(|e| e.starts_with("close")))
        .count();
    assert_eq!(closes, 1, "on_close runs exactly once: {seen}");
    assert!(took < Duration::from_secs(2), "{seen}");
}

/// RFC 9110 §15.2: a client must take interim 1xx responses before the final one, as the
/// WebSocket handshake does. A proxy that sends `100 Continue` before its `200` opens the
/// tunnel.
#[test]
fn proxy_interim_100_before_200_opens_the_tunnel() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = server.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let head = read_head_bytes(&mut s);
        s.write_all(&common::response_for(&head, "")).unwrap();
        std::thread::sleep(Duration::from_secs(2));
    });
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut client, _) = proxy.accept().unwrap();
        read_head_bytes(&mut client);
        let upstream = TcpStream::connect(target).unwrap();
        client
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Connection established\r\n\r\n")
            .unwrap();
        let (mut a, mut b) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut a, &mut b);
        });
        let (mut upstream, mut client) = (upstream, client);
        let _ = std::io::copy(&mut upstream, &mut client);
    });
    let client = BlockingClient::new(&format!("ws://{target}/"), Options::default())
        .unwrap()
        .proxy(&format!("http://{proxy_addr}"))
        .unwrap();
    client.start_connection().unwrap();
}

/// `send(_, MessageType::Close(_))` before `start_connection` closes the client as
/// `close_connection` does: `on_close` runs once, at once (the closed client reads no
/// more, so it cannot wait for a read).
#[test]
fn a_close_sent_before_start_runs_on_close_once() {
    // Nothing listens here: the client must not need a server to close.
    let client = BlockingClient::new("ws://127.0.0.1:9/", Options::default()).unwrap();
    let closes = record(&client);
    client
        .send(b"bye", websocket_driver::MessageType::Close(4000))
        .unwrap();
    assert_eq!(client.ready_state(), websocket_driver::ReadyState::Closed);
    assert_eq!(closes.try_iter().collect::<Vec<_>>(), ["close 4000 bye"]);
}

/// A proxy whose answer grows past 16 KiB without ending a line is refused once it passes
/// the limit (`HeadTooLarge`), not read until the handshake times out; its head at the
/// limit, read byte by byte, still opens the tunnel (the unit tests of `session::proxy`
/// have the exact boundary).
#[test]
fn a_proxy_head_over_the_limit_is_refused_as_it_grows() {
    use websocket_driver::HandshakeError;
    use websocket_driver::session::proxy::MAX_RESPONSE_HEAD;
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let (done, finished) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut client, _) = proxy.accept().unwrap();
        read_head_bytes(&mut client);
        let mut answer = b"HTTP/1.1 200 Connection established\r\nX: ".to_vec();
        answer.resize(MAX_RESPONSE_HEAD + 100, b'a');
        let _ = client.write_all(&answer);
        // Held open: only the limit ends the client's read.
        let _ = finished.recv_timeout(Duration::from_secs(30));
    });
    let client = BlockingClient::new("ws://127.0.0.1:9/", Options::default())
        .unwrap()
        .timeouts(ClientTimeouts {
            handshake: Duration::from_secs(60),
            ..ClientTimeouts::default()
        })
        .proxy(&format!("http://{proxy_addr}"))
        .unwrap();
    let result = client.start_connection();
    drop(done);
    assert!(
        matches!(
            result,
            Err(Error::Handshake(HandshakeError::HeadTooLarge {
                limit: MAX_RESPONSE_HEAD
            }))
        ),
        "{result:?}"
    );
}
