//! Shared bits of the peer echo servers: argument parsing and the tokio runtime.

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
