//! The blocking server at the process's open-file limit. Alone in its own test binary:
//! each test lowers this process's soft limit for a moment (other tests opening sockets
//! meanwhile would fail), and they take turns.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use websocket_driver::blocking::BlockingServer;

/// One test at a time lowers the limit.
static LIMIT: Mutex<()> = Mutex::new(());

const UPGRADE: &[u8] =
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Lowers the soft open-file limit so that exactly `free` more descriptors can be opened
/// (probed: descriptors are allocated lowest-first, below the limit); returns the old one.
fn leave_free_descriptors(free: usize) -> (u64, u64) {
    const NOFILE: rlimit::Resource = rlimit::Resource::NOFILE;
    let (soft, hard) = rlimit::getrlimit(NOFILE).unwrap();
    let mut limit = 64u64;
    loop {
        rlimit::setrlimit(NOFILE, limit, hard).unwrap();
        let mut held = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            held.push(f);
        }
        let can = held.len();
        drop(held);
        if can == free {
            return (soft, hard);
        }
        limit = (limit as i64 + free as i64 - can as i64) as u64;
    }
}

/// A connection that cannot get the descriptors it holds besides its socket (a second
/// handle and its epoll instance) is answered 503 before any listener runs: no `on_open`,
/// so no `on_close` owed (`on_open` ran, then the epoll instance failed, and the
/// connection was dropped without `on_close` and without an answer).
#[test]
fn a_connection_without_descriptors_left_gets_503_before_any_listener() {
    let _turn = LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let (tx, rx) = mpsc::channel::<String>();
    let tx = Mutex::new(tx);
    let server = BlockingServer::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || {
        let _ = server.serve(move |_, ws| {
            let a = tx.lock().unwrap().clone();
            let b = a.clone();
            ws.on_open(move |_| {
                let _ = a.send("open".into());
            });
            ws.on_close(move |_, code, _| {
                let _ = b.send(format!("close {code}"));
            });
        });
    });
    std::thread::sleep(Duration::from_millis(100));
    for free in [2, 3] {
        // The client's socket and the accepted one, then the second handle (free = 2:
        // none left for it) or the epoll instance (free = 3).
        let (soft, hard) = leave_free_descriptors(free);
        let mut raw = TcpStream::connect(addr).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        raw.write_all(UPGRADE).unwrap();
        let mut got = Vec::new();
        let _ = raw.read_to_end(&mut got);
        rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard).unwrap();
        let got = String::from_utf8_lossy(&got).into_owned();
        assert!(got.starts_with("HTTP/1.1 503 "), "{free} free: {got:?}");
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "{free} free: no listener runs"
        );
    }
}

/// `BlockingServer::max_connections` defaults to what the open-file limit leaves room
/// for at three descriptors a connection: every client gets a 101, or a 503 once past
/// the limit (at the reactor's default of the limit − 64, the server ran out of
/// descriptors long before its limit and clients beyond got no answer at all). The
/// clients' sockets are made before the limit is lowered, so they do not count against
/// the server.
#[test]
fn the_default_max_connections_fits_the_open_file_limit() {
    let _turn = LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    use socket2::{Domain, Socket, Type};
    let clients: Vec<Socket> = (0..60)
        .map(|_| Socket::new(Domain::IPV4, Type::STREAM, None).unwrap())
        .collect();
    let (soft, hard) = leave_free_descriptors(64 + 40);
    let server = BlockingServer::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap().0;
    std::thread::spawn(move || {
        let _ = server.serve(|_, _| {});
    });
    let mut answers = Vec::new();
    let mut held = Vec::new();
    for socket in clients {
        socket.connect(&addr.into()).unwrap();
        let mut stream: TcpStream = socket.into();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        stream.write_all(UPGRADE).unwrap();
        let mut buf = [0u8; 12];
        let answer = match stream.read_exact(&mut buf) {
            Ok(()) => String::from_utf8_lossy(&buf).into_owned(),
            Err(e) => format!("no answer ({:?})", e.kind()),
        };
        answers.push(answer);
        held.push(stream);
    }
    rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard).unwrap();
    let served = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 101"))
        .count();
    let unanswered: Vec<(usize, &String)> = answers
        .iter()
        .enumerate()
        .filter(|(_, a)| !a.starts_with("HTTP/1.1 101") && !a.starts_with("HTTP/1.1 503"))
        .collect();
    assert!(
        unanswered.is_empty(),
        "soft limit {limit}: {} of 60 clients got neither 101 nor 503, from client #{}: {:?}",
        unanswered.len(),
        unanswered[0].0,
        unanswered[0].1
    );
    assert!(served > 0 && served < 60, "{served} served");
}
