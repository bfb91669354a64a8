//! `session::proxy::parse_response` on arbitrary bytes: an HTTP proxy's answer to
//! `CONNECT`, which is untrusted input for every client configured with a proxy.
//!
//! Checked: a parse never panics; `Partial` only below `MAX_RESPONSE_HEAD` bytes; a
//! `Complete` tunnel is a 2xx whose head ends within the input, parses the same from its
//! head alone, and every proper prefix of that head is `Partial` (nothing is consumed
//! early); a refusal is never a 2xx and keeps at most `MAX_AUTHENTICATE` bytes of
//! challenges; an answer (tunnel or refusal) does not change when more bytes follow, since
//! they belong to the tunnel or are never read.

#![no_main]

use libfuzzer_sys::fuzz_target;
use websocket_driver::protocol::error::HandshakeError;
use websocket_driver::protocol::frame::Status;
use websocket_driver::session::proxy::{MAX_AUTHENTICATE, MAX_RESPONSE_HEAD, parse_response};

fuzz_target!(|data: &[u8]| {
    let parsed = parse_response(data);
    let mut longer = data.to_vec();
    longer.extend_from_slice(b"\x81\x05hello\r\n\r\n");
    match &parsed {
        Ok(Status::Partial) => {
            assert!(
                data.len() < MAX_RESPONSE_HEAD,
                "Partial with {} bytes of input",
                data.len()
            );
        }
        Ok(Status::Complete(status, used)) => {
            assert!((200..300).contains(status), "tunnel on status {status}");
            assert!(
                *used <= data.len(),
                "head of {used} bytes in {}",
                data.len()
            );
            assert_eq!(parse_response(&data[..*used]), parsed, "head alone");
            for cut in 0..*used {
                assert_eq!(
                    parse_response(&data[..cut]),
                    Ok(Status::Partial),
                    "prefix of {cut} bytes"
                );
            }
            assert_eq!(parse_response(&longer), parsed, "more bytes after the head");
        }
        Err(HandshakeError::ProxyRefused {
            status,
            authenticate,
        }) => {
            assert!(!(200..300).contains(status), "refused on status {status}");
            assert!(
                authenticate.len() <= MAX_AUTHENTICATE,
                "{} bytes of challenges",
                authenticate.len()
            );
            assert_eq!(parse_response(&longer), parsed, "more bytes after the head");
        }
        Err(
            HandshakeError::MalformedHttp(_)
            | HandshakeError::TooManyHeaders { .. }
            | HandshakeError::HeadTooLarge { .. },
        ) => {}
        Err(other) => panic!("unexpected error {other:?}"),
    }
});
