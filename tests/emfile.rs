//! accept() failing with EMFILE neither spins the loop nor loses the pending connections:
//! the loop backs off on a timer and accepts them once descriptors are free again.
//! Alone in its own test binary: it lowers this process's open-files limit.

use std::time::{Duration, Instant};

use websocket_driver::Backend;
use websocket_driver::server::{Handler, Server, ServerConfig, ServerHandle, Upgrade};

struct Quiet;
impl Handler for Quiet {}

/// The `stat` file of the thread named `name`, opened now: once descriptors run out,
/// nothing new can be opened.
fn thread_stat(name: &str) -> std::fs::File {
    // A new thread names itself once it runs: look for a while.
    for _ in 0..100 {
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = task.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim() == name {
                return std::fs::File::open(dir.join("stat")).unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no thread named {name}");
}

/// CPU ticks (1/100 s) used by the thread whose `stat` file this is.
fn ticks(stat: &std::fs::File) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 1024];
    let n = stat.read_at(&mut buf, 0).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn exhaust_and_recover(backend: Backend) {
    // Work at the hard limit: io_uring samples the limit when the accept is armed, so it
    // cannot be lowered afterwards; instead the table is filled up to it.
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard).unwrap();
    let server: ServerHandle = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            backend,
            ..ServerConfig::default()
        })
        .start(|_| Upgrade::Accept(Quiet))
        .unwrap();
    let addr = server.local_addr();
    let stat = thread_stat("wsd-loop-0");
    // Sockets are made while descriptors remain; then the table is filled to the limit
    // and they connect: the connections wait in the server's backlog and its accept()
    // fails with EMFILE.
    const PENDING: usize = 8;
    let sockets: Vec<socket2::Socket> = (0..PENDING)
        .map(|_| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap())
        .collect();
    let mut fillers = Vec::new();
    while let Ok(file) = std::fs::File::open("/dev/null") {
        fillers.push(file);
    }
    for socket in &sockets {
        socket.connect(&addr.into()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        server.stats().connections_total,
        0,
        "{backend}: accepted without a free descriptor? ({} fillers)",
        fillers.len()
    );
    // Out of descriptors, the loop waits on its backoff timer rather than retrying at once:
    // over a second it uses a small fraction of a core (a spinning loop would use all).
    let before = ticks(&stat);
    std::thread::sleep(Duration::from_secs(1));
    let used = ticks(&stat) - before;
    assert!(
        used < 30,
        "the loop used {used} of 100 ticks while out of descriptors"
    );
    // Free descriptors: every pending connection is accepted.
    fillers.truncate(fillers.len() - 2 * PENDING);
    let end = Instant::now() + Duration::from_secs(10);
    while (server.stats().connections_total as usize) < PENDING && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.stats().connections_total as usize, PENDING);
    drop(sockets);
    drop(fillers);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

#[test]
fn emfile_backs_off_and_recovers_on_both_backends() {
    exhaust_and_recover(Backend::Epoll);
    exhaust_and_recover(Backend::IoUring);
}
