//! HTTP proxies, sans-IO: the `CONNECT` request that asks a proxy for a tunnel to the
//! WebSocket server, and the incremental parse of the proxy's answer.
//!
//! Call order, for a runtime:
//!
//! 1. [`Proxy::parse`] the proxy's URL (`http://[user:password@]host[:port]`) and connect
//!    a transport to [`Proxy::host`] and [`Proxy::port`] (resolving the name is the
//!    runtime's business).
//! 2. Write [`Proxy::connect_request`] for the WebSocket URL.
//! 3. Read, and call [`parse_response`] on everything read so far until it stops
//!    answering [`Status::Partial`] (which consumes nothing: keep the bytes, append the
//!    next read, call again). [`Status::Complete`] means the tunnel is open; an error
//!    means it is not ([`HandshakeError::ProxyRefused`] for a refusal such as a 407).
//! 4. Run the WebSocket handshake (and TLS for `wss://`) through the tunnel.
//!
//! Nothing may arrive past the proxy's head before the client speaks through the tunnel
//! (a WebSocket or TLS server waits for the client), so a runtime may read in chunks.
//!
//! ```
//! use websocket_driver::protocol::frame::Status;
//! use websocket_driver::protocol::handshake::ClientUrl;
//! use websocket_driver::session::proxy::{Proxy, parse_response};
//!
//! let proxy = Proxy::parse("http://alice:secret@proxy.example:3128").unwrap();
//! assert_eq!((proxy.host.as_str(), proxy.port), ("proxy.example", 3128));
//! let target = ClientUrl::parse("ws://chat.example/room").unwrap();
//! let request = proxy.connect_request(&target);
//! assert!(request.starts_with(b"CONNECT chat.example:80 HTTP/1.1\r\nHost: chat.example:80\r\n"));
//!
//! assert_eq!(parse_response(b"HTTP/1.1 200 Connection est").unwrap(), Status::Partial);
//! let head = b"HTTP/1.1 200 Connection established\r\n\r\n";
//! assert_eq!(parse_response(head).unwrap(), Status::Complete(200, head.len()));
//! ```

use std::fmt;

use crate::protocol::driver::cut_at_char_boundary;
use crate::protocol::error::{HandshakeError, UsageError};
use crate::protocol::frame::Status;
use crate::protocol::handshake::ClientUrl;

/// The largest proxy response head accepted, in bytes.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// The most header lines accepted in a proxy response.
const MAX_HEADERS: usize = 64;

/// An HTTP proxy that opens `CONNECT` tunnels.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Host name or address (IPv6 without brackets), to connect to.
    pub host: String,
    /// Port (80 when the URL names none).
    pub port: u16,
    /// The `Proxy-Authorization` value (`Basic …`) from the URL's `user:password`.
    authorization: Option<String>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Credentials stay out of logs.
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Proxy {
    /// Parses `http://[user:password@]host[:port][/]`. Credentials go out as
    /// `Proxy-Authorization: Basic`, percent-decoded (see [`basic_credentials`]); a
    /// password may also hold a raw `/`, `?` or `#` (a proxy URL has no path, so the
    /// credentials end at the last `@`). IPv6 hosts are bracketed: `http://[::1]:3128`.
    ///
    /// [`basic_credentials`]: crate::protocol::handshake::basic_credentials
    pub fn parse(url: &str) -> Result<Proxy, UsageError> {
        let bad = || UsageError::InvalidUrl(url.to_string());
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(bad());
        }
        // A raw `/` in a password used to end the authority there: the user name became
        // the proxy's host.
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let hostport = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            match hostport.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(bad());
        }
        let port = match port {
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => p.parse().map_err(|_| bad())?,
            Some(_) => return Err(bad()),
            None => 80,
        };
        let authorization = userinfo.map(crate::protocol::handshake::basic_credentials);
        Ok(Proxy {
            host: host.to_string(),
            port,
            authorization,
        })
    }

    /// Whether the URL carried credentials.
    pub fn has_credentials(&self) -> bool {
        self.authorization.is_some()
    }

    /// The `CONNECT` request head for a tunnel to `target`'s host and port.
    pub fn connect_request(&self, target: &ClientUrl) -> Vec<u8> {
        let authority = if target.host.contains(':') {
            format!("[{}]:{}", target.host, target.port)
        } else {
            format!("{}:{}", target.host, target.port)
        };
        let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(auth) = &self.authorization {
            request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        request.push_str("\r\n");
        request.into_bytes()
    }
}

/// Parses the proxy's response head from the start of `input` (everything read so far).
///
/// - `Ok(Status::Partial)`: incomplete; nothing consumed. Read more, append, call again.
/// - `Ok(Status::Complete(status, used))`: a 2xx; the tunnel is open and `input[used..]`
///   already belongs to it. Interim 1xx responses before it (`100 Continue`) are skipped
///   and counted in `used`; a `101` is a refusal (a tunnel is not an upgrade).
/// - `Err(HandshakeError::ProxyRefused { status, authenticate })`: any other status (407
///   when the credentials are missing or wrong), with the proxy's `Proxy-Authenticate`
///   challenges (at most [`MAX_AUTHENTICATE`] bytes of them, cut at a character).
/// - `Err(MalformedHttp | TooManyHeaders | HeadTooLarge)`: not an HTTP response, or a head
///   over [`MAX_RESPONSE_HEAD`] bytes.
pub fn parse_response(input: &[u8]) -> Result<Status<u16>, HandshakeError> {
    let limited = &input[..input.len().min(MAX_RESPONSE_HEAD)];
    // Interim 1xx heads (`100 Continue`, `103 Early Hints`) come before the final one and
    // are skipped (RFC 9110 §15.2); they count against the same head limit.
    let mut at = 0;
    loop {
        match parse_one(&limited[at..], input.len())? {
            Head::Interim(used) => at += used,
            Head::Final(status, used) => return Ok(Status::Complete(status, at + used)),
            Head::Partial => return Ok(Status::Partial),
        }
    }
}

enum Head {
    Partial,
    /// An interim response of this many bytes.
    Interim(usize),
    /// A 2xx of this many bytes.
    Final(u16, usize),
}

/// One response head from the start of `limited`; `read` is how much was read in all.
fn parse_one(limited: &[u8], read: usize) -> Result<Head, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(limited) {
        Ok(httparse::Status::Complete(used)) => {
            let status = response.code.unwrap_or_default();
            if (200..300).contains(&status) {
                Ok(Head::Final(status, used))
            } else if (100..200).contains(&status) && status != 101 {
                Ok(Head::Interim(used))
            } else {
                Err(HandshakeError::ProxyRefused {
                    status,
                    authenticate: challenges(response.headers),
                })
            }
        }
        Ok(httparse::Status::Partial) if read >= MAX_RESPONSE_HEAD => {
            Err(HandshakeError::HeadTooLarge {
                limit: MAX_RESPONSE_HEAD,
            })
        }
        Ok(httparse::Status::Partial) => Ok(Head::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            Err(HandshakeError::TooManyHeaders { limit: MAX_HEADERS })
        }
        Err(e) => Err(HandshakeError::MalformedHttp(format!(
            "proxy response: {e}"
        ))),
    }
}

/// The most bytes of `Proxy-Authenticate` a refusal keeps: challenges are a scheme and a
/// few parameters, and the error must stay small whatever the proxy sends.
pub const MAX_AUTHENTICATE: usize = 1024;

/// A refusal's `Proxy-Authenticate` values, joined by ", " (RFC 9110 allows either form
/// of a list), lossily decoded and cut to [`MAX_AUTHENTICATE`] bytes.
fn challenges(headers: &[httparse::Header<'_>]) -> String {
    let mut joined = String::new();
    for header in headers {
        if !header.name.eq_ignore_ascii_case("proxy-authenticate") {
            continue;
        }
        if !joined.is_empty() {
            joined.push_str(", ");
        }
        joined.push_str(String::from_utf8_lossy(header.value).trim());
    }
    let kept = cut_at_char_boundary(&joined, MAX_AUTHENTICATE).len();
    joined.truncate(kept);
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> ClientUrl {
        ClientUrl::parse(url).unwrap()
    }

    #[test]
    fn parses_proxy_urls() {
        let p = Proxy::parse("http://proxy.local:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.local", 3128));
        assert!(!p.has_credentials());
        let p = Proxy::parse("HTTP://u:p@10.0.0.1:8080/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("10.0.0.1", 8080));
        assert!(p.has_credentials());
        let p = Proxy::parse("http://[::1]:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("::1", 3128));
        let p = Proxy::parse("http://[::1]").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("::1", 80));
        assert_eq!(Proxy::parse("http://proxy").unwrap().port, 80);
        // A password may contain '@': the last one ends the userinfo.
        let p = Proxy::parse("http://u:p@ss@host:1").unwrap();
        assert_eq!(p.host, "host");
        for bad in [
            "proxy:3128",
            "https://proxy:3128",
            "socks5://proxy:1080",
            "http://",
            "http://:3128",
            "http://host:port",
            "http://host:70000",
            "http://[::1",
            "http://[::1]x",
            "http://host:+81",
        ] {
            assert!(
                matches!(Proxy::parse(bad), Err(UsageError::InvalidUrl(_))),
                "{bad}"
            );
        }
    }

    /// Credentials go out percent-decoded, with the `:` a user without a password needs
    /// (RFC 7617), and a raw `/` in a password stays in it: it used to end the authority,
    /// making the user name the proxy's host.
    #[test]
    fn credentials_are_decoded_and_may_hold_a_raw_slash() {
        let authorization = |url: &str| {
            let proxy = Proxy::parse(url).unwrap();
            let request = String::from_utf8(proxy.connect_request(&target("ws://t/"))).unwrap();
            assert_eq!(proxy.host, "proxy.example", "{url}");
            request
                .lines()
                .find_map(|l| l.strip_prefix("Proxy-Authorization: Basic "))
                .map(|b| {
                    use base64::Engine;
                    let raw = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
                    String::from_utf8(raw).unwrap()
                })
        };
        let cases = [
            ("http://alice:12/34@proxy.example:3128", "alice:12/34"),
            ("http://alice:p%2Fss@proxy.example:3128", "alice:p/ss"),
            ("http://al%40ice:p%3As%25@proxy.example", "al@ice:p:s%"),
            ("http://alice@proxy.example/", "alice:"),
            ("http://alice:100%@proxy.example", "alice:100%"),
        ];
        for (url, pair) in cases {
            assert_eq!(authorization(url).as_deref(), Some(pair), "{url}");
        }
        assert_eq!(authorization("http://proxy.example:3128/"), None);
    }

    #[test]
    fn debug_hides_credentials() {
        let p = Proxy::parse("http://alice:secret@proxy:1").unwrap();
        let shown = format!("{p:?}");
        assert!(!shown.contains("secret") && !shown.contains("YWxpY2U6c2VjcmV0"));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn builds_the_connect_request() {
        let p = Proxy::parse("http://proxy:3128").unwrap();
        assert_eq!(
            p.connect_request(&target("ws://example.com/chat?x=1")),
            b"CONNECT example.com:80 HTTP/1.1\r\nHost: example.com:80\r\n\r\n"
        );
        assert_eq!(
            p.connect_request(&target("wss://[::1]:9443/")),
            b"CONNECT [::1]:9443 HTTP/1.1\r\nHost: [::1]:9443\r\n\r\n"
        );
        // Basic credentials from the proxy URL, never from the WebSocket URL.
        let p = Proxy::parse("http://alice:secret@proxy:3128").unwrap();
        let request = p.connect_request(&target("ws://bob:pw@example.com:8080/"));
        assert_eq!(
            request,
            b"CONNECT example.com:8080 HTTP/1.1\r\nHost: example.com:8080\r\n\
              Proxy-Authorization: Basic YWxpY2U6c2VjcmV0\r\n\r\n"
        );
    }

    #[test]
    fn accepts_2xx_and_reports_what_follows() {
        let head = b"HTTP/1.1 200 Connection established\r\nVia: proxy\r\n\r\n";
        let mut input = head.to_vec();
        input.extend_from_slice(b"tunnel bytes");
        assert_eq!(
            parse_response(&input).unwrap(),
            Status::Complete(200, head.len())
        );
        assert_eq!(
            parse_response(b"HTTP/1.0 204 No Content\r\n\r\n").unwrap(),
            Status::Complete(204, 27)
        );
    }

    #[test]
    fn interim_heads_are_skipped_and_counted_and_a_101_is_refused() {
        let interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n";
        let head = b"HTTP/1.1 200 Connection established\r\n\r\n";
        let mut input = interim.to_vec();
        input.extend_from_slice(head);
        let used = interim.len() + head.len();
        input.extend_from_slice(b"tunnel bytes");
        assert_eq!(parse_response(&input).unwrap(), Status::Complete(200, used));
        // Cut anywhere before the final head ends: partial, nothing consumed.
        for cut in 0..used {
            assert_eq!(
                parse_response(&input[..cut]).unwrap(),
                Status::Partial,
                "{cut}"
            );
        }
        assert!(matches!(
            parse_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 407 Auth\r\n\r\n"),
            Err(HandshakeError::ProxyRefused { status: 407, .. })
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            Err(HandshakeError::ProxyRefused { status: 101, .. })
        ));
    }

    #[test]
    fn partial_heads_consume_nothing_whatever_the_split() {
        let head = b"HTTP/1.1 200 OK\r\nProxy-Agent: test\r\n\r\n";
        for cut in 0..head.len() {
            assert_eq!(
                parse_response(&head[..cut]).unwrap(),
                Status::Partial,
                "{cut}"
            );
        }
        assert_eq!(
            parse_response(head).unwrap(),
            Status::Complete(200, head.len())
        );
    }

    fn refused(status: u16, authenticate: &str) -> Result<Status<u16>, HandshakeError> {
        Err(HandshakeError::ProxyRefused {
            status,
            authenticate: authenticate.to_owned(),
        })
    }

    #[test]
    fn refusals_carry_the_status_and_the_challenges() {
        let head = b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                     Proxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_response(head), refused(407, "Basic realm=\"x\""));
        // Several headers, in order, any case; other headers are not challenges.
        let head = b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                     proxy-authenticate: Negotiate\r\nWWW-Authenticate: Bearer\r\n\
                     PROXY-AUTHENTICATE:  Basic realm=\"corp\" \r\n\r\n";
        assert_eq!(
            parse_response(head),
            refused(407, "Negotiate, Basic realm=\"corp\"")
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 502 Bad Gateway\r\n\r\n"),
            refused(502, "")
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            refused(101, "")
        );
        // The message names the challenges only when there are some.
        let message = |status, authenticate| refused(status, authenticate).unwrap_err().to_string();
        assert_eq!(
            message(502, ""),
            "the proxy refused the tunnel with status 502"
        );
        assert_eq!(
            message(407, "Basic realm=\"x\""),
            "the proxy refused the tunnel with status 407 (Proxy-Authenticate: Basic realm=\"x\")"
        );
    }

    #[test]
    fn challenges_are_cut_at_the_limit_on_a_character() {
        let head = |value: &str| {
            format!("HTTP/1.1 407 No\r\nProxy-Authenticate: {value}\r\n\r\n").into_bytes()
        };
        let at_limit = "a".repeat(MAX_AUTHENTICATE);
        assert_eq!(parse_response(&head(&at_limit)), refused(407, &at_limit));
        let over = "a".repeat(MAX_AUTHENTICATE + 1);
        assert_eq!(parse_response(&head(&over)), refused(407, &at_limit));
        // A two-byte character across the limit goes whole.
        let straddling = format!("{}é", "a".repeat(MAX_AUTHENTICATE - 1));
        let kept = "a".repeat(MAX_AUTHENTICATE - 1);
        assert_eq!(parse_response(&head(&straddling)), refused(407, &kept));
    }

    #[test]
    fn rejects_garbage_and_oversized_heads() {
        assert!(matches!(
            parse_response(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(HandshakeError::MalformedHttp(_))
        ));
        let mut huge = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        huge.resize(MAX_RESPONSE_HEAD + 10, b'a');
        assert_eq!(
            parse_response(&huge),
            Err(HandshakeError::HeadTooLarge {
                limit: MAX_RESPONSE_HEAD
            })
        );
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_response(&many),
            Err(HandshakeError::TooManyHeaders { limit: MAX_HEADERS })
        );
    }

    /// Heads (an interim one counted in) of exactly `MAX_RESPONSE_HEAD` bytes and
    /// `MAX_HEADERS` lines are taken; a byte more is refused, in one read or as it grows.
    #[test]
    fn head_limits_at_the_limit_and_one_over() {
        let padded = |interim: &str, len: usize| {
            let start = format!("{interim}HTTP/1.1 200 OK\r\nX: ");
            let mut head = start.into_bytes();
            head.resize(len - 4, b'a');
            head.extend_from_slice(b"\r\n\r\n");
            head
        };
        let too_large = Err(HandshakeError::HeadTooLarge {
            limit: MAX_RESPONSE_HEAD,
        });
        for interim in ["", "HTTP/1.1 100 Continue\r\n\r\n"] {
            let at_limit = padded(interim, MAX_RESPONSE_HEAD);
            assert_eq!(
                parse_response(&at_limit),
                Ok(Status::Complete(200, MAX_RESPONSE_HEAD))
            );
            let over = padded(interim, MAX_RESPONSE_HEAD + 1);
            assert_eq!(parse_response(&over), too_large);
            assert_eq!(parse_response(&over[..MAX_RESPONSE_HEAD]), too_large);
            assert_eq!(
                parse_response(&over[..MAX_RESPONSE_HEAD - 1]),
                Ok(Status::Partial)
            );
        }
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_response(&many), Ok(Status::Complete(200, many.len())));
    }
}
