//! A server whose `start` returned `Ok` serves: each loop builds its backend (an io_uring
//! ring is made on the loop's own thread) before `start` returns, and a failure to build it
//! is `start`'s error, not a loop thread that ended by itself behind a server that looked
//! started. Alone in its own test binary: it lowers this process's open-file limit.
#![cfg(target_os = "linux")]

mod support;

use std::time::Duration;

use rlimit::Resource;
use support::{Owned, TestClient, backends};
use websocket_driver::Message;
use websocket_driver::server::{Handler, Server, Upgrade, Ws};

struct Echo;

impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = ws.send_message(&message);
    }
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Linux's "too many open files".
const EMFILE: i32 = 24;

/// Threads named as the server's loops.
fn loop_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| {
            let t = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(t)
                .map(|c| c.starts_with("wsd-loop"))
                .unwrap_or(false)
        })
        .count()
}

/// On every backend, with `threads` loops: raises the open-file limit one descriptor at a
/// time from far too low. Every `start` fails with EMFILE (whichever loop failed, the
/// later ones after earlier ones started) and leaves no descriptor open and no loop thread
/// running, until one succeeds; that one must serve.
fn start_under_tight_limits(threads: usize) {
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).unwrap();
    for backend in backends() {
        let before = open_descriptors();
        let mut failures = 0;
        let mut started = None;
        for limit in 3..(before as u64 + 128) {
            let server = Server::bind("127.0.0.1:0")
                .unwrap()
                .threads(threads)
                .backend(backend);
            rlimit::setrlimit(Resource::NOFILE, limit, hard).unwrap();
            let result = server.start(|_| Upgrade::Accept(Echo));
            // The limit stays low a while after `start` returned: a loop still building its
            // backend then builds it under this limit too.
            std::thread::sleep(Duration::from_millis(50));
            rlimit::setrlimit(Resource::NOFILE, soft, hard).unwrap();
            match result {
                Ok(server) => {
                    started = Some(server);
                    break;
                }
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(EMFILE), "{backend}: {e}");
                    failures += 1;
                    assert!(
                        support::eventually(Duration::from_secs(5), || open_descriptors()
                            <= before),
                        "{backend}, limit {limit}: {} descriptors open, {before} before",
                        open_descriptors()
                    );
                    assert_eq!(
                        loop_threads(),
                        0,
                        "{backend}, limit {limit}: loop threads left"
                    );
                }
            }
        }
        assert!(failures > 0, "{backend}: no limit was too low");
        let server = started.unwrap_or_else(|| panic!("{backend}: never started"));
        let mut client = TestClient::connect(server.local_addr(), "/")
            .unwrap_or_else(|e| panic!("{backend}: the started server does not serve: {e}"));
        client.send_text("still here").unwrap();
        assert_eq!(
            client.next_message().unwrap(),
            Owned::Text("still here".into()),
            "{backend}"
        );
        drop(client);
        server.shutdown(Duration::from_secs(2)).unwrap();
        // (The handle holds the loop's waker.)
        drop(server);
        assert!(
            support::eventually(Duration::from_secs(5), || open_descriptors() <= before),
            "{backend}: {} descriptors open, {before} before",
            open_descriptors()
        );
    }
}

/// One test for both: each lowers the process's open-file limit, so they may not run
/// side by side.
#[test]
fn a_server_started_under_a_tight_open_file_limit_serves() {
    start_under_tight_limits(1);
    start_under_tight_limits(4);
}
