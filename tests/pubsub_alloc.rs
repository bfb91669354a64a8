//! Allocations per delivered message, counted by a global allocator over the whole
//! process: once the loops' queues and pools are warm, publishing costs a fixed number of
//! allocations per publish (the shared frame, the publication, the channel's blocks), and
//! none per subscriber it reaches.
//!
//! The measured window holds only the publishes and the loops' work: the clients do not
//! read during it (their kernel buffers take the burst), and the wait for the loops to
//! finish reads two atomic counters.

#[path = "support/counting.rs"]
mod counting;
mod support;

use std::time::Duration;

use counting::Counting;
use support::{Owned, TestClient, eventually};
use websocket_driver::server::{Handler, Server, ServerConfig, ServerHandle, Upgrade, Ws};
use websocket_driver::{Backend, MessageType};

#[global_allocator]
static GLOBAL: Counting = Counting;

const SUBSCRIBERS: usize = 100;
const BURST: usize = 500;

struct Subscriber;
impl Handler for Subscriber {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        ws.subscribe("t").unwrap();
    }
}

/// Publishes a burst and waits (without allocating) until every delivery is written.
fn burst(server: &ServerHandle, payload: &[u8]) {
    let delivered = server.stats().delivered;
    let expected = delivered + (BURST * SUBSCRIBERS) as u64;
    let bytes_out = server.stats().bytes_out;
    let frame = 2 + payload.len() as u64;
    let expected_out = bytes_out + (BURST * SUBSCRIBERS) as u64 * frame;
    for _ in 0..BURST {
        server.publish("t", payload, MessageType::Binary).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(30), || {
            let stats = server.stats();
            stats.delivered == expected && stats.bytes_out == expected_out
        }),
        "delivered {} of {expected}, bytes out {} of {expected_out}",
        server.stats().delivered,
        server.stats().bytes_out
    );
}

fn drain(clients: &mut [TestClient]) {
    for client in clients {
        for _ in 0..BURST {
            assert!(matches!(client.next_message().unwrap(), Owned::Binary(_)));
        }
    }
}

fn no_allocation_per_delivered_message(backend: Backend) {
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 2,
            backend,
            ..ServerConfig::default()
        })
        .start(|_| Upgrade::Accept(Subscriber))
        .unwrap();
    let mut clients: Vec<TestClient> = (0..SUBSCRIBERS)
        .map(|_| TestClient::connect(server.local_addr(), "/").unwrap())
        .collect();
    assert!(eventually(Duration::from_secs(10), || server
        .subscribers("t")
        == SUBSCRIBERS));
    // A loop counts a write's bytes just after the syscall, so a client can hold its 101
    // before the server's `bytes_out` includes it: wait for the count to catch up, or a
    // late one lands inside the first burst's expected total.
    let handshakes: u64 = clients.iter().map(|c| c.bytes_read as u64).sum();
    assert!(eventually(Duration::from_secs(10), || server
        .stats()
        .bytes_out
        == handshakes));
    let payload = [7u8; 20];
    // Warm-up: subscriber queues, send batches and channel blocks reach their size.
    for _ in 0..3 {
        burst(&server, &payload);
        drain(&mut clients);
    }
    let before = counting::allocations();
    burst(&server, &payload);
    let allocations = counting::allocations() - before;
    drain(&mut clients);
    let deliveries = (BURST * SUBSCRIBERS) as u64;
    println!(
        "{backend}: {allocations} allocations for {BURST} publishes, {deliveries} deliveries \
         ({:.4} per delivery)",
        allocations as f64 / deliveries as f64
    );
    // Per publish: the frame, the publication, and a share of the channels' blocks and
    // of the stats polling; on a loaded machine (CI) io_uring's pools of send batches and
    // run buffers sometimes grow past their warm-up size (up to ~150 more seen). A single
    // allocation per delivery would add 50 000.
    assert!(
        allocations <= 3 * BURST as u64 + BURST as u64 / 2,
        "{allocations} allocations for {BURST} publishes to {SUBSCRIBERS} subscribers"
    );
    drop(clients);
    server.shutdown(Duration::from_secs(5)).unwrap();
}

/// Both backends in one test: the counter is process-wide, so nothing may run beside.
#[test]
fn no_allocation_per_delivered_message_on_either_backend() {
    no_allocation_per_delivered_message(Backend::Epoll);
    #[cfg(target_os = "linux")]
    no_allocation_per_delivered_message(Backend::IoUring);
}
