//! A handler that panics fails its own connection (close 1011 behind everything it had
//! queued, then the server closes TCP) wherever the panic comes from: `on_drain`, a write
//! callback with megabytes queued, a pong callback, after an echo over permessage-deflate
//! or of a large frame received straight into its buffer; its `Sender`s fail; and a
//! shutdown is not held up by it. On both backends.
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Owned, TestClient, eventually};
use websocket_driver::server::{Handler, Sender, Server, ServerConfig, ServerHandle, Upgrade, Ws};
use websocket_driver::{Backend, Message, MessageType, Options};

const BACKENDS: [Backend; 2] = [Backend::Epoll, Backend::IoUring];

fn server_with<H: Handler>(
    backend: Backend,
    tweak: impl FnOnce(&mut ServerConfig),
    make: impl Fn() -> H + Send + Sync + 'static,
) -> ServerHandle {
    let mut config = ServerConfig {
        threads: 1,
        backend,
        close_timeout: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    tweak(&mut config);
    Server::bind("127.0.0.1:0")
        .unwrap()
        .config(config)
        .start(move |_| Upgrade::Accept(make()))
        .unwrap()
}

fn expect_1011(client: &mut TestClient, what: &str) {
    assert_eq!(
        client.next_message().unwrap(),
        Owned::Close(1011, "the handler panicked".into()),
        "{what}"
    );
    assert!(client.wait_eof(), "{what}: the server closes TCP");
    // Our FIN ends the server's lingering at once.
    let _ = client.stream.shutdown(std::net::Shutdown::Both);
}

fn settled(server: &ServerHandle, panics: u64) -> bool {
    eventually(Duration::from_secs(10), || {
        let s = server.stats();
        s.handler_panics == panics && s.connections_open == 0
    })
}

// ---- on_drain ----

struct FloodThenPanicOnDrain(Arc<Mutex<usize>>);
impl Handler for FloodThenPanicOnDrain {
    fn on_message(&mut self, ws: &mut Ws<'_>, _message: Message<'_>) {
        let chunk = vec![7u8; 64 * 1024];
        let mut n = 0;
        while ws.send_binary(&chunk).is_ok() {
            n += 1;
        }
        *self.0.lock().unwrap() = n;
    }
    fn on_drain(&mut self, _ws: &mut Ws<'_>) {
        panic!("on_drain panics (on purpose)");
    }
}

/// A panic in `on_drain`: every message queued up to the cap arrives whole, then 1011.
#[test]
fn a_panic_in_on_drain_sends_what_was_queued_then_1011() {
    for backend in BACKENDS {
        let sent = Arc::new(Mutex::new(0));
        let s2 = sent.clone();
        let server = server_with(
            backend,
            |c| c.max_backpressure = 256 * 1024,
            move || FloodThenPanicOnDrain(s2.clone()),
        );
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        client.send_text("go").unwrap();
        // The handler filled its output up to the cap before the first read.
        assert!(eventually(Duration::from_secs(10), || *sent
            .lock()
            .unwrap()
            > 0));
        let n = *sent.lock().unwrap();
        for i in 0..n {
            match client.next_message().unwrap() {
                Owned::Binary(b) => assert_eq!(b.len(), 64 * 1024, "{backend} {i}"),
                other => panic!("{backend} {i}/{n}: {other:?}"),
            }
        }
        expect_1011(&mut client, &format!("{backend}"));
        assert!(settled(&server, 1), "{backend}: {:?}", server.stats());
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

// ---- a write callback with lots queued ----

struct BigThenCallbackPanics;
impl Handler for BigThenCallbackPanics {
    fn on_message(&mut self, ws: &mut Ws<'_>, _message: Message<'_>) {
        let big = vec![9u8; 2 << 20];
        ws.send_with(&big, MessageType::Binary, |ws| {
            let _ = ws.send_text("from the callback");
            panic!("a write callback panics (on purpose)")
        })
        .unwrap();
        ws.send_text("tail").unwrap();
    }
}

/// A write callback panics with 2 MiB ahead of it (on io_uring, inside the take of the
/// output): nothing is lost, repeated or reordered, what the callback sent included.
#[test]
fn a_write_callback_panic_loses_no_byte_of_what_was_queued() {
    for backend in BACKENDS {
        let server = server_with(
            backend,
            |c| c.max_backpressure = 16 << 20,
            || BigThenCallbackPanics,
        );
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        client.send_text("go").unwrap();
        match client.next_message().unwrap() {
            Owned::Binary(b) => assert!(b.len() == 2 << 20 && b.iter().all(|&x| x == 9)),
            other => panic!("{backend}: {other:?}"),
        }
        assert_eq!(
            client.next_message().unwrap(),
            Owned::Text("tail".into()),
            "{backend}"
        );
        assert_eq!(
            client.next_message().unwrap(),
            Owned::Text("from the callback".into()),
            "{backend}"
        );
        expect_1011(&mut client, &format!("{backend}"));
        assert!(settled(&server, 1), "{backend}: {:?}", server.stats());
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

// ---- deflate ----

struct EchoThenPanic;
impl Handler for EchoThenPanic {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        ws.send_message(&message).unwrap();
        if message.as_text() == Some("panic") || matches!(message, Message::Binary(_)) {
            panic!("panics after its echo (on purpose)");
        }
    }
}

/// Over permessage-deflate the echo goes out compressed, then 1011.
#[test]
fn a_panic_after_a_compressed_echo_sends_the_echo_then_1011() {
    for backend in BACKENDS {
        let server = server_with(
            backend,
            |c| c.options = Options::default().deflate(true),
            || EchoThenPanic,
        );
        let options = Options::default().deflate(true);
        let mut client = TestClient::connect_with(server.local_addr(), "/", &options).unwrap();
        client.send_text("hello").unwrap();
        assert_eq!(client.next_message().unwrap(), Owned::Text("hello".into()));
        client.send_text("panic").unwrap();
        assert_eq!(client.next_message().unwrap(), Owned::Text("panic".into()));
        expect_1011(&mut client, &format!("{backend}"));
        assert!(settled(&server, 1), "{backend}: {:?}", server.stats());
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

// ---- a large frame (payload loan) ----

/// A 4 MiB message (received straight into its own buffer), echoed, then a panic: the
/// echo whole, then 1011, three times over on one loop.
#[test]
fn a_panic_after_a_large_echo_sends_the_echo_then_1011() {
    for backend in BACKENDS {
        let server = server_with(backend, |_| {}, || EchoThenPanic);
        for round in 1..=3u64 {
            let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
            let big: Vec<u8> = (0..(4 << 20)).map(|i| (i * 7 % 251) as u8).collect();
            client.send_binary(&big).unwrap();
            match client.next_message().unwrap() {
                Owned::Binary(b) => assert!(b == big, "{backend}: echo differs"),
                other => panic!("{backend}: {other:?}"),
            }
            expect_1011(&mut client, &format!("{backend}"));
            assert!(settled(&server, round), "{backend}: {:?}", server.stats());
        }
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

// ---- pong callback ----

struct PongCallbackPanics;
impl Handler for PongCallbackPanics {
    fn on_message(&mut self, ws: &mut Ws<'_>, _message: Message<'_>) {
        ws.send_ping(b"x", |_| panic!("a pong callback panics (on purpose)"))
            .unwrap();
        ws.send_text("after ping").unwrap();
    }
}

/// A pong callback that panics fails the connection it was given for.
#[test]
fn a_pong_callback_panic_fails_its_connection() {
    for backend in BACKENDS {
        let server = server_with(backend, |_| {}, || PongCallbackPanics);
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        client.send_text("go").unwrap();
        assert_eq!(
            client.next_message().unwrap(),
            Owned::Text("after ping".into())
        );
        expect_1011(&mut client, &format!("{backend}"));
        assert!(settled(&server, 1), "{backend}: {:?}", server.stats());
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

// ---- a Sender of the failed connection ----

struct KeepsSender(Arc<Mutex<Option<Sender>>>);
impl Handler for KeepsSender {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        *self.0.lock().unwrap() = Some(ws.sender());
    }
    fn on_message(&mut self, _ws: &mut Ws<'_>, _message: Message<'_>) {
        panic!("panics (on purpose)");
    }
}

/// A `Sender` of a failed connection refuses: the connection is gone for it.
#[test]
fn a_failed_connections_sender_refuses() {
    for backend in BACKENDS {
        let slot = Arc::new(Mutex::new(None));
        let s2 = slot.clone();
        let server = server_with(backend, |_| {}, move || KeepsSender(s2.clone()));
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        client.send_text("go").unwrap();
        assert_eq!(
            client.next_message().unwrap(),
            Owned::Close(1011, "the handler panicked".into())
        );
        let sender = slot.lock().unwrap().take().unwrap();
        let err = sender.send_text("late").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotConnected, "{backend}");
        assert!(client.wait_eof());
        assert!(settled(&server, 1), "{backend}: {:?}", server.stats());
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

// ---- shutdown ----

struct PanicsOnClose;
impl Handler for PanicsOnClose {
    fn on_close(&mut self, _ws: &mut Ws<'_>, _code: u16, _reason: &str) {
        panic!("on_close panics (on purpose)");
    }
}

/// A shutdown whose 1001 makes `on_close` panic finishes without waiting out its deadline.
#[test]
fn a_shutdown_through_a_panicking_on_close_does_not_wait_out_its_deadline() {
    for backend in BACKENDS {
        let server = server_with(backend, |_| {}, || PanicsOnClose);
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let started = std::time::Instant::now();
        let stopper = std::thread::spawn(move || {
            let r = server.shutdown(Duration::from_secs(5));
            (r.is_ok(), server.stats().handler_panics)
        });
        assert_eq!(
            client.next_message().unwrap(),
            Owned::Close(1001, "server shutting down".into()),
            "{backend}"
        );
        assert!(client.wait_eof(), "{backend}");
        let (ok, panics) = stopper.join().unwrap();
        assert!(ok, "{backend}");
        assert_eq!(panics, 1, "{backend}");
        // Its deadline is 5 s: done before it, whatever the machine's speed.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{backend}: shutdown took {:?}",
            started.elapsed()
        );
    }
}

/// Queues 8 MiB, then panics.
struct FloodThenPanic;
impl Handler for FloodThenPanic {
    fn on_message(&mut self, ws: &mut Ws<'_>, _message: Message<'_>) {
        let chunk = vec![1u8; 1 << 20];
        for _ in 0..8 {
            let _ = ws.send_binary(&chunk);
        }
        panic!("panics with 8 MiB queued (on purpose)");
    }
}

/// A failed connection whose peer reads nothing (8 MiB queued, a 30 s close timeout)
/// does not hold a shutdown past its own deadline.
#[test]
fn a_failed_connection_stuck_writing_does_not_hold_a_shutdown() {
    for backend in BACKENDS {
        let server = server_with(
            backend,
            |c| {
                c.max_backpressure = 64 << 20;
                c.close_timeout = Duration::from_secs(30);
            },
            || FloodThenPanic,
        );
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        client.send_text("go").unwrap();
        assert!(eventually(Duration::from_secs(10), || server
            .stats()
            .handler_panics
            == 1));
        let started = std::time::Instant::now();
        server.shutdown(Duration::from_secs(1)).unwrap();
        // By the shutdown's 1 s deadline, not the 30 s close timeout.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{backend}: shutdown took {:?}",
            started.elapsed()
        );
        drop(client);
    }
}
