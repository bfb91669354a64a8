//! Echo server: every message comes back as it came.
//!
//! `cargo run --release --example echo -- --addr 127.0.0.1:9001 --backend blocking`

use websocket_driver::Options;
use websocket_driver::blocking::BlockingServer;

fn main() {
    let mut addr = "127.0.0.1:9001".to_string();
    let mut backend = "blocking".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().unwrap_or_else(|| usage(&format!("{name} needs a value")));
        match arg.as_str() {
            "--addr" => addr = value("--addr"),
            "--backend" => backend = value("--backend"),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if backend != "blocking" {
        usage(&format!("backend {backend:?} is not available; this build has: blocking"));
    }
    // Autobahn's 9.x cases send 16 MiB messages; the default max_length (64 MiB) allows them.
    let server = BlockingServer::bind(&addr)
        .unwrap_or_else(|e| usage(&format!("cannot listen on {addr}: {e}")))
        .options(Options::default());
    eprintln!("echo: listening on ws://{} (backend {backend})", server.local_addr().unwrap());
    server
        .serve(|_request, ws| {
            ws.on_message(|ws, message| {
                let _ = ws.send_message(&message);
            });
        })
        .unwrap_or_else(|e| usage(&format!("server failed: {e}")));
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("echo: {problem}");
    }
    eprintln!("usage: echo [--addr HOST:PORT] [--backend blocking]");
    std::process::exit(2)
}
