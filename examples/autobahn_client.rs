//! Drives the Autobahn fuzzingserver through every case, echoing every message.
//!
//! `autobahn_client --url ws://127.0.0.1:9001 --agent NAME [--hosted] [--backend B] [--deflate]`
//!
//! `--deflate` offers permessage-deflate (`Options::deflate(true)`).
//!
//! Blocking mode uses `BlockingClient` (reader thread); `--hosted` runs each case on a
//! `ClientReactor` (event loops, `--backend epoll|io-uring|auto`).

use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use websocket_driver::client::{BlockingClient, ClientReactor};
use websocket_driver::server::{Handler, ServerConfig, Ws};
use websocket_driver::{Backend, Message, Options};

const CASE_TIMEOUT: Duration = Duration::from_secs(60);

static DEFLATE: OnceLock<bool> = OnceLock::new();

fn options() -> Options {
    // Autobahn's 9.x cases send messages up to 16 MiB: the default max_length allows them.
    Options::default().deflate(DEFLATE.get().copied().unwrap_or(false))
}

/// Echoes every message and reports the close (and a text message, for getCaseCount).
struct Echo {
    echo: bool,
    done: mpsc::Sender<Option<String>>,
}

impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        if self.echo {
            let _ = ws.send_message(&message);
        } else if let Some(text) = message.as_text() {
            let _ = self.done.send(Some(text.to_string()));
        }
    }

    fn on_close(&mut self, _ws: &mut Ws<'_>, _code: u16, _reason: &str) {
        let _ = self.done.send(None);
    }
}

enum Runner {
    Blocking,
    Hosted(ClientReactor<Echo>),
}

impl Runner {
    /// Runs one connection to `url` to its close; returns the first text message seen
    /// when not echoing.
    fn run(&self, url: &str, echo: bool) -> Option<String> {
        let (done, events) = mpsc::channel();
        match self {
            Runner::Blocking => {
                let client = BlockingClient::new(url, options()).expect("valid URL");
                let tx = done.clone();
                client.on_message(move |ws, message| {
                    if echo {
                        let _ = ws.send_message(&message);
                    } else if let Some(text) = message.as_text() {
                        let _ = tx.send(Some(text.to_string()));
                    }
                });
                client.on_close(move |_, _, _| {
                    let _ = done.send(None);
                });
                if let Err(e) = client.start_connection() {
                    eprintln!("autobahn_client: {url}: {e}");
                    return None;
                }
                let first = collect(&events);
                client.wait_closed(CASE_TIMEOUT);
                first
            }
            Runner::Hosted(reactor) => {
                reactor
                    .connect(url, Echo { echo, done })
                    .expect("valid URL");
                let first = collect(&events);
                // Like `wait_closed` above: the next case starts once this connection is
                // gone, so the server has its close before the next request (else
                // updateReports can run before the last case is recorded).
                let deadline = std::time::Instant::now() + CASE_TIMEOUT;
                while reactor.stats().connections_open > 0 && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                first
            }
        }
    }
}

/// Waits for the close; returns the first text message reported before it.
fn collect(events: &mpsc::Receiver<Option<String>>) -> Option<String> {
    let mut first = None;
    while let Ok(event) = events.recv_timeout(CASE_TIMEOUT) {
        match event {
            Some(text) => {
                first.get_or_insert(text);
            }
            None => break,
        }
    }
    first
}

fn main() {
    let mut url = "ws://127.0.0.1:9001".to_string();
    let mut agent = "websocket-driver-client".to_string();
    let mut hosted = false;
    let mut backend = Backend::Auto;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--url" => url = value("--url"),
            "--agent" => agent = value("--agent"),
            "--hosted" => hosted = true,
            "--deflate" => {
                let _ = DEFLATE.set(true);
            }
            "--backend" => {
                backend = value("--backend")
                    .parse()
                    .unwrap_or_else(|e: String| usage(&e))
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let runner = if hosted {
        let config = ServerConfig {
            threads: 1,
            backend,
            options: options(),
            ..ServerConfig::default()
        };
        Runner::Hosted(
            ClientReactor::start(config).unwrap_or_else(|e| usage(&format!("reactor: {e}"))),
        )
    } else {
        Runner::Blocking
    };
    let count: usize = runner
        .run(&format!("{url}/getCaseCount"), false)
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| usage("could not read the case count"));
    eprintln!("autobahn_client: {count} cases, agent {agent}");
    for case in 1..=count {
        runner.run(&format!("{url}/runCase?case={case}&agent={agent}"), true);
    }
    runner.run(&format!("{url}/updateReports?agent={agent}"), false);
    if let Runner::Hosted(reactor) = runner {
        let _ = reactor.shutdown(Duration::from_secs(1));
    }
    eprintln!("autobahn_client: done");
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("autobahn_client: {problem}");
    }
    eprintln!(
        "usage: autobahn_client --url ws://HOST:PORT --agent NAME [--hosted] [--backend auto|epoll|io-uring] [--deflate]"
    );
    std::process::exit(2)
}
