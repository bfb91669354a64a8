//! Shared bits of the peer servers: argument parsing, the tokio runtime, and the topics of
//! the pub/sub peers.

use std::net::SocketAddr;

/// `--addr 127.0.0.1:PORT [--threads N]`.
pub struct Args {
    pub addr: SocketAddr,
    pub threads: usize,
}

pub fn parse_args(name: &str) -> Args {
    let usage = |msg: &str| -> ! {
        if !msg.is_empty() {
            eprintln!("{name}: {msg}");
        }
        eprintln!("usage: {name} --addr 127.0.0.1:PORT [--threads N]");
        std::process::exit(if msg.is_empty() { 0 } else { 2 });
    };
    let mut addr = "127.0.0.1:9001".to_string();
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match arg.as_str() {
            "--addr" => addr = value("--addr"),
            "--threads" => {
                threads = value("--threads")
                    .parse()
                    .ok()
                    .filter(|&n: &usize| n > 0)
                    .unwrap_or_else(|| usage("--threads needs a positive number"))
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let addr = addr
        .parse()
        .unwrap_or_else(|_| usage(&format!("bad --addr {addr}")));
    Args { addr, threads }
}

/// One worker per core: `threads == 1` gets a current-thread runtime (no work-stealing
/// overhead, the peers' best case on one pinned core), more get a multi-thread runtime with
/// that many workers.
/// Binds the peer's listener (or exits with why it cannot) and says where it listens.
pub async fn listen(name: &str, args: &Args) -> tokio::net::TcpListener {
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .unwrap_or_else(|e| {
            eprintln!("{name}: cannot listen on {}: {e}", args.addr);
            std::process::exit(1);
        });
    eprintln!(
        "{name}: listening on ws://{} ({} threads)",
        listener.local_addr().unwrap(),
        args.threads
    );
    listener
}

pub fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build().expect("tokio runtime")
}

/// Largest message (and frame) either peer accepts, as the project's own default.
pub const MAX_MESSAGE: usize = 64 << 20;

// ----- pub/sub -----

/// Messages a topic's `tokio::sync::broadcast` channel holds for its slowest subscriber; one
/// that falls further behind gets `RecvError::Lagged` and loses the oldest (counted in
/// [`DROPPED`]). Larger than a `broadcast` round of 500 clients, so only a subscriber that
/// really cannot keep up lags.
pub const TOPIC_CAPACITY: usize = 1024;

/// Deliveries lost to lagging subscribers, over the whole process.
pub static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The topics: one broadcast channel per request path, made by its first subscriber and
/// removed with its last one.
pub struct Topics<T> {
    channels:
        std::sync::Mutex<std::collections::HashMap<String, tokio::sync::broadcast::Sender<T>>>,
}

impl<T: Clone> Default for Topics<T> {
    fn default() -> Self {
        Topics {
            channels: Default::default(),
        }
    }
}

impl<T: Clone> Topics<T> {
    /// Subscribes to `topic`: the sender to publish on and this subscriber's receiver.
    pub fn subscribe(
        &self,
        topic: &str,
    ) -> (
        tokio::sync::broadcast::Sender<T>,
        tokio::sync::broadcast::Receiver<T>,
    ) {
        let mut channels = self.channels.lock().unwrap();
        let tx = channels
            .entry(topic.to_string())
            .or_insert_with(|| tokio::sync::broadcast::channel(TOPIC_CAPACITY).0);
        (tx.clone(), tx.subscribe())
    }

    /// Drops `topic`'s channel if nobody is subscribed any more (call after dropping the
    /// receiver).
    pub fn leave(&self, topic: &str) {
        let mut channels = self.channels.lock().unwrap();
        if channels
            .get(topic)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            channels.remove(topic);
        }
    }
}

/// Logs the count of dropped deliveries to stderr once a second whenever it has grown.
pub fn spawn_drop_reporter(name: &'static str) {
    tokio::spawn(async move {
        let mut last = 0;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = DROPPED.load(std::sync::atomic::Ordering::Relaxed);
            if now != last {
                eprintln!("{name}: {now} deliveries dropped so far (lagging subscribers)");
                last = now;
            }
        }
    });
}
