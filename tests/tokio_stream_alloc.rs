//! Allocations per echoed message on the tokio stream (`WebSocketStream::recv` and its
//! `Reply`, the shape `examples/echo_tokio.rs` uses), counted by a global allocator over the
//! whole process: once the connection's buffers are warm, an echo costs no allocation. The
//! clients write prebuilt frames and read the replies into fixed buffers straight from
//! their sockets, so everything counted in the window is the server's.

#[path = "support/counting.rs"]
mod counting;
#[path = "support/raw_echo.rs"]
mod raw_echo;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use counting::Counting;
use raw_echo::ROUNDS;
use websocket_driver::tokio::WebSocketStream;
use websocket_driver::{Event, Options};

#[global_allocator]
static GLOBAL: Counting = Counting;

const CONNECTIONS: usize = 10;

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
        let allocations = raw_echo::allocations_per_rounds(&mut streams, size);
        let echoes = (CONNECTIONS * ROUNDS) as u64;
        // One allocation per echo would be 2 000.
        assert!(
            allocations <= 20,
            "{size} B: {allocations} allocations for {echoes} echoes"
        );
    }
}
