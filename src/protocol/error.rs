//! Errors, grouped by who is at fault, and the one place that maps them to close codes.

use std::fmt;

/// Close codes (RFC 6455 §7.4.1).
pub mod code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The endpoint is going away (server shutdown, page navigation).
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The peer sent a data type this endpoint cannot accept.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Reported (never sent) when a close frame carried no status code.
    pub const NO_STATUS: u16 = 1005;
    /// Reported (never sent) when the connection dropped without a close frame.
    pub const ABNORMAL: u16 = 1006;
    /// A text message was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Generic policy violation.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message exceeded `max_length`.
    pub const TOO_BIG: u16 = 1009;
    /// The client needed an extension the server did not offer.
    pub const EXTENSION_REQUIRED: u16 = 1010;
    /// The server hit an unexpected condition.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The server is restarting (IANA registry; a client may reconnect).
    pub const SERVICE_RESTART: u16 = 1012;
    /// The server is overloaded: try again later (IANA registry).
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// A gateway or proxy got an invalid response upstream (IANA registry).
    pub const BAD_GATEWAY: u16 = 1014;
}

/// Whether `code` may appear in a close frame on the wire, in either direction:
/// 1000–1003, 1007–1014 (RFC 6455's own and the three the IANA registry added: service
/// restart, try again later, bad gateway) and the application ranges 3000–4999. Never
/// 1004, the reserved 1005, 1006 and 1015 (those three are for reporting, not sending),
/// nor an unregistered code under 3000.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The peer broke RFC 6455 after the handshake. Each maps to the close code sent back.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// RSV bits set that no negotiated extension claims (the bits, RSV1 = 4).
    ReservedBits(u8),
    /// An opcode RFC 6455 reserves.
    ReservedOpcode(u8),
    /// A control frame without FIN.
    FragmentedControlFrame,
    /// A control frame with a payload over 125 bytes.
    ControlFrameTooLong,
    /// A 64-bit payload length with the most significant bit set.
    LengthTopBitSet,
    /// A client sent an unmasked frame.
    UnmaskedFrame,
    /// A server sent a masked frame.
    MaskedFrame,
    /// A continuation frame with no message in progress.
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is unfinished.
    UnfinishedMessage,
    /// A text message (or close reason) that is not UTF-8.
    InvalidUtf8,
    /// A message larger than `max_length`.
    MessageTooLarge {
        /// Bytes the message would have had.
        len: u64,
        /// The configured limit.
        max: usize,
    },
    /// A close frame with a one-byte payload.
    CloseFrameTooShort,
    /// A close frame with a code that may not be sent.
    InvalidCloseCode(u16),
    /// A compressed message (RSV1, permessage-deflate) larger on the wire than any
    /// message of `max_length` bytes compresses to (see
    /// [`compressed_limit`](crate::protocol::deflate::compressed_limit)): refused before
    /// its payload is read.
    CompressedTooLarge {
        /// Compressed bytes the message would have had on the wire.
        len: u64,
        /// The most it may have (from `max_length` and its frames).
        wire_max: usize,
        /// The configured `max_length`.
        max: usize,
    },
    /// A compressed message (RSV1, permessage-deflate) whose data does not inflate.
    InvalidCompressedData,
    /// A compressed message that inflates past `max_length` (inflation stops there).
    InflatedTooLarge {
        /// The configured limit.
        max: usize,
    },
}

impl ProtocolError {
    /// The close code sent to the peer for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::InvalidUtf8 | ProtocolError::InvalidCompressedData => {
                code::INVALID_PAYLOAD
            }
            ProtocolError::MessageTooLarge { .. }
            | ProtocolError::CompressedTooLarge { .. }
            | ProtocolError::InflatedTooLarge { .. } => code::TOO_BIG,
            _ => code::PROTOCOL_ERROR,
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::ReservedBits(bits) => write!(f, "reserved bits set: {bits:#05b}"),
            ProtocolError::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            ProtocolError::FragmentedControlFrame => f.write_str("fragmented control frame"),
            ProtocolError::ControlFrameTooLong => {
                f.write_str("control frame payload over 125 bytes")
            }
            ProtocolError::LengthTopBitSet => {
                f.write_str("64-bit payload length with the top bit set")
            }
            ProtocolError::UnmaskedFrame => f.write_str("unmasked frame from a client"),
            ProtocolError::MaskedFrame => f.write_str("masked frame from a server"),
            ProtocolError::UnexpectedContinuation => {
                f.write_str("continuation frame without a message")
            }
            ProtocolError::UnfinishedMessage => {
                f.write_str("new data frame inside a fragmented message")
            }
            ProtocolError::InvalidUtf8 => {
                f.write_str("invalid UTF-8 in a text message or a close reason")
            }
            ProtocolError::MessageTooLarge { len, max } => {
                write!(f, "message of {len} bytes exceeds max_length {max}")
            }
            ProtocolError::CompressedTooLarge { len, wire_max, max } => write!(
                f,
                "compressed message of {len} bytes on the wire exceeds {wire_max}, the most \
                 max_length {max} allows"
            ),
            ProtocolError::CloseFrameTooShort => f.write_str("close frame with a 1-byte payload"),
            ProtocolError::InvalidCloseCode(c) => write!(f, "invalid close code {c}"),
            ProtocolError::InvalidCompressedData => {
                f.write_str("compressed message is not valid deflate data")
            }
            ProtocolError::InflatedTooLarge { max } => {
                write!(f, "compressed message inflates past max_length {max}")
            }
        }
    }
}

/// The opening handshake failed. On the server side each carries the HTTP status to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The request or response is not valid HTTP/1.1.
    MalformedHttp(String),
    /// The request head is larger than the limit (431).
    HeadTooLarge {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// More header lines than the limit (431).
    TooManyHeaders {
        /// The configured limit.
        limit: usize,
    },
    /// A valid HTTP request that is not a WebSocket upgrade, or a bad one (400).
    BadRequest(&'static str),
    /// `Sec-WebSocket-Version` is not 13 (426).
    UnsupportedVersion(String),
    /// The server answered with something other than 101. `body` is the start of the
    /// response's body, at most 1 KiB, lossily decoded. The client waits for it, so it does
    /// not depend on how the reads fell: its `Content-Length`, a chunked body's last chunk,
    /// else the close; none for 1xx, 204, 304 or an unreadable `Content-Length`.
    UnexpectedStatus {
        /// The HTTP status.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The server's response is missing or has a wrong header.
    BadResponse(&'static str),
    /// The server's `Sec-WebSocket-Accept` does not match the key.
    AcceptMismatch,
    /// The connection ended before the handshake completed.
    Incomplete,
    /// The HTTP proxy refused the `CONNECT` tunnel.
    ProxyRefused {
        /// The proxy's HTTP status (407: credentials missing or wrong).
        status: u16,
        /// The proxy's `Proxy-Authenticate` challenges (the schemes and realms it accepts),
        /// joined by ", " when it sent several; empty when it sent none.
        authenticate: String,
    },
}

impl HandshakeError {
    /// The HTTP status a server answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::HeadTooLarge { .. } | HandshakeError::TooManyHeaders { .. } => 431,
            HandshakeError::UnsupportedVersion(_) => 426,
            _ => 400,
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::MalformedHttp(why) => write!(f, "malformed HTTP: {why}"),
            HandshakeError::HeadTooLarge { limit } => {
                write!(f, "handshake head larger than {limit} bytes")
            }
            HandshakeError::TooManyHeaders { limit } => write!(f, "more than {limit} header lines"),
            HandshakeError::BadRequest(why) => f.write_str(why),
            HandshakeError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "unsupported Sec-WebSocket-Version {v:?} (only 13 is supported)"
                )
            }
            HandshakeError::UnexpectedStatus { status, body } if body.trim().is_empty() => {
                write!(f, "unexpected response status {status} (expected 101)")
            }
            HandshakeError::UnexpectedStatus { status, body } => {
                write!(
                    f,
                    "unexpected response status {status} (expected 101): {}",
                    body.trim_end()
                )
            }
            HandshakeError::BadResponse(why) => f.write_str(why),
            HandshakeError::AcceptMismatch => {
                f.write_str("Sec-WebSocket-Accept does not match the key")
            }
            HandshakeError::Incomplete => f.write_str("connection closed during the handshake"),
            HandshakeError::ProxyRefused {
                status,
                authenticate,
            } => {
                write!(f, "the proxy refused the tunnel with status {status}")?;
                if !authenticate.is_empty() {
                    write!(f, " (Proxy-Authenticate: {authenticate})")?;
                }
                Ok(())
            }
        }
    }
}

/// The caller asked for something the connection cannot do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UsageError {
    /// Sending on a connection that is closing or closed.
    NotOpen,
    /// A close code that may not be sent (1005, 1006, 1015, unassigned ranges).
    InvalidCloseCode(u16),
    /// A close reason over 123 bytes.
    CloseReasonTooLong,
    /// A ping or pong payload over 125 bytes.
    ControlPayloadTooLong,
    /// Bytes sent as text that are not UTF-8.
    InvalidUtf8,
    /// A header name or value with CR, LF, NUL or (in a name) other non-token characters.
    InvalidHeader(String),
    /// A URL that is not `ws://` or `wss://`, or has no host.
    InvalidUrl(String),
    /// The outgoing buffer is over its limit and the policy drops new sends.
    BufferFull {
        /// Bytes queued.
        buffered: usize,
        /// The limit.
        limit: usize,
    },
    /// A pub/sub topic longer than the maximum.
    TopicTooLong {
        /// The topic's length in bytes.
        len: usize,
        /// The longest topic allowed.
        max: usize,
    },
    /// A message kind that cannot be published (only text and binary can).
    NotPublishable,
    /// A client connection cannot subscribe to topics: a published frame is a server's
    /// (unmasked), which a client may not send.
    ClientCannotSubscribe,
    /// An option out of its range (the message says which).
    InvalidOption(String),
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageError::NotOpen => f.write_str("the connection is closing or closed"),
            UsageError::InvalidCloseCode(c) => write!(f, "close code {c} may not be sent"),
            UsageError::CloseReasonTooLong => f.write_str("close reason longer than 123 bytes"),
            UsageError::ControlPayloadTooLong => {
                f.write_str("ping/pong payload longer than 125 bytes")
            }
            UsageError::InvalidUtf8 => f.write_str("text payload is not UTF-8"),
            UsageError::InvalidHeader(h) => write!(f, "invalid header {h:?}"),
            UsageError::InvalidUrl(u) => write!(f, "invalid WebSocket URL {u:?}"),
            UsageError::TopicTooLong { len, max } => {
                write!(
                    f,
                    "topic of {len} bytes is longer than the maximum of {max}"
                )
            }
            UsageError::InvalidOption(why) => write!(f, "invalid option: {why}"),
            UsageError::NotPublishable => {
                f.write_str("only text and binary messages can be published")
            }
            UsageError::ClientCannotSubscribe => {
                f.write_str("a client connection cannot subscribe to topics")
            }
            UsageError::BufferFull { buffered, limit } => {
                write!(
                    f,
                    "{buffered} bytes already queued, over the limit of {limit}; message dropped"
                )
            }
        }
    }
}

/// TLS failed: what was being done, and the error behind it (with the `tls` feature, a
/// `rustls::Error` for handshake, certificate and configuration failures, or the PEM or
/// server-name error for files and hosts).
///
/// [`Error::source`](std::error::Error::source) on an [`Error::Tls`] returns that
/// underlying error itself, so it downcasts directly:
/// `err.source().and_then(|e| e.downcast_ref::<rustls::Error>())`.
#[derive(Debug)]
pub struct TlsError {
    context: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl TlsError {
    /// A failure while doing `context`, caused by `source`.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn new(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> TlsError {
        TlsError {
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }

    /// A failure with no underlying error.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn msg(context: impl Into<String>) -> TlsError {
        TlsError {
            context: context.into(),
            source: None,
        }
    }

    /// What was being done (a file name, a host, `TLS` for the handshake).
    pub fn context(&self) -> &str {
        &self.context
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.context),
            None => f.write_str(&self.context),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// Every error the crate reports.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The peer broke the WebSocket protocol; the connection was failed with a close code.
    Protocol(ProtocolError),
    /// The opening handshake failed.
    Handshake(HandshakeError),
    /// This side misused the API; nothing was sent.
    Usage(UsageError),
    /// The transport failed.
    Io(std::io::Error),
    /// TLS failed: certificate verification, handshake, configuration. Its
    /// [`source`](std::error::Error::source) is the underlying (rustls) error.
    Tls(TlsError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Protocol(e) => write!(f, "protocol error: {e}"),
            Error::Handshake(e) => write!(f, "handshake failed: {e}"),
            Error::Usage(e) => write!(f, "{e}"),
            Error::Io(e) => write!(f, "I/O error: {e}"),
            Error::Tls(e) => write!(f, "TLS error: {e}"),
        }
    }
}

impl std::error::Error for ProtocolError {}
impl std::error::Error for HandshakeError {}
impl std::error::Error for UsageError {}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            Error::Protocol(e) => Some(e),
            Error::Handshake(e) => Some(e),
            Error::Usage(e) => Some(e),
            // The underlying error itself (not the wrapper), so it downcasts directly.
            Error::Tls(e) => std::error::Error::source(e),
        }
    }
}

impl From<ProtocolError> for Error {
    fn from(e: ProtocolError) -> Self {
        Error::Protocol(e)
    }
}
impl From<HandshakeError> for Error {
    fn from(e: HandshakeError) -> Self {
        Error::Handshake(e)
    }
}
impl From<UsageError> for Error {
    fn from(e: UsageError) -> Self {
        Error::Usage(e)
    }
}
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_code_table() {
        let valid: Vec<u16> = (0..=u16::MAX).filter(|&c| is_valid_close_code(c)).collect();
        assert_eq!(valid.len(), 4 + 8 + 2000);
        for c in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!is_valid_close_code(c), "{c}");
        }
        for c in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            assert!(is_valid_close_code(c), "{c}");
        }
    }

    #[test]
    fn tls_error_keeps_its_source() {
        use std::error::Error as _;
        let gone = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let err = Error::Tls(TlsError::new("cert.pem", gone));
        assert_eq!(err.to_string(), "TLS error: cert.pem: gone");
        // The underlying error itself, not the wrapper.
        let source = err.source().expect("a source");
        assert_eq!(
            source.downcast_ref::<std::io::Error>().map(|e| e.kind()),
            Some(std::io::ErrorKind::NotFound)
        );
        let bare = Error::Tls(TlsError::msg("no system root certificates found"));
        assert_eq!(
            bare.to_string(),
            "TLS error: no system root certificates found"
        );
        assert!(bare.source().is_none());
    }

    #[test]
    fn errors_map_to_codes() {
        assert_eq!(ProtocolError::InvalidUtf8.close_code(), 1007);
        assert_eq!(
            ProtocolError::MessageTooLarge { len: 2, max: 1 }.close_code(),
            1009
        );
        let compressed = ProtocolError::CompressedTooLarge {
            len: 300,
            wire_max: 250,
            max: 100,
        };
        assert_eq!(compressed.close_code(), 1009);
        assert_eq!(
            compressed.to_string(),
            "compressed message of 300 bytes on the wire exceeds 250, the most max_length 100 \
             allows"
        );
        assert_eq!(ProtocolError::UnmaskedFrame.close_code(), 1002);
        assert_eq!(HandshakeError::UnsupportedVersion("8".into()).status(), 426);
        assert_eq!(HandshakeError::HeadTooLarge { limit: 1 }.status(), 431);
        assert_eq!(HandshakeError::BadRequest("x").status(), 400);
    }
}
