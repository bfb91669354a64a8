//! BlockingClient timeouts and close paths against raw servers that misbehave.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use websocket_driver::client::{BlockingClient, ClientTimeouts};
use websocket_driver::{Error, Options};

/// A server that answers the upgrade, then reads (and drops) everything and never writes
/// nor closes, for `hold`.
fn silent_after_upgrade(hold: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
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
