//! `wsload echo` for one second against an in-process echo server: a non-zero rate and
//! zero errors, on each server backend; `wsload slow` likewise, with its flooder.

use std::process::Command;
use std::time::Duration;

use websocket_driver::server::{Handler, Server, ServerConfig, Upgrade, Ws};
use websocket_driver::{Backend, Message};

struct Echo;
impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = ws.send_message(&message);
    }
}

fn field(json: &str, name: &str) -> f64 {
    let at = json
        .find(&format!("\"{name}\":"))
        .unwrap_or_else(|| panic!("no {name} in {json}"));
    let rest = &json[at + name.len() + 3..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end]
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number in {json}"))
}

/// Runs `wsload MODE --url URL ARGS…` against an in-process echo server; its JSON.
fn run_wsload(backend: Backend, mode: &str, args: &[&str]) -> String {
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 1,
            backend,
            ..ServerConfig::default()
        })
        .start(|_| Upgrade::Accept(Echo))
        .unwrap();
    let url = format!("ws://{}/", server.local_addr());
    let output = Command::new(env!("CARGO_BIN_EXE_wsload"))
        .args([mode, "--url", &url])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    server.shutdown(Duration::from_secs(1)).unwrap();
    String::from_utf8(output.stdout).unwrap()
}

fn smoke(backend: Backend, extra: &[&str]) {
    let args = [&["--conns", "10", "--size", "100", "--secs", "1"], extra].concat();
    let json = run_wsload(backend, "echo", &args);
    assert!(field(&json, "msgs_per_sec") > 0.0, "{json}");
    assert_eq!(field(&json, "errors"), 0.0, "{json}");
    assert!(field(&json, "p50_us") <= field(&json, "p99_us"), "{json}");
}

#[test]
fn echo_smoke_on_epoll() {
    smoke(Backend::Epoll, &["--backend", "epoll"]);
}

#[test]
fn echo_smoke_on_io_uring_with_text_and_inflight() {
    smoke(
        Backend::IoUring,
        &["--backend", "io-uring", "--text", "--inflight", "4"],
    );
}

/// `wsload slow` against this process's own server: the flooder connects and gets bytes
/// in, the echo clients still get echoes, the RSS is read. Its flood is capped at 64 MiB
/// of growth so the test process stays small whatever the server's flow control does.
#[test]
fn slow_smoke_on_epoll() {
    let pid = std::process::id().to_string();
    let json = run_wsload(
        Backend::Epoll,
        "slow",
        &[
            "--conns",
            "4",
            "--size",
            "100",
            "--secs",
            "1",
            "--pid",
            &pid,
            "--flood-size",
            "16384",
            "--max-rss-growth-mib",
            "64",
            "--backend",
            "epoll",
        ],
    );
    assert!(json.contains("\"mode\":\"slow\""), "{json}");
    assert!(json.contains("\"flooder_connected\":true"), "{json}");
    assert!(field(&json, "flooder_bytes_sent") > 0.0, "{json}");
    assert!(field(&json, "server_rss_start_kib") > 0.0, "{json}");
    assert!(field(&json, "messages") > 0.0, "{json}");
    assert_eq!(field(&json, "errors"), 0.0, "{json}");
}
