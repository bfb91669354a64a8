//! Ping floods from peers that never read: pongs coalesce once 16 KiB of output waits
//! (RFC 6455 §5.5.3), so the output of the reactor's server and `ClientReactor` stays at
//! that, whatever the flood, and the loop's other connections are served meanwhile.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use support::{Owned, TestClient, accept_upgrade};
use websocket_driver::client::ClientReactor;
use websocket_driver::server::{Handler, Server, ServerConfig, Upgrade, Ws};
use websocket_driver::{Backend, Message};

/// Output the pongs may reach: under 16 KiB, then at most two more pongs (6 bytes each
/// from a client, 2 from the server): one partly written, which is not replaced, and the one
/// that replaces the rest.
const BOUND: usize = 16 * 1024 + 2 * 6;

/// Bytes of empty server pings (2 bytes each on the wire; the client's masked pong is 6).
const PING_FLOOD: usize = 16 << 20;

/// A hostile server: upgrades, then writes `PING_FLOOD` bytes of empty pings and never
/// reads, then a text frame "probe", then holds the socket for a while.
fn ping_flooding_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        accept_upgrade(&mut s, "");
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let chunk: Vec<u8> = [0x89u8, 0x00].repeat(32 * 1024);
        let mut sent = 0;
        while sent < PING_FLOOD {
            if s.write_all(&chunk).is_err() {
                // The client stopped reading: that is the bound we want.
                break;
            }
            sent += chunk.len();
        }
        let _ = s.write_all(&[0x81, 5, b'p', b'r', b'o', b'b', b'e']);
        std::thread::sleep(Duration::from_secs(3));
    });
    addr
}

/// Records the largest output backlog a handler saw while answering pings.
struct PingWatch {
    max: Arc<AtomicUsize>,
    probe: Option<mpsc::Sender<usize>>,
}
impl Handler for PingWatch {
    fn on_ping(&mut self, ws: &mut Ws<'_>, _: &[u8]) {
        self.max.fetch_max(ws.buffered_amount(), Ordering::Relaxed);
    }
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        match &self.probe {
            Some(tx) => {
                let _ = tx.send(ws.buffered_amount());
            }
            None => {
                let _ = ws.send_message(&message);
            }
        }
    }
}

/// The hosted client against a server that floods pings and never reads: its pongs stay
/// at 16 KiB.
fn client_reactor_output_stays_bounded_under_a_ping_flood(backend: Backend) {
    let addr = ping_flooding_server();
    let cap = 256 * 1024;
    let reactor: ClientReactor<PingWatch> = ClientReactor::start(ServerConfig {
        threads: 1,
        backend,
        max_backpressure: cap,
        ..ServerConfig::default()
    })
    .unwrap();
    let max = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    reactor
        .connect(
            &format!("ws://{addr}/"),
            PingWatch {
                max: max.clone(),
                probe: Some(tx),
            },
        )
        .unwrap();
    // Either the probe comes (the flood fit in the kernel's buffers) or the reading stays
    // paused; both are fine as long as the backlog stayed at the cap.
    let _ = rx.recv_timeout(Duration::from_secs(8));
    let max = max.load(Ordering::Relaxed);
    eprintln!("{backend:?} client reactor: at most {max} bytes queued");
    assert!(
        max <= BOUND,
        "the hosted client queued {max} bytes (cap {cap})"
    );
    reactor.shutdown(Duration::from_secs(1)).unwrap();
}

#[test]
fn client_reactor_output_stays_bounded_under_a_ping_flood_on_epoll() {
    client_reactor_output_stays_bounded_under_a_ping_flood(Backend::Epoll);
}

#[test]
fn client_reactor_output_stays_bounded_under_a_ping_flood_on_io_uring() {
    client_reactor_output_stays_bounded_under_a_ping_flood(Backend::IoUring);
}

/// Writes masked empty pings (6 bytes each) until the server stops taking them (a write
/// blocks 2 s) or `limit` bytes went out; returns the bytes written.
fn flood_pings(stream: &mut TcpStream, limit: usize) -> usize {
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let chunk: Vec<u8> = [0x89u8, 0x80, 1, 2, 3, 4].repeat(16 * 1024);
    let mut sent = 0;
    while sent < limit {
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    sent
}

/// A client that floods pings and never reads: the reactor server's pongs stay at 16 KiB
/// (they coalesce), and another connection on the same loop is served all along.
fn ping_flood_from_a_peer_that_never_reads_stays_at_16_kib(backend: Backend) {
    let cap = 64 * 1024;
    let max = Arc::new(AtomicUsize::new(0));
    let watched = max.clone();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            backend,
            max_backpressure: cap,
            ..ServerConfig::default()
        })
        .start(move |_| {
            Upgrade::Accept(PingWatch {
                max: watched.clone(),
                probe: None,
            })
        })
        .unwrap();
    let addr = server.local_addr();
    let flooder = TestClient::connect(addr, "/").unwrap();
    let limit = 16 << 20;
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let mut stream = flooder.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let n = flood_pings(&mut stream, limit);
        flag.store(true, Ordering::Relaxed);
        n
    });
    // Meanwhile another connection on the same (only) loop echoes.
    let mut other = TestClient::connect(addr, "/").unwrap();
    let started = Instant::now();
    let mut rounds = 0;
    while !done.load(Ordering::Relaxed) || rounds < 20 {
        other.send_text("still here").unwrap();
        assert_eq!(
            other.next_message().unwrap(),
            Owned::Text("still here".into())
        );
        rounds += 1;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the flood never stalled"
        );
    }
    let written = writer.join().unwrap();
    let max = max.load(Ordering::Relaxed);
    eprintln!("{backend:?}: flooder wrote {written} bytes, server backlog at most {max}");
    assert!(
        max <= BOUND,
        "server queued {max} bytes of pongs (cap {cap}, written {written})"
    );
    drop(flooder.stream.shutdown(std::net::Shutdown::Both));
    drop(other);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

#[test]
fn server_output_stays_at_16_kib_under_a_ping_flood_on_epoll() {
    ping_flood_from_a_peer_that_never_reads_stays_at_16_kib(Backend::Epoll);
}

#[test]
fn server_output_stays_at_16_kib_under_a_ping_flood_on_io_uring() {
    ping_flood_from_a_peer_that_never_reads_stays_at_16_kib(Backend::IoUring);
}
