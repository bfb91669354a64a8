//! A small websocat: sends each stdin line as a text message and prints what arrives.
//!
//! `cargo run --example client -- ws://127.0.0.1:9001`
//!
//! EOF on stdin closes the connection with 1000; the server's close ends the program,
//! with status 0 for a normal close (1000, 1001) and 1 otherwise (1006: the connection
//! was lost).

use std::io::BufRead;
use std::time::Duration;

use websocket_driver::client::BlockingClient;
use websocket_driver::{Message, Options};

fn main() {
    let url = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: client ws://HOST:PORT/PATH");
        std::process::exit(2)
    });
    let client = BlockingClient::new(&url, Options::default()).unwrap_or_else(|e| fail(&e));
    client.on_message(|_, message| match message {
        Message::Text(text) => println!("{text}"),
        Message::Binary(bytes) => println!("<{} bytes of binary>", bytes.len()),
    });
    client.on_error(|_, error| eprintln!("client: {error}"));
    client.on_close(|_, code, reason| {
        eprintln!("client: closed ({code} {reason})");
        std::process::exit(if matches!(code, 1000 | 1001) { 0 } else { 1 })
    });
    client.start_connection().unwrap_or_else(|e| fail(&e));
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if let Err(e) = client.send_text(&line) {
            fail(&e);
        }
    }
    let _ = client.close_connection(1000, "");
    if !client.wait_closed(Duration::from_secs(10)) {
        fail(&"the server did not close the connection within 10 s");
    }
    // Closed: `on_close`, on the reader thread, exits with the close's status.
    std::thread::sleep(Duration::from_secs(10));
    fail(&"closed, but on_close did not run");
}

fn fail(error: &dyn std::fmt::Display) -> ! {
    eprintln!("client: {error}");
    std::process::exit(1)
}
