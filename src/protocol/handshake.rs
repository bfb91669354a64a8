//! The opening handshake (RFC 6455 §4): HTTP upgrade request and response, both roles.
//!
//! Heads are read incrementally. Each byte is scanned for the end of the head at most
//! once (plus a 3-byte overlap), so a head dripped one byte per read costs linear time
//! (the CVE-2023-43669 class), and httparse runs once, on the complete head.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest, Sha1};

use super::error::{HandshakeError, UsageError};
use super::frame::Status;

// The client's side (URL, upgrade request, response check), re-exported so every item
// keeps its `handshake::` path.
mod client;

pub use client::{
    Agreed, ClientUrl, basic_credentials, client_request, generate_key, validate_response,
};

const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.trim().as_bytes());
    sha.update(ACCEPT_GUID);
    BASE64.encode(sha.finalize())
}

/// A parsed HTTP request head: what the seed calls the `env` of an upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The request target: path and query.
    pub path: String,
    /// Minor HTTP version: 1 for HTTP/1.1.
    pub version: u8,
    /// Header lines in order, names as sent.
    pub headers: Vec<(String, String)>,
}

/// A parsed HTTP response head (the client side of the handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header lines in order, names as sent.
    pub headers: Vec<(String, String)>,
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

pub(super) fn count_header(headers: &[(String, String)], name: &str) -> usize {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .count()
}

/// Whether a comma-separated header value holds `token` (case-insensitive), in any of the
/// header's lines.
pub(crate) fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl Request {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

impl Response {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// Whether a request asks for a WebSocket upgrade: GET, `Connection` holding `upgrade` and
/// `Upgrade: websocket`. Like the seed's `websocket-p`, for routing before `make_server`.
pub fn is_websocket(request: &Request) -> bool {
    request.method == "GET"
        && has_token(&request.headers, "connection", "upgrade")
        && has_token(&request.headers, "upgrade", "websocket")
}

/// Limits on a handshake head.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// Largest head in bytes, final blank line included.
    pub max_size: usize,
    /// Most header lines.
    pub max_headers: usize,
}

/// Collects a head until its blank line.
#[derive(Debug, Default)]
struct HeadBuffer {
    buf: Vec<u8>,
}

/// Where a head ends: just past its first empty line, searching `buf` for line ends
/// from `from` on. Lines end in CRLF or, as httparse also reads them (RFC 9112 §2.2
/// lets a recipient), a bare LF: the end found here is the one httparse finds.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    memchr::memchr_iter(b'\n', &buf[from..]).find_map(|i| {
        let next = from + i + 1;
        match buf.get(next..) {
            Some([b'\n', ..]) => Some(next + 1),
            Some([b'\r', b'\n', ..]) => Some(next + 2),
            _ => None,
        }
    })
}

enum Head<'a> {
    /// The head, and how many bytes of the input it took.
    Complete(&'a [u8], usize),
    Partial,
}

impl HeadBuffer {
    fn feed<'a>(
        &'a mut self,
        input: &'a [u8],
        max_size: usize,
    ) -> Result<Head<'a>, HandshakeError> {
        /// The longest end of a head: `\r\n\r\n`.
        const END: usize = 4;
        if self.buf.is_empty() {
            // Fast path: the whole head in one read needs no copy.
            if let Some(end) = head_end(input, 0) {
                if end > max_size {
                    return Err(HandshakeError::HeadTooLarge { limit: max_size });
                }
                return Ok(Head::Complete(&input[..end], end));
            }
        }
        let old = self.buf.len();
        // An end is an LF and at most two bytes after it: one may begin in what was
        // already looked at.
        let start = old.saturating_sub(2);
        // Never hold more than the limit plus the terminator, whatever the read size.
        let room = max_size.saturating_add(END).saturating_sub(old);
        let take = input.len().min(room);
        self.buf.extend_from_slice(&input[..take]);
        match head_end(&self.buf, start) {
            Some(end) => {
                if end > max_size {
                    return Err(HandshakeError::HeadTooLarge { limit: max_size });
                }
                self.buf.truncate(end);
                Ok(Head::Complete(&self.buf, end - old))
            }
            None if self.buf.len() > max_size => {
                Err(HandshakeError::HeadTooLarge { limit: max_size })
            }
            None => Ok(Head::Partial),
        }
    }
}

fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// httparse must have read the whole head, to its end: bytes it left (or a head it
/// thought unfinished) would otherwise be dropped unparsed.
fn complete_head(status: httparse::Status<usize>, head: &[u8]) -> Result<(), HandshakeError> {
    match status {
        httparse::Status::Complete(n) if n == head.len() => Ok(()),
        _ => Err(HandshakeError::MalformedHttp("incomplete head".into())),
    }
}

fn http_error(e: httparse::Error, limits: HeadLimits) -> HandshakeError {
    match e {
        httparse::Error::TooManyHeaders => HandshakeError::TooManyHeaders {
            limit: limits.max_headers,
        },
        other => HandshakeError::MalformedHttp(other.to_string()),
    }
}

/// Incremental parser for an HTTP upgrade request.
#[derive(Debug)]
pub struct RequestParser {
    head: HeadBuffer,
    limits: HeadLimits,
}

impl RequestParser {
    /// A parser with the given limits.
    pub fn new(limits: HeadLimits) -> Self {
        RequestParser {
            head: HeadBuffer::default(),
            limits,
        }
    }

    /// Feeds the next read. `Complete(request, n)`: the head ended after `n` bytes of
    /// `input`, and `input[n..]` belongs to the WebSocket stream. `Partial`: all of `input`
    /// was taken in.
    pub fn parse(&mut self, input: &[u8]) -> Result<Status<Request>, HandshakeError> {
        let limits = self.limits;
        let (head, used) = match self.head.feed(input, limits.max_size)? {
            Head::Complete(head, used) => (head, used),
            Head::Partial => return Ok(Status::Partial),
        };
        let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
        let mut req = httparse::Request::new(&mut headers);
        complete_head(req.parse(head).map_err(|e| http_error(e, limits))?, head)?;
        let request = Request {
            method: req.method.unwrap_or_default().to_string(),
            path: req.path.unwrap_or_default().to_string(),
            version: req.version.unwrap_or_default(),
            headers: owned_headers(req.headers),
        };
        Ok(Status::Complete(request, used))
    }
}

/// Incremental parser for the server's handshake response.
#[derive(Debug)]
pub struct ResponseParser {
    head: HeadBuffer,
    limits: HeadLimits,
}

impl ResponseParser {
    /// A parser with the given limits.
    pub fn new(limits: HeadLimits) -> Self {
        ResponseParser {
            head: HeadBuffer::default(),
            limits,
        }
    }

    /// Forgets the head parsed last, to parse the next one (a final response after an
    /// interim 1xx).
    pub fn reset(&mut self) {
        self.head.buf.clear();
    }

    /// Like [`RequestParser::parse`], for the response.
    pub fn parse(&mut self, input: &[u8]) -> Result<Status<Response>, HandshakeError> {
        let limits = self.limits;
        let (head, used) = match self.head.feed(input, limits.max_size)? {
            Head::Complete(head, used) => (head, used),
            Head::Partial => return Ok(Status::Partial),
        };
        let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
        let mut resp = httparse::Response::new(&mut headers);
        complete_head(resp.parse(head).map_err(|e| http_error(e, limits))?, head)?;
        Ok(Status::Complete(
            Response {
                status: resp.code.unwrap_or_default(),
                headers: owned_headers(resp.headers),
            },
            used,
        ))
    }
}

/// Checks an upgrade request (RFC 6455 §4.2.1) and returns its `Sec-WebSocket-Accept`.
pub fn validate_request(request: &Request) -> Result<String, HandshakeError> {
    use HandshakeError::BadRequest;
    if request.method != "GET" {
        return Err(BadRequest("WebSocket upgrade requires the GET method"));
    }
    if request.version != 1 {
        return Err(BadRequest("WebSocket upgrade requires HTTP/1.1"));
    }
    match count_header(&request.headers, "host") {
        0 => return Err(BadRequest("missing Host header")),
        1 => {}
        // RFC 7230 §5.4: a server MUST answer 400 to more than one Host.
        _ => return Err(BadRequest("duplicate Host header")),
    }
    if !has_token(&request.headers, "upgrade", "websocket") {
        return Err(BadRequest("missing 'Upgrade: websocket' header"));
    }
    if !has_token(&request.headers, "connection", "upgrade") {
        return Err(BadRequest("'Connection' header does not contain 'upgrade'"));
    }
    match count_header(&request.headers, "sec-websocket-version") {
        0 => return Err(HandshakeError::UnsupportedVersion(String::new())),
        1 => {}
        _ => return Err(BadRequest("duplicate Sec-WebSocket-Version header")),
    }
    let version = request
        .header("sec-websocket-version")
        .unwrap_or_default()
        .trim();
    if version != "13" {
        return Err(HandshakeError::UnsupportedVersion(version.to_string()));
    }
    // A body would be read as the client's first frames (a GET's body has no meaning, RFC
    // 9110 §9.3.1); Python's websockets refuses one too.
    if count_header(&request.headers, "transfer-encoding") > 0 {
        return Err(BadRequest(
            "an upgrade request has no body (Transfer-Encoding)",
        ));
    }
    if request
        .headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("content-length") && v.trim().parse::<u64>() != Ok(0))
    {
        return Err(BadRequest(
            "an upgrade request has no body (Content-Length)",
        ));
    }
    let key = match count_header(&request.headers, "sec-websocket-key") {
        0 => return Err(BadRequest("missing Sec-WebSocket-Key header")),
        1 => request
            .header("sec-websocket-key")
            .unwrap_or_default()
            .trim(),
        _ => return Err(BadRequest("duplicate Sec-WebSocket-Key header")),
    };
    match BASE64.decode(key) {
        Ok(raw) if raw.len() == 16 => Ok(accept_key(key)),
        _ => Err(BadRequest("Sec-WebSocket-Key is not 16 bytes of base64")),
    }
}

/// The first protocol the client offers that the server accepts (case-sensitive, as the seed).
pub fn select_protocol(request: &Request, accept_protocols: &[String]) -> Option<String> {
    request
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-protocol"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .find(|offered| accept_protocols.iter().any(|a| a == offered))
        .map(str::to_string)
}

/// Rejects header names that are not HTTP tokens and values with CR, LF, NUL or other
/// control characters, so `additional_headers` cannot inject lines.
pub fn validate_header(name: &str, value: &str) -> Result<(), UsageError> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let value_ok = |b: u8| b == b'\t' || (b >= 0x20 && b != 0x7f);
    if name.is_empty() || !name.bytes().all(token) || !value.bytes().all(value_ok) {
        return Err(UsageError::InvalidHeader(format!("{name}: {value}")));
    }
    Ok(())
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The 101 response, with the agreed extensions (a `Sec-WebSocket-Extensions` value) if
/// any. `additional_headers` must have passed [`validate_header`].
pub fn server_response(
    accept: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
    additional_headers: &[(String, String)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    push_header(&mut out, "Sec-WebSocket-Accept", accept);
    if let Some(p) = protocol {
        push_header(&mut out, "Sec-WebSocket-Protocol", p);
    }
    if let Some(e) = extensions {
        push_header(&mut out, "Sec-WebSocket-Extensions", e);
    }
    for (name, value) in additional_headers {
        push_header(&mut out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        401 => "Unauthorized",
        429 => "Too Many Requests",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => match status / 100 {
            1 => "Continue",
            2 => "OK",
            3 => "Redirect",
            _ => "Error",
        },
    }
}

/// A complete HTTP response that closes the connection: plain text unless
/// `extra_headers` names its own `Content-Type`. With an `Upgrade` header among them (a
/// 426), `Connection` lists `upgrade` too, as a sender of `Upgrade` must (RFC 9110 §7.8).
/// The framing is this function's: `Content-Length`, `Transfer-Encoding` and `Connection`
/// among `extra_headers` are left out (two differing lengths are a framing error the
/// client cannot recover from, RFC 9112 §6.3).
pub fn http_response(status: u16, extra_headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let has = |header: &str| {
        extra_headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case(header))
    };
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\n{}Content-Length: {}\r\nConnection: {}\r\n",
        reason_phrase(status),
        if has("content-type") {
            ""
        } else {
            "Content-Type: text/plain; charset=utf-8\r\n"
        },
        body.len() + 1,
        if has("upgrade") {
            "Upgrade, close"
        } else {
            "close"
        }
    )
    .into_bytes();
    for (name, value) in extra_headers {
        let framing = ["content-length", "transfer-encoding", "connection"]
            .iter()
            .any(|own| name.eq_ignore_ascii_case(own));
        if !framing {
            push_header(&mut out, name, value);
        }
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    out.push(b'\n');
    out
}

/// The HTTP response a server sends for a failed handshake: 400 with the reason,
/// 426 with `Upgrade: websocket` (RFC 9110 §15.5.22: a 426 must name the protocol) and
/// `Sec-WebSocket-Version: 13` (RFC 6455 §4.4), or 431.
pub fn error_response(error: &HandshakeError) -> Vec<u8> {
    let status = error.status();
    let extra: &[(&str, &str)] = if status == 426 {
        &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")]
    } else {
        &[]
    };
    http_response(status, extra, &error.to_string())
}

#[cfg(test)]
mod tests {

    /// A refusal whose headers name their own framing (`Content-Length`, `Connection`,
    /// `Transfer-Encoding`) goes out with the library's only: two differing lengths are a
    /// framing error for the client (RFC 9112 §6.3); it had two of each.
    #[test]
    fn a_response_keeps_its_own_framing_headers_only() {
        let text = String::from_utf8(http_response(
            401,
            &[
                ("Content-Length", "2"),
                ("connection", "keep-alive"),
                ("Transfer-Encoding", "chunked"),
                ("WWW-Authenticate", "Basic"),
            ],
            "no",
        ))
        .unwrap();
        let count = |name: &str| {
            text.lines()
                .filter(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
                .count()
        };
        assert_eq!(count("content-length"), 1, "{text:?}");
        assert_eq!(count("connection"), 1, "{text:?}");
        assert_eq!(count("transfer-encoding"), 0, "{text:?}");
        assert!(text.contains("\r\nContent-Length: 3\r\n"), "{text:?}");
        assert!(text.contains("\r\nConnection: close\r\n"), "{text:?}");
        assert!(text.contains("\r\nWWW-Authenticate: Basic\r\n"), "{text:?}");
        assert!(text.ends_with("\r\n\r\nno\n"), "{text:?}");
    }
    use super::*;

    #[test]
    fn http_response_status_line_and_one_content_type() {
        let page = http_response(200, &[("Content-Type", "text/html")], "<p>hi</p>");
        let text = String::from_utf8(page).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert_eq!(text.matches("Content-Type").count(), 1, "{text}");
        assert!(text.contains("Content-Type: text/html\r\n"));
        let plain = String::from_utf8(http_response(299, &[], "x")).unwrap();
        assert!(plain.starts_with("HTTP/1.1 299 OK\r\n"));
        assert!(plain.contains("Content-Type: text/plain; charset=utf-8\r\n"));
    }

    const LIMITS: HeadLimits = HeadLimits {
        max_size: 16 * 1024,
        max_headers: 64,
    };

    fn parse(head: &str) -> Request {
        match RequestParser::new(LIMITS).parse(head.as_bytes()) {
            Ok(Status::Complete(r, n)) => {
                assert_eq!(n, head.len());
                r
            }
            other => panic!("{other:?}"),
        }
    }

    const GOOD: &str = "GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn accept_vectors() {
        // RFC 6455 §1.3, then two vectors the faye drivers test with.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(
            accept_key("JFBCWHksyIpXV+6Wlq/9pw=="),
            "JdiiuafpBKRqD7eol0y4vJDTsTs="
        );
        assert_eq!(
            accept_key("2vBVWg4Qyk3ZoM/5d3QD9Q=="),
            "QV3I5XUXU2CdhtjixE7QCkCcMZM="
        );
    }

    /// A limit of `usize::MAX` is "no limit": a head in two reads completes (the room
    /// left for it does not overflow).
    #[test]
    fn an_unlimited_head_in_pieces_completes() {
        let mut parser = RequestParser::new(HeadLimits {
            max_size: usize::MAX,
            max_headers: 64,
        });
        let (first, rest) = GOOD.as_bytes().split_at(40);
        assert!(matches!(parser.parse(first), Ok(Status::Partial)));
        match parser.parse(rest) {
            Ok(Status::Complete(request, _)) => assert_eq!(request.path, "/chat"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rfc_request_validates() {
        let req = parse(GOOD);
        assert!(is_websocket(&req));
        assert_eq!(
            validate_request(&req).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(
            select_protocol(&req, &["superchat".into(), "chat".into()]),
            Some("chat".into())
        );
        assert_eq!(
            select_protocol(&req, &["superchat".into()]),
            Some("superchat".into())
        );
        assert_eq!(select_protocol(&req, &["Chat".into()]), None);
    }

    #[test]
    fn malformed_requests_get_clear_statuses() {
        let cases: &[(&str, &str, u16)] = &[
            ("GET /chat HTTP/1.1", "POST /chat HTTP/1.1", 400),
            ("HTTP/1.1\r\nHost", "HTTP/1.0\r\nHost", 400),
            ("Host: server.example.com\r\n", "", 400),
            (
                "Host: server.example.com\r\n",
                "Host: server.example.com\r\nHost: other.example.com\r\n",
                400,
            ),
            ("Upgrade: websocket", "Upgrade: h2c", 400),
            ("Connection: Upgrade", "Connection: keep-alive", 400),
            ("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8", 426),
            ("Sec-WebSocket-Version: 13\r\n", "", 426),
            ("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ", 400),
            ("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZQ==", 400),
            ("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZR==", 400),
            ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "", 400),
            (
                "Upgrade: websocket",
                "Upgrade: websocket\r\nSec-WebSocket-Key: JFBCWHksyIpXV+6Wlq/9pw==",
                400,
            ),
        ];
        for (from, to, status) in cases {
            let head = GOOD.replacen(from, to, 1);
            let req = parse(&head);
            let err = validate_request(&req).expect_err(&head);
            assert_eq!(err.status(), *status, "{head}: {err}");
        }
        let resp = String::from_utf8(error_response(&HandshakeError::UnsupportedVersion(
            "8".into(),
        )))
        .unwrap();
        assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(resp.contains("\r\nUpgrade: websocket\r\n"), "{resp}");
    }

    /// A 426 names the protocol in `Upgrade` (RFC 9110 §15.5.22), and a sender of
    /// `Upgrade` MUST also send the `upgrade` connection option in `Connection` (RFC 9110
    /// §7.8; RFC 7230 §6.7), so that intermediaries do not forward the hop-by-hop field.
    #[test]
    fn a_426_lists_upgrade_as_a_connection_option() {
        let resp = String::from_utf8(error_response(&HandshakeError::UnsupportedVersion(
            "8".into(),
        )))
        .unwrap();
        assert!(resp.contains("\r\nUpgrade: websocket\r\n"), "{resp}");
        let connection = resp
            .lines()
            .find_map(|l| l.strip_prefix("Connection: "))
            .expect("a Connection header");
        assert!(
            connection
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade")),
            "Connection: {connection}\n{resp}"
        );
    }

    #[test]
    fn connection_token_lists_and_case() {
        let head = GOOD
            .replace("Connection: Upgrade", "connection: keep-alive, UPGRADE")
            .replace("Upgrade: websocket", "upgrade: WebSocket");
        assert!(validate_request(&parse(&head)).is_ok());
    }

    #[test]
    fn head_limits_at_limit_and_over() {
        for (extra, ok) in [(0usize, true), (1, false), (2, false)] {
            let len = GOOD.len() + extra;
            let limits = HeadLimits {
                max_size: GOOD.len(),
                max_headers: 64,
            };
            let padded = GOOD.replacen(
                "/chat",
                &format!("/chat{}", "x".repeat(len - GOOD.len())),
                1,
            );
            let result = RequestParser::new(limits).parse(padded.as_bytes());
            assert_eq!(result.is_ok(), ok, "extra {extra}");
            if !ok {
                assert_eq!(result.unwrap_err().status(), 431);
            }
        }
        // Six header lines: at a limit of 6 fine, at 5 or 4 rejected with 431.
        for (max_headers, ok) in [(6usize, true), (5, false), (4, false)] {
            let limits = HeadLimits {
                max_size: 1 << 16,
                max_headers,
            };
            let result = RequestParser::new(limits).parse(GOOD.as_bytes());
            assert_eq!(result.is_ok(), ok, "max_headers {max_headers}");
            if !ok {
                assert_eq!(result.unwrap_err().status(), 431);
            }
        }
    }

    /// Parses `input` in two reads, cut at `cut`: the request and how many bytes of
    /// `input` its head took.
    fn parse_in_two(input: &[u8], cut: usize) -> (Request, usize) {
        let mut p = RequestParser::new(LIMITS);
        let (a, b) = input.split_at(cut);
        match p.parse(a).unwrap() {
            Status::Complete(r, n) => (r, n),
            Status::Partial => match p.parse(b).unwrap() {
                Status::Complete(r, n) => (r, cut + n),
                Status::Partial => panic!("still partial, cut at {cut}"),
            },
        }
    }

    #[test]
    fn split_head_hands_over_the_rest() {
        let mut input = GOOD.as_bytes().to_vec();
        input.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        for cut in 0..input.len() {
            let (req, used) = parse_in_two(&input, cut);
            assert_eq!(used, GOOD.len(), "cut {cut}");
            assert_eq!(req.path, "/chat");
        }
    }

    /// Lines may end in a bare LF (httparse reads them so): a head ends at its first
    /// empty line however its lines end, split anywhere, and every header in it is
    /// parsed. (A head that ended `\r\n\n` used to be taken to the next `\r\n\r\n`,
    /// the headers between dropped unparsed; one of bare LFs never ended.)
    #[test]
    fn heads_with_bare_lf_line_ends_end_at_their_empty_line() {
        let bare = GOOD.replace("\r\n", "\n");
        let mixed = GOOD.replace("Version: 13\r\n\r\n", "Version: 13\r\n\n");
        for head in [bare, mixed] {
            let mut input = head.clone().into_bytes();
            input.extend_from_slice(b"X-After: 1\r\n\r\n");
            for cut in 0..input.len() {
                let (req, used) = parse_in_two(&input, cut);
                assert_eq!(used, head.len(), "{head:?} cut {cut}");
                assert!(validate_request(&req).is_ok());
                assert_eq!(req.header("sec-websocket-version"), Some("13"));
                assert_eq!(req.header("x-after"), None);
            }
        }
        // A response the same way.
        let response = "HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\n\nrest";
        match ResponseParser::new(LIMITS).parse(response.as_bytes()) {
            Ok(Status::Complete(r, used)) => {
                assert_eq!((r.status, used), (101, response.len() - 4));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn additional_headers_cannot_inject() {
        assert!(validate_header("X-Api-Key", "abc def").is_ok());
        assert!(validate_header("X-Api-Key", "a\r\nSet-Cookie: x").is_err());
        assert!(validate_header("X-Api-Key", "a\nb").is_err());
        assert!(validate_header("X-Api-Key", "a\0b").is_err());
        assert!(validate_header("X Api", "a").is_err());
        assert!(validate_header("X:Api", "a").is_err());
        assert!(validate_header("", "a").is_err());
    }
}
