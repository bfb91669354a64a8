//! The template for any other transport or runtime: the sans-IO driver pumped over a
//! blocking `std::os::unix::net::UnixStream` pair, a server on one end and a client on the
//! other. `pump` is the whole integration; its one optional part is the payload loan
//! (`Driver::lend_payload_buffer`), which receives the rest of a large frame, here the
//! client's 1 MiB message and its echo, straight into the message's buffer.
//!
//! `cargo run --example embed`

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use websocket_driver::protocol::frame::Status;
use websocket_driver::protocol::handshake::HeadLimits;
use websocket_driver::protocol::options::{DEFAULT_MAX_HANDSHAKE_SIZE, DEFAULT_MAX_HEADERS};
use websocket_driver::{Driver, Event, Options, RequestParser, make_client, make_server};

/// Writes what the driver has to write, reads, feeds the driver and hands each event to
/// `on_event`, until the driver is finished. `input` holds bytes already read.
fn pump<S: Read + Write>(
    stream: &mut S,
    driver: &mut Driver,
    mut input: Vec<u8>,
    mut on_event: impl FnMut(&mut Driver, Event<'_>),
) -> io::Result<()> {
    let mut n = input.len();
    input.resize(64 * 1024, 0);
    loop {
        let mut at = 0;
        while let (used, Some(event)) = driver.poll_event(&mut input[at..n]) {
            at += used;
            on_event(driver, event);
        }
        stream.write_all(driver.pending_output())?;
        driver.consume_output(driver.pending_output().len());
        if driver.is_finished() {
            return Ok(());
        }
        // Optional: once a read buffer's worth or more of a data frame is still to come,
        // the rest is read straight into its message's buffer, not copied out of `input`.
        if let Some((mut buf, room)) = driver.lend_payload_buffer(input.len()) {
            // Safe Rust zeroes what it reads into: a read buffer's worth at a time, not
            // the whole room (up to 1 MiB) for every read.
            let start = buf.len();
            buf.resize(start + room.min(input.len()), 0);
            let read = stream.read(&mut buf[start..]);
            let got = *read.as_ref().unwrap_or(&0);
            buf.truncate(start + got);
            driver.payload_received(buf, got);
            if read? == 0 {
                driver.receive_eof();
            }
            n = 0;
            continue;
        }
        n = stream.read(&mut input)?;
        if n == 0 {
            driver.receive_eof();
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> Result<()> {
    let (mut server_end, mut client_end) = UnixStream::pair()?;

    let server = std::thread::spawn(move || -> Result<()> {
        // The server reads the upgrade request head; what follows it belongs to the driver.
        let mut parser = RequestParser::new(HeadLimits {
            max_size: DEFAULT_MAX_HANDSHAKE_SIZE,
            max_headers: DEFAULT_MAX_HEADERS,
        });
        let mut buf = vec![0u8; 16 * 1024];
        let (request, rest) = loop {
            let n = server_end.read(&mut buf)?;
            match parser
                .parse(&buf[..n])
                .map_err(websocket_driver::Error::from)?
            {
                Status::Complete(request, used) => break (request, buf[used..n].to_vec()),
                Status::Partial if n == 0 => {
                    return Err("connection closed in the handshake".into());
                }
                Status::Partial => {}
            }
        };
        let mut ws = make_server(&request, &Options::default())?;
        ws.start_connection();
        pump(&mut server_end, &mut ws, rest, |ws, event| {
            if let Event::Message(message) = event {
                let _ = ws.send_message(&message); // echo
            }
        })?;
        Ok(())
    });

    let mut ws = make_client("ws://localhost/echo", &Options::default())?;
    ws.start_connection();
    ws.send_text("Hello over a Unix socket")?; // queued until open
    ws.send_binary(&vec![7u8; 1 << 20])?; // the server receives most of it through a loan
    pump(
        &mut client_end,
        &mut ws,
        Vec::new(),
        |ws, event| match event {
            Event::Message(message) if message.is_text() => {
                println!("client: echoed {:?}", message.as_text().unwrap_or_default());
            }
            Event::Message(message) => {
                println!("client: echoed {} bytes", message.as_bytes().len());
                let _ = ws.close_connection(1000, "done");
            }
            Event::Close { code, reason } => println!("client: closed {code} {reason:?}"),
            _ => {}
        },
    )?;
    drop(client_end);
    server.join().expect("the server thread panicked")?;
    Ok(())
}
