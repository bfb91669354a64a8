//! permessage-deflate (RFC 7692): the options, the negotiation in both roles, and the
//! codec a connection uses once it is agreed.
//!
//! # Memory
//! A side that compresses without context takeover (the default both ways) keeps no zlib
//! state per connection: each message is compressed by a compressor this thread shares
//! with all its connections, reset before every message, and inflated by a decompressor
//! shared the same way. An idle deflate connection then costs a small boxed record (the
//! agreed parameters) beside a plain one. Context takeover needs the connection's own
//! stream, made on its first compressed message and kept until the connection ends: a
//! compressor (zlib-rs: about 240 KiB at 9 window bits, 370 KiB at 15, the 128 KiB hash
//! table being fixed) and a decompressor (about 7 KiB plus the window, 2^bits bytes).
//!
//! # Bombs
//! Inflation is bounded by `max_length`: output grows in steps that never take the buffer
//! past `max_length + 1` bytes, and one byte over fails the connection with 1009, so a
//! small frame that would inflate to gigabytes costs at most `max_length` plus one step.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

use super::driver::Role;
use super::error::{HandshakeError, UsageError};
use super::frame::{FrameHeader, MAX_HEADER_LEN, OpCode, encode_header};
use super::handshake::Request;
use super::mask::apply_mask;

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION_NAME: &str = "permessage-deflate";
/// Default [`DeflateOptions::threshold`]: messages shorter than this go uncompressed.
pub const DEFAULT_DEFLATE_THRESHOLD: usize = 128;
/// Default [`DeflateOptions::level`] (zlib's default).
pub const DEFAULT_DEFLATE_LEVEL: u32 = 6;
/// The largest LZ77 window, in bits (32 KiB), and the default of both window options.
pub const MAX_WINDOW_BITS: u8 = 15;
/// The smallest LZ77 window RFC 7692 allows, in bits (256 bytes).
pub const MIN_WINDOW_BITS: u8 = 8;

/// What the trailing empty stored block of a sync flush looks like (RFC 7692 §7.2.1).
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// zlib (and zlib-rs) refuse an 8-bit window for raw deflate. A 9-bit compressor never
/// emits a distance over 512 − 262 = 250 bytes, so it serves a peer that allows only 256
/// (what RFC 7692 asks of an 8-bit window); a 9-bit decompressor reads any 8-bit stream.
const ZLIB_MIN_WINDOW_BITS: u8 = 9;
/// The first output step when inflating (then it doubles, up to `max_length + 1`).
const INFLATE_FIRST_STEP: usize = 4 * 1024;

/// permessage-deflate settings: what a server accepts and a client offers.
///
/// Each field speaks of the server's or the client's compressor, in both roles. The
/// defaults keep no context either way, so an idle connection holds no zlib state.
///
/// ```
/// use websocket_driver::Options;
/// use websocket_driver::protocol::deflate::DeflateOptions;
/// let on = Options::default().deflate(true);
/// let tuned = Options::default().deflate_options(DeflateOptions {
///     server_no_context_takeover: false, // the server keeps its window between messages
///     server_max_window_bits: 10,        // … of 1 KiB
///     ..DeflateOptions::default()
/// });
/// assert!(on.deflate.is_some() && tuned.deflate.is_some());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeflateOptions {
    /// The server compresses each message on its own. Server: always granted in the
    /// response (and granted whenever a client asks). Client: asked for in the offer.
    /// Default true.
    pub server_no_context_takeover: bool,
    /// The client compresses each message on its own. Server: always asked for in the
    /// response (else only when a client offers it). Client: offered, and then kept to
    /// whatever the server answers. Default true.
    pub client_no_context_takeover: bool,
    /// The server's LZ77 window, 8–15 bits. Server: the largest it uses (less when a
    /// client asks). Client: asked for in the offer when below 15. Default 15.
    pub server_max_window_bits: u8,
    /// The client's LZ77 window, 8–15 bits. Server: the largest it accepts, asked for in
    /// the response; below 15, an offer that cannot take the parameter is declined unless
    /// the client keeps no context. Client: offered (bare at 15). Default 15.
    pub client_max_window_bits: u8,
    /// Compression level, 0–9. Default [`DEFAULT_DEFLATE_LEVEL`].
    pub level: u32,
    /// Messages shorter than this many bytes are sent uncompressed. Default
    /// [`DEFAULT_DEFLATE_THRESHOLD`].
    pub threshold: usize,
}

impl Default for DeflateOptions {
    fn default() -> Self {
        DeflateOptions {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: MAX_WINDOW_BITS,
            client_max_window_bits: MAX_WINDOW_BITS,
            level: DEFAULT_DEFLATE_LEVEL,
            threshold: DEFAULT_DEFLATE_THRESHOLD,
        }
    }
}

impl DeflateOptions {
    /// Checks the window sizes (8–15) and the level (0–9).
    pub fn validate(&self) -> Result<(), UsageError> {
        for (name, bits) in [
            ("server_max_window_bits", self.server_max_window_bits),
            ("client_max_window_bits", self.client_max_window_bits),
        ] {
            if !(MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&bits) {
                return Err(UsageError::InvalidOption(format!(
                    "deflate {name} {bits} is not within 8..=15"
                )));
            }
        }
        if self.level > 9 {
            return Err(UsageError::InvalidOption(format!(
                "deflate level {} is not within 0..=9",
                self.level
            )));
        }
        Ok(())
    }

    /// The client's offer: the `Sec-WebSocket-Extensions` value.
    pub fn offer(&self) -> String {
        let mut offer = String::from(EXTENSION_NAME);
        if self.server_no_context_takeover {
            offer.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            offer.push_str("; client_no_context_takeover");
        }
        if self.server_max_window_bits < MAX_WINDOW_BITS {
            offer.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_max_window_bits
            ));
        }
        if self.client_max_window_bits < MAX_WINDOW_BITS {
            offer.push_str(&format!(
                "; client_max_window_bits={}",
                self.client_max_window_bits
            ));
        } else {
            offer.push_str("; client_max_window_bits");
        }
        offer
    }
}

/// The permessage-deflate parameters a connection agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeflateParams {
    /// The server resets its compressor after every message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after every message.
    pub client_no_context_takeover: bool,
    /// The server's LZ77 window, in bits (15 when not limited).
    pub server_max_window_bits: u8,
    /// The client's LZ77 window, in bits (15 when not limited).
    pub client_max_window_bits: u8,
}

/// One element of a `Sec-WebSocket-Extensions` list: the name and its parameters in order
/// (a quoted value unquoted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// The extension token.
    pub name: String,
    /// `(name, value)`; `None` for a parameter without `=`.
    pub params: Vec<(String, Option<String>)>,
}

/// An HTTP token character (RFC 9110 §5.6.2).
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses a `Sec-WebSocket-Extensions` value (RFC 6455 §9.1, with RFC 7230's list rule:
/// empty elements are skipped). `None` when it is malformed.
pub fn parse_extensions(value: &str) -> Option<Vec<Extension>> {
    struct Cursor<'a> {
        s: &'a [u8],
        at: usize,
    }
    impl Cursor<'_> {
        fn peek(&self) -> Option<u8> {
            self.s.get(self.at).copied()
        }
        fn skip_ows(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t')) {
                self.at += 1;
            }
        }
        fn token(&mut self) -> Option<String> {
            let start = self.at;
            while self.peek().is_some_and(is_tchar) {
                self.at += 1;
            }
            (self.at > start).then(|| String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
        }
        fn quoted(&mut self) -> Option<String> {
            self.at += 1; // the opening quote
            let mut value = Vec::new();
            loop {
                let b = self.peek()?;
                self.at += 1;
                match b {
                    b'"' => return String::from_utf8(value).ok(),
                    b'\\' => {
                        let escaped = self.peek()?;
                        self.at += 1;
                        value.push(escaped);
                    }
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => value.push(b),
                    _ => return None,
                }
            }
        }
    }
    let mut c = Cursor {
        s: value.as_bytes(),
        at: 0,
    };
    let mut list = Vec::new();
    loop {
        c.skip_ows();
        match c.peek() {
            None => return Some(list),
            Some(b',') => {
                c.at += 1;
                continue;
            }
            Some(_) => {}
        }
        let name = c.token()?;
        let mut params = Vec::new();
        loop {
            c.skip_ows();
            match c.peek() {
                None | Some(b',') => break,
                Some(b';') => c.at += 1,
                Some(_) => return None,
            }
            c.skip_ows();
            let param = c.token()?;
            c.skip_ows();
            let value = if c.peek() == Some(b'=') {
                c.at += 1;
                c.skip_ows();
                Some(if c.peek() == Some(b'"') {
                    c.quoted()?
                } else {
                    c.token()?
                })
            } else {
                None
            };
            params.push((param, value));
        }
        list.push(Extension { name, params });
    }
}

/// A window-bits value: a decimal 8–15 without leading zeros (RFC 7692 §7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.len() > 2 || value.starts_with('0') {
        return None;
    }
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bits: u8 = value.parse().ok()?;
    (MIN_WINDOW_BITS..=MAX_WINDOW_BITS)
        .contains(&bits)
        .then_some(bits)
}

/// The parameters of one permessage-deflate element, checked for duplicates, unknown
/// names and bad values (RFC 7692 §7.1). `client_max_window_bits` may be bare
/// (`Some(None)`) only in an offer.
#[derive(Debug, Default)]
struct RawParams {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    client_max_window_bits: Option<Option<u8>>,
}

fn read_params(
    params: &[(String, Option<String>)],
    offer: bool,
) -> Result<RawParams, &'static str> {
    let mut raw = RawParams::default();
    for (name, value) in params {
        match name.as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" => {
                let flag = if name.starts_with("server") {
                    &mut raw.server_no_context_takeover
                } else {
                    &mut raw.client_no_context_takeover
                };
                if *flag {
                    return Err("duplicate permessage-deflate parameter");
                }
                if value.is_some() {
                    return Err("permessage-deflate no_context_takeover with a value");
                }
                *flag = true;
            }
            "server_max_window_bits" => {
                if raw.server_max_window_bits.is_some() {
                    return Err("duplicate permessage-deflate parameter");
                }
                let bits = value
                    .as_deref()
                    .and_then(window_bits)
                    .ok_or("invalid permessage-deflate server_max_window_bits")?;
                raw.server_max_window_bits = Some(bits);
            }
            "client_max_window_bits" => {
                if raw.client_max_window_bits.is_some() {
                    return Err("duplicate permessage-deflate parameter");
                }
                let bits = match value.as_deref() {
                    None if offer => None,
                    v => Some(
                        v.and_then(window_bits)
                            .ok_or("invalid permessage-deflate client_max_window_bits")?,
                    ),
                };
                raw.client_max_window_bits = Some(bits);
            }
            _ => return Err("unknown permessage-deflate parameter"),
        }
    }
    Ok(raw)
}

/// The server's answer to one offer: the agreed parameters and the response's
/// `Sec-WebSocket-Extensions` value, or `None` to decline it (RFC 7692 §5, §7.1).
pub fn accept_offer(
    params: &[(String, Option<String>)],
    options: &DeflateOptions,
) -> Option<(DeflateParams, String)> {
    let raw = match read_params(params, true) {
        Ok(raw) => raw,
        Err(why) => {
            log::debug!("declining a permessage-deflate offer: {why}");
            return None;
        }
    };
    let server_no_context_takeover =
        raw.server_no_context_takeover || options.server_no_context_takeover;
    let client_no_context_takeover =
        raw.client_no_context_takeover || options.client_no_context_takeover;
    let server_max_window_bits = raw
        .server_max_window_bits
        .map_or(options.server_max_window_bits, |asked| {
            asked.min(options.server_max_window_bits)
        });
    let (client_max_window_bits, client_bits_answered) = match raw.client_max_window_bits {
        Some(hint) => {
            let bits = hint.map_or(options.client_max_window_bits, |h| {
                h.min(options.client_max_window_bits)
            });
            (bits, bits < MAX_WINDOW_BITS)
        }
        // The client cannot be limited: fine when it keeps no context (the shared
        // decompressor has the full window), not when this server would keep one for it.
        None if options.client_max_window_bits < MAX_WINDOW_BITS && !client_no_context_takeover => {
            log::debug!("declining a permessage-deflate offer without client_max_window_bits");
            return None;
        }
        None => (MAX_WINDOW_BITS, false),
    };
    let agreed = DeflateParams {
        server_no_context_takeover,
        client_no_context_takeover,
        server_max_window_bits,
        client_max_window_bits,
    };
    let mut response = String::from(EXTENSION_NAME);
    if server_no_context_takeover {
        response.push_str("; server_no_context_takeover");
    }
    if client_no_context_takeover {
        response.push_str("; client_no_context_takeover");
    }
    if raw.server_max_window_bits.is_some() || server_max_window_bits < MAX_WINDOW_BITS {
        response.push_str(&format!(
            "; server_max_window_bits={server_max_window_bits}"
        ));
    }
    if client_bits_answered {
        response.push_str(&format!(
            "; client_max_window_bits={client_max_window_bits}"
        ));
    }
    Some((agreed, response))
}

/// The server's negotiation: the first permessage-deflate offer of the request it can
/// accept (other extensions are passed over), with the response header value. A
/// malformed header declines them all.
pub fn negotiate(request: &Request, options: &DeflateOptions) -> Option<(DeflateParams, String)> {
    let lines: Vec<&str> = request
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|(_, v)| v.as_str())
        .collect();
    if lines.is_empty() {
        return None;
    }
    let Some(offers) = parse_extensions(&lines.join(",")) else {
        log::debug!("ignoring a malformed Sec-WebSocket-Extensions header");
        return None;
    };
    offers
        .iter()
        .filter(|e| e.name == EXTENSION_NAME)
        .find_map(|e| accept_offer(&e.params, options))
}

/// The client's check of the server's `Sec-WebSocket-Extensions` (all its lines) against
/// what it offered (`None`: nothing). Fails on anything not offered or against RFC 7692.
pub fn accept_response(
    lines: &[&str],
    offered: Option<&DeflateOptions>,
) -> Result<Option<DeflateParams>, HandshakeError> {
    use HandshakeError::BadResponse;
    if lines.iter().all(|l| l.trim().is_empty()) {
        return Ok(None);
    }
    let extensions = parse_extensions(&lines.join(","))
        .ok_or(BadResponse("malformed Sec-WebSocket-Extensions header"))?;
    let [extension] = extensions.as_slice() else {
        return match extensions.len() {
            0 => Ok(None),
            _ => Err(BadResponse("server selected more than one extension")),
        };
    };
    let Some(offer) = offered.filter(|_| extension.name == EXTENSION_NAME) else {
        return Err(BadResponse(
            "server selected an extension the client did not offer",
        ));
    };
    let raw = read_params(&extension.params, false).map_err(BadResponse)?;
    if offer.server_no_context_takeover && !raw.server_no_context_takeover {
        return Err(BadResponse(
            "server did not accept the offered server_no_context_takeover",
        ));
    }
    let server_max_window_bits = match raw.server_max_window_bits {
        Some(bits) if bits > offer.server_max_window_bits => {
            return Err(BadResponse(
                "server_max_window_bits larger than the client offered",
            ));
        }
        Some(bits) => bits,
        None if offer.server_max_window_bits < MAX_WINDOW_BITS => {
            return Err(BadResponse(
                "server did not accept the offered server_max_window_bits",
            ));
        }
        None => MAX_WINDOW_BITS,
    };
    let client_max_window_bits = match raw.client_max_window_bits.flatten() {
        Some(bits) if bits > offer.client_max_window_bits => {
            return Err(BadResponse(
                "client_max_window_bits larger than the client offered",
            ));
        }
        Some(bits) => bits,
        None => offer.client_max_window_bits,
    };
    Ok(Some(DeflateParams {
        server_no_context_takeover: raw.server_no_context_takeover,
        // Offered as a promise: the client keeps it whatever the answer.
        client_no_context_takeover: raw.client_no_context_takeover
            || offer.client_no_context_takeover,
        server_max_window_bits,
        client_max_window_bits,
    }))
}

// ----- the codec -----

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InflateError {
    /// It inflates past `max_length`.
    TooBig,
    /// Not valid deflate data.
    Corrupt,
}

/// Per-thread compressors and decompressor for messages without context takeover, shared
/// by every connection this thread drives.
#[derive(Default)]
struct SharedCodecs {
    /// One per (window bits, level) in use on this thread.
    compressors: Vec<(u8, u32, Compress)>,
    /// Full window: it reads a stream of any window size.
    decompressor: Option<Decompress>,
}

thread_local! {
    static SHARED: RefCell<SharedCodecs> = RefCell::new(SharedCodecs::default());
    /// A message's own inflate stream, given back at the message's end for the next one
    /// on this thread (a connection without the peer's context takeover needs one only
    /// while a compressed message arrives in pieces).
    static SPARE_STREAM: RefCell<Option<Box<Decompress>>> = const { RefCell::new(None) };
}

/// A fresh full-window inflate stream for one message: this thread's spare, reset, or a
/// new one.
fn message_stream() -> Box<Decompress> {
    // `try_with`: a driver may be used from another thread-local's destructor, after
    // this one is gone (then a new stream, dropped at the message's end).
    match SPARE_STREAM
        .try_with(|spare| spare.borrow_mut().take())
        .ok()
        .flatten()
    {
        Some(mut d) => {
            d.reset(false);
            d
        }
        None => Box::new(Decompress::new_with_window_bits(false, MAX_WINDOW_BITS)),
    }
}

/// Gives a message's inflate stream back to this thread, if it holds none.
fn give_back_stream(d: Box<Decompress>) {
    // Gone (a thread-local's destructor stopping a driver): the stream is dropped.
    let _ = SPARE_STREAM.try_with(|spare| {
        spare.borrow_mut().get_or_insert(d);
    });
}

/// Runs `f` with this thread's shared compressor for `bits` and `level`, reset.
fn with_shared_compressor<R>(bits: u8, level: u32, f: impl FnOnce(&mut Compress) -> R) -> R {
    SHARED.with(|shared| {
        let mut shared = shared.borrow_mut();
        let at = match shared
            .compressors
            .iter()
            .position(|(b, l, _)| *b == bits && *l == level)
        {
            Some(at) => {
                shared.compressors[at].2.reset();
                at
            }
            None => {
                let compressor =
                    Compress::new_with_window_bits(Compression::new(level), false, bits);
                shared.compressors.push((bits, level, compressor));
                shared.compressors.len() - 1
            }
        };
        f(&mut shared.compressors[at].2)
    })
}

/// Runs `f` with this thread's shared decompressor, reset.
fn with_shared_decompressor<R>(f: impl FnOnce(&mut Decompress) -> R) -> R {
    SHARED.with(|shared| {
        let mut shared = shared.borrow_mut();
        let decompressor = match &mut shared.decompressor {
            Some(d) => {
                d.reset(false);
                d
            }
            slot @ None => slot.insert(Decompress::new_with_window_bits(false, MAX_WINDOW_BITS)),
        };
        f(decompressor)
    })
}

/// Compresses `input` as one message onto the end of `out`: raw deflate, sync flush, the
/// `00 00 ff ff` tail removed (RFC 7692 §7.2.1).
fn deflate_message(c: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> bool {
    let start_in = c.total_in();
    out.reserve(input.len() / 2 + 64);
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve((input.len() / 4).max(4096));
        }
        let consumed = (c.total_in() - start_in) as usize;
        if let Err(e) = c.compress_vec(&input[consumed..], out, FlushCompress::Sync) {
            log::error!("permessage-deflate: compression failed: {e}");
            return false;
        }
        let consumed = (c.total_in() - start_in) as usize;
        if consumed == input.len() && out.len() < out.capacity() {
            break;
        }
    }
    if out.ends_with(&SYNC_TAIL) {
        out.truncate(out.len() - SYNC_TAIL.len());
        true
    } else {
        log::error!("permessage-deflate: a sync flush without its empty stored block");
        false
    }
}

/// Inflates one message (`input` without its tail), never holding more than
/// `max_length + 1` bytes of output. Returns whether the stream ended with a final block
/// (a kept context must then start over).
///
/// The tail completes the empty stored block of the sender's flush, so it inflates to
/// nothing; output from it means the message stopped inside a block (cut short, or not
/// flushed), and it fails as corrupt rather than deliver a part of a message or leave a
/// kept context in the middle of a block for the next one.
fn inflate_message(
    d: &mut Decompress,
    input: &[u8],
    max_length: usize,
) -> Result<(Vec<u8>, bool), InflateError> {
    let mut out = Vec::new();
    if inflate_onto(d, input, &mut out, max_length)? {
        return Ok((out, true));
    }
    let ended = inflate_tail(d, &mut out, max_length)?;
    Ok((out, ended))
}

/// Inflates `input` onto the end of `out`, growing it geometrically and never past
/// `max_length + 1` bytes. Returns whether the stream ended with a final block (input
/// after it is ignored).
fn inflate_onto(
    d: &mut Decompress,
    input: &[u8],
    out: &mut Vec<u8>,
    max_length: usize,
) -> Result<bool, InflateError> {
    let limit = max_length.saturating_add(1);
    let start = d.total_in();
    loop {
        if out.len() == out.capacity() {
            if out.len() >= limit {
                return Err(InflateError::TooBig);
            }
            let step = if out.capacity() == 0 {
                INFLATE_FIRST_STEP.max(input.len().saturating_mul(4))
            } else {
                out.len()
            };
            out.reserve_exact(step.min(limit - out.len()));
        }
        let status = d
            .decompress_vec(
                &input[(d.total_in() - start) as usize..],
                out,
                FlushDecompress::Sync,
            )
            .map_err(|_| InflateError::Corrupt)?;
        if out.len() > max_length {
            return Err(InflateError::TooBig);
        }
        if status == flate2::Status::StreamEnd {
            return Ok(true);
        }
        let used = (d.total_in() - start) as usize;
        if used == input.len() && out.len() < out.capacity() {
            return Ok(false);
        }
    }
}

/// Ends a message: inflates the flush's tail (RFC 7692 §7.2.2), which must add nothing
/// (see [`inflate_message`]). Returns whether the stream ended with a final block.
fn inflate_tail(
    d: &mut Decompress,
    out: &mut Vec<u8>,
    max_length: usize,
) -> Result<bool, InflateError> {
    let before_tail = out.len();
    let ended = inflate_onto(d, &SYNC_TAIL, out, max_length)?;
    // Also when the tail ended the stream: it then completed a final block the message
    // stopped inside, and its bytes are not the peer's.
    if out.len() != before_tail {
        return Err(InflateError::Corrupt);
    }
    Ok(ended)
}

/// A connection's permessage-deflate state, once agreed.
pub(crate) struct DeflateState {
    params: DeflateParams,
    role: Role,
    level: u32,
    threshold: usize,
    /// This side's own compressor: only with context takeover, made on first use.
    compressor: Option<Box<Compress>>,
    /// The peer's stream: only with its context takeover, made on first use.
    decompressor: Option<Box<Decompress>>,
    /// Without the peer's context takeover: the stream of the one message being inflated
    /// piece by piece ([`DeflateState::inflate_piece`]), given back to the thread at its
    /// end.
    message_stream: Option<Box<Decompress>>,
    /// The peer's stream ended (a final block) inside the message being inflated piece by
    /// piece: the rest of its data is ignored, as [`DeflateState::inflate`] ignores it.
    message_ended: bool,
}

impl std::fmt::Debug for DeflateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeflateState")
            .field("params", &self.params)
            .field("compressor", &self.compressor.is_some())
            .field("decompressor", &self.decompressor.is_some())
            .field("message_stream", &self.message_stream.is_some())
            .finish()
    }
}

impl DeflateState {
    pub(crate) fn new(params: DeflateParams, role: Role, options: &DeflateOptions) -> Self {
        DeflateState {
            params,
            role,
            level: options.level,
            threshold: options.threshold,
            compressor: None,
            decompressor: None,
            message_stream: None,
            message_ended: false,
        }
    }

    pub(crate) fn params(&self) -> DeflateParams {
        self.params
    }

    pub(crate) fn threshold(&self) -> usize {
        self.threshold
    }

    pub(crate) fn level(&self) -> u32 {
        self.level
    }

    /// Whether this side compresses each message on its own.
    pub(crate) fn own_no_context_takeover(&self) -> bool {
        match self.role {
            Role::Server => self.params.server_no_context_takeover,
            Role::Client => self.params.client_no_context_takeover,
        }
    }

    /// The window this side compresses with (9 standing in for 8).
    pub(crate) fn own_window_bits(&self) -> u8 {
        let bits = match self.role {
            Role::Server => self.params.server_max_window_bits,
            Role::Client => self.params.client_max_window_bits,
        };
        bits.max(ZLIB_MIN_WINDOW_BITS)
    }

    fn peer_no_context_takeover(&self) -> bool {
        match self.role {
            Role::Server => self.params.client_no_context_takeover,
            Role::Client => self.params.server_no_context_takeover,
        }
    }

    fn peer_window_bits(&self) -> u8 {
        let bits = match self.role {
            Role::Server => self.params.client_max_window_bits,
            Role::Client => self.params.server_max_window_bits,
        };
        bits.max(ZLIB_MIN_WINDOW_BITS)
    }

    /// Whether zlib state is held between messages (for the idle-cost accounting).
    pub(crate) fn holds_streams(&self) -> bool {
        self.compressor.is_some() || self.decompressor.is_some() || self.message_stream.is_some()
    }

    /// Appends a compressed frame (RSV1 set) of `payload` to `out` and returns its length,
    /// or `None`, leaving `out` as it was, when the message should go plain: under the
    /// threshold, or (without context takeover) when compressing does not make it smaller.
    pub(crate) fn write_frame(
        &mut self,
        out: &mut Vec<u8>,
        opcode: OpCode,
        payload: &[u8],
        mask: Option<[u8; 4]>,
    ) -> Option<usize> {
        if payload.len() < self.threshold {
            return None;
        }
        let start = out.len();
        out.resize(start + MAX_HEADER_LEN, 0);
        let bits = self.own_window_bits();
        let ok = if self.own_no_context_takeover() {
            with_shared_compressor(bits, self.level, |c| deflate_message(c, payload, out))
        } else {
            let level = self.level;
            let c = self.compressor.get_or_insert_with(|| {
                Box::new(Compress::new_with_window_bits(
                    Compression::new(level),
                    false,
                    bits,
                ))
            });
            deflate_message(c, payload, out)
        };
        let len = out.len() - start - MAX_HEADER_LEN;
        if !ok {
            // The message goes plain, but a kept compressor has part of it in its window
            // now, which the peer's never gets: later messages could refer to it. A fresh
            // one refers to nothing the peer has not seen (the peer's larger window does
            // no harm).
            self.compressor = None;
        }
        if !ok || (self.own_no_context_takeover() && len >= payload.len()) {
            out.truncate(start);
            return None;
        }
        Some(finish_frame(out, start, opcode, len, mask))
    }

    /// Inflates one whole compressed message. An empty payload (a sender's flush always
    /// makes at least one byte, RFC 7692 §7.2.1) is taken as an empty message and leaves
    /// the peer's stream as it was.
    pub(crate) fn inflate(
        &mut self,
        compressed: &[u8],
        max_length: usize,
    ) -> Result<Vec<u8>, InflateError> {
        if compressed.is_empty() {
            return Ok(Vec::new());
        }
        if self.peer_no_context_takeover() {
            return with_shared_decompressor(|d| inflate_message(d, compressed, max_length))
                .map(|(out, _)| out);
        }
        let result = inflate_message(self.kept_decompressor(), compressed, max_length);
        if !matches!(result, Ok((_, false))) {
            // A final block ends the peer's stream; an error leaves it unusable anyway.
            self.decompressor = None;
        }
        result.map(|(out, _)| out)
    }

    /// Inflates a piece of a compressed message that arrives in pieces (fragments, or
    /// reads of a frame) onto `out`, so that only the inflated message is held, not its
    /// compressed bytes too. Pieces arrive in order; end the message with
    /// [`DeflateState::inflate_end`]. An error leaves the stream unusable: the connection
    /// fails.
    pub(crate) fn inflate_piece(
        &mut self,
        piece: &[u8],
        out: &mut Vec<u8>,
        max_length: usize,
    ) -> Result<(), InflateError> {
        if piece.is_empty() || self.message_ended {
            return Ok(());
        }
        let d = self.message_decompressor();
        let result = inflate_onto(d, piece, out, max_length);
        self.message_ended = matches!(result, Ok(true));
        result.map(drop)
    }

    /// Ends a message inflated with [`DeflateState::inflate_piece`]: its flush's tail,
    /// then the stream is kept (context takeover) or dropped. `wire`: the message's
    /// compressed bytes; none is an empty message, and leaves the stream as it was.
    pub(crate) fn inflate_end(
        &mut self,
        out: &mut Vec<u8>,
        wire: usize,
        max_length: usize,
    ) -> Result<(), InflateError> {
        if wire == 0 {
            return Ok(());
        }
        let result = if std::mem::take(&mut self.message_ended) {
            Ok(true)
        } else {
            inflate_tail(self.message_decompressor(), out, max_length)
        };
        if let Some(d) = self.message_stream.take() {
            give_back_stream(d);
        }
        if !matches!(result, Ok(false)) {
            // A final block ends the peer's stream; an error leaves it unusable anyway.
            self.decompressor = None;
        }
        result.map(drop)
    }

    /// Drops this side's stream: the connection sends no more messages (its close is
    /// queued), so the compressor's window and state (about 256 KiB at the defaults)
    /// would only wait for the connection to go.
    pub(crate) fn stop_compressing(&mut self) {
        self.compressor = None;
    }

    /// Drops the peer's streams: the connection reads no more.
    pub(crate) fn stop_inflating(&mut self) {
        self.decompressor = None;
        if let Some(d) = self.message_stream.take() {
            give_back_stream(d);
        }
        self.message_ended = false;
    }

    /// The stream a message in pieces inflates through: the kept one (the peer's context
    /// takeover), or one of the message's own (the thread's shared one serves only a
    /// message inflated in one call).
    fn message_decompressor(&mut self) -> &mut Decompress {
        if self.peer_no_context_takeover() {
            self.message_stream.get_or_insert_with(message_stream)
        } else {
            self.kept_decompressor()
        }
    }

    /// The peer's stream kept between messages (its context takeover), made on first use.
    fn kept_decompressor(&mut self) -> &mut Decompress {
        let bits = self.peer_window_bits();
        self.decompressor
            .get_or_insert_with(|| Box::new(Decompress::new_with_window_bits(false, bits)))
    }
}

/// Moves a compressed payload written `MAX_HEADER_LEN` bytes after `start` behind its
/// header (RSV1 set), masks it for a client, and returns the frame's length.
fn finish_frame(
    out: &mut Vec<u8>,
    start: usize,
    opcode: OpCode,
    len: usize,
    mask: Option<[u8; 4]>,
) -> usize {
    let header = FrameHeader {
        fin: true,
        rsv: 0b100,
        opcode,
        mask,
        payload_len: len as u64,
    };
    let mut head = [0u8; MAX_HEADER_LEN];
    let h = encode_header(&mut head, &header);
    out.copy_within(start + MAX_HEADER_LEN.., start + h);
    out.truncate(start + h + len);
    out[start..start + h].copy_from_slice(&head[..h]);
    if let Some(key) = mask {
        apply_mask(&mut out[start + h..], key, 0);
    }
    h + len
}

/// A whole unmasked server frame of `payload` compressed without context (for a shared
/// frame's variant), or `None` when compressing does not make it smaller.
pub(crate) fn compress_shared_frame(
    opcode: OpCode,
    payload: &[u8],
    bits: u8,
    level: u32,
) -> Option<Box<[u8]>> {
    let mut out = vec![0u8; MAX_HEADER_LEN];
    let ok = with_shared_compressor(bits.max(ZLIB_MIN_WINDOW_BITS), level, |c| {
        deflate_message(c, payload, &mut out)
    });
    let len = out.len() - MAX_HEADER_LEN;
    if !ok || len >= payload.len() {
        return None;
    }
    finish_frame(&mut out, 0, opcode, len, None);
    Some(out.into_boxed_slice())
}

/// What a flush may add to each fragment after a message's first: a peer that compresses
/// each fragment with a sync flush ends it with an empty stored block and may start a
/// new block (RFC 7692 §7.2.1 allows it; Python's websockets and Node's ws do it).
pub const FRAGMENT_FLUSH_OVERHEAD: usize = 16;

/// The most compressed bytes a message of at most `max_length` inflated bytes may arrive
/// as in one frame: deflate's worst case for that size under any settings, as zlib's
/// `deflateBound` puts it for a window under 15 bits or level 1 (static Huffman codes,
/// up to 9 bits a byte, about 13.1 % over; a full window at the default level stays
/// within 0.03 %, but RFC 7692 lets a peer compress as it likes), plus 64 bytes. A
/// compressed message larger on the wire fails with 1009 before its payload is read; one
/// in several frames may be larger by [`compressed_limit_fragmented`]. Inflation itself
/// stops at `max_length`, whatever the wire size.
pub fn compressed_limit(max_length: usize) -> usize {
    compressed_limit_fragmented(max_length, 0)
}

/// zlib's `deflateBound` for settings other than its default (its "fixed" and "stored"
/// bounds, the larger of the two), without a wrapper.
fn deflate_bound(n: usize) -> usize {
    let fixed = n
        .saturating_add(n >> 3)
        .saturating_add(n >> 8)
        .saturating_add(n >> 9)
        .saturating_add(4);
    let stored = n
        .saturating_add(n >> 5)
        .saturating_add(n >> 7)
        .saturating_add(n >> 11)
        .saturating_add(7);
    fixed.max(stored)
}

/// [`compressed_limit`] for a message in `continuations` + 1 frames: plus
/// [`FRAGMENT_FLUSH_OVERHEAD`] per frame after the first, at most `max_length` more in all
/// (so a peer's empty flushes cannot make it buffer without bound).
pub fn compressed_limit_fragmented(max_length: usize, continuations: usize) -> usize {
    deflate_bound(max_length).saturating_add(64).saturating_add(
        continuations
            .saturating_mul(FRAGMENT_FLUSH_OVERHEAD)
            .min(max_length),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(list: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.map(str::to_string)))
            .collect()
    }

    #[test]
    fn extension_lists_parse() {
        let list = parse_extensions(
            "permessage-deflate; client_max_window_bits, x-foo ; a=\"b\\\"c\" ;d= 1,, permessage-deflate",
        )
        .unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].name, "permessage-deflate");
        assert_eq!(list[0].params, params(&[("client_max_window_bits", None)]));
        assert_eq!(
            list[1].params,
            params(&[("a", Some("b\"c")), ("d", Some("1"))])
        );
        assert!(list[2].params.is_empty());
        assert_eq!(parse_extensions("").unwrap(), vec![]);
        for bad in [
            "permessage-deflate;",
            "permessage-deflate; =1",
            "permessage-deflate; a=",
            "permessage-deflate; a=\"open",
            "permessage-deflate x",
            "; a",
            "permessage-deflate; a=\"\u{1}\"",
            "per(message)",
        ] {
            assert_eq!(parse_extensions(bad), None, "{bad}");
        }
    }

    #[test]
    fn window_bits_values() {
        for (v, bits) in [("8", Some(8)), ("15", Some(15)), ("9", Some(9))] {
            assert_eq!(window_bits(v), bits);
        }
        for v in ["7", "16", "08", "015", "", "1a", "+9", " 9", "100"] {
            assert_eq!(window_bits(v), None, "{v:?}");
        }
    }

    #[test]
    fn compress_then_inflate_round_trips() {
        let options = DeflateOptions::default();
        let p = DeflateParams {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        };
        let mut server = DeflateState::new(p, Role::Server, &options);
        let mut client = DeflateState::new(p, Role::Client, &options);
        let text = "{\"id\":1,\"name\":\"websocket\",\"tags\":[\"a\",\"b\"]}".repeat(30);
        let mut out = Vec::new();
        let n = server
            .write_frame(&mut out, OpCode::Text, text.as_bytes(), None)
            .unwrap();
        assert_eq!(n, out.len());
        assert_eq!(out[0], 0xc1, "FIN, RSV1, text");
        assert!(n < text.len() / 4);
        let header_len = if out[1] == 126 { 4 } else { 2 };
        let inflated = client.inflate(&out[header_len..], 1 << 20).unwrap();
        assert_eq!(inflated, text.as_bytes());
        assert!(!server.holds_streams() && !client.holds_streams());
    }

    #[test]
    fn inflation_stops_at_the_limit() {
        let data = vec![b'a'; 100_000];
        let mut out = Vec::new();
        with_shared_compressor(15, 6, |c| deflate_message(c, &data, &mut out));
        let inflate = |max| with_shared_decompressor(|d| inflate_message(d, &out, max));
        assert_eq!(inflate(100_000).unwrap().0.len(), 100_000);
        assert_eq!(inflate(99_999), Err(InflateError::TooBig));
        assert_eq!(
            with_shared_decompressor(|d| inflate_message(d, &[0xff, 0xff, 0xff], 10)),
            Err(InflateError::Corrupt)
        );
    }
}
