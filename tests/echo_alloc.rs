//! Allocations per echoed message, counted by a global allocator over the whole process:
//! once a loop's buffer pool is warm, an echo (read, parse, unmask, reply, write) costs no
//! allocation. The clients write prebuilt frames and read the replies into fixed buffers
//! straight from their sockets, so everything counted in the window is the server's.

#[path = "support/counting.rs"]
mod counting;
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use counting::Counting;
use support::TestClient;
use websocket_driver::server::{Handler, Server, ServerConfig, Upgrade, Ws};
use websocket_driver::{Backend, Message};

#[global_allocator]
static GLOBAL: Counting = Counting;

const CONNECTIONS: usize = 10;
const ROUNDS: usize = 200;

struct Echo;
impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        ws.send_message_owned(message).unwrap();
    }
}

/// A masked binary frame of `size` bytes, as a client sends it.
fn masked_frame(size: usize) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x82];
    match size {
        0..=125 => frame.push(0x80 | size as u8),
        126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(size as u16).to_be_bytes());
        }
        _ => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(size as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend((0..size).map(|i| (i as u8) ^ mask[i % 4]));
    frame
}

/// One message from each connection, then each one's echo, read whole and checked.
fn round(streams: &mut [TcpStream], frame: &[u8], reply: &mut [u8], size: usize) {
    for stream in streams.iter_mut() {
        stream.write_all(frame).unwrap();
    }
    let header = reply.len() - size;
    for stream in streams.iter_mut() {
        stream.read_exact(reply).unwrap();
        assert_eq!(reply[0], 0x82, "a binary frame comes back");
        assert_eq!(reply[1] & 0x80, 0, "server frames are not masked");
        assert!(
            reply[header..]
                .iter()
                .enumerate()
                .all(|(i, &b)| b == i as u8)
        );
    }
}

fn echo_allocations(backend: Backend, size: usize) -> u64 {
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            backend,
            ..ServerConfig::default()
        })
        .start(|_| Upgrade::Accept(Echo))
        .unwrap();
    let mut streams: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| {
            TestClient::connect(server.local_addr(), "/")
                .unwrap()
                .stream
        })
        .collect();
    for stream in &streams {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
    }
    let frame = masked_frame(size);
    let header = match size {
        0..=125 => 2,
        126..=0xffff => 4,
        _ => 10,
    };
    let mut reply = vec![0; header + size];
    // Warm-up: the loop's read buffer, buffer pool and event queues reach their size.
    for _ in 0..ROUNDS {
        round(&mut streams, &frame, &mut reply, size);
    }
    let before = counting::allocations();
    for _ in 0..ROUNDS {
        round(&mut streams, &frame, &mut reply, size);
    }
    let allocations = counting::allocations() - before;
    drop(streams);
    server.shutdown(Duration::from_secs(5)).unwrap();
    allocations
}

/// All cases in one test: the counter is process-wide, so nothing may run beside.
#[test]
fn an_echo_allocates_nothing_once_warm() {
    let mut backends = vec![Backend::Epoll];
    #[cfg(target_os = "linux")]
    backends.push(Backend::IoUring);
    for backend in backends {
        for size in [20, 16 * 1024] {
            let allocations = echo_allocations(backend, size);
            let echoes = (CONNECTIONS * ROUNDS) as u64;
            // One allocation per echo would be 2 000; a handful covers the loop's
            // occasional housekeeping (a timer wheel slot, a batch growing once).
            assert!(
                allocations <= 20,
                "{backend}, {size} B: {allocations} allocations for {echoes} echoes"
            );
        }
    }
}
