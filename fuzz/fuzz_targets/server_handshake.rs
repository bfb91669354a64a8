//! The server side of the opening handshake on arbitrary bytes, fed in fuzz-chosen chunks.
//!
//! Input layout: byte 0 picks the chunking (0: everything in one read), byte 1 seeds the
//! chunk sizes, the rest is the byte stream from the "client".
//!
//! Checked: nothing panics; chunked parsing gives the same request (or the same error) at
//! the same stream offset as parsing the whole stream in one read; on a complete head,
//! `validate_request`, `select_protocol`, `is_websocket` and `Driver::make_server` agree
//! with each other, and an accepted upgrade's driver survives the rest of the stream; every
//! handshake error gets an `error_response`.

#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;
use common::Chunks;
use websocket_driver::protocol::frame::Status;
use websocket_driver::protocol::handshake::{
    self, HeadLimits, RequestParser, select_protocol, validate_request,
};
use websocket_driver::{Driver, Error, Event, Options, is_websocket};

const LIMITS: HeadLimits = HeadLimits {
    max_size: 4096,
    max_headers: 32,
};

fn drain(driver: &mut Driver, input: &mut [u8]) {
    let total = input.len();
    let mut pos = 0;
    let mut closes = 0;
    let mut guard = 0usize;
    loop {
        guard += 1;
        assert!(guard <= total + 16, "poll_event does not converge");
        let (n, event) = driver.poll_event(&mut input[pos..]);
        assert!(n <= total - pos);
        pos += n;
        match event {
            None => {
                assert_eq!(pos, total, "no event but input left over");
                break;
            }
            Some(Event::Close { .. }) => closes += 1,
            Some(Event::Message(_) | Event::Ping(_) | Event::Pong(_)) => {
                assert_eq!(closes, 0, "event after Close");
            }
            Some(_) => {}
        }
    }
    assert!(closes <= 1, "Close reported {closes} times");
}

fn check_request(request: &websocket_driver::Request, rest: &[u8]) {
    let accept = ["chat".to_string(), "superchat".to_string()];
    let valid = validate_request(request);
    let protocol = select_protocol(request, &accept);
    if let Some(p) = &protocol {
        assert!(accept.contains(p));
    }
    let websocket = is_websocket(request);
    if valid.is_ok() {
        assert!(websocket, "a valid upgrade that is_websocket rejects");
    }
    let options = Options::default()
        .accept_protocols(accept.clone())
        .max_length(4096);
    match Driver::make_server(request, &options) {
        Ok(mut driver) => {
            let accept_key = valid.expect("make_server accepted what validate_request rejects");
            assert_eq!(driver.protocol(), protocol.as_deref());
            assert!(driver.start_connection());
            let response = driver.pending_output().to_vec();
            assert!(response.starts_with(b"HTTP/1.1 101 "));
            assert!(response.ends_with(b"\r\n\r\n"));
            let needle = format!("Sec-WebSocket-Accept: {accept_key}\r\n");
            assert!(
                response
                    .windows(needle.len())
                    .any(|w| w == needle.as_bytes())
            );
            driver.consume_output(response.len());
            let mut rest = rest.to_vec();
            drain(&mut driver, &mut rest);
            driver.receive_eof();
            drain(&mut driver, &mut []);
            assert!(driver.is_finished() || !driver.pending_output().is_empty());
        }
        Err(Error::Handshake(e)) => {
            assert_eq!(
                valid.as_ref().err(),
                Some(&e),
                "make_server and validate_request disagree"
            );
            let response = handshake::error_response(&e);
            assert!(response.starts_with(b"HTTP/1.1 4"));
        }
        Err(other) => panic!("make_server failed with a non-handshake error: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mut chunks = Chunks {
        mode: data[0],
        state: data[1] as u32,
    };
    let stream = &data[2..];

    let whole = RequestParser::new(LIMITS).parse(stream);

    let mut parser = RequestParser::new(LIMITS);
    let mut pos = 0;
    let chunked = loop {
        let n = chunks.next(stream.len() - pos);
        let chunk = &stream[pos..pos + n];
        match parser.parse(chunk) {
            Ok(Status::Complete(request, used)) => {
                assert!(used <= n, "used {used} of a {n}-byte read");
                break Ok(Status::Complete(request, pos + used));
            }
            Ok(Status::Partial) => {
                pos += n;
                if pos == stream.len() {
                    break Ok(Status::Partial);
                }
            }
            Err(e) => break Err(e),
        }
    };
    assert_eq!(
        whole, chunked,
        "chunked parse differs from the one-read parse"
    );

    match chunked {
        Ok(Status::Complete(request, end)) => check_request(&request, &stream[end..]),
        Ok(Status::Partial) => {}
        Err(e) => {
            let response = handshake::error_response(&e);
            assert!(response.starts_with(b"HTTP/1.1 4"));
        }
    }
});
