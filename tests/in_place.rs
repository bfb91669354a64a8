//! Replies sent from the buffer their message was received in (the reactor's receive
//! buffers, lent to the reply instead of copied into the output): every byte and the order
//! among the connection's other sends hold, also when the socket takes only part of a
//! reply; only messages of at least half a receive buffer (io_uring, which keeps the buffer
//! until the send completes) or of 4 KiB (epoll, which takes it back after its write) go
//! that way, and never over permessage-deflate, or for a message reassembled from several
//! receives.

mod support;

use std::io::Write;
use std::time::Duration;

use support::{Owned, Rng, TestClient, backends};
use websocket_driver::server::{Handler, Server, ServerConfig, ServerHandle, Upgrade, Ws};
use websocket_driver::{Backend, Message, Options};

/// Half of io_uring's 32 KiB receive buffers: the smallest payload it sends in place.
const HALF_A_BUFFER: usize = 16 * 1024;
/// The smallest payload epoll sends in place.
const EPOLL_IN_PLACE_MIN: usize = 4096;

/// Answers a binary message with a text before it, the message itself, and a text after.
struct Bracketing;
impl Handler for Bracketing {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        if matches!(message, Message::Binary(_)) {
            ws.send_text("before").unwrap();
            ws.send_message(&message).unwrap();
            ws.send_text("after").unwrap();
        } else {
            ws.send_message_owned(message).unwrap();
        }
    }
}

fn server(backend: Backend, options: Options) -> ServerHandle {
    Server::bind("127.0.0.1:0")
        .unwrap()
        .threads(1)
        .backend(backend)
        .options(options)
        .start(|_| Upgrade::Accept(Bracketing))
        .unwrap()
}

/// Sends `message` and checks the three replies.
fn bracketed_echo(client: &mut TestClient, message: &[u8]) {
    client.send_binary(message).unwrap();
    assert_eq!(client.next_message().unwrap(), Owned::Text("before".into()));
    match client.next_message().unwrap() {
        Owned::Binary(reply) => assert!(reply == message, "{} bytes came back", reply.len()),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.next_message().unwrap(), Owned::Text("after".into()));
}

/// Echoes messages of `size` until one went in place, at most 10: a receive that caught
/// only part of a frame reassembles it (and copies the reply), which is rare but possible.
fn echoes_until_one_goes_in_place(
    server: &ServerHandle,
    client: &mut TestClient,
    rng: &mut Rng,
    size: usize,
) {
    let before = server.stats().replies_in_place;
    for _ in 0..10 {
        bracketed_echo(client, &rng.bytes(size));
        if server.stats().replies_in_place > before {
            return;
        }
    }
    panic!("none of 10 replies of {size} B was sent in place");
}

#[test]
fn replies_in_place_keep_their_bytes_and_their_order() {
    for backend in backends() {
        let server = server(backend, Options::default());
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let mut rng = Rng(7);
        for i in 0..40 {
            let size = HALF_A_BUFFER + i * 400;
            bracketed_echo(&mut client, &rng.bytes(size));
        }
        // Text goes the same way, through `send_message_owned` (16 404 bytes, checked
        // UTF-8 as it arrived).
        let text = "é".repeat(HALF_A_BUFFER / 2 + 10);
        client.send_text(&text).unwrap();
        assert_eq!(client.next_message().unwrap(), Owned::Text(text));
        // Each frame left the client in one write; a receive that caught only part of one
        // (then reassembled, and copied) is possible but rare.
        let in_place = server.stats().replies_in_place;
        assert!(in_place >= 20, "{backend}: {in_place} of 41 sent in place");
        // Gone first, so the shutdown does not wait out its deadline for them.
        drop(client);
        server.shutdown(Duration::from_secs(2)).unwrap();
    }
}

/// At the limit (half a receive buffer on io_uring, 4 KiB on epoll) a reply goes in
/// place; one byte under, it is copied.
#[test]
fn only_messages_of_the_backends_limit_or_more_are_sent_in_place() {
    for backend in backends() {
        let limit = match backend {
            Backend::IoUring => HALF_A_BUFFER,
            _ => EPOLL_IN_PLACE_MIN,
        };
        let server = server(backend, Options::default());
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let mut rng = Rng(11);
        for _ in 0..10 {
            bracketed_echo(&mut client, &rng.bytes(limit - 1));
        }
        assert_eq!(
            server.stats().replies_in_place,
            0,
            "{backend}: one byte under the limit"
        );
        echoes_until_one_goes_in_place(&server, &mut client, &mut rng, limit);
        drop(client);
        server.shutdown(Duration::from_secs(2)).unwrap();
    }
}

/// A client that sends 300 large messages before it reads any reply: the server's socket
/// fills, so replies sent in place are written in part, and the rest waits (on epoll,
/// copied out of the read buffer, which the next receive reuses). Every reply still comes
/// back whole and in order.
#[test]
fn replies_in_place_to_a_peer_that_reads_late_arrive_whole() {
    const MESSAGES: usize = 300;
    for backend in backends() {
        // Room for every reply, so that none is refused as over the cap.
        let config = ServerConfig {
            max_backpressure: 64 << 20,
            threads: 1,
            backend,
            ..ServerConfig::default()
        };
        let server = Server::bind("127.0.0.1:0")
            .unwrap()
            .config(config)
            .start(|_| Upgrade::Accept(Bracketing))
            .unwrap();
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let mut rng = Rng(17);
        let messages: Vec<Vec<u8>> = (0..MESSAGES)
            .map(|_| rng.bytes(HALF_A_BUFFER + 3000))
            .collect();
        let mut wire = Vec::new();
        for message in &messages {
            client.driver.send_binary(message).unwrap();
            while !client.driver.pending_output().is_empty() {
                let n = client.driver.pending_output().len();
                wire.extend_from_slice(client.driver.pending_output());
                client.driver.consume_output(n);
            }
        }
        let mut stream = client.stream.try_clone().unwrap();
        let writer = std::thread::spawn(move || stream.write_all(&wire));
        // Not reading yet: the replies pile up in the sockets.
        std::thread::sleep(Duration::from_millis(300));
        for (i, message) in messages.iter().enumerate() {
            assert_eq!(client.next_message().unwrap(), Owned::Text("before".into()));
            match client.next_message().unwrap() {
                Owned::Binary(reply) => assert!(reply == *message, "{backend}: reply {i}"),
                other => panic!("{backend}: reply {i}: {other:?}"),
            }
            assert_eq!(client.next_message().unwrap(), Owned::Text("after".into()));
        }
        writer.join().unwrap().unwrap();
        let in_place = server.stats().replies_in_place;
        assert!(in_place > 0, "{backend}: none of {MESSAGES} sent in place");
        drop(client);
        server.shutdown(Duration::from_secs(2)).unwrap();
    }
}

/// A reply that the connection compresses, and a message too large for one receive
/// buffer (reassembled), are copied; both still come back whole.
#[test]
fn compressed_and_reassembled_replies_are_not_sent_in_place() {
    for backend in backends() {
        compressed_and_reassembled_replies_are_copied(backend);
    }
}

fn compressed_and_reassembled_replies_are_copied(backend: Backend) {
    let server = server(backend, Options::default().deflate(true));
    let mut deflating =
        TestClient::connect_with(server.local_addr(), "/", &Options::default().deflate(true))
            .unwrap();
    let mut plain = TestClient::connect(server.local_addr(), "/").unwrap();
    let mut rng = Rng(13);
    for _ in 0..10 {
        bracketed_echo(&mut deflating, &rng.bytes(HALF_A_BUFFER + 100));
        bracketed_echo(&mut plain, &rng.bytes(100_000));
    }
    assert_eq!(server.stats().replies_in_place, 0);
    // The same server sends in place on a plain connection.
    echoes_until_one_goes_in_place(&server, &mut plain, &mut rng, HALF_A_BUFFER + 100);
    drop((deflating, plain));
    server.shutdown(Duration::from_secs(2)).unwrap();
}

/// Everything around an in-place reply at once, checked byte for byte: several
/// sends per message (in place, then the same message copied), a write callback that
/// sends, a publish to a topic the connection is on (queued behind), a cap small enough
/// that delivery pauses and input is held, a peer that reads late, and an in-place reply
/// followed by a close.
#[test]
fn in_place_replies_survive_pauses_callbacks_publishes_and_a_close() {
    for backend in backends() {
        in_place_replies_survive_everything_around_them(backend);
    }
}

fn in_place_replies_survive_everything_around_them(backend: Backend) {
    use std::sync::{Arc, Mutex};
    use websocket_driver::MessageType;

    #[derive(Clone, Debug, PartialEq)]
    enum Sent {
        Text(String),
        Binary(Vec<u8>),
    }
    struct Busy(Arc<Mutex<Vec<Sent>>>);
    impl Handler for Busy {
        fn on_open(&mut self, ws: &mut Ws<'_>) {
            ws.subscribe("t").unwrap();
        }
        fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
            let Message::Binary(data) = &message else {
                return;
            };
            let log = &self.0;
            if ws.send_text("b").is_ok() {
                log.lock().unwrap().push(Sent::Text("b".into()));
            }
            if ws.send_message(&message).is_ok() {
                log.lock().unwrap().push(Sent::Binary(data.to_vec()));
            }
            let _ = ws.publish_all("t", b"p", MessageType::Text);
            if ws
                .send_with(b"w", MessageType::Text, |ws| {
                    let _ = ws.send_text("cb");
                })
                .is_ok()
            {
                log.lock().unwrap().push(Sent::Text("w".into()));
            }
            if ws.send_message_owned(message.clone()).is_ok() {
                log.lock().unwrap().push(Sent::Binary(data.to_vec()));
            }
            if data[0] == 0xFF {
                ws.close_connection(1000, "bye").unwrap();
            }
        }
    }

    let log = Arc::new(Mutex::new(Vec::new()));
    let for_server = log.clone();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            backend,
            max_backpressure: 200 * 1024,
            ..ServerConfig::default()
        })
        .start(move |_| Upgrade::Accept(Busy(for_server.clone())))
        .unwrap();
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rng = Rng(123);
    const MESSAGES: usize = 400;
    let mut wire = Vec::new();
    for i in 0..MESSAGES {
        let len = 4096 + (rng.next() % 40_000) as usize;
        let mut m = rng.bytes(len);
        m[0] = if i == MESSAGES - 1 { 0xFF } else { m[0] & 0x7F };
        client.driver.send_binary(&m).unwrap();
        while !client.driver.pending_output().is_empty() {
            let n = client.driver.pending_output().len();
            wire.extend_from_slice(client.driver.pending_output());
            client.driver.consume_output(n);
        }
    }
    let mut stream = client.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        // In pieces of varied sizes, so reads catch whole frames and parts of frames.
        let mut rng = Rng(5);
        let mut at = 0;
        while at < wire.len() {
            let n = ((rng.next() % 90_000) as usize + 1).min(wire.len() - at);
            stream.write_all(&wire[at..at + n])?;
            at += n;
            if rng.next().is_multiple_of(4) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok::<_, std::io::Error>(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut got = Vec::new();
    let (mut published, mut called_back) = (0, 0);
    loop {
        match client.next_message().unwrap() {
            Owned::Text(t) if t == "p" => published += 1,
            Owned::Text(t) if t == "cb" => called_back += 1,
            Owned::Text(t) => got.push(Sent::Text(t)),
            Owned::Binary(b) => got.push(Sent::Binary(b)),
            Owned::Close(..) => break,
            other => panic!("{other:?}"),
        }
    }
    writer.join().unwrap().unwrap();
    let expected = log.lock().unwrap().clone();
    let stats = server.stats();
    assert_eq!(got.len(), expected.len(), "{backend}");
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!(g == e, "{backend}: reply {i} differs");
    }
    assert!(
        published > 0 && called_back > 0,
        "{backend}: {published} · {called_back}"
    );
    assert!(stats.replies_in_place > 0, "{backend}");
    drop(client);
    server.shutdown(Duration::from_secs(2)).unwrap();
}

/// Sends every message back (in place when it can), then panics.
struct EchoThenPanic;
impl Handler for EchoThenPanic {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        ws.send_message(&message).unwrap();
        panic!("panics after its echo (on purpose)");
    }
}

/// A handler that sends a message back from its receive buffer and then panics in the
/// same delivery: the reply, which claimed the buffer, still goes out whole, then close
/// 1011, and the loop's buffers are whole for the next connection.
#[test]
fn a_reply_in_place_goes_out_whole_before_a_panics_close() {
    for backend in backends() {
        let limit = match backend {
            Backend::IoUring => HALF_A_BUFFER,
            _ => EPOLL_IN_PLACE_MIN,
        };
        let server = Server::bind("127.0.0.1:0")
            .unwrap()
            .threads(1)
            .backend(backend)
            .start(|_| Upgrade::Accept(EchoThenPanic))
            .unwrap();
        let mut rng = Rng(23);
        // A receive that caught only part of a frame reassembles it and copies the reply:
        // rare, so at most 10 tries until one reply went in place.
        let mut connections = 0;
        while server.stats().replies_in_place == 0 {
            assert!(connections < 10, "{backend}: no reply went in place");
            connections += 1;
            let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
            let message = rng.bytes(limit + connections * 1000);
            client.send_binary(&message).unwrap();
            match client.next_message().unwrap() {
                Owned::Binary(reply) => assert!(reply == message, "{backend}: echo differs"),
                other => panic!("{backend}: {other:?}"),
            }
            assert_eq!(
                client.next_message().unwrap(),
                Owned::Close(1011, "the handler panicked".into()),
                "{backend}"
            );
            assert!(client.wait_eof(), "{backend}: the server closes TCP");
        }
        assert_eq!(server.stats().handler_panics, connections as u64);
        // The loop reads on into whole buffers.
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let message = rng.bytes(3 * limit);
        client.send_binary(&message).unwrap();
        assert_eq!(client.next_message().unwrap(), Owned::Binary(message));
        drop(client);
        server.shutdown(Duration::from_secs(2)).unwrap();
    }
}
