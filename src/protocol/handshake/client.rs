//! The client's side of the opening handshake: the `ws://` URL, the upgrade request and
//! the check of the server's response.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::{Response, count_header, has_token, push_header};
use crate::protocol::deflate::{DeflateOptions, DeflateParams, accept_response};
use crate::protocol::error::{HandshakeError, UsageError};
use crate::protocol::mask::random_bytes;

/// A `ws://` or `wss://` URL, split for the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientUrl {
    /// `wss://`.
    pub secure: bool,
    /// Host name or address (IPv6 without brackets), for connecting and TLS.
    pub host: String,
    /// Port, defaulting to 80 (ws) or 443 (wss).
    pub port: u16,
    /// The `Host` header: host, and the port when not the default. Never userinfo.
    pub host_header: String,
    /// Path and query, `/` at least. The fragment is dropped.
    pub resource: String,
    /// `user:password` from the URL as written, sent as Basic authorization (see
    /// [`basic_credentials`]).
    pub userinfo: Option<String>,
}

impl ClientUrl {
    /// Parses a WebSocket URL.
    pub fn parse(url: &str) -> Result<ClientUrl, UsageError> {
        let bad = || UsageError::InvalidUrl(url.to_string());
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        let secure = match scheme.to_ascii_lowercase().as_str() {
            "ws" => false,
            "wss" => true,
            _ => return Err(bad()),
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, resource) = rest.split_at(split);
        let resource = match resource {
            "" => "/".to_string(),
            r if r.starts_with('?') => format!("/{r}"),
            r => r.to_string(),
        };
        // The request line is ASCII: other characters go percent-encoded as UTF-8, as a
        // browser sends them (`/café` → `/caf%C3%A9`).
        let resource = if resource.is_ascii() {
            resource
        } else {
            resource.bytes().fold(String::new(), |mut out, b| {
                if b.is_ascii() {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
                out
            })
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_string()), h),
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            // Brackets hold an IPv6 address (RFC 3986 §3.2.2), nothing else.
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad());
            }
            match after {
                "" => (h, None),
                _ => (h, Some(after.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            let (h, p) = match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            };
            // A name or an IPv4 address has no `:` or brackets: `ws://host:80:81/` and
            // `ws://::1/` are not a host and a port.
            if h.contains([':', '[', ']']) {
                return Err(bad());
            }
            (h, p)
        };
        let default_port = if secure { 443 } else { 80 };
        let port = match port {
            None | Some("") => default_port,
            // Digits only (RFC 3986 §3.2.3): `u16::from_str` also takes a leading `+`.
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u16>().map_err(|_| bad())?
            }
            Some(_) => return Err(bad()),
        };
        // An internationalized name must come in its ASCII (`xn--`) form: the `Host`
        // header and the resolver take nothing else.
        if host.is_empty()
            || host
                .bytes()
                .any(|b| b <= b' ' || b == b'/' || b == b'@' || !b.is_ascii())
        {
            return Err(bad());
        }
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let host_header = if port == default_port {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        if resource.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad());
        }
        Ok(ClientUrl {
            secure,
            host: host.to_string(),
            port,
            host_header,
            resource,
            userinfo,
        })
    }
}

/// The `Basic` credentials (RFC 7617) for a URL's `user[:password]`: percent-decoded
/// first (RFC 3986: a `/`, `:` or `@` in a password is written `%2F`, `%3A`, `%40`; a `%`
/// not followed by two hex digits stays as it is), with the `:` a user name without a
/// password still needs.
pub fn basic_credentials(userinfo: &str) -> String {
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let mut pair = percent_decode(user);
    pair.push(b':');
    pair.extend(percent_decode(password));
    format!("Basic {}", BASE64.encode(pair))
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'%', Some(hi), Some(lo)) if hex(hi).is_some() && hex(lo).is_some() => {
                out.push((hex(hi).unwrap_or(0) * 16 + hex(lo).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// A fresh `Sec-WebSocket-Key`: 16 bytes from the OS CSPRNG, base64.
pub fn generate_key() -> String {
    let mut raw = [0u8; 16];
    random_bytes(&mut raw);
    BASE64.encode(raw)
}

/// The client's upgrade request, offering `extensions` (a `Sec-WebSocket-Extensions`
/// value) if given.
pub fn client_request(
    url: &ClientUrl,
    key: &str,
    protocols: &[String],
    extensions: Option<&str>,
    additional_headers: &[(String, String)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(url.resource.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    push_header(&mut out, "Host", &url.host_header);
    out.extend_from_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\n");
    push_header(&mut out, "Sec-WebSocket-Key", key);
    out.extend_from_slice(b"Sec-WebSocket-Version: 13\r\n");
    if !protocols.is_empty() {
        push_header(&mut out, "Sec-WebSocket-Protocol", &protocols.join(", "));
    }
    if let Some(e) = extensions {
        push_header(&mut out, "Sec-WebSocket-Extensions", e);
    }
    if let Some(userinfo) = &url.userinfo {
        push_header(&mut out, "Authorization", &basic_credentials(userinfo));
    }
    for (name, value) in additional_headers {
        push_header(&mut out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// What the server's response agreed to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Agreed {
    /// The selected subprotocol.
    pub protocol: Option<String>,
    /// The accepted permessage-deflate parameters.
    pub deflate: Option<DeflateParams>,
}

/// Checks the server's response (RFC 6455 §4.2.2 from the client's side, RFC 7692 for a
/// permessage-deflate offer, `deflate`) and returns what it agreed to.
pub fn validate_response(
    response: &Response,
    expected_accept: &str,
    offered: &[String],
    deflate: Option<&DeflateOptions>,
) -> Result<Agreed, HandshakeError> {
    use HandshakeError::BadResponse;
    if response.status != 101 {
        return Err(HandshakeError::UnexpectedStatus {
            status: response.status,
            body: String::new(),
        });
    }
    if !has_token(&response.headers, "upgrade", "websocket") {
        return Err(BadResponse(
            "'Upgrade' header is missing or not 'websocket'",
        ));
    }
    if !has_token(&response.headers, "connection", "upgrade") {
        return Err(BadResponse(
            "'Connection' header is missing or not 'Upgrade'",
        ));
    }
    // One line, and the right one: a second (even a repeat) is not the key's answer.
    if count_header(&response.headers, "sec-websocket-accept") != 1
        || response.header("sec-websocket-accept").map(str::trim) != Some(expected_accept)
    {
        return Err(HandshakeError::AcceptMismatch);
    }
    let extensions: Vec<&str> = response
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|(_, v)| v.as_str())
        .collect();
    let deflate = accept_response(&extensions, deflate)?;
    if count_header(&response.headers, "sec-websocket-protocol") > 1 {
        return Err(BadResponse("server selected more than one subprotocol"));
    }
    let protocol = match response.header("sec-websocket-protocol").map(str::trim) {
        None => None,
        Some(p) if offered.iter().any(|o| o == p) => Some(p.to_string()),
        Some(_) => {
            return Err(BadResponse(
                "server selected a subprotocol the client did not offer",
            ));
        }
    };
    Ok(Agreed { protocol, deflate })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::handshake::accept_key;

    #[test]
    fn urls() {
        let u = ClientUrl::parse("ws://user:pw@example.com/chat?room=1#frag").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.host_header.as_str()),
            ("example.com", 80, "example.com")
        );
        assert_eq!(u.resource, "/chat?room=1");
        assert_eq!(u.userinfo.as_deref(), Some("user:pw"));
        let u = ClientUrl::parse("wss://[::1]:9001").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.host_header.as_str(),
                u.resource.as_str()
            ),
            ("::1", 9001, "[::1]:9001", "/")
        );
        let u = ClientUrl::parse("WS://h:80?x").unwrap();
        assert_eq!((u.host_header.as_str(), u.resource.as_str()), ("h", "/?x"));
        for bad in [
            "http://x/",
            "ws://",
            "ws://:80/",
            "ws://h:99999/",
            "ws://h/a b",
            "ws://[::1]junk/",
            "ws://[::1]80/",
            "x",
            // Ports are digits only; hosts ASCII (their `xn--` form).
            "ws://h:+81/",
            "ws://h:-1/",
            "ws://h: 81/",
            "ws://caf\u{e9}.example/",
        ] {
            assert!(ClientUrl::parse(bad).is_err(), "{bad}");
        }
        // Other characters of the path and query go percent-encoded, as browsers send them.
        let u = ClientUrl::parse("ws://h/caf\u{e9}?q=\u{1F600}#\u{e9}").unwrap();
        assert_eq!(u.resource, "/caf%C3%A9?q=%F0%9F%98%80");
        assert_eq!(ClientUrl::parse("ws://h:081/").unwrap().port, 81);
        let req = String::from_utf8(client_request(
            &ClientUrl::parse("ws://u:p@h:81/p").unwrap(),
            "k",
            &[],
            None,
            &[],
        ))
        .unwrap();
        assert!(req.starts_with("GET /p HTTP/1.1\r\nHost: h:81\r\n"));
        assert!(req.contains("Authorization: Basic dTpw\r\n"));
        assert!(!req.contains("u:p@"));
        // Credentials are percent-decoded before they are encoded (`us@er:p/`), and a
        // user without a password still gets its `:` (`u:`).
        assert_eq!(basic_credentials("us%40er:p%2F"), "Basic dXNAZXI6cC8=");
        assert_eq!(basic_credentials("u"), "Basic dTo=");
    }

    #[test]
    fn response_checks() {
        let accept = accept_key("dGhlIHNhbXBsZSBub25jZQ==");
        let ok = Response {
            status: 101,
            headers: vec![
                ("Upgrade".into(), "websocket".into()),
                ("Connection".into(), "Upgrade".into()),
                ("Sec-WebSocket-Accept".into(), accept.clone()),
            ],
        };
        assert_eq!(
            validate_response(&ok, &accept, &[], None),
            Ok(Agreed::default())
        );
        assert_eq!(
            validate_response(&ok, "other", &[], None),
            Err(HandshakeError::AcceptMismatch)
        );
        let mut r = ok.clone();
        r.status = 403;
        assert_eq!(
            validate_response(&r, &accept, &[], None),
            Err(HandshakeError::UnexpectedStatus {
                status: 403,
                body: String::new()
            })
        );
        let mut r = ok.clone();
        r.headers
            .push(("Sec-WebSocket-Protocol".into(), "chat".into()));
        assert!(validate_response(&r, &accept, &[], None).is_err());
        assert_eq!(
            validate_response(&r, &accept, &["x".into(), "chat".into()], None)
                .unwrap()
                .protocol,
            Some("chat".into())
        );
        let mut r = ok.clone();
        r.headers.push((
            "Sec-WebSocket-Extensions".into(),
            "permessage-deflate".into(),
        ));
        assert!(validate_response(&r, &accept, &[], None).is_err());
        let offer = DeflateOptions::default();
        assert!(
            validate_response(&r, &accept, &[], Some(&offer)).is_err(),
            "the offer's server_no_context_takeover was not accepted"
        );
        r.headers[3].1 = "permessage-deflate; server_no_context_takeover".into();
        assert!(
            validate_response(&r, &accept, &[], Some(&offer))
                .unwrap()
                .deflate
                .is_some()
        );
        let mut r = ok;
        r.headers.retain(|(n, _)| n != "Connection");
        assert!(validate_response(&r, &accept, &[], None).is_err());
    }
}
