//! Options shared by servers and clients (the seed's `&key` arguments).

use super::deflate::DeflateOptions;
use super::error::UsageError;
use super::handshake::{HeadLimits, validate_header};

/// The seed's default `max-length`: `#x3ffffff` bytes (64 MiB − 1).
pub const DEFAULT_MAX_LENGTH: usize = 0x3ff_ffff;
/// Default limit on a handshake head (request or response), in bytes.
pub const DEFAULT_MAX_HANDSHAKE_SIZE: usize = 16 * 1024;
/// Default limit on header lines in a handshake head.
pub const DEFAULT_MAX_HEADERS: usize = 64;

/// Driver options.
///
/// ```
/// use websocket_driver::Options;
/// let options = Options::default()
///     .max_length(1 << 20)
///     .accept_protocols(["chat"])
///     .additional_header("X-Server", "wsd");
/// assert_eq!(options.max_length, 1 << 20);
/// ```
#[derive(Debug, Clone)]
pub struct Options {
    /// Largest message, in bytes, across all its fragments. Bigger ones fail the
    /// connection with 1009. Default [`DEFAULT_MAX_LENGTH`].
    pub max_length: usize,
    /// Server: subprotocols it accepts. Client: subprotocols it offers, in order.
    pub accept_protocols: Vec<String>,
    /// Extra headers for the handshake (server: the 101 response; client: the request).
    pub additional_headers: Vec<(String, String)>,
    /// Largest handshake head, in bytes (431 beyond). Default [`DEFAULT_MAX_HANDSHAKE_SIZE`].
    pub max_handshake_size: usize,
    /// Most header lines in a handshake head (431 beyond). Default [`DEFAULT_MAX_HEADERS`].
    pub max_headers: usize,
    /// permessage-deflate (RFC 7692): `None` (the default) neither offers (client) nor
    /// accepts (server) it; see [`Options::deflate`]. With it, [`Options::max_length`]
    /// bounds the inflated size of a message.
    pub deflate: Option<DeflateOptions>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_length: DEFAULT_MAX_LENGTH,
            accept_protocols: Vec::new(),
            additional_headers: Vec::new(),
            max_handshake_size: DEFAULT_MAX_HANDSHAKE_SIZE,
            max_headers: DEFAULT_MAX_HEADERS,
            deflate: None,
        }
    }
}

impl Options {
    /// Sets [`Options::max_length`].
    pub fn max_length(mut self, bytes: usize) -> Self {
        self.max_length = bytes;
        self
    }

    /// Sets [`Options::accept_protocols`].
    pub fn accept_protocols<I, S>(mut self, protocols: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.accept_protocols = protocols.into_iter().map(Into::into).collect();
        self
    }

    /// Adds one of [`Options::additional_headers`].
    pub fn additional_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.additional_headers.push((name.into(), value.into()));
        self
    }

    /// Sets [`Options::max_handshake_size`].
    pub fn max_handshake_size(mut self, bytes: usize) -> Self {
        self.max_handshake_size = bytes;
        self
    }

    /// Sets [`Options::max_headers`].
    pub fn max_headers(mut self, count: usize) -> Self {
        self.max_headers = count;
        self
    }

    /// Turns permessage-deflate on (with [`DeflateOptions::default`]: no context takeover
    /// either way, so idle connections keep no zlib state) or off.
    pub fn deflate(mut self, on: bool) -> Self {
        self.deflate = on.then(DeflateOptions::default);
        self
    }

    /// Turns permessage-deflate on with these settings.
    pub fn deflate_options(mut self, deflate: DeflateOptions) -> Self {
        self.deflate = Some(deflate);
        self
    }

    /// The handshake head limits, for a [`RequestParser`](super::handshake::RequestParser).
    pub fn head_limits(&self) -> HeadLimits {
        HeadLimits {
            max_size: self.max_handshake_size,
            max_headers: self.max_headers,
        }
    }

    /// Checks the headers for characters that could break the head, and the protocol
    /// names: each a non-empty token, none twice (RFC 6455 §4.1).
    pub fn validate(&self) -> Result<(), UsageError> {
        for (name, value) in &self.additional_headers {
            validate_header(name, value)?;
        }
        for (i, p) in self.accept_protocols.iter().enumerate() {
            let token = !p.is_empty() && p.bytes().all(super::deflate::is_tchar);
            if !token || self.accept_protocols[..i].contains(p) {
                return Err(UsageError::InvalidHeader(format!(
                    "Sec-WebSocket-Protocol: {p}"
                )));
            }
        }
        if let Some(deflate) = &self.deflate {
            deflate.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Subprotocol names are tokens, non-empty, each once (RFC 6455 §4.1): a client
    /// would otherwise put a broken or ambiguous `Sec-WebSocket-Protocol` on the wire.
    #[test]
    fn protocol_names_must_be_unique_tokens() {
        let good = Options::default().accept_protocols(["chat", "v2.chat+json", "a!#$%&'*^_`|~"]);
        assert!(good.validate().is_ok());
        let bad: [&[&str]; 7] = [
            &["chat room"],
            &[""],
            &["a/b"],
            &["\"chat\""],
            &["a,b"],
            &["caf\u{e9}"],
            &["chat", "chat"],
        ];
        for names in bad {
            let options = Options::default().accept_protocols(names.iter().copied());
            assert!(
                matches!(options.validate(), Err(UsageError::InvalidHeader(_))),
                "{names:?} accepted"
            );
        }
    }
}
