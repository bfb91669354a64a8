//! The server side of the opening handshake, written once for every runtime: from a
//! parsed upgrade request and the application's decision to either a server [`Driver`]
//! or the HTTP response that refuses the request.
//!
//! Call order:
//!
//! 1. Feed the request bytes to a [`RequestParser`](crate::RequestParser) until it
//!    completes. A parse error is answered with [`error_response`], then the transport
//!    closes.
//! 2. The application looks at the [`Request`] and decides: `Ok(handler)` to accept,
//!    `Err(HttpResponse)` to refuse.
//! 3. [`answer`] turns request and decision into an [`Answer`]:
//!    - [`Answer::Accept`]: a server driver that has not started yet. Attach what must see
//!      the first events, then call [`Driver::start_connection`], which queues the 101 and
//!      [`Event::Open`](crate::Event::Open); bytes that followed the request head are the
//!      connection's first input.
//!    - [`Answer::Reject`]: write [`Refusal::response`] and close the transport (the
//!      server closes first). [`Refusal::error`] says why, for runtimes that report it.
//!
//! ```
//! use websocket_driver::session::{Answer, NonUpgrade, answer};
//! use websocket_driver::protocol::frame::Status;
//! use websocket_driver::{Options, RequestParser};
//!
//! let head = b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
//!              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
//! let mut parser = RequestParser::new(Options::default().head_limits());
//! let Ok(Status::Complete(request, _)) = parser.parse(head) else { panic!() };
//! let decision = Ok::<_, websocket_driver::session::HttpResponse>("chat handler");
//! match answer(&request, &Options::default(), decision, NonUpgrade::UpgradeRequired) {
//!     Answer::Accept(mut driver, handler) => {
//!         driver.start_connection();
//!         assert!(driver.pending_output().starts_with(b"HTTP/1.1 101 "));
//!         assert_eq!(handler, "chat handler");
//!     }
//!     Answer::Reject(refusal) => panic!("refused: {}", refusal.error),
//! }
//! ```

use crate::protocol::driver::Driver;
use crate::protocol::error::{Error, HandshakeError};
use crate::protocol::handshake::{Request, is_websocket, validate_header};
use crate::protocol::options::Options;

pub use crate::protocol::handshake::{error_response, http_response};

/// The answer to an upgrade request whose application code panicked before the 101 (the
/// reactor's upgrade closure, `BlockingServer`'s setup closure): 500.
pub(crate) fn panicked_response() -> Vec<u8> {
    http_response(500, &[], "the server failed to answer the upgrade")
}

/// An HTTP response that refuses an upgrade (or answers a plain HTTP request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Extra headers (`Content-Length`, `Transfer-Encoding` and `Connection` are the
    /// library's own: the body's length, and a connection that closes after it).
    pub headers: Vec<(String, String)>,
    /// Plain-text body.
    pub body: String,
}

impl HttpResponse {
    /// A response with a status and a plain-text body.
    pub fn new(status: u16, body: impl Into<String>) -> HttpResponse {
        HttpResponse {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// The response on the wire (`Connection: close`). Headers that are not valid HTTP
    /// (a newline in a value, a bad name) are left out.
    pub fn to_bytes(&self) -> Vec<u8> {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .filter(|(n, v)| validate_header(n, v).is_ok())
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        http_response(self.status, &headers, &self.body)
    }
}

/// How to answer a request the application accepted that is not a WebSocket upgrade at
/// all (no `Connection: upgrade` / `Upgrade: websocket`, or not a GET).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonUpgrade {
    /// `426 Upgrade Required` with `Upgrade: websocket`: for servers whose application
    /// sees every HTTP request and may answer plain ones itself (the reactor's server).
    UpgradeRequired,
    /// `400 Bad Request` naming what is missing, like any other invalid handshake: for
    /// endpoints that only ever expect upgrades (the blocking and tokio servers).
    BadRequest,
}

/// A refused request: what to write before closing, and why.
#[derive(Debug)]
pub struct Refusal {
    /// The whole HTTP response.
    pub response: Vec<u8>,
    /// Why: the handshake error, [`HandshakeError::BadRequest`] when the application
    /// refused, or the options' validation error (answered with 500).
    pub error: Error,
}

/// The outcome of [`answer`].
#[derive(Debug)]
pub enum Answer<H> {
    /// Accepted: a server driver for the request, not started yet
    /// ([`Driver::start_connection`] queues the 101), and the application's handler.
    Accept(Driver, H),
    /// Refused: write the response and close.
    Reject(Refusal),
}

/// Answers a parsed upgrade request given the application's decision: the application's
/// refusal as it asked; then, for an accepted request, a request that is no upgrade at all
/// as `non_upgrade` says; then [`Driver::make_server`], whose handshake errors become
/// [`error_response`]s (400, 426 with `Sec-WebSocket-Version: 13`, 431) and any other
/// error (invalid options) a 500.
///
/// A refusal of a `HEAD` request is its head only (RFC 9110 §9.3.2: no content in a
/// response to HEAD), `Content-Length` included.
pub fn answer<H>(
    request: &Request,
    options: &Options,
    decision: Result<H, HttpResponse>,
    non_upgrade: NonUpgrade,
) -> Answer<H> {
    let refuse = |response: Vec<u8>, error: Error| {
        Answer::Reject(Refusal {
            response: if request.method == "HEAD" {
                head_only(response)
            } else {
                response
            },
            error,
        })
    };
    let handler = match decision {
        Ok(handler) => handler,
        Err(response) => {
            return refuse(
                response.to_bytes(),
                HandshakeError::BadRequest("upgrade refused by the application").into(),
            );
        }
    };
    if non_upgrade == NonUpgrade::UpgradeRequired && !is_websocket(request) {
        let why = "this endpoint requires a WebSocket upgrade";
        return refuse(
            http_response(426, &[("Upgrade", "websocket")], why),
            HandshakeError::BadRequest(why).into(),
        );
    }
    match Driver::make_server(request, options) {
        Ok(driver) => Answer::Accept(driver, handler),
        Err(Error::Handshake(e)) => refuse(error_response(&e), e.into()),
        Err(e) => refuse(http_response(500, &[], &e.to_string()), e),
    }
}

/// A response without its content: everything up to the blank line after the headers.
fn head_only(mut response: Vec<u8>) -> Vec<u8> {
    if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        response.truncate(end + 4);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::Status;
    use crate::protocol::handshake::RequestParser;

    const UPGRADE: &str = "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn parse(head: &str) -> Request {
        let mut parser = RequestParser::new(Options::default().head_limits());
        match parser.parse(head.as_bytes()) {
            Ok(Status::Complete(request, _)) => request,
            other => panic!("{head:?} does not parse: {other:?}"),
        }
    }

    #[test]
    fn a_refused_head_request_gets_the_head_only() {
        let head = parse("HEAD /page HTTP/1.1\r\nHost: x\r\n\r\n");
        let (response, _) = refused(answer(
            &head,
            &Options::default(),
            Err::<(), _>(HttpResponse::new(404, "not found")),
            NonUpgrade::UpgradeRequired,
        ));
        assert!(response.starts_with("HTTP/1.1 404 "), "{response}");
        assert!(
            response.contains("\r\nContent-Length: 10\r\n"),
            "{response}"
        );
        assert!(response.ends_with("\r\n\r\n"), "no content: {response:?}");
        // The same refusal of a GET keeps its content.
        let get = parse("GET /page HTTP/1.1\r\nHost: x\r\n\r\n");
        let (response, _) = refused(answer(
            &get,
            &Options::default(),
            Err::<(), _>(HttpResponse::new(404, "not found")),
            NonUpgrade::UpgradeRequired,
        ));
        assert!(response.ends_with("\r\n\r\nnot found\n"), "{response:?}");
        // And a HEAD that is no upgrade: the 426's head.
        let (response, _) = refused(answer(
            &head,
            &Options::default(),
            Ok(()),
            NonUpgrade::UpgradeRequired,
        ));
        assert!(
            response.starts_with("HTTP/1.1 426 ") && response.ends_with("\r\n\r\n"),
            "{response:?}"
        );
    }

    fn refused(answer: Answer<()>) -> (String, Error) {
        match answer {
            Answer::Reject(r) => (String::from_utf8(r.response).unwrap(), r.error),
            Answer::Accept(..) => panic!("accepted"),
        }
    }

    #[test]
    fn accepted_upgrade_gives_an_unstarted_server_driver() {
        let request = parse(&format!("GET /chat HTTP/1.1\r\n{UPGRADE}"));
        let Answer::Accept(mut driver, 7) = answer(
            &request,
            &Options::default(),
            Ok(7),
            NonUpgrade::UpgradeRequired,
        ) else {
            panic!("refused");
        };
        assert!(driver.pending_output().is_empty());
        assert!(driver.start_connection());
        let out = String::from_utf8(driver.pending_output().to_vec()).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{out}"
        );
        assert!(out.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn the_application_refusal_goes_out_as_asked() {
        let request = parse(&format!("GET /chat HTTP/1.1\r\n{UPGRADE}"));
        let mut response = HttpResponse::new(403, "not for you");
        response.headers.push(("X-Why".into(), "policy".into()));
        response.headers.push(("X-Bad".into(), "a\r\nb".into()));
        let (text, error) = refused(answer(
            &request,
            &Options::default(),
            Err(response),
            NonUpgrade::UpgradeRequired,
        ));
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
        assert!(text.contains("\r\nX-Why: policy\r\n"), "{text}");
        assert!(
            !text.contains("X-Bad"),
            "invalid headers are left out: {text}"
        );
        assert!(text.ends_with("\r\n\r\nnot for you\n"), "{text}");
        assert!(matches!(
            error,
            Error::Handshake(HandshakeError::BadRequest(_))
        ));
    }

    #[test]
    fn plain_http_is_426_or_400_as_asked() {
        let request = parse("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let (text, _) = refused(answer(
            &request,
            &Options::default(),
            Ok(()),
            NonUpgrade::UpgradeRequired,
        ));
        assert!(
            text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nUpgrade: websocket\r\n"), "{text}");
        let (text, error) = refused(answer(
            &request,
            &Options::default(),
            Ok(()),
            NonUpgrade::BadRequest,
        ));
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        assert!(matches!(
            error,
            Error::Handshake(HandshakeError::BadRequest(_))
        ));
    }

    #[test]
    fn handshake_errors_get_their_status() {
        let old = UPGRADE.replace("Version: 13", "Version: 8");
        let request = parse(&format!("GET / HTTP/1.1\r\n{old}"));
        for non_upgrade in [NonUpgrade::UpgradeRequired, NonUpgrade::BadRequest] {
            let (text, error) = refused(answer(&request, &Options::default(), Ok(()), non_upgrade));
            assert!(text.starts_with("HTTP/1.1 426"), "{text}");
            assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{text}");
            assert!(matches!(
                error,
                Error::Handshake(HandshakeError::UnsupportedVersion(_))
            ));
        }
    }

    #[test]
    fn invalid_options_are_a_500() {
        let request = parse(&format!("GET / HTTP/1.1\r\n{UPGRADE}"));
        let options = Options {
            additional_headers: vec![("X-Bad".into(), "a\nb".into())],
            ..Options::default()
        };
        let (text, error) = refused(answer(&request, &options, Ok(()), NonUpgrade::BadRequest));
        assert!(text.starts_with("HTTP/1.1 500 "), "{text}");
        assert!(!matches!(error, Error::Handshake(_)));
    }
}
