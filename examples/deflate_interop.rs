//! Checks permessage-deflate against another implementation's echo server: offers deflate,
//! sends compressible text and binary messages of several sizes, and checks that each comes
//! back whole and that both directions were compressed on the wire.
//!
//! `deflate_interop ws://127.0.0.1:8765/ [--takeover]`
//!
//! The plain sans-IO `Driver` over a `TcpStream`, so the bytes on the wire are counted
//! exactly. `--takeover` offers context takeover both ways (the default offer asks for none).
//! Exits non-zero on any mismatch; prints the agreed parameters and the wire ratios.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use websocket_driver::protocol::deflate::DeflateOptions;
use websocket_driver::{Driver, Event, Message, Options};

fn json(len: usize, seed: usize) -> String {
    let mut s = String::with_capacity(len + 128);
    let mut i = seed;
    while s.len() < len {
        s.push_str(&format!(
            "{{\"id\":{i},\"user\":\"user{}\",\"text\":\"hello, world\",\"ok\":true}},",
            i % 13
        ));
        i += 1;
    }
    s.truncate(len);
    s
}

struct Conn {
    stream: TcpStream,
    driver: Driver,
    buf: Vec<u8>,
    wire_in: usize,
    wire_out: usize,
}

impl Conn {
    fn flush(&mut self) {
        while !self.driver.pending_output().is_empty() {
            let n = self
                .stream
                .write(self.driver.pending_output())
                .unwrap_or_else(|e| fail(&format!("write: {e}")));
            self.wire_out += n;
            self.driver.consume_output(n);
        }
    }

    /// The next message (or `None` at the close).
    fn next(&mut self) -> Option<Message<'static>> {
        loop {
            self.flush();
            let (_, event) = self.driver.poll_event(&mut []);
            match event.map(owned) {
                Some(Some(Ok(m))) => return Some(m),
                Some(Some(Err(close))) => {
                    eprintln!("deflate_interop: {close}");
                    return None;
                }
                Some(None) => continue,
                None => {}
            }
            let n = self
                .stream
                .read(&mut self.buf)
                .unwrap_or_else(|e| fail(&format!("read: {e}")));
            if n == 0 {
                self.driver.receive_eof();
                continue;
            }
            self.wire_in += n;
            let mut at = 0;
            let mut input = std::mem::take(&mut self.buf);
            let mut got = None;
            while at < n {
                let (used, event) = self.driver.poll_event(&mut input[at..n]);
                at += used;
                match event.map(owned) {
                    Some(Some(Ok(m))) if got.is_none() => got = Some(m),
                    Some(Some(Ok(_))) => fail("two messages in one read (the peer echoes one)"),
                    Some(Some(Err(close))) => {
                        eprintln!("deflate_interop: {close}");
                        self.buf = input;
                        self.flush();
                        return None;
                    }
                    _ => {}
                }
            }
            self.buf = input;
            if let Some(m) = got {
                return Some(m);
            }
        }
    }
}

/// A message, an error or close as text, or `None` for other events.
fn owned(event: Event<'_>) -> Option<Result<Message<'static>, String>> {
    match event {
        Event::Message(m) => Some(Ok(m.into_owned())),
        Event::Error(e) => Some(Err(format!("error: {e}"))),
        Event::Close { code, reason } => Some(Err(format!("closed {code} {reason}"))),
        _ => None,
    }
}

fn main() {
    let mut url = None;
    let mut takeover = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--takeover" => takeover = true,
            u if u.starts_with("ws://") => url = Some(u.to_string()),
            other => fail(&format!(
                "usage: deflate_interop ws://HOST:PORT/ [--takeover] ({other}?)"
            )),
        }
    }
    let url = url.unwrap_or_else(|| fail("usage: deflate_interop ws://HOST:PORT/ [--takeover]"));
    let deflate = if takeover {
        DeflateOptions {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            ..DeflateOptions::default()
        }
    } else {
        DeflateOptions::default()
    };
    let options = Options::default().deflate_options(deflate);
    let mut driver = Driver::make_client(&url, &options).unwrap_or_else(|e| fail(&e.to_string()));
    let target = driver
        .url()
        .map(|u| {
            // An IPv6 literal needs its brackets back to be a socket address.
            if u.host.contains(':') {
                format!("[{}]:{}", u.host, u.port)
            } else {
                format!("{}:{}", u.host, u.port)
            }
        })
        .unwrap();
    let stream = TcpStream::connect(&target).unwrap_or_else(|e| fail(&format!("{target}: {e}")));
    stream.set_read_timeout(Some(Duration::from_secs(20))).ok();
    stream.set_nodelay(true).ok();
    driver.start_connection();
    let mut conn = Conn {
        stream,
        driver,
        buf: vec![0; 256 * 1024],
        wire_in: 0,
        wire_out: 0,
    };
    // The handshake.
    conn.flush();
    while !conn.driver.is_handshake_complete() {
        let n = conn.stream.read(&mut conn.buf).unwrap_or(0);
        if n == 0 {
            fail("connection closed during the handshake");
        }
        let mut input = std::mem::take(&mut conn.buf);
        let (used, event) = conn.driver.poll_event(&mut input[..n]);
        assert_eq!(used, n, "the peer sent frames before we spoke");
        if let Some(Event::Error(e)) = event {
            fail(&format!("handshake: {e}"));
        }
        conn.buf = input;
    }
    let agreed = conn
        .driver
        .deflate_params()
        .unwrap_or_else(|| fail("the server did not accept permessage-deflate"));
    println!("deflate_interop: {url}: agreed {agreed:?}");
    let (wire_in0, wire_out0) = (conn.wire_in, conn.wire_out);
    let mut payload = 0usize;
    for (round, len) in [0usize, 20, 200, 1024, 5000, 70_000, 300_000, 1024, 1024]
        .into_iter()
        .enumerate()
    {
        let text = json(len, round);
        conn.driver
            .send_text(&text)
            .unwrap_or_else(|e| fail(&e.to_string()));
        match conn.next() {
            Some(Message::Text(t)) if t == text => {}
            Some(other) => fail(&format!(
                "text of {len} bytes came back as {} bytes ({})",
                other.as_bytes().len(),
                if other.is_text() { "text" } else { "binary" }
            )),
            None => fail("closed before the echo"),
        }
        let binary = json(len, round + 100).into_bytes();
        conn.driver
            .send_binary(&binary)
            .unwrap_or_else(|e| fail(&e.to_string()));
        match conn.next() {
            Some(Message::Binary(b)) if b[..] == binary[..] => {}
            _ => fail(&format!("binary of {len} bytes did not come back whole")),
        }
        payload += 2 * len;
    }
    let (sent, received) = (conn.wire_out - wire_out0, conn.wire_in - wire_in0);
    println!(
        "deflate_interop: {payload} payload bytes each way; on the wire sent {sent} ({:.1}%), \
         received {received} ({:.1}%)",
        100.0 * sent as f64 / payload as f64,
        100.0 * received as f64 / payload as f64
    );
    if sent * 3 > payload || received * 3 > payload {
        fail("a direction was not compressed");
    }
    let _ = conn.driver.close_connection(1000, "");
    conn.flush();
    while conn.next().is_some() {}
    println!("deflate_interop: OK");
}

fn fail(why: &str) -> ! {
    eprintln!("deflate_interop: FAILED: {why}");
    std::process::exit(1)
}
