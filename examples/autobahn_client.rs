//! Drives the Autobahn fuzzingserver through every case, echoing every message.
//!
//! `autobahn_client --url ws://127.0.0.1:9001 --agent NAME [--hosted] [--backend B] [--tokio recv|next|split] [--deflate]`
//!
//! `--deflate` offers permessage-deflate (`Options::deflate(true)`).
//!
//! Blocking mode uses `BlockingClient` (reader thread); `--hosted` runs each case on a
//! `ClientReactor` (event loops, `--backend epoll|io-uring|auto`); `--tokio` (feature
//! `tokio`) on the tokio adapter's client, one case after another on a current-thread
//! runtime: `recv` is `WebSocketStream::connect` + `recv` (each message echoed from the read
//! buffer through its `Reply`), `next` the same stream with `next` + `send_message`, and
//! `split` the split API's `connect` (`WsSender` + `WsReceiver`).

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
    #[cfg(feature = "tokio")]
    Tokio(tokio_client::Api, tokio::runtime::Runtime),
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
            #[cfg(feature = "tokio")]
            Runner::Tokio(api, runtime) => {
                let case = tokio_client::run(*api, url, echo);
                // The timer needs the runtime: made inside `block_on`.
                match runtime.block_on(async { tokio::time::timeout(CASE_TIMEOUT, case).await }) {
                    Ok(first) => first,
                    Err(_) => {
                        eprintln!("autobahn_client: {url}: no close within {CASE_TIMEOUT:?}");
                        None
                    }
                }
            }
        }
    }
}

/// The tokio adapter's client: one connection to its close, in the shape `Api` names.
#[cfg(feature = "tokio")]
mod tokio_client {
    use websocket_driver::Event;
    use websocket_driver::tokio::{WebSocketStream, connect};

    #[derive(Clone, Copy)]
    pub enum Api {
        Recv,
        Next,
        Split,
    }

    impl std::str::FromStr for Api {
        type Err = String;
        fn from_str(s: &str) -> Result<Api, String> {
            match s {
                "recv" => Ok(Api::Recv),
                "next" => Ok(Api::Next),
                "split" => Ok(Api::Split),
                other => Err(format!("--tokio takes recv, next or split, not {other}")),
            }
        }
    }

    /// Echoes every message (or keeps the first text, when not echoing) until the close;
    /// returns that text.
    pub async fn run(api: Api, url: &str, echo: bool) -> Option<String> {
        let options = super::options();
        let mut first = None;
        let mut keep = |event: &Event<'_>| {
            if let Event::Message(message) = event
                && let Some(text) = message.as_text()
            {
                first.get_or_insert_with(|| text.to_string());
            }
        };
        let failed = |e| eprintln!("autobahn_client: {url}: {e}");
        match api {
            Api::Recv => {
                let mut ws = WebSocketStream::connect(url, &options)
                    .await
                    .map_err(failed)
                    .ok()?;
                while let Some((event, mut reply)) = ws.recv().await {
                    match &event {
                        Event::Message(message) if echo => {
                            let _ = reply.send_message(message);
                        }
                        other => keep(other),
                    }
                }
            }
            Api::Next => {
                let mut ws = WebSocketStream::connect(url, &options)
                    .await
                    .map_err(failed)
                    .ok()?;
                while let Some(event) = ws.next().await {
                    match event {
                        Event::Message(message) if echo => {
                            let _ = ws.send_message(message).await;
                        }
                        other => keep(&other),
                    }
                }
            }
            Api::Split => {
                let (tx, mut rx) = connect(url, &options).await.map_err(failed).ok()?;
                while let Some(event) = rx.next().await {
                    match event {
                        Event::Message(message) if echo => {
                            let _ = tx.send_message(message).await;
                        }
                        other => keep(&other),
                    }
                }
            }
        }
        first
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
    let mut tokio_api: Option<String> = None;
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
            "--tokio" => tokio_api = Some(value("--tokio")),
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
    let runner = if let Some(api) = tokio_api {
        tokio_runner(&api)
    } else if hosted {
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
    // The agent goes into query strings: anything but unreserved characters is escaped.
    let agent: String = agent
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    if let Err(e) = websocket_driver::protocol::handshake::ClientUrl::parse(&url) {
        usage(&format!("--url {url}: {e}"));
    }
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

#[cfg(feature = "tokio")]
fn tokio_runner(api: &str) -> Runner {
    let api = api.parse().unwrap_or_else(|e: String| usage(&e));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| usage(&format!("tokio runtime: {e}")));
    Runner::Tokio(api, runtime)
}

#[cfg(not(feature = "tokio"))]
fn tokio_runner(_: &str) -> Runner {
    usage("--tokio needs the example built with --features tokio")
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("autobahn_client: {problem}");
    }
    eprintln!(
        "usage: autobahn_client --url ws://HOST:PORT --agent NAME [--hosted] [--backend auto|epoll|io-uring] [--tokio recv|next|split] [--deflate]"
    );
    std::process::exit(2)
}
