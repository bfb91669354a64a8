//! Pub/sub with permessage-deflate on the reactor (both backends, several loops): a
//! publish reaches subscribers that agreed on different deflate parameters, and plain ones,
//! whole and in order, compressed on the wire for every deflate subscriber. Subscribers
//! without server context takeover share the frame compressed once per window size; those
//! with it get the message compressed on their own stream.

mod support;

use std::sync::Mutex;
use std::time::Duration;

use support::{Owned, TestClient, eventually};
use websocket_driver::protocol::deflate::DeflateOptions;
use websocket_driver::server::{Handler, Server, ServerConfig, Upgrade, Ws};
use websocket_driver::{Backend, MessageType, Options};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Member;

impl Handler for Member {
    fn on_open(&mut self, ws: &mut Ws<'_>) {
        ws.subscribe("news").expect("subscribe");
    }
}

fn json(len: usize, seed: usize) -> String {
    let mut s = String::new();
    let mut i = seed;
    while s.len() < len {
        s.push_str(&format!(
            "{{\"seq\":{seed},\"id\":{i},\"price\":{}.25,\"sym\":\"ABC\"}},",
            i % 97
        ));
        i += 1;
    }
    s.truncate(len);
    s
}

fn publishes_reach_deflate_and_plain_subscribers(backend: Backend) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The server keeps its context for clients that allow it; others ask it not to.
    let server_deflate = DeflateOptions {
        server_no_context_takeover: false,
        ..DeflateOptions::default()
    };
    let handle = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(ServerConfig {
            threads: 3,
            backend,
            options: Options::default().deflate_options(server_deflate),
            ..ServerConfig::default()
        })
        .start(|_| Upgrade::Accept(Member))
        .unwrap();
    let addr = handle.local_addr();
    let default = Options::default().deflate(true);
    let small_window = Options::default().deflate_options(DeflateOptions {
        server_max_window_bits: 10,
        ..DeflateOptions::default()
    });
    let takeover = Options::default().deflate_options(DeflateOptions {
        server_no_context_takeover: false,
        ..DeflateOptions::default()
    });
    let kinds = [
        (&default, "default"),
        (&default, "default"),
        (&default, "default"),
        (&small_window, "window 10"),
        (&small_window, "window 10"),
        (&takeover, "context takeover"),
        (&takeover, "context takeover"),
        (&Options::default(), "plain"),
        (&Options::default(), "plain"),
    ];
    let mut clients: Vec<(TestClient, &str)> = kinds
        .iter()
        .map(|(options, name)| (TestClient::connect_with(addr, "/", options).unwrap(), *name))
        .collect();
    for (client, name) in &clients {
        let params = client.driver.deflate_params();
        assert_eq!(params.is_some(), *name != "plain", "{name}");
        if let Some(p) = params {
            assert_eq!(p.server_no_context_takeover, *name != "context takeover");
            let bits = if *name == "window 10" { 10 } else { 15 };
            assert_eq!(p.server_max_window_bits, bits);
        }
    }
    assert!(
        eventually(Duration::from_secs(10), || handle.subscribers("news")
            == clients.len()),
        "subscribers: {}",
        handle.subscribers("news")
    );
    const MESSAGES: usize = 200;
    let messages: Vec<String> = (0..MESSAGES).map(|i| json(2048, i)).collect();
    for m in &messages {
        handle
            .publish("news", m.as_bytes(), MessageType::Text)
            .unwrap();
    }
    let payload = MESSAGES * 2048;
    for (client, name) in &mut clients {
        for (i, expected) in messages.iter().enumerate() {
            match client.next_message().unwrap() {
                Owned::Text(t) if t == *expected => {}
                other => panic!("{name}: message {i}: {other:?}"),
            }
        }
        println!(
            "{name}: {payload} bytes published, {} read",
            client.bytes_read
        );
        if *name == "plain" {
            assert!(client.bytes_read > payload, "{name}");
        } else {
            assert!(
                client.bytes_read * 4 < payload,
                "{name}: {}",
                client.bytes_read
            );
        }
    }
    // Context takeover compresses better than one message at a time.
    let read = |name: &str| {
        clients
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(c, _)| c.bytes_read)
            .unwrap()
    };
    assert!(read("context takeover") < read("default"));
    drop(clients);
    handle.shutdown(Duration::from_secs(5)).unwrap();
}

#[test]
fn publishes_reach_deflate_and_plain_subscribers_epoll() {
    publishes_reach_deflate_and_plain_subscribers(Backend::Epoll);
}

#[cfg(target_os = "linux")]
#[test]
fn publishes_reach_deflate_and_plain_subscribers_io_uring() {
    publishes_reach_deflate_and_plain_subscribers(Backend::IoUring);
}
