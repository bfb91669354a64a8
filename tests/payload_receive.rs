//! The rest of a large frame received straight into its message's buffer (no copy from
//! the loop's read buffer, or from io_uring's provided buffers): every byte, text checks
//! and order hold, whatever the pieces the frame arrives in; at the limit (on epoll a read
//! buffer's worth still to come, on io_uring 128 KiB) it goes that way, under it not; and a
//! connection paused by backpressure in the middle of such frames still gets every message
//! in order.

mod common;
mod support;

use std::io::Write;
use std::time::Duration;

use common::client_frame;
use support::{Owned, Rng, TestClient, backends};
use websocket_driver::protocol::frame::OpCode;
use websocket_driver::server::{Handler, Server, ServerConfig, ServerHandle, Upgrade, Ws};
use websocket_driver::{Backend, Message};

/// The server's read buffer (`ServerConfig::read_buffer_size`'s default).
const READ_BUFFER: usize = 64 * 1024;

/// Bytes of a frame still to come from which the rest is received into the message's
/// buffer: on epoll a read buffer's worth, on io_uring four of its 32 KiB provided buffers.
fn payload_min(backend: Backend) -> usize {
    match backend {
        Backend::IoUring => 128 * 1024,
        _ => READ_BUFFER,
    }
}

struct Echo;
impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = ws.send_message_owned(message);
    }
}

fn server(backend: Backend, config: ServerConfig) -> ServerHandle {
    Server::bind("127.0.0.1:0")
        .unwrap()
        .config(config)
        .threads(1)
        .backend(backend)
        .start(|_| Upgrade::Accept(Echo))
        .unwrap()
}

/// Writes `bytes` in pieces of `piece` bytes, each its own write.
fn write_in_pieces(client: &mut TestClient, bytes: &[u8], piece: usize) {
    for chunk in bytes.chunks(piece) {
        client.stream.write_all(chunk).unwrap();
    }
}

fn expect_binary(client: &mut TestClient, sent: &[u8]) {
    match client.next_message().unwrap() {
        Owned::Binary(echo) => assert!(echo == sent, "{} of {} bytes", echo.len(), sent.len()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn large_frames_come_back_whole_whatever_their_pieces() {
    for backend in backends() {
        let server = server(backend, ServerConfig::default());
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let mut rng = Rng(21);
        // Whole frames, as the client driver writes them.
        for size in [2 * READ_BUFFER, 300_000, 1 << 20, 3 << 20] {
            let message = rng.bytes(size);
            client.send_binary(&message).unwrap();
            expect_binary(&mut client, &message);
        }
        // Text, checked as UTF-8 as it arrives (2-byte characters across every piece).
        let text = "é".repeat(400_000);
        client.send_text(&text).unwrap();
        assert_eq!(client.next_message().unwrap(), Owned::Text(text));
        // A frame trickled in 1 000-byte writes, and a fragmented message whose second
        // fragment is large.
        let message = rng.bytes(200_000);
        write_in_pieces(
            &mut client,
            &client_frame(0x80 | OpCode::Binary as u8, &message),
            1000,
        );
        expect_binary(&mut client, &message);
        let (first, second) = (rng.bytes(5000), rng.bytes(500_000));
        let mut wire = client_frame(OpCode::Binary as u8, &first);
        wire.extend(client_frame(0x80 | OpCode::Continuation as u8, &second));
        write_in_pieces(&mut client, &wire, 70_000);
        expect_binary(&mut client, &[first, second].concat());
        let receives = server.stats().payload_receives;
        assert!(
            receives >= 6,
            "{backend}: {receives} receives into message buffers"
        );
        drop(client);
        server.shutdown(Duration::from_secs(2)).unwrap();
    }
}

/// With exactly the limit of the frame still to come it is received into the message's
/// buffer; with one byte less, into the read buffer.
#[test]
fn only_frames_with_the_limit_still_to_come_are_received_into_the_message() {
    for backend in backends() {
        let server = server(backend, ServerConfig::default());
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let mut rng = Rng(23);
        let min = payload_min(backend);
        for (rest, lent) in [(min - 1, false), (min, true)] {
            // The header and 10 bytes, then (once the server has read them: a read of
            // both together would leave less than the limit to come) the rest.
            let message = rng.bytes(10 + rest);
            let frame = client_frame(0x80 | OpCode::Binary as u8, &message);
            let split = frame.len() - rest;
            let before = server.stats().payload_receives;
            let bytes_before = server.stats().bytes_in;
            client.stream.write_all(&frame[..split]).unwrap();
            assert!(
                support::eventually(Duration::from_secs(10), || server.stats().bytes_in
                    >= bytes_before + split as u64),
                "{backend}: the first piece was never read"
            );
            client.stream.write_all(&frame[split..]).unwrap();
            expect_binary(&mut client, &message);
            let receives = server.stats().payload_receives - before;
            assert_eq!(
                receives > 0,
                lent,
                "{backend}, {rest} B to come: {receives}"
            );
        }
        drop(client);
        server.shutdown(Duration::from_secs(2)).unwrap();
    }
}

#[test]
fn text_that_is_not_utf8_late_in_a_large_frame_closes_with_1007() {
    for backend in backends() {
        let server = server(backend, ServerConfig::default());
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let mut payload = vec![b'a'; 500_000];
        payload[450_000] = 0xff;
        client
            .stream
            .write_all(&client_frame(0x80 | OpCode::Text as u8, &payload))
            .unwrap();
        loop {
            match client.next_event().unwrap() {
                Owned::Close(code, _) => {
                    assert_eq!(code, 1007, "{backend}");
                    break;
                }
                Owned::Ping(_) | Owned::Pong(_) => {}
                other => panic!("{backend}: {other:?}"),
            }
        }
        drop(client);
        server.shutdown(Duration::from_secs(2)).unwrap();
    }
}

/// Ten 1 MiB messages sent without reading the echoes: the server's output goes over its
/// cap and it stops reading in the middle of a frame, then goes on once the client reads.
#[test]
fn a_paused_connection_gets_every_large_message_in_order() {
    for backend in backends() {
        let config = ServerConfig {
            max_backpressure: 1 << 20,
            ..ServerConfig::default()
        };
        let server = server(backend, config);
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let mut rng = Rng(29);
        let messages: Vec<Vec<u8>> = (0..10).map(|_| rng.bytes(1 << 20)).collect();
        let wire: Vec<u8> = messages
            .iter()
            .flat_map(|m| client_frame(0x80 | OpCode::Binary as u8, m))
            .collect();
        let mut writer = client.stream.try_clone().unwrap();
        let sending = std::thread::spawn(move || writer.write_all(&wire));
        // Let the server fill its output and pause before anything is read.
        std::thread::sleep(Duration::from_millis(300));
        for message in &messages {
            expect_binary(&mut client, message);
        }
        sending.join().unwrap().unwrap();
        drop(client);
        server.shutdown(Duration::from_secs(2)).unwrap();
    }
}

/// A client gone in the middle of a frame being received into its message's buffer, and
/// a server shut down while another is: the connections end, and the server serves on
/// (then stops) as usual.
#[test]
fn connections_that_end_during_a_payload_receive_are_released() {
    for backend in backends() {
        let server = server(backend, ServerConfig::default());
        let mut rng = Rng(31);
        let frame = client_frame(0x80 | OpCode::Binary as u8, &rng.bytes(1 << 20));
        for _ in 0..3 {
            let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
            let before = server.stats().payload_receives;
            client.stream.write_all(&frame[..300_000]).unwrap();
            assert!(
                support::eventually(Duration::from_secs(5), || {
                    server.stats().payload_receives > before
                }),
                "{backend}: the frame's rest is being received into its buffer"
            );
            drop(client);
        }
        assert!(
            support::eventually(Duration::from_secs(5), || {
                server.stats().connections_open == 0
            }),
            "{backend}: {} connections still open",
            server.stats().connections_open
        );
        // Still serving; then a shutdown while a frame is half received.
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let message = rng.bytes(500_000);
        client.send_binary(&message).unwrap();
        expect_binary(&mut client, &message);
        client.stream.write_all(&frame[..300_000]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        server.shutdown(Duration::from_millis(200)).unwrap();
        drop(client);
    }
}

/// With an idle keepalive, a large frame trickling in counts as input as it arrives: each
/// piece received into the message's buffer restarts the idle period, so the connection is
/// neither pinged nor closed while the frame takes ten idle periods to arrive.
#[test]
fn a_slow_large_frame_keeps_an_idle_connection_alive() {
    for backend in backends() {
        // The frame takes 10 idle periods to arrive, a piece every 50 ms: 250 ms of room
        // for a late write on a loaded machine (with 100 ms and 20 pieces, a write 50 ms late
        // let the keepalive ping go first).
        let config = ServerConfig {
            idle_timeout: Some(Duration::from_millis(300)),
            ..ServerConfig::default()
        };
        let server = server(backend, config);
        let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
        let message = Rng(37).bytes(400_000);
        let frame = client_frame(0x80 | OpCode::Binary as u8, &message);
        let before = server.stats().payload_receives;
        for piece in frame.chunks(frame.len() / 60 + 1) {
            client.stream.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        // The echo, with no keepalive ping before it.
        match client.next_event().unwrap() {
            Owned::Binary(echo) => assert!(echo == message, "{backend}"),
            other => panic!("{backend}: {other:?} before the echo"),
        }
        assert!(server.stats().payload_receives > before, "{backend}");
        drop(client);
        server.shutdown(Duration::from_secs(2)).unwrap();
    }
}
