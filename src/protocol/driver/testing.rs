//! Helpers for the driver's unit tests.

use super::{Driver, Event};
use crate::protocol::frame::Status;
use crate::protocol::handshake::RequestParser;
use crate::protocol::options::Options;

/// An open server driver with `options` for a request with `extra_headers` (each line
/// ending in CRLF), whose 101 response is already written; and that response.
pub(super) fn open_server_with(options: &Options, extra_headers: &str) -> (Driver, String) {
    let mut driver = server_before_start(options, extra_headers);
    driver.start_connection();
    let response = String::from_utf8_lossy(driver.pending_output()).into_owned();
    driver.consume_output(response.len());
    assert!(matches!(driver.poll_event(&mut []).1, Some(Event::Open)));
    (driver, response)
}

/// A server driver for a valid request with `extra_headers`, before
/// [`Driver::start_connection`]: no response written yet.
pub(super) fn server_before_start(options: &Options, extra_headers: &str) -> Driver {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         {extra_headers}\r\n"
    );
    let mut parser = RequestParser::new(options.head_limits());
    let Status::Complete(request, _) = parser.parse(request.as_bytes()).unwrap() else {
        panic!("a complete request")
    };
    Driver::make_server(&request, options).unwrap()
}
