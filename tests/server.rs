//! The reactor-hosted server over loopback: echo at scale, leaks, backpressure, idle
//! connections, timeouts, shutdown, rejections, cross-thread sends.

mod support;

use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Owned, Rng, TestClient, eventually};
use websocket_driver::protocol::driver::OWNED_MIN;
use websocket_driver::server::{
    BackpressurePolicy, Handler, HttpResponse, PanicPolicy, Sender, Server, ServerConfig,
    ServerHandle, Upgrade, Ws,
};
use websocket_driver::{Backend, Error, Message, Options, UsageError};

struct Echo;
impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = ws.send_message(&message);
    }
}

fn config(backend: Backend) -> ServerConfig {
    ServerConfig {
        threads: 2,
        backend,
        ..ServerConfig::default()
    }
}

/// Tests that hold thousands of sockets take turns: both ends live in this process and
/// the hard limit is 20 000 descriptors.
static HEAVY: Mutex<()> = Mutex::new(());

/// Takes the turn and raises the open-file limit to the hard limit (the library leaves it
/// alone); call it before building the server's config, whose `max_connections` follows
/// the limit.
fn heavy() -> std::sync::MutexGuard<'static, ()> {
    let turn = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    websocket_driver::raise_open_file_limit().expect("raise the open-file limit");
    turn
}

fn start_echo(config: ServerConfig) -> ServerHandle {
    Server::bind("127.0.0.1:0")
        .unwrap()
        .config(config)
        .start(|req| match req.path() {
            "/forbidden" => Upgrade::Reject(HttpResponse::new(403, "not for you")),
            _ => Upgrade::Accept(Echo),
        })
        .unwrap()
}

fn raw_request(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

fn thousand_clients_echo_random_sizes_without_loss(backend: Backend) {
    let _turn = heavy();
    let server = start_echo(config(backend));
    let addr = server.local_addr();
    const THREADS: usize = 8;
    const PER_THREAD: usize = 125;
    const MESSAGES: usize = 100;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1));
                let mut clients: Vec<TestClient> = (0..PER_THREAD)
                    .map(|_| TestClient::connect(addr, "/").unwrap())
                    .collect();
                let mut echoed = 0usize;
                for round in 0..MESSAGES {
                    let sent: Vec<Vec<u8>> = clients
                        .iter_mut()
                        .map(|c| {
                            let size = rng.size();
                            let mut payload = rng.bytes(size);
                            payload[0] = round as u8;
                            c.send_binary(&payload).unwrap();
                            payload
                        })
                        .collect();
                    for (c, payload) in clients.iter_mut().zip(sent) {
                        match c.next_message().unwrap() {
                            Owned::Binary(b) => assert_eq!(b, payload, "corrupted echo"),
                            other => panic!("expected an echo, got {other:?}"),
                        }
                        echoed += 1;
                    }
                }
                for c in &mut clients {
                    c.driver.close_connection(1000, "done").unwrap();
                    c.flush().unwrap();
                    assert_eq!(c.next_message().unwrap(), Owned::Close(1000, String::new()));
                    assert!(c.wait_eof(), "server closes TCP after the close handshake");
                }
                echoed
            })
        })
        .collect();
    let echoed: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(echoed, THREADS * PER_THREAD * MESSAGES);
    assert!(eventually(Duration::from_secs(10), || server
        .stats()
        .connections_open
        == 0));
    let stats = server.stats();
    assert_eq!(stats.connections_total, 1000);
    assert_eq!(stats.messages_in, 100_000);
    assert_eq!(stats.messages_out, 100_000);
    assert_eq!(stats.closes.get(&1000), Some(&1000));
    server.shutdown(Duration::from_secs(1)).unwrap();
}

fn random_disconnects_leak_no_connection(backend: Backend) {
    let server = start_echo(config(backend));
    let addr = server.local_addr();
    let mut rng = Rng(7);
    for i in 0..300 {
        match i % 3 {
            0 => {
                // Cut mid-handshake.
                let mut stream = TcpStream::connect(addr).unwrap();
                stream
                    .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgr")
                    .unwrap();
            }
            1 => {
                // Cut mid-message: header of a 1000-byte masked frame, then 10 bytes.
                let mut c = TestClient::connect(addr, "/").unwrap();
                let mut frame = vec![0x82, 0x80 | 126, 0x03, 0xe8, 1, 2, 3, 4];
                frame.extend(rng.bytes(10));
                c.stream.write_all(&frame).unwrap();
                if rng.next().is_multiple_of(2) {
                    socket2::SockRef::from(&c.stream)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap();
                }
                continue;
            }
            _ => {
                // Reset right after connecting.
                let stream = TcpStream::connect(addr).unwrap();
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
        }
    }
    // The WebSocket connections were all accepted (they completed the handshake); the
    // others may be reset before accept() sees them.
    assert!(
        eventually(Duration::from_secs(15), || {
            let s = server.stats();
            s.connections_open == 0 && s.connections_total >= 100
        }),
        "connections left open: {:?}",
        server.stats()
    );
    assert!(server.stats().connections_total <= 300);
    // Every opened WebSocket reported its close: 1006, no close handshake.
    assert_eq!(
        server.stats().closes.get(&1006),
        Some(&100),
        "{:?}",
        server.stats()
    );
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// Sends `count` messages of `size` bytes back for every text message "flood count size".
/// Hands every connection's `Sender` to the test.
struct Register(Arc<Mutex<Vec<Sender>>>);
impl Handler for Register {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        self.0.lock().unwrap().push(ws.sender());
    }
}

/// A server whose connections register their `Sender` as they open.
fn registering(config: ServerConfig) -> (ServerHandle, Arc<Mutex<Vec<Sender>>>) {
    let senders = Arc::new(Mutex::new(Vec::new()));
    let registry = senders.clone();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(config)
        .start(move |_| Upgrade::Accept(Register(registry.clone())))
        .unwrap();
    (server, senders)
}

/// Waits until `n` connections have registered, and returns their senders.
fn registered(senders: &Mutex<Vec<Sender>>, n: usize) -> Vec<Sender> {
    assert!(eventually(Duration::from_secs(5), || senders
        .lock()
        .unwrap()
        .len()
        == n));
    senders.lock().unwrap().clone()
}

struct Flooder {
    refused: Arc<AtomicUsize>,
}
impl Handler for Flooder {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let text = message.as_text().unwrap_or_default().to_string();
        let mut parts = text.split(' ');
        if parts.next() == Some("flood") {
            let count: usize = parts.next().unwrap().parse().unwrap();
            let size: usize = parts.next().unwrap().parse().unwrap();
            let chunk = vec![7u8; size];
            for _ in 0..count {
                match ws.send_binary(&chunk) {
                    Ok(_) => {}
                    Err(Error::Usage(UsageError::BufferFull { .. })) => {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    // Closed by the policy: nothing more to send.
                    Err(_) => break,
                }
            }
        } else {
            let _ = ws.send_message(&message);
        }
    }
}

/// A connected client whose receive buffer is `bytes`: what the server sends it beyond
/// that waits on the server's side, as behind a slow link.
fn slow_link_client(server: &ServerHandle, bytes: usize) -> TestClient {
    let client = TestClient::connect(server.local_addr(), "/").unwrap();
    socket2::SockRef::from(&client.stream)
        .set_recv_buffer_size(bytes)
        .unwrap();
    client
}

fn start_flooder(config: ServerConfig, refused: Arc<AtomicUsize>) -> ServerHandle {
    Server::bind("127.0.0.1:0")
        .unwrap()
        .config(config)
        .start(move |_| {
            Upgrade::Accept(Flooder {
                refused: refused.clone(),
            })
        })
        .unwrap()
}

/// `BackpressurePolicy::Close { grace: ZERO }` (uWebSockets' `closeOnBackpressureLimit`):
/// the first send refused by the cap closes the connection with 1008; another client on
/// the same loop keeps echoing.
fn refused_send_closes_with_1008_under_close_policy(backend: Backend) {
    let refused = Arc::new(AtomicUsize::new(0));
    let server = start_flooder(
        ServerConfig {
            threads: 1,
            backend,
            max_backpressure: 256 * 1024,
            backpressure_policy: BackpressurePolicy::Close {
                grace: Duration::ZERO,
            },
            ..ServerConfig::default()
        },
        refused.clone(),
    );
    let addr = server.local_addr();
    let mut slow = TestClient::connect(addr, "/").unwrap();
    // 64 MiB in one handler call: the queue passes 256 KiB after five 64 KiB sends.
    slow.send_text("flood 1024 65536").unwrap();
    let mut healthy = TestClient::connect(addr, "/").unwrap();
    for i in 0..200 {
        let text = format!("ping {i}");
        healthy.send_text(&text).unwrap();
        assert_eq!(healthy.next_message().unwrap(), Owned::Text(text));
    }
    assert!(eventually(Duration::from_secs(10), || server
        .stats()
        .closes
        .get(&1008)
        == Some(&1)));
    // Each 64 KiB message is a 65 546-byte frame: four make 262 184 bytes, just over the
    // 256 KiB cap, so the fifth send was refused and closed the connection (and the rest
    // were refused too); the slow client gets exactly the four messages, then the close.
    assert_eq!(refused.load(Ordering::Relaxed), 1024 - 4);
    for _ in 0..4 {
        match slow.next_message().unwrap() {
            Owned::Binary(data) => assert_eq!(data.len(), 65536),
            other => panic!("expected a 64 KiB message, got {other:?}"),
        }
    }
    assert!(matches!(
        slow.next_message().unwrap(),
        Owned::Close(1008, _)
    ));
    healthy.send_text("still here").unwrap();
    assert_eq!(
        healthy.next_message().unwrap(),
        Owned::Text("still here".into())
    );
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .connections_open
        == 1));
    drop((slow, healthy));
    server.shutdown(Duration::from_secs(1)).unwrap();
}

fn drop_new_policy_refuses_sends_over_the_limit(backend: Backend) {
    let refused = Arc::new(AtomicUsize::new(0));
    let server = start_flooder(
        ServerConfig {
            threads: 1,
            backend,
            max_backpressure: 64 * 1024,
            backpressure_policy: BackpressurePolicy::DropNew,
            ..ServerConfig::default()
        },
        refused.clone(),
    );
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    // 64 sends of 16 KiB in one handler call: the socket cannot take them all at once,
    // so the queue passes 64 KiB and later sends are refused.
    client.send_text("flood 64 16384").unwrap();
    let mut received = 0;
    while received + refused.load(Ordering::Relaxed) < 64 {
        match client.next_message().unwrap() {
            Owned::Binary(b) => {
                assert_eq!(b.len(), 16384);
                received += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    let dropped = refused.load(Ordering::Relaxed);
    assert!(dropped > 0, "nothing was refused");
    // All 64 sends happen in one handler call, before any write: four 16 KiB frames
    // (65 552 bytes with headers) pass the 64 KiB limit, so the other 60 are refused.
    assert_eq!((received, dropped), (4, 60));

    // At the limit exactly: sixteen frames of 4 096 bytes (4 092 of payload) make 65 536
    // queued bytes, which is not over it, so the seventeenth is taken; then the output is
    // over by 4 096 and the rest are refused.
    let before = refused.load(Ordering::Relaxed);
    client.send_text("flood 20 4092").unwrap();
    let mut received = 0;
    while received + refused.load(Ordering::Relaxed) - before < 20 {
        match client.next_message().unwrap() {
            Owned::Binary(b) => {
                assert_eq!(b.len(), 4092);
                received += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        (received, refused.load(Ordering::Relaxed) - before),
        (17, 3)
    );
    drop(client);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

fn nine_thousand_idle_connections_open_and_close_cleanly(backend: Backend) {
    let _turn = heavy();
    // Client and server share this process: 18 000 descriptors of the hard limit of 20 000
    // (`heavy` raised the soft limit to it).
    let server = start_echo(config(backend));
    let addr = server.local_addr();
    const N: usize = 9000;
    let mut clients = Vec::with_capacity(N);
    for _ in 0..N {
        clients.push(TestClient::connect(addr, "/").unwrap());
    }
    assert!(eventually(Duration::from_secs(10), || server
        .stats()
        .connections_open
        == N));
    for c in &mut clients {
        c.driver.close_connection(1000, "").unwrap();
        c.flush().unwrap();
    }
    for c in &mut clients {
        assert_eq!(c.next_message().unwrap(), Owned::Close(1000, String::new()));
    }
    drop(clients);
    assert!(eventually(Duration::from_secs(15), || server
        .stats()
        .connections_open
        == 0));
    assert_eq!(server.stats().closes.get(&1000), Some(&(N as u64)));
    server.shutdown(Duration::from_secs(1)).unwrap();
}

fn handshake_timeout_closes_silent_and_slow_sockets(backend: Backend) {
    let server = start_echo(ServerConfig {
        threads: 1,
        backend,
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    });
    let addr = server.local_addr();
    let mut silent = TcpStream::connect(addr).unwrap();
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    for s in [&mut silent, &mut slow] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).unwrap(), 0, "the server closes the socket");
    }
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .connections_open
        == 0));
    server.shutdown(Duration::from_secs(1)).unwrap();
}

fn shutdown_sends_1001_to_everyone_and_returns(backend: Backend) {
    let server = start_echo(config(backend));
    let addr = server.local_addr();
    let mut clients: Vec<TestClient> = (0..50)
        .map(|_| TestClient::connect(addr, "/").unwrap())
        .collect();
    let stopper = {
        let server = server.clone();
        std::thread::spawn(move || server.shutdown(Duration::from_secs(5)))
    };
    for c in &mut clients {
        assert_eq!(
            c.next_message().unwrap(),
            Owned::Close(1001, "server shutting down".into())
        );
    }
    stopper.join().unwrap().unwrap();
    assert_eq!(server.stats().connections_open, 0);
    assert!(
        TcpStream::connect(addr).is_err() || raw_request(addr, "GET / HTTP/1.1\r\n\r\n").is_empty()
    );
}

/// A head of exactly `max_handshake_size` bytes and `max_headers` lines is upgraded, one
/// byte or one line more gets 431.
fn head_limits_at_the_limit_and_one_over(backend: Backend) {
    let server = start_echo(ServerConfig {
        options: Options::default().max_handshake_size(512).max_headers(6),
        ..config(backend)
    });
    // Six header lines (`X-Pad` filling the head to `len` bytes), or seven with `extra`.
    let head = |len: usize, extra: &str| {
        let base = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             {extra}X-Pad: \r\n\r\n"
        );
        let padded = base.replace(
            "X-Pad: ",
            &format!("X-Pad: {}", "p".repeat(len - base.len())),
        );
        assert_eq!(padded.len(), len);
        padded
    };
    for (len, extra, want) in [
        (512, "", "HTTP/1.1 101 "),
        (513, "", "HTTP/1.1 431 "),
        (512, "X: 1\r\n", "HTTP/1.1 431 "),
    ] {
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        stream.write_all(head(len, extra).as_bytes()).unwrap();
        let answer = support::read_head(&mut stream);
        assert!(answer.starts_with(want), "{len} bytes, {extra:?}: {answer}");
    }
    server.shutdown(Duration::from_secs(1)).unwrap();
}

fn plain_http_and_rejections_get_clear_responses(backend: Backend) {
    let server = start_echo(config(backend));
    let addr = server.local_addr();
    let plain = raw_request(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        plain.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{plain}"
    );
    let upgrade = "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let forbidden = raw_request(addr, &format!("GET /forbidden HTTP/1.1\r\n{upgrade}"));
    assert!(
        forbidden.starts_with("HTTP/1.1 403 Forbidden\r\n"),
        "{forbidden}"
    );
    assert!(forbidden.ends_with("not for you\n"));
    let old = raw_request(
        addr,
        &format!(
            "GET / HTTP/1.1\r\n{}",
            upgrade.replace("Version: 13", "Version: 8")
        ),
    );
    assert!(
        old.starts_with("HTTP/1.1 426") && old.contains("Sec-WebSocket-Version: 13\r\n"),
        "{old}"
    );
    let huge = raw_request(
        addr,
        &format!("GET /{} HTTP/1.1\r\n{upgrade}", "a".repeat(20_000)),
    );
    assert!(huge.starts_with("HTTP/1.1 431"), "{huge}");
    // An upgrade request with a body: 400 (the body would be read as frames).
    for body in [
        "Content-Length: 5\r\n\r\nhello",
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let with_body = raw_request(
            addr,
            &format!(
                "GET / HTTP/1.1\r\n{}",
                upgrade.replace("\r\n\r\n", &format!("\r\n{body}"))
            ),
        );
        assert!(with_body.starts_with("HTTP/1.1 400 "), "{with_body}");
        assert!(
            with_body.contains("an upgrade request has no body"),
            "{with_body}"
        );
    }
    // A body with another version: the 426 that names ours comes first.
    let old_with_body = raw_request(
        addr,
        &format!(
            "GET / HTTP/1.1\r\n{}",
            upgrade
                .replace("Version: 13", "Version: 8")
                .replace("\r\n\r\n", "\r\nContent-Length: 5\r\n\r\nhello")
        ),
    );
    assert!(old_with_body.starts_with("HTTP/1.1 426"), "{old_with_body}");
    // `Content-Length: 0` (however written) is no body.
    for zero in ["0", "00"] {
        let empty = raw_request(
            addr,
            &format!(
                "GET / HTTP/1.1\r\n{}",
                upgrade.replace(
                    "\r\n\r\n",
                    &format!("\r\nContent-Length: {zero}\r\n\r\n{}", "\u{88}\u{80}")
                )
            ),
        );
        assert!(empty.starts_with("HTTP/1.1 101 "), "{empty}");
    }
    let ok = raw_request(
        addr,
        &format!(
            "GET / HTTP/1.1\r\n{}",
            upgrade.replace("\r\n\r\n", "\r\n\r\n\u{88}\u{80}")
        ),
    );
    assert!(
        ok.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{ok}"
    );
    server.shutdown(Duration::from_secs(1)).unwrap();
}

fn max_connections_answers_503_beyond_the_limit(backend: Backend) {
    let server = start_echo(ServerConfig {
        threads: 1,
        backend,
        max_connections: 5,
        ..ServerConfig::default()
    });
    let addr = server.local_addr();
    let held: Vec<TestClient> = (0..5)
        .map(|_| TestClient::connect(addr, "/").unwrap())
        .collect();
    let refused = raw_request(addr, "GET / HTTP/1.1\r\n\r\n");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert_eq!(server.stats().connections_refused, 1);
    drop(held);
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .connections_open
        == 0));
    // Room again.
    TestClient::connect(addr, "/").unwrap();
    server.shutdown(Duration::from_secs(1)).unwrap();
}

fn sender_reaches_a_connection_from_another_thread(backend: Backend) {
    let (server, senders) = registering(config(backend));
    let mut clients: Vec<TestClient> = (0..4)
        .map(|_| TestClient::connect(server.local_addr(), "/").unwrap())
        .collect();
    let all = registered(&senders, 4);
    let pusher = std::thread::spawn(move || {
        for (i, s) in all.iter().enumerate() {
            // Close arguments the loop would refuse fail here, clearly, and send nothing.
            for (code, reason) in [(4000, "é€".repeat(40)), (1005, String::new())] {
                let err = s.close_connection(code, reason).unwrap_err();
                assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
                let usage = err
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<Error>())
                    .unwrap_or_else(|| panic!("{err:?}"));
                assert!(
                    matches!(
                        usage,
                        Error::Usage(
                            UsageError::CloseReasonTooLong | UsageError::InvalidCloseCode(1005)
                        )
                    ),
                    "{usage:?}"
                );
            }
            s.send_text(format!("hello {i}")).unwrap();
            s.send_binary(vec![i as u8; 3]).unwrap();
            s.close_connection(4000, "bye").unwrap();
        }
    });
    pusher.join().unwrap();
    let mut seen = Vec::new();
    for c in &mut clients {
        let Owned::Text(t) = c.next_message().unwrap() else {
            panic!()
        };
        let i: u8 = t.strip_prefix("hello ").unwrap().parse().unwrap();
        assert_eq!(c.next_message().unwrap(), Owned::Binary(vec![i; 3]));
        assert_eq!(c.next_message().unwrap(), Owned::Close(4000, "bye".into()));
        seen.push(i);
    }
    seen.sort();
    assert_eq!(seen, vec![0, 1, 2, 3]);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

fn idle_timeout_pings_then_closes_a_silent_peer(backend: Backend) {
    let server = start_echo(ServerConfig {
        threads: 1,
        backend,
        idle_timeout: Some(Duration::from_millis(200)),
        ..ServerConfig::default()
    });
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    // A peer that answers pings stays open: two idle periods pass, two pings answered.
    assert_eq!(client.next_event().unwrap(), Owned::Ping(vec![]));
    assert_eq!(client.next_event().unwrap(), Owned::Ping(vec![]));
    assert_eq!(server.stats().connections_open, 1);
    // Now go silent (read raw bytes, never pong): a ping, then close 1001.
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !seen.windows(2).any(|w| w == [0x03, 0xe9]) {
        let n = client.stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the close frame; got {seen:?}");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&seen[..2], [0x89, 0x00], "a ping first");
    assert_eq!(&seen[2..4], [0x88, 2 + "idle timeout".len() as u8]);
    assert!(eventually(Duration::from_secs(10), || server
        .stats()
        .closes
        .get(&1001)
        == Some(&1)));
    drop(client);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

fn close_timeout_drops_a_peer_that_never_answers(backend: Backend) {
    let (server, senders) = registering(ServerConfig {
        threads: 1,
        backend,
        close_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    });
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    registered(&senders, 1)[0]
        .close_connection(1000, "bye")
        .unwrap();
    // Read raw bytes and never answer: the close frame, then the server drops TCP.
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match client.stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("no close within the read timeout: {e}"),
        }
    }
    assert_eq!(
        &seen[..4],
        [0x88, 5, 0x03, 0xe8],
        "a close frame with 1000 first"
    );
    // No close handshake happened: the handler saw 1006.
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .closes
        .get(&1006)
        == Some(&1)));
    assert_eq!(server.stats().connections_open, 0);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// The seed's callbacks on the hosted `Ws`: `send_with` runs once the frame is handed to
/// the transport, `send_ping` once its pong arrives; both may send again. A
/// callback whose connection closes first never runs.
fn write_and_pong_callbacks_run_and_are_dropped_on_close(backend: Backend) {
    struct Callbacks(Arc<Mutex<Vec<String>>>, usize);
    impl Handler for Callbacks {
        fn on_open(&mut self, ws: &mut Ws<'_>) {
            let log = self.0.clone();
            ws.send_with(b"one", websocket_driver::MessageType::Binary, move |ws| {
                log.lock().unwrap().push("written one".into());
                ws.send_text("after one").unwrap();
            })
            .unwrap();
            let log = self.0.clone();
            ws.send_ping(b"p1", move |ws| {
                log.lock().unwrap().push("pong p1".into());
                ws.send_text("after pong").unwrap();
            })
            .unwrap();
        }
        fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
            if message.as_text() == Some("ping me") {
                let (log, id) = (self.0.clone(), self.1);
                ws.send_ping(b"unanswered", move |_| {
                    log.lock().unwrap().push(format!("pong unanswered #{id}"));
                })
                .unwrap();
            }
        }
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let shared = log.clone();
    let accepted = AtomicUsize::new(0);
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            ..config(backend)
        })
        .start(move |_| {
            let id = accepted.fetch_add(1, Ordering::Relaxed) + 1;
            Upgrade::Accept(Callbacks(shared.clone(), id))
        })
        .unwrap();
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    assert_eq!(
        client.next_message().unwrap(),
        Owned::Binary(b"one".to_vec())
    );
    assert_eq!(
        client.next_message().unwrap(),
        Owned::Text("after one".into())
    );
    assert_eq!(
        client.next_message().unwrap(),
        Owned::Text("after pong".into())
    );
    assert_eq!(*log.lock().unwrap(), ["written one", "pong p1"]);

    // A ping the client never answers: it reads the raw frame and goes away.
    client.send_text("ping me").unwrap();
    let mut frame = [0u8; 12];
    client.stream.read_exact(&mut frame).unwrap();
    assert_eq!(&frame[..2], [0x89, 10], "the ping arrives");
    drop(client);
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .connections_open
        == 0));
    // The next connection reuses the slab key; the old callback must not fire for it.
    let mut next = TestClient::connect(server.local_addr(), "/").unwrap();
    assert_eq!(next.next_message().unwrap(), Owned::Binary(b"one".to_vec()));
    assert_eq!(
        next.next_message().unwrap(),
        Owned::Text("after one".into())
    );
    assert_eq!(
        next.next_message().unwrap(),
        Owned::Text("after pong".into())
    );
    // Its own callback runs when it answers; the dead connection's (same slab key, same
    // payload) never does.
    next.send_text("ping me").unwrap();
    assert_eq!(
        next.next_event().unwrap(),
        Owned::Ping(b"unanswered".to_vec())
    );
    assert!(eventually(Duration::from_secs(5), || log
        .lock()
        .unwrap()
        .len()
        == 5));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        *log.lock().unwrap(),
        [
            "written one",
            "pong p1",
            "written one",
            "pong p1",
            "pong unanswered #2"
        ]
    );
    drop(next);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A pong answers its ping and every earlier one (RFC 6455 §5.5.3 lets a peer answer only
/// the latest of several pings): a client that answers only the second of two pings runs
/// both callbacks, in ping order; a late pong for the first runs nothing more.
fn a_pong_for_a_later_ping_runs_the_earlier_pings_callbacks_too(backend: Backend) {
    struct TwoPings(Arc<Mutex<Vec<&'static str>>>);
    impl Handler for TwoPings {
        fn on_message(&mut self, ws: &mut Ws<'_>, _message: Message<'_>) {
            for (payload, name) in [(&b"first"[..], "pong first"), (b"second", "pong second")] {
                let log = self.0.clone();
                ws.send_ping(payload, move |_| log.lock().unwrap().push(name))
                    .unwrap();
            }
        }
        fn on_pong(&mut self, _ws: &mut Ws<'_>, _payload: &[u8]) {
            self.0.lock().unwrap().push("on_pong");
        }
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let shared = log.clone();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            ..config(backend)
        })
        .start(move |_| Upgrade::Accept(TwoPings(shared.clone())))
        .unwrap();
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    client.send_text("ping me twice").unwrap();
    // Both pings, read raw so that the client's driver does not answer them.
    let mut pings = [0u8; 2 + 5 + 2 + 6];
    client.stream.read_exact(&mut pings).unwrap();
    assert_eq!(&pings[..7], b"\x89\x05first");
    assert_eq!(&pings[7..], b"\x89\x06second");
    client.driver.send_pong(b"second").unwrap();
    client.flush().unwrap();
    assert!(eventually(Duration::from_secs(5), || log
        .lock()
        .unwrap()
        .len()
        == 3));
    assert_eq!(
        *log.lock().unwrap(),
        ["pong first", "pong second", "on_pong"]
    );
    client.driver.send_pong(b"first").unwrap();
    client.flush().unwrap();
    assert!(eventually(Duration::from_secs(5), || log
        .lock()
        .unwrap()
        .len()
        == 4));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        *log.lock().unwrap(),
        ["pong first", "pong second", "on_pong", "on_pong"],
        "an answered ping's callback runs once"
    );
    drop(client);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A server that ends a connection the peer has not closed (here a protocol error) closes
/// TCP first and keeps reading until the peer's FIN (RFC 6455 §7.1.1): bytes the peer
/// sends after our FIN are read and dropped, and the peer's FIN ends the connection at
/// once rather than the linger timer.
fn lingering_close_reads_until_the_peers_fin(backend: Backend) {
    let server = start_echo(config(backend));
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    // A masked frame with the reserved opcode 3: the server fails the connection (1002)
    // without a Close from us.
    client
        .stream
        .write_all(&[0x83, 0x81, 1, 2, 3, 4, b'x' ^ 1])
        .unwrap();
    assert!(matches!(
        client.next_event().unwrap(),
        Owned::Close(1002, _)
    ));
    assert!(client.wait_eof(), "the server's FIN");
    // Half-closed: the server's side is done, ours still sends; then our FIN.
    client.stream.write_all(&[0u8; 64 * 1024]).unwrap();
    client.stream.shutdown(std::net::Shutdown::Write).unwrap();
    // The server reads our bytes and our FIN and closes at once: well before its 2 s
    // linger would expire (had it stopped reading, only that timer would close it, and with
    // our bytes unread the kernel would answer with a reset).
    assert!(eventually(Duration::from_secs(1), || server
        .stats()
        .connections_open
        == 0));
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// Once the peer's Close has arrived (it sends nothing after it) and ours is written,
/// the server closes the socket at once, whichever side started the close: it does not
/// linger for the peer's FIN, which here never comes (the 2 s linger would otherwise hold
/// the connection).
fn a_peers_close_ends_the_connection_without_lingering(backend: Backend) {
    struct CloseOnRequest;
    impl Handler for CloseOnRequest {
        fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
            if message.as_text() == Some("close me") {
                ws.close_connection(1000, "bye").unwrap();
            }
        }
    }
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(config(backend))
        .start(|_| Upgrade::Accept(CloseOnRequest))
        .unwrap();
    // The client starts the close.
    let mut first = TestClient::connect(server.local_addr(), "/").unwrap();
    first.driver.close_connection(1000, "done").unwrap();
    first.flush().unwrap();
    assert_eq!(
        first.next_event().unwrap(),
        Owned::Close(1000, String::new())
    );
    assert!(first.wait_eof(), "the server's FIN");
    // The server starts it; our driver answers its Close at once.
    let mut second = TestClient::connect(server.local_addr(), "/").unwrap();
    second.send_text("close me").unwrap();
    assert_eq!(
        second.next_event().unwrap(),
        Owned::Close(1000, "bye".into())
    );
    assert!(second.wait_eof(), "the server's FIN");
    // Neither client closes its side, yet both connections are gone well before the
    // linger timer.
    assert!(eventually(Duration::from_secs(1), || server
        .stats()
        .connections_open
        == 0));
    drop((first, second));
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// Every test above runs once per backend.
/// A handler that echoes by value (`send_message_owned`): messages reassembled from
/// several reads go out from their own allocation, the rest are copied. Either way every
/// echo arrives whole, in order, between the others.
fn messages_echoed_by_value_arrive_whole_and_in_order(backend: Backend) {
    struct EchoOwned(Arc<AtomicUsize>);
    impl Handler for EchoOwned {
        fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
            let owned = match &message {
                Message::Binary(b) => matches!(b, Cow::Owned(_)) && b.len() >= OWNED_MIN,
                Message::Text(t) => matches!(t, Cow::Owned(_)) && t.len() >= OWNED_MIN,
            };
            if owned {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
            ws.send_message_owned(message).unwrap();
        }
    }
    let by_value = Arc::new(AtomicUsize::new(0));
    let counter = by_value.clone();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(config(backend))
        .start(move |_| Upgrade::Accept(EchoOwned(counter.clone())))
        .unwrap();
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    let mut rng = Rng(0x5eed);
    let mut sent = Vec::new();
    for size in [1 << 20, 20, 300_000, OWNED_MIN, OWNED_MIN - 1, 70_001, 5] {
        let payload = rng.bytes(size);
        if size % 2 == 0 {
            client.send_binary(&payload).unwrap();
            sent.push(Owned::Binary(payload));
        } else {
            let text: String = payload.iter().map(|b| (b'a' + b % 26) as char).collect();
            client.send_text(&text).unwrap();
            sent.push(Owned::Text(text));
        }
    }
    for expected in sent {
        let echo = client.next_message().unwrap();
        assert!(echo == expected, "echo differs from what was sent");
    }
    // At least the 1 MiB message cannot arrive in one read: it went by value.
    assert!(by_value.load(Ordering::Relaxed) >= 1);
    let stats = server.stats();
    assert_eq!((stats.messages_in, stats.messages_out), (7, 7));
    drop(client);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A burst of connections waiting in the backlog does not hold the loop away from the
/// connections it already has: a turn accepts a bounded number of them (epoll: 64; io_uring
/// takes what one wait completes), so an open connection's next message is handled long
/// before the 3 000th connection is accepted, and every one of them is accepted in the end.
/// io_uring's multishot accept takes the whole backlog at once, so its loop stops accepting
/// with 1 024 accepted connections still to set up (`Stats::accept_pauses`) and accepts again
/// once it has room: a connection made after the burst is served.
fn a_backlog_burst_leaves_room_for_open_connections(backend: Backend) {
    const BURST: usize = 3000;
    let _turn = heavy();
    struct Probe {
        handle: Arc<std::sync::OnceLock<ServerHandle>>,
        release: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
        held: std::sync::mpsc::Sender<()>,
        accepted_at_ping: Arc<Mutex<Option<u64>>>,
    }
    impl Handler for Probe {
        fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
            match message.as_text() {
                Some("hold") => {
                    // Blocks the loop while the burst fills the backlog.
                    self.held.send(()).unwrap();
                    let _ = self
                        .release
                        .lock()
                        .unwrap()
                        .recv_timeout(Duration::from_secs(30));
                }
                Some("ping") => {
                    let total = self.handle.get().unwrap().stats().connections_total;
                    *self.accepted_at_ping.lock().unwrap() = Some(total);
                    ws.send_text("pong").unwrap();
                }
                _ => {}
            }
        }
    }
    let handle = Arc::new(std::sync::OnceLock::new());
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let release = Arc::new(Mutex::new(release_rx));
    let accepted_at_ping = Arc::new(Mutex::new(None));
    let (h, r, a) = (handle.clone(), release.clone(), accepted_at_ping.clone());
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            ..config(backend)
        })
        .start(move |_| {
            Upgrade::Accept(Probe {
                handle: h.clone(),
                release: r.clone(),
                held: held_tx.clone(),
                accepted_at_ping: a.clone(),
            })
        })
        .unwrap();
    handle.set(server.clone()).ok().unwrap();
    let addr = server.local_addr();
    let mut client = TestClient::connect(addr, "/").unwrap();
    client.send_text("hold").unwrap();
    held_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // The loop is blocked: the kernel completes these handshakes into the backlog.
    let burst: Vec<TcpStream> = (0..BURST)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    client.send_text("ping").unwrap();
    release_tx.send(()).unwrap();
    assert_eq!(client.next_message().unwrap(), Owned::Text("pong".into()));
    let at_ping = accepted_at_ping.lock().unwrap().unwrap();
    assert!(
        at_ping < 1 + BURST as u64,
        "all {BURST} waiting connections were accepted before the open one's message"
    );
    assert!(
        eventually(Duration::from_secs(30), || server.stats().connections_total
            == 1 + BURST as u64),
        "{} of {} connections accepted",
        server.stats().connections_total,
        1 + BURST
    );
    let pauses = server.stats().accept_pauses;
    match backend {
        Backend::IoUring => assert!(pauses >= 1, "io_uring took {BURST} at once"),
        _ => assert_eq!(pauses, 0, "{backend} accepts only what a turn sets up"),
    }
    drop(burst);
    let mut later = TestClient::connect(addr, "/").unwrap();
    later.send_text("ping").unwrap();
    assert_eq!(later.next_message().unwrap(), Owned::Text("pong".into()));
    drop((client, later));
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// With `busy_poll` off, and with one longer than the gaps between messages (so the
/// loop's poll before sleeping finds the next one), a client that waits between messages
/// gets every echo, in order; the server's idle turns in between (sleeping, or polling and
/// backing off) lose nothing. epoll ignores the setting.
fn echoes_arrive_with_and_without_busy_polling(backend: Backend) {
    for busy_poll in [Duration::ZERO, Duration::from_millis(5)] {
        let server = start_echo(ServerConfig {
            busy_poll,
            ..config(backend)
        });
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        for i in 0..40 {
            let text = format!("message {i} with busy_poll {busy_poll:?}");
            client.send_text(&text).unwrap();
            assert_eq!(client.next_message().unwrap(), Owned::Text(text));
            // Gaps from nothing to past the poll, so polls both find work and miss.
            std::thread::sleep(Duration::from_micros(250 * (i % 30)));
        }
        drop(client);
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

/// The read buffer's size, at its smallest: 0 is taken as 1 byte (an empty buffer read
/// as an EOF and dropped every peer), and echoes of every size still arrive whole with
/// 1- and 2-byte reads.
fn tiny_read_buffers_still_echo(backend: Backend) {
    for read_buffer_size in [0, 1, 2] {
        let server = start_echo(ServerConfig {
            read_buffer_size,
            ..config(backend)
        });
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        for len in [0, 1, 125, 126, 70_000] {
            let text = "r".repeat(len);
            client.send_text(&text).unwrap();
            assert_eq!(client.next_message().unwrap(), Owned::Text(text));
        }
        drop(client);
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

/// A peer that sends a burst of many small messages, more than a turn's reads take, and
/// then its FIN (no Close frame) is closed: the FIN that came with the burst raises no
/// new readiness edge, so the reads carried over to later turns must still read on to
/// the end of the stream. Small read buffers make every turn's reads run out.
fn a_burst_then_fin_is_read_to_the_end(backend: Backend) {
    struct Silent;
    impl Handler for Silent {}
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            read_buffer_size: 1024,
            ..config(backend)
        })
        .start(|_| Upgrade::Accept(Silent))
        .unwrap();
    for _ in 0..5 {
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        // A masked text frame of 100 bytes (key 0: the payload as it is).
        let mut frame = vec![0x81, 0x80 | 100, 0, 0, 0, 0];
        frame.extend_from_slice(&[b'm'; 100]);
        let burst: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(frame.len() * 600)
            .collect();
        client.stream.write_all(&burst).unwrap();
        client.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(
            eventually(Duration::from_secs(10), || server.stats().connections_open
                == 0),
            "the connection outlived its peer's FIN"
        );
    }
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// The same with reading paused: a peer that sends far more than the output cap while
/// not reading its echoes, then its FIN, and only then reads. The server pauses reading
/// over the cap (the FIN comes meanwhile: io_uring's receive meets it, epoll gets its
/// edge); every message that came before the FIN still reaches the handler, as reading
/// resumes, and the FIN ends the connection after them.
fn a_fin_that_came_while_reading_was_paused_is_read(backend: Backend) {
    struct CountingEcho(Arc<AtomicUsize>);
    impl Handler for CountingEcho {
        fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
            self.0.fetch_add(1, Ordering::Relaxed);
            let _ = ws.send_message(&message);
        }
    }
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            max_backpressure: 64 * 1024,
            ..config(backend)
        })
        .start(move |_| Upgrade::Accept(CountingEcho(counter.clone())))
        .unwrap();
    let client = TestClient::connect(server.local_addr(), "/").unwrap();
    let mut frame = vec![0x82, 0x80 | 126, 0x10, 0x00, 0, 0, 0, 0];
    frame.extend_from_slice(&[7u8; 4096]);
    let burst: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 256)
        .collect();
    let mut writer = client.stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        writer.write_all(&burst).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    // Let the server fill its cap and pause before anything is read.
    std::thread::sleep(Duration::from_millis(300));
    // Everything until the server's FIN. (A FIN without a Close is an abnormal end:
    // echoes still queued when the server reads it are not waited for.)
    let mut reader = client.stream;
    let mut buf = vec![0u8; 64 * 1024];
    while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    sending.join().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || server.stats().connections_open
            == 0),
        "the connection outlived its peer's FIN"
    );
    assert_eq!(received.load(Ordering::Relaxed), 256);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A peer that stops reading and then sends its Close leaves the server closed with
/// output it will never take (its echo of 32 MiB, under the cap but over what the
/// sockets buffer, and the Close's answer behind it): the close timeout still bounds
/// that, and the connection ends (it was held forever: nothing timed the last writes).
fn a_peer_that_closes_without_reading_is_dropped_after_the_close_timeout(backend: Backend) {
    let server = start_echo(ServerConfig {
        threads: 1,
        max_backpressure: 128 << 20,
        close_timeout: Duration::from_millis(300),
        ..config(backend)
    });
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    let len: u64 = 32 << 20;
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.resize(frame.len() + len as usize, 9);
    // Close 1000, masked with key 0.
    frame.extend_from_slice(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]);
    client.stream.write_all(&frame).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || server.stats().connections_open
            == 0),
        "a closed connection whose output never drains is held"
    );
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A peer that resets the connection in the middle of a large frame's payload is reported
/// as the reset (`on_error` with `ConnectionReset`, then 1006), not as a plain end of
/// stream: on io_uring the payload receive returns what it got and the next receive
/// finds the socket done, so the reset is read from the socket's error.
fn a_reset_in_the_middle_of_a_payload_is_reported_as_a_reset(backend: Backend) {
    struct Recording(Arc<Mutex<Vec<String>>>);
    impl Handler for Recording {
        fn on_error(&mut self, _ws: &mut Ws<'_>, error: &Error) {
            let kind = match error {
                Error::Io(e) => format!("{:?}", e.kind()),
                other => other.to_string(),
            };
            self.0.lock().unwrap().push(format!("error {kind}"));
        }
        fn on_close(&mut self, _ws: &mut Ws<'_>, code: u16, _reason: &str) {
            self.0.lock().unwrap().push(format!("close {code}"));
        }
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(config(backend))
        .start(move |_| Upgrade::Accept(Recording(log.clone())))
        .unwrap();
    let client = TestClient::connect(server.local_addr(), "/").unwrap();
    let len: u64 = 4 << 20;
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.resize(frame.len() + (1 << 20), 3);
    let mut stream = client.stream;
    stream.write_all(&frame).unwrap();
    // The server is receiving the rest of the payload now.
    std::thread::sleep(Duration::from_millis(200));
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
    assert!(eventually(Duration::from_secs(10), || seen
        .lock()
        .unwrap()
        .len()
        == 2));
    assert_eq!(
        *seen.lock().unwrap(),
        ["error ConnectionReset", "close 1006"]
    );
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A close started from a write callback (`send_with`) is a close like any other: the
/// connection leaves its topics at once and the close timeout bounds the wait for the
/// peer's answer (here a peer that reads and never answers: dropped after 300 ms).
fn a_close_from_a_write_callback_is_timed_and_leaves_its_topics(backend: Backend) {
    struct ByeThenClose;
    impl Handler for ByeThenClose {
        fn on_open(&mut self, ws: &mut Ws<'_>) {
            ws.subscribe("room").unwrap();
            ws.send_with(b"bye", websocket_driver::MessageType::Text, |ws| {
                ws.close_connection(1000, "done").unwrap();
            })
            .unwrap();
        }
    }
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            close_timeout: Duration::from_millis(300),
            ..config(backend)
        })
        .start(|_| Upgrade::Accept(ByeThenClose))
        .unwrap();
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    assert_eq!(client.next_message().unwrap(), Owned::Text("bye".into()));
    // The server's Close follows; it is never answered (this client writes nothing).
    assert!(
        eventually(Duration::from_secs(10), || server.subscribers("room") == 0),
        "still subscribed while closing"
    );
    assert!(
        eventually(Duration::from_secs(10), || server.stats().connections_open
            == 0),
        "a close nobody answers is not timed"
    );
    server.shutdown(Duration::from_secs(1)).unwrap();
}

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            $(#[test] fn $name() { super::$name(websocket_driver::Backend::Epoll) })*
        }
        mod io_uring {
            $(#[test] fn $name() { super::$name(websocket_driver::Backend::IoUring) })*
        }
    };
}

/// Echoes, and panics on the text "panic".
struct Fragile;
impl Handler for Fragile {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        if message.as_text() == Some("panic") {
            panic!("a handler panics (on purpose)");
        }
        let _ = ws.send_message(&message);
    }
}

/// A server of `threads` loops whose `Fragile` handlers panic on "panic", under
/// `PanicPolicy::EndLoop`.
fn fragile_ending_loops(backend: Backend, threads: usize) -> ServerHandle {
    Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads,
            panic_policy: PanicPolicy::EndLoop,
            ..config(backend)
        })
        .start(|_| Upgrade::Accept(Fragile))
        .unwrap()
}

/// Under `PanicPolicy::EndLoop` a handler that panics ends its loop, and the loop lets go
/// of what it held: its other connections end (here one in the middle of 1 MiB echoes,
/// with receives and sends in the kernel's hands on io_uring, which the backend cancels
/// and waits for before its memory goes), and the server's handle reports the panic.
fn a_panicking_handler_ends_its_loop_and_its_connections(backend: Backend) {
    let server = fragile_ending_loops(backend, 1);
    let addr = server.local_addr();
    let mut streaming = TestClient::connect(addr, "/").unwrap();
    let mut idle = TestClient::connect(addr, "/").unwrap();
    let big = vec![0x42; 1 << 20];
    for _ in 0..3 {
        streaming.send_binary(&big).unwrap();
    }
    assert_eq!(
        streaming.next_message().unwrap(),
        Owned::Binary(big.clone())
    );
    let mut culprit = TestClient::connect(addr, "/").unwrap();
    culprit.send_text("panic").unwrap();
    // Ended, with a FIN or, where the server had not read everything, a reset.
    for client in [&mut culprit, &mut idle, &mut streaming] {
        assert!(client.wait_ended(), "a connection of the loop stayed open");
    }
    let error = server.shutdown(Duration::from_secs(1)).unwrap_err();
    assert_eq!(error.to_string(), "an event loop panicked");
}

/// Panics wherever the application's code runs on the loop, chosen by the request's path
/// or by the message: the upgrade closure (`/upgrade`), `on_open` (`/open`),
/// `on_message` ("panic"), a write callback ("later"), `on_close` ("close").
struct Touchy {
    panic_on_open: bool,
    panic_on_close: bool,
}
impl Handler for Touchy {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        if self.panic_on_open {
            panic!("on_open panics (on purpose)");
        }
        ws.subscribe("room").unwrap();
    }
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        match message.as_text() {
            Some("panic") => panic!("on_message panics (on purpose)"),
            Some("later") => {
                ws.send_with(b"sent", websocket_driver::MessageType::Text, |_| {
                    panic!("a write callback panics (on purpose)")
                })
                .unwrap();
            }
            Some("close") => {
                self.panic_on_close = true;
                ws.close_connection(1000, "").unwrap();
            }
            _ => {
                let _ = ws.send_message(&message);
            }
        }
    }
    fn on_close(&mut self, _ws: &mut Ws<'_>, _code: u16, _reason: &str) {
        if self.panic_on_close {
            panic!("on_close panics (on purpose)");
        }
    }
}

/// By default a panic fails only the connection it happened on: its peer gets close 1011
/// behind what was already queued (500 when the upgrade closure panicked), then the
/// server closes TCP; it leaves its topics at once; the loop's other connections (one in
/// the middle of 1 MiB echoes) go on, the panics are counted, and the server shuts down
/// cleanly.
fn a_panicking_handler_fails_only_its_connection(backend: Backend) {
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            ..config(backend)
        })
        .start(|request| {
            if request.path() == "/upgrade" {
                panic!("the upgrade closure panics (on purpose)");
            }
            Upgrade::Accept(Touchy {
                panic_on_open: request.path() == "/open",
                panic_on_close: false,
            })
        })
        .unwrap();
    let addr = server.local_addr();
    let mut streaming = TestClient::connect(addr, "/").unwrap();
    let big = vec![0x42; 1 << 20];
    for _ in 0..3 {
        streaming.send_binary(&big).unwrap();
    }
    assert!(eventually(Duration::from_secs(10), || server
        .subscribers("room")
        == 1));
    let mut expected = 0;
    for message in ["panic", "later", "close"] {
        let mut culprit = TestClient::connect(addr, "/").unwrap();
        assert!(eventually(Duration::from_secs(10), || server
            .subscribers("room")
            == 2));
        culprit.send_text(message).unwrap();
        if message == "later" {
            // The write callback ran once its message was out.
            assert_eq!(culprit.next_message().unwrap(), Owned::Text("sent".into()));
        }
        // A panic in `on_close` comes after the close handshake: nothing is left to say.
        let close = match message {
            "close" => Owned::Close(1000, String::new()),
            _ => Owned::Close(1011, "the handler panicked".into()),
        };
        assert_eq!(culprit.next_message().unwrap(), close, "{message}");
        assert!(culprit.wait_eof(), "{message}: the server closes TCP");
        expected += 1;
        assert!(
            eventually(Duration::from_secs(10), || server.stats().handler_panics
                == expected),
            "{message}: {:?}",
            server.stats()
        );
        assert_eq!(server.subscribers("room"), 1, "{message}: left its topic");
    }
    for path in ["/upgrade", "/open"] {
        let mut culprit = TestClient::connect_only(addr, path).unwrap();
        if path == "/upgrade" {
            let head = support::read_head(&mut culprit.stream);
            assert!(head.starts_with("HTTP/1.1 500 "), "{head}");
        } else {
            assert_eq!(culprit.next_event().unwrap(), Owned::Open);
            assert_eq!(
                culprit.next_message().unwrap(),
                Owned::Close(1011, "the handler panicked".into())
            );
        }
        assert!(culprit.wait_eof(), "{path}: the server closes TCP");
        expected += 1;
        assert!(
            eventually(Duration::from_secs(10), || server.stats().handler_panics
                == expected),
            "{path}: {:?}",
            server.stats()
        );
    }
    // The loop's other connection was never disturbed.
    for _ in 0..3 {
        assert_eq!(
            streaming.next_message().unwrap(),
            Owned::Binary(big.clone())
        );
    }
    streaming.send_text("still here").unwrap();
    assert_eq!(
        streaming.next_message().unwrap(),
        Owned::Text("still here".into())
    );
    assert_eq!(server.stats().connections_open, 1);
    drop(streaming);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

on_every_backend!(
    a_panicking_handler_ends_its_loop_and_its_connections,
    a_panicking_handler_fails_only_its_connection,
    close_timeout_drops_a_peer_that_never_answers,
    thousand_clients_echo_random_sizes_without_loss,
    random_disconnects_leak_no_connection,
    refused_send_closes_with_1008_under_close_policy,
    drop_new_policy_refuses_sends_over_the_limit,
    nine_thousand_idle_connections_open_and_close_cleanly,
    handshake_timeout_closes_silent_and_slow_sockets,
    shutdown_sends_1001_to_everyone_and_returns,
    plain_http_and_rejections_get_clear_responses,
    head_limits_at_the_limit_and_one_over,
    max_connections_answers_503_beyond_the_limit,
    sender_reaches_a_connection_from_another_thread,
    idle_timeout_pings_then_closes_a_silent_peer,
    write_and_pong_callbacks_run_and_are_dropped_on_close,
    a_pong_for_a_later_ping_runs_the_earlier_pings_callbacks_too,
    lingering_close_reads_until_the_peers_fin,
    a_peers_close_ends_the_connection_without_lingering,
    messages_echoed_by_value_arrive_whole_and_in_order,
    a_backlog_burst_leaves_room_for_open_connections,
    echoes_arrive_with_and_without_busy_polling,
    tiny_read_buffers_still_echo,
    a_burst_then_fin_is_read_to_the_end,
    a_fin_that_came_while_reading_was_paused_is_read,
    a_peer_that_closes_without_reading_is_dropped_after_the_close_timeout,
    a_reset_in_the_middle_of_a_payload_is_reported_as_a_reset,
    a_close_from_a_write_callback_is_timed_and_leaves_its_topics,
);

// ----- the session layer: close policy, keepalive, pipelined frames, stale senders -----

/// Closes with 1000 when it gets the text "bye"; records every `on_close`.
struct CloseOnBye(Arc<Mutex<Vec<(u16, String)>>>);
impl Handler for CloseOnBye {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        if message.as_text() == Some("bye") {
            ws.close_connection(1000, "bye").unwrap();
        }
    }
    fn on_close(&mut self, _ws: &mut Ws<'_>, code: u16, reason: &str) {
        self.0.lock().unwrap().push((code, reason.to_string()));
    }
}

/// README: "close timeout drops a silent peer with 1006". With an idle keepalive shorter
/// than the close timeout, a peer that never answers the server's Close must still get
/// the close timeout (and 1006), not an "idle timeout" for a ping that could not be sent.
fn a_silent_peer_in_the_close_handshake_gets_the_close_timeout(backend: Backend) {
    let closes = Arc::new(Mutex::new(Vec::new()));
    let log = closes.clone();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            backend,
            idle_timeout: Some(Duration::from_millis(200)),
            close_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        })
        .start(move |_| Upgrade::Accept(CloseOnBye(log.clone())))
        .unwrap();
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    client.send_text("bye").unwrap();
    let started = std::time::Instant::now();
    // Raw bytes from here: the Close is never answered.
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match client.stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("no EOF: {e}"),
        }
    }
    let ended = started.elapsed();
    assert_eq!(
        &seen[..4],
        [0x88, 5, 0x03, 0xe8],
        "our close frame: {seen:?}"
    );
    assert!(eventually(Duration::from_secs(5), || !closes
        .lock()
        .unwrap()
        .is_empty()));
    let closes = closes.lock().unwrap().clone();
    assert_eq!(
        closes,
        vec![(1006, "close handshake timed out".to_string())],
        "dropped after {ended:?}, bytes after the close frame: {:?}",
        &seen[7..]
    );
    assert!(
        ended >= Duration::from_millis(1500),
        "dropped after {ended:?}"
    );
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A client that sends its first frame in the same write as the upgrade request (and one
/// more right behind it) gets the 101, then both echoes.
fn frames_in_the_same_write_as_the_request_are_kept(backend: Backend) {
    let server = start_echo(config(backend));
    let url = format!("ws://{}/", server.local_addr());
    let mut driver =
        websocket_driver::Driver::make_client(&url, &websocket_driver::Options::default()).unwrap();
    driver.start_connection();
    let mut bytes = driver.pending_output().to_vec();
    let n = bytes.len();
    driver.consume_output(n);
    // Frames cannot be queued on a connecting driver: mask them by hand.
    for text in ["first", "second"] {
        let mut frame = vec![0x81, 0x80 | text.len() as u8, 1, 2, 3, 4];
        frame.extend(
            text.bytes()
                .enumerate()
                .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
        );
        bytes.extend(frame);
    }
    let mut stream = TcpStream::connect(server.local_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(&bytes).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("second") {
        let n = stream
            .read(&mut buf)
            .expect("echoes of the pipelined frames");
        assert!(n > 0, "EOF; got {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.find("first").unwrap() < text.find("second").unwrap());
    drop(stream);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// `BackpressurePolicy::Close { grace: ZERO }` closes "at the first refused send" (README,
/// `BackpressurePolicy` docs): a `Sender`'s send refused by the cap (`WouldBlock` wrapping
/// `BufferFull`) must close a peer that stopped reading with 1008, as a handler's does.
fn a_refused_sender_send_closes_under_close_policy(backend: Backend) {
    let (server, senders) = registering(ServerConfig {
        threads: 1,
        backend,
        max_backpressure: 64 * 1024,
        backpressure_policy: BackpressurePolicy::Close {
            grace: Duration::ZERO,
        },
        ..ServerConfig::default()
    });
    // A client that never reads.
    let _silent = TestClient::connect(server.local_addr(), "/").unwrap();
    let sender = registered(&senders, 1).remove(0);
    let chunk = vec![7u8; 16 * 1024];
    let mut accepted = 0;
    let refused = loop {
        match sender.send_binary(chunk.clone()) {
            Ok(()) => accepted += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break e,
            Err(e) => panic!("{e}"),
        }
        assert!(accepted < 100_000, "never refused");
        // Let the loop take each message, so sends are refused by the connection's
        // backlog rather than by the inbox.
        std::thread::sleep(Duration::from_millis(20));
    };
    let closed = eventually(Duration::from_secs(3), || {
        server.stats().closes.get(&1008) == Some(&1)
    });
    assert!(
        closed,
        "refused after {accepted} sends ({refused}), but still open 3 s later: {:?}",
        server.stats()
    );
    drop(_silent);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A `Sender` of a closed connection never reaches the next connection that gets its
/// slab key (one loop: the key is reused at once).
fn a_stale_sender_does_not_reach_the_keys_next_connection(backend: Backend) {
    let (server, senders) = registering(ServerConfig {
        threads: 1,
        backend,
        ..ServerConfig::default()
    });
    let mut first = TestClient::connect(server.local_addr(), "/").unwrap();
    first.driver.close_connection(1000, "").unwrap();
    first.flush().unwrap();
    assert_eq!(
        first.next_message().unwrap(),
        Owned::Close(1000, String::new())
    );
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .connections_open
        == 0));
    let mut second = TestClient::connect(server.local_addr(), "/").unwrap();
    let mut both = registered(&senders, 2);
    let (stale, fresh) = (both.remove(0), both.remove(0));
    assert_eq!(
        format!("{stale:?}").split("generation").next(),
        format!("{fresh:?}").split("generation").next(),
        "same key"
    );
    // Refused at once: its connection is gone (one sent just before the close is
    // dropped by the loop, which checks the generation).
    let refused = stale.send_text("for the first");
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::NotConnected),
        "{refused:?}"
    );
    fresh.send_text("for the second").unwrap();
    assert_eq!(
        second.next_message().unwrap(),
        Owned::Text("for the second".into())
    );
    drop((first, second));
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// `Close { grace: ZERO }` closes "at the first refused send": an echo whose one send was
/// accepted (the output was empty) is no refused send, so a client that sends a 4 MiB
/// message and reads the echo after 500 ms gets it, not a 1008.
fn an_accepted_send_over_the_cap_is_not_closed_under_close_policy(backend: Backend) {
    let refused = Arc::new(AtomicUsize::new(0));
    let server = start_flooder(
        ServerConfig {
            threads: 1,
            backend,
            max_backpressure: 256 * 1024,
            backpressure_policy: BackpressurePolicy::Close {
                grace: Duration::ZERO,
            },
            ..ServerConfig::default()
        },
        refused.clone(),
    );
    let mut client = slow_link_client(&server, 64 * 1024);
    let big = vec![0x5a; 4 << 20];
    client.send_binary(&big).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let echo = client.next_message().unwrap();
    assert_eq!(refused.load(Ordering::Relaxed), 0, "no send was refused");
    match echo {
        Owned::Binary(b) => assert_eq!(b.len(), big.len()),
        other => panic!(
            "expected the echo, got {other:?}; stats {:?}",
            server.stats()
        ),
    }
    drop(client);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A client reading a long download more slowly than the server produces it is alive,
/// though the keepalive's ping waits behind megabytes of output and its pong comes late:
/// output the peer keeps taking counts as life. The client's small receive buffer keeps the
/// backlog on the server's side, as a slow link would.
fn a_slow_reader_of_a_long_download_is_not_closed_as_idle(backend: Backend) {
    let refused = Arc::new(AtomicUsize::new(0));
    let server = start_flooder(
        ServerConfig {
            threads: 1,
            backend,
            idle_timeout: Some(Duration::from_millis(300)),
            max_backpressure: 16 << 20,
            ..ServerConfig::default()
        },
        refused.clone(),
    );
    let mut client = slow_link_client(&server, 64 * 1024);
    let (count, size) = (128, 64 * 1024);
    client.send_text(&format!("flood {count} {size}")).unwrap();
    // About 3 MB/s: the 8 MiB take 2.5 s, eight idle periods.
    for i in 0..count {
        match client.next_message().unwrap() {
            Owned::Binary(b) => assert_eq!(b.len(), size),
            other => panic!(
                "message {i}: expected binary, got {other:?}; stats {:?}",
                server.stats()
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(refused.load(Ordering::Relaxed), 0);
    assert!(server.stats().closes.is_empty(), "{:?}", server.stats());
    assert_eq!(server.stats().connections_open, 1);
    drop(client);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A client that stops reading a long download is still closed by the keepalive, however
/// much output waits: once its buffers are full it takes nothing more.
fn a_peer_that_stops_reading_a_download_is_closed_as_idle(backend: Backend) {
    let refused = Arc::new(AtomicUsize::new(0));
    let server = start_flooder(
        ServerConfig {
            threads: 1,
            backend,
            idle_timeout: Some(Duration::from_millis(200)),
            close_timeout: Duration::from_millis(300),
            max_backpressure: 16 << 20,
            ..ServerConfig::default()
        },
        refused.clone(),
    );
    let mut client = slow_link_client(&server, 64 * 1024);
    client.send_text("flood 128 65536").unwrap();
    // Never read: the idle close (1001, its frame stuck behind the output), then the close
    // timeout drops the socket.
    assert!(
        eventually(Duration::from_secs(10), || server.stats().connections_open
            == 0),
        "{:?}",
        server.stats()
    );
    assert_eq!(
        server.stats().closes.get(&1001),
        Some(&1),
        "{:?}",
        server.stats()
    );
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A client that sends its Close and then half-closes TCP is still reading: RFC 6455
/// §5.5.1 says the server must answer the Close with its own, and the FIN that came in the
/// same turn must not drop that answer.
fn a_close_followed_by_fin_is_answered(backend: Backend) {
    let server = start_echo(config(backend));
    for _ in 0..5 {
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        client.driver.close_connection(1000, "bye").unwrap();
        client.flush().unwrap();
        client.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(
            client.next_event().unwrap(),
            Owned::Close(1000, String::new()),
            "the server's Close answer"
        );
    }
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// A plain HTTP client that half-closes after its request still gets the server's answer.
fn a_request_followed_by_fin_gets_its_answer(backend: Backend) {
    let server = start_echo(config(backend));
    for _ in 0..5 {
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.1 426 "), "got {response:?}");
    }
    server.shutdown(Duration::from_secs(1)).unwrap();
}

/// `Duration::MAX` is "never" for every timeout (and for a shutdown's grace), not an
/// overflow that panics the loop at the first connection.
fn a_timeout_of_duration_max_means_never(backend: Backend) {
    let server = start_echo(ServerConfig {
        threads: 1,
        backend,
        handshake_timeout: Duration::MAX,
        close_timeout: Duration::MAX,
        idle_timeout: Some(Duration::MAX),
        backpressure_policy: BackpressurePolicy::Close {
            grace: Duration::MAX,
        },
        ..ServerConfig::default()
    });
    let mut client = TestClient::connect(server.local_addr(), "/").expect("the handshake");
    client.send_text("hello").unwrap();
    assert_eq!(client.next_message().unwrap(), Owned::Text("hello".into()));
    client.driver.close_connection(1000, "").unwrap();
    client.flush().unwrap();
    assert_eq!(
        client.next_message().unwrap(),
        Owned::Close(1000, String::new())
    );
    server.shutdown(Duration::MAX).unwrap();
}

mod session_layer {
    use super::*;
    on_every_backend!(
        a_silent_peer_in_the_close_handshake_gets_the_close_timeout,
        frames_in_the_same_write_as_the_request_are_kept,
        a_refused_sender_send_closes_under_close_policy,
        a_stale_sender_does_not_reach_the_keys_next_connection,
        an_accepted_send_over_the_cap_is_not_closed_under_close_policy,
        a_slow_reader_of_a_long_download_is_not_closed_as_idle,
        a_peer_that_stops_reading_a_download_is_closed_as_idle,
        a_close_followed_by_fin_is_answered,
        a_request_followed_by_fin_gets_its_answer,
        a_timeout_of_duration_max_means_never,
    );
}

mod panics_in_drops {
    use super::*;

    /// Panics when dropped outside an unwind: a value a callback captured.
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                panic!("a callback's captured value panics on drop (on purpose)");
            }
        }
    }

    /// Echoes; on "panic" leaves a pong callback pending (capturing a `Bomb`) and panics.
    struct PanicsWithCallbackPending;
    impl Handler for PanicsWithCallbackPending {
        fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
            if message.as_text() == Some("panic") {
                let bomb = Bomb;
                ws.send_ping(b"never answered", move |_| drop(bomb))
                    .unwrap();
                panic!("on_message panics (on purpose) with a pong callback pending");
            }
            let _ = ws.send_message(&message);
        }
    }

    /// The callbacks of an abandoned connection are the application's code too: dropping
    /// them in `Service::abandoned` (WsService::forget) must be guarded like the session's
    /// drop, or a panic there ends the loop under `PanicPolicy::CloseConnection`.
    fn a_panic_dropping_an_abandoned_connections_callback_drops_only_it(backend: Backend) {
        let server = Server::bind("127.0.0.1:0")
            .unwrap()
            .config(ServerConfig {
                threads: 1,
                ..config(backend)
            })
            .start(|_| Upgrade::Accept(PanicsWithCallbackPending))
            .unwrap();
        let addr = server.local_addr();
        let mut bystander = TestClient::connect(addr, "/").unwrap();
        let mut culprit = TestClient::connect(addr, "/").unwrap();
        culprit.send_text("panic").unwrap();
        let _ = culprit.next_event();
        std::thread::sleep(Duration::from_millis(300));
        bystander.send_text("still here").unwrap();
        assert_eq!(
            bystander.next_message().ok(),
            Some(Owned::Text("still here".into())),
            "the loop died: {:?}",
            server.stats()
        );
        assert!(server.stats().handler_panics >= 1, "{:?}", server.stats());
        drop((bystander, culprit));
        server.shutdown(Duration::from_secs(1)).unwrap();
    }

    on_every_backend!(a_panic_dropping_an_abandoned_connections_callback_drops_only_it);
}

mod eof_after_close {
    use super::*;

    /// The peer's Close and FIN arrive behind a long download it never reads: the answer
    /// waits behind 8 MiB, the FIN takes the lingering away, and the close timeout must
    /// still drop the connection.
    fn a_close_and_fin_from_a_peer_that_never_reads_still_times_out(backend: Backend) {
        let refused = Arc::new(AtomicUsize::new(0));
        let server = start_flooder(
            ServerConfig {
                threads: 1,
                backend,
                close_timeout: Duration::from_millis(300),
                max_backpressure: 16 << 20,
                ..ServerConfig::default()
            },
            refused.clone(),
        );
        let mut client = slow_link_client(&server, 16 * 1024);
        client.send_text("flood 128 65536").unwrap();
        client.driver.close_connection(1000, "bye").unwrap();
        client.flush().unwrap();
        client.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(
            eventually(Duration::from_secs(5), || server.stats().connections_open
                == 0),
            "{:?}",
            server.stats()
        );
        drop(client);
        server.shutdown(Duration::from_secs(1)).unwrap();
    }

    on_every_backend!(a_close_and_fin_from_a_peer_that_never_reads_still_times_out);
}

mod end_loop_leaves_counts {
    use super::*;

    /// Under `PanicPolicy::EndLoop` the panicking loop's connections are dropped and the
    /// other loops go on: `Stats::connections_open` and `subscribers` no longer count them,
    /// and the surviving loop takes connections up to `max_connections` again (all three
    /// kept counting the dead loop's connections).
    fn an_ended_loops_connections_are_no_longer_counted(backend: Backend) {
        const CLIENTS: usize = 8;
        let server = Server::bind("127.0.0.1:0")
            .unwrap()
            .config(ServerConfig {
                threads: 2,
                max_connections: CLIENTS,
                panic_policy: PanicPolicy::EndLoop,
                ..config(backend)
            })
            .start(|_| {
                Upgrade::Accept(Touchy {
                    panic_on_open: false,
                    panic_on_close: false,
                })
            })
            .unwrap();
        let addr = server.local_addr();
        let mut clients: Vec<TestClient> = (0..CLIENTS)
            .map(|_| TestClient::connect(addr, "/").unwrap())
            .collect();
        assert!(eventually(Duration::from_secs(5), || server
            .subscribers("room")
            == CLIENTS));
        clients[0].send_text("panic").unwrap();
        // Which connections survived: those that still echo.
        std::thread::sleep(Duration::from_millis(300));
        let mut alive = 0;
        for client in &mut clients {
            client
                .stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            if client.send_text("hello").is_ok()
                && client.next_message().ok() == Some(Owned::Text("hello".into()))
            {
                alive += 1;
            }
        }
        // The kernel spreads connections over the loops as it likes: all may have been on
        // the loop that ended (then none survives, and the other loop takes them all anew).
        let dead = CLIENTS - alive;
        assert!(dead >= 1, "the panicking connection's loop ended");
        std::thread::sleep(Duration::from_millis(200));
        let stats = server.stats();
        let subscribers = server.subscribers("room");
        // The surviving loop can take as many connections as the dead one held.
        let mut refused = 0;
        let mut extra = Vec::new();
        for _ in 0..dead {
            match TestClient::connect(addr, "/") {
                Ok(client) => extra.push(client),
                Err(_) => refused += 1,
            }
        }
        assert_eq!(
            (stats.connections_open, subscribers, refused),
            (alive, alive, 0),
            "after the loop ended with {dead} connections: {stats:?}"
        );
        drop(extra);
        let _ = server.shutdown(Duration::from_secs(1));
    }

    on_every_backend!(an_ended_loops_connections_are_no_longer_counted);
}

mod sender_after_close {
    use super::*;

    /// A `Sender` whose connection has closed fails with `NotConnected` (`NotOpen`), every
    /// time, never with `WouldBlock` / `BufferFull`, which tells the caller to wait for a
    /// drain that never comes (the loop dropped each message, but they stayed counted
    /// against the cap, and after a cap's worth every send was refused as full).
    fn a_closed_connections_sender_fails_as_not_connected(backend: Backend) {
        let (server, senders) = registering(ServerConfig {
            threads: 1,
            backend,
            max_backpressure: 64 * 1024,
            ..ServerConfig::default()
        });
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let sender = registered(&senders, 1).remove(0);
        client.driver.close_connection(1000, "").unwrap();
        client.flush().unwrap();
        assert_eq!(
            client.next_message().unwrap(),
            Owned::Close(1000, String::new())
        );
        assert!(eventually(Duration::from_secs(5), || server
            .stats()
            .connections_open
            == 0));
        let chunk = vec![7u8; 16 * 1024];
        for i in 0..20 {
            let sent = sender.send_binary(chunk.clone());
            assert!(
                matches!(&sent, Err(e) if e.kind() == std::io::ErrorKind::NotConnected
                && matches!(
                    e.get_ref().and_then(|e| e.downcast_ref::<Error>()),
                    Some(Error::Usage(UsageError::NotOpen))
                )),
                "send {i} to the closed connection: {sent:?}"
            );
        }
        server.shutdown(Duration::from_secs(1)).unwrap();
    }

    on_every_backend!(a_closed_connections_sender_fails_as_not_connected);
}

mod sender_validation {
    use super::*;
    use websocket_driver::MessageType;

    /// `Sender::send` refuses what `Ws::send` refuses, since the loop would have no one to
    /// report it to: text that is not UTF-8 fails with `InvalidInput` wrapping
    /// `UsageError::InvalidUtf8` (it was accepted with `Ok` and dropped by the loop).
    fn a_sender_refuses_text_that_is_not_utf8(backend: Backend) {
        let (server, senders) = registering(ServerConfig {
            threads: 1,
            backend,
            ..ServerConfig::default()
        });
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let sender = registered(&senders, 1).remove(0);
        let result = sender.send(vec![0xff, 0xfe], MessageType::Text);
        sender.send_text("next").unwrap();
        let first = client.next_message().unwrap();
        assert!(
            result.is_err(),
            "invalid UTF-8 text accepted ({result:?}) and never delivered: the client's \
             first message is {first:?}"
        );
        drop(client);
        server.shutdown(Duration::from_secs(1)).unwrap();
    }

    on_every_backend!(a_sender_refuses_text_that_is_not_utf8);
}

/// A burst over the cap followed by Close and FIN, and a shutdown in the middle of a write.
mod close_under_load {
    use super::*;

    /// A peer that sends a burst far over the output cap without reading, then its Close
    /// and its FIN, and only then reads: it gets every echo, in order, and the Close
    /// answer behind them (its Close came before its FIN, so nothing it sent is abnormal).
    fn close_and_fin_after_a_burst_over_the_cap_get_every_echo_and_the_answer(backend: Backend) {
        let server = start_echo(ServerConfig {
            threads: 1,
            max_backpressure: 64 * 1024,
            ..config(backend)
        });
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        const N: usize = 256;
        let mut burst = Vec::new();
        for i in 0..N {
            let mut frame = vec![0x82, 0x80 | 126, 0x10, 0x00, 0, 0, 0, 0];
            frame.extend_from_slice(&[i as u8; 4096]);
            burst.extend_from_slice(&frame);
        }
        // Close 1000, masked with key 0.
        burst.extend_from_slice(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]);
        let mut writer = client.stream.try_clone().unwrap();
        let sending = std::thread::spawn(move || {
            writer.write_all(&burst).unwrap();
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        std::thread::sleep(Duration::from_millis(300));
        // Everything the server sends, to its FIN (the client writes nothing more).
        let mut bytes = Vec::new();
        let _ = client.stream.read_to_end(&mut bytes);
        sending.join().unwrap();
        let mut events = Vec::new();
        let (mut at, total) = (0, bytes.len());
        loop {
            let (used, event) = client.driver.poll_event(&mut bytes[at..]);
            at += used;
            match event {
                Some(event) => events.push(support::own(event)),
                None if at >= total => break,
                None => {}
            }
        }
        let echoes = events
            .iter()
            .take_while(|e| matches!(e, Owned::Binary(_)))
            .count();
        for (i, event) in events.iter().take(echoes).enumerate() {
            let Owned::Binary(data) = event else {
                unreachable!()
            };
            assert!(
                data.len() == 4096 && data.iter().all(|&b| b == i as u8),
                "echo {i}"
            );
        }
        assert_eq!(
            (echoes, events.get(echoes)),
            (N, Some(&Owned::Close(1000, String::new()))),
            "every echo, then the server's Close answer"
        );
        server.shutdown(Duration::from_secs(1)).unwrap();
    }

    /// Shutdown with a connection in the middle of a write to a slow reader: the output
    /// already queued goes out first, then the 1001, within the grace.
    fn shutdown_mid_write_delivers_the_output_then_1001(backend: Backend) {
        let server = start_echo(ServerConfig {
            threads: 1,
            max_backpressure: 64 << 20,
            ..config(backend)
        });
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let payload: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        client.send_binary(&payload).unwrap();
        // The echo fills the socket buffers; then the shutdown starts.
        std::thread::sleep(Duration::from_millis(300));
        let handle = std::thread::spawn(move || {
            server.shutdown(Duration::from_secs(10)).unwrap();
        });
        std::thread::sleep(Duration::from_millis(300));
        match client.next_event().unwrap() {
            Owned::Binary(data) => assert!(data == payload, "the echo"),
            other => panic!("got {other:?}"),
        }
        assert_eq!(
            client.next_event().unwrap(),
            Owned::Close(1001, "server shutting down".into())
        );
        handle.join().unwrap();
    }

    on_every_backend!(
        close_and_fin_after_a_burst_over_the_cap_get_every_echo_and_the_answer,
        shutdown_mid_write_delivers_the_output_then_1001,
    );
}

mod wait_beside_shutdown {
    use super::*;

    /// Under `PanicPolicy::EndLoop` "the server's `wait` and `shutdown` report 'an event
    /// loop panicked'": also when another thread is blocked in `wait()` as `shutdown`
    /// is called.
    fn shutdown_beside_a_waiting_thread_reports_a_panicked_loop(backend: Backend) {
        let server = fragile_ending_loops(backend, 2);
        let addr = server.local_addr();
        let waiter = server.clone();
        let waiting = std::thread::spawn(move || waiter.wait());
        std::thread::sleep(Duration::from_millis(100));
        let mut culprit = TestClient::connect(addr, "/").unwrap();
        culprit.send_text("panic").unwrap();
        assert!(culprit.wait_ended());
        let shut = server.shutdown(Duration::from_secs(1));
        let waited = waiting.join().unwrap();
        assert_eq!(
            waited.as_ref().map_err(|e| e.to_string()),
            Err("an event loop panicked".to_string())
        );
        assert_eq!(
            shut.map_err(|e| e.to_string()),
            Err("an event loop panicked".to_string()),
            "shutdown did not report the panicked loop"
        );
    }

    /// The same without a second thread: `wait()` reports the panic, and so does a
    /// `shutdown` after it (it returned `Ok`: the first join took the outcome with it).
    fn shutdown_after_wait_still_reports_a_panicked_loop(backend: Backend) {
        let server = fragile_ending_loops(backend, 1);
        let mut culprit = TestClient::connect(server.local_addr(), "/").unwrap();
        culprit.send_text("panic").unwrap();
        assert!(culprit.wait_ended());
        // The only loop has ended: wait() returns, with the panic.
        assert_eq!(
            server.wait().map_err(|e| e.to_string()),
            Err("an event loop panicked".to_string())
        );
        assert_eq!(
            server
                .shutdown(Duration::from_secs(1))
                .map_err(|e| e.to_string()),
            Err("an event loop panicked".to_string()),
            "shutdown did not report the panicked loop"
        );
    }

    on_every_backend!(
        shutdown_beside_a_waiting_thread_reports_a_panicked_loop,
        shutdown_after_wait_still_reports_a_panicked_loop
    );
}

mod shutdown_from_a_handler {
    use super::*;
    use std::sync::OnceLock;

    /// Calls on its server's handle from inside `on_message` ("stop": `shutdown`, "wait":
    /// `wait`) and reports what they returned.
    struct Admin {
        handle: Arc<OnceLock<ServerHandle>>,
        said: std::sync::mpsc::Sender<String>,
    }

    impl Handler for Admin {
        fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
            let handle = self.handle.get().unwrap();
            match message.as_text() {
                Some("wait") => {
                    let waited = handle.wait().map_err(|e| e.kind());
                    let _ = self.said.send(format!("wait {waited:?}"));
                    let _ = ws.send_text("still serving");
                }
                Some("stop") => {
                    let shut = handle
                        .shutdown(Duration::from_secs(1))
                        .map_err(|e| e.kind());
                    let _ = self.said.send(format!("shutdown {shut:?}"));
                }
                _ => {}
            }
        }
    }

    /// `ServerHandle` "controls a running server from any thread", a handler's too:
    /// `wait` there fails at once (the loop would wait for itself) and the loop goes on;
    /// `shutdown` there starts the shutdown and returns, every client gets 1001, and
    /// `wait` on another thread sees the loops end. (Both joined the handler's own
    /// thread: a panic, close 1011 to the client, and the handle's lock poisoned for
    /// every later `wait` and `shutdown`.)
    fn wait_and_shutdown_from_a_handler(backend: Backend) {
        let handle = Arc::new(OnceLock::new());
        let (said, heard) = std::sync::mpsc::channel();
        let (cell, said) = (handle.clone(), Mutex::new(said));
        let server = Server::bind("127.0.0.1:0")
            .unwrap()
            .config(ServerConfig {
                threads: 2,
                backend,
                ..ServerConfig::default()
            })
            .start(move |_| {
                Upgrade::Accept(Admin {
                    handle: cell.clone(),
                    said: said.lock().unwrap().clone(),
                })
            })
            .unwrap();
        handle.set(server.clone()).ok().unwrap();
        let mut admin = TestClient::connect(server.local_addr(), "/").unwrap();
        let mut other = TestClient::connect(server.local_addr(), "/").unwrap();
        admin.send_text("wait").unwrap();
        let said = heard.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(said, "wait Err(Deadlock)");
        assert_eq!(
            admin.next_message().unwrap(),
            Owned::Text("still serving".into())
        );

        admin.send_text("stop").unwrap();
        let said = heard.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(said, "shutdown Ok(())");
        for client in [&mut admin, &mut other] {
            assert!(
                matches!(client.next_message(), Ok(Owned::Close(1001, _))),
                "a client did not get 1001"
            );
        }
        drop((admin, other));
        let waiter = server.clone();
        let waited = std::thread::spawn(move || waiter.wait());
        assert!(waited.join().unwrap().is_ok());
        assert!(server.shutdown(Duration::from_secs(1)).is_ok());
        assert_eq!(server.stats().handler_panics, 0);
    }

    on_every_backend!(wait_and_shutdown_from_a_handler);
}
