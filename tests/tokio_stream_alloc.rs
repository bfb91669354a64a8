//! Allocations per echoed message on the tokio stream (`WebSocketStream::recv` and its
//! `Reply`, the shape `examples/echo_tokio.rs` uses), counted by a global allocator over the
//! whole process: once the connection's buffers are warm, an echo costs no allocation. The
//! clients write prebuilt frames and read the replies into fixed buffers straight from
//! their sockets, so everything counted in the window is the server's.

#[path = "support/counting.rs"]
mod counting;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use counting::Counting;
use websocket_driver::tokio::WebSocketStream;
use websocket_driver::{Event, Options};

#[global_allocator]
static GLOBAL: Counting = Counting;

const CONNECTIONS: usize = 10;
const ROUNDS: usize = 200;

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

/// A current-thread tokio runtime on its own thread, echoing each connection inline.
fn start_server() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let Ok(mut ws) = WebSocketStream::accept(tcp, &Options::default()).await else {
                        return;
                    };
                    while let Some((event, mut reply)) = ws.recv().await {
                        if let Event::Message(message) = event {
                            let _ = reply.send_message(&message);
                        }
                    }
                });
            }
        })
    });
    addr
}

/// Connects with a plain upgrade request and reads the 101 response up to its end.
fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut response = Vec::new();
    let mut byte = [0];
    while !response.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        response.push(byte[0]);
    }
    assert!(response.starts_with(b"HTTP/1.1 101"), "{response:?}");
    stream
}

#[test]
fn a_stream_echo_allocates_nothing_once_warm() {
    let addr = start_server();
    for size in [20, 1024, 16 * 1024] {
        let mut streams: Vec<TcpStream> = (0..CONNECTIONS).map(|_| connect(addr)).collect();
        let frame = masked_frame(size);
        let header = match size {
            0..=125 => 2,
            126..=0xffff => 4,
            _ => 10,
        };
        let mut reply = vec![0; header + size];
        for _ in 0..ROUNDS {
            round(&mut streams, &frame, &mut reply, size);
        }
        let before = counting::allocations();
        for _ in 0..ROUNDS {
            round(&mut streams, &frame, &mut reply, size);
        }
        let allocations = counting::allocations() - before;
        let echoes = (CONNECTIONS * ROUNDS) as u64;
        // One allocation per echo would be 2 000.
        assert!(
            allocations <= 20,
            "{size} B: {allocations} allocations for {echoes} echoes"
        );
    }
}
