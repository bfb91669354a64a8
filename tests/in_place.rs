//! Replies sent from the buffer their message was received in (io_uring's receive buffers,
//! lent to the reply instead of copied into the output): every byte and the order among the
//! connection's other sends hold, only messages of at least half a receive buffer go that
//! way, and never on epoll, over permessage-deflate, or for a message reassembled from
//! several receives.

mod support;

use std::time::Duration;

use support::{Owned, Rng, TestClient, backends};
use websocket_driver::server::{Handler, Server, ServerHandle, Upgrade, Ws};
use websocket_driver::{Backend, Message, Options};

/// Half of io_uring's 32 KiB receive buffers: the smallest payload sent in place.
const HALF_A_BUFFER: usize = 16 * 1024;

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
        let in_place = server.stats().replies_in_place;
        match backend {
            // Each frame left the client in one write; a receive that caught only part of
            // one (then reassembled, and copied) is possible but rare.
            Backend::IoUring => assert!(in_place >= 20, "{in_place} of 41 sent in place"),
            _ => assert_eq!(in_place, 0, "{backend} reads into one buffer it keeps"),
        }
        // Gone first, so the shutdown does not wait out its deadline for them.
        drop(client);
        server.shutdown(Duration::from_secs(2)).unwrap();
    }
}

/// At the limit (half a receive buffer) a reply goes in place; one byte under, it is copied.
#[test]
fn only_messages_of_half_a_buffer_or_more_are_sent_in_place() {
    if websocket_driver::reactor::io_uring_support().is_err() {
        return; // No io_uring here: nothing is sent in place on epoll (tested above).
    }
    let server = server(Backend::IoUring, Options::default());
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    let mut rng = Rng(11);
    for _ in 0..10 {
        bracketed_echo(&mut client, &rng.bytes(HALF_A_BUFFER - 1));
    }
    assert_eq!(
        server.stats().replies_in_place,
        0,
        "one byte under the limit"
    );
    echoes_until_one_goes_in_place(&server, &mut client, &mut rng, HALF_A_BUFFER);
    drop(client);
    server.shutdown(Duration::from_secs(2)).unwrap();
}

/// A reply that the connection compresses, and a message too large for one receive
/// buffer (reassembled), are copied; both still come back whole.
#[test]
fn compressed_and_reassembled_replies_are_not_sent_in_place() {
    if websocket_driver::reactor::io_uring_support().is_err() {
        return; // No io_uring here: nothing is sent in place on epoll (tested above).
    }
    let server = server(Backend::IoUring, Options::default().deflate(true));
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
