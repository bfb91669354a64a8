//! The `Driver`: one WebSocket connection as a sans-IO state machine.

use std::borrow::Cow;
use std::collections::VecDeque;

use super::deflate::{self, DeflateOptions, DeflateParams, DeflateState};
use super::error::{Error, HandshakeError};
use super::handshake::{
    self, ClientUrl, Request, ResponseParser, client_request, generate_key, select_protocol,
    server_response, validate_request,
};
use super::options::Options;

// The state machine's two halves, each an `impl Driver` of its own: reading (handshake
// response, frames, reassembly) and writing (commands, the output buffer).
mod inbound;
mod outbound;
#[cfg(test)]
mod pong_props;
mod shared;
#[cfg(test)]
mod testing;

pub use inbound::EAGER_RESERVE;
pub use outbound::OWNED_MIN;
pub(crate) use outbound::{check_sendable, cut_at_char_boundary};
pub use shared::Outgoing;

use inbound::{HEADER_START, PartialMessage, Stage};

/// Which end of the connection a driver plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts the upgrade; reads masked frames, writes unmasked ones.
    Server,
    /// Requests the upgrade; masks every frame it writes.
    Client,
}

/// The connection state, as the seed's `ready-state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadyState {
    /// Before the handshake completes. Sends are queued.
    Connecting,
    /// Messages flow both ways.
    Open,
    /// This side sent a close frame and waits for the peer's.
    Closing,
    /// The close handshake finished, failed, or the transport ended.
    Closed,
}

/// A received message: borrowed from the read buffer when it arrived as one frame in one
/// read, owned when it was reassembled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message, valid UTF-8.
    Text(Cow<'a, str>),
    /// A binary message.
    Binary(Cow<'a, [u8]>),
}

impl Message<'_> {
    /// The payload bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
        }
    }

    /// The text, if a text message.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Message::Text(t) => Some(t),
            Message::Binary(_) => None,
        }
    }

    /// Whether a text message.
    pub fn is_text(&self) -> bool {
        matches!(self, Message::Text(_))
    }

    /// Copies a borrowed payload so the message outlives the read buffer.
    pub fn into_owned(self) -> Message<'static> {
        match self {
            Message::Text(t) => Message::Text(Cow::Owned(t.into_owned())),
            Message::Binary(b) => Message::Binary(Cow::Owned(b.into_owned())),
        }
    }
}

/// What the driver reports, in order, from [`Driver::poll_event`].
#[derive(Debug)]
pub enum Event<'a> {
    /// The handshake completed; the connection is open.
    Open,
    /// A complete message.
    Message(Message<'a>),
    /// A ping arrived (a pong is already queued while open).
    Ping(Cow<'a, [u8]>),
    /// A pong arrived.
    Pong(Cow<'a, [u8]>),
    /// The peer broke the protocol or the handshake failed. A `Close` follows.
    Error(Error),
    /// The connection is closed. Reported exactly once. `code` is the peer's close code,
    /// the code this side failed the connection with, 1005 for a close frame without a
    /// code, or 1006 when the transport ended without a close handshake.
    Close {
        /// Close code.
        code: u16,
        /// Close reason (UTF-8, possibly empty).
        reason: String,
    },
}

/// What [`Driver::send`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageType {
    /// A text message (the bytes must be UTF-8).
    Text,
    /// A binary message.
    Binary,
    /// A ping (at most 125 bytes).
    Ping,
    /// An unsolicited pong (at most 125 bytes).
    Pong,
    /// A close frame with this code; the bytes are the reason (at most 123, UTF-8).
    Close(u16),
}

/// Identifies a send: it has reached the transport once [`Driver::is_sent`] says so.
/// Tokens of one driver are ordered like their sends, with one exception: a close while
/// still connecting drops the sends queued before it (they never report sent) and writes
/// nothing itself, so its token reports sent at once and may order before theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SendToken(u64);

#[derive(Debug)]
struct ClientHandshake {
    url: ClientUrl,
    request: Vec<u8>,
    expected_accept: String,
    offered: Vec<String>,
    deflate: Option<DeflateOptions>,
    parser: ResponseParser,
}

/// The body of a non-101 response, read so that the error reports the same body however
/// the reads fell: `want` bytes (its `Content-Length`, else up to the close), or a chunked
/// body decoded, at most [`REFUSED_BODY_MAX`].
#[derive(Debug)]
struct RefusedBody {
    status: u16,
    want: usize,
    body: Vec<u8>,
    /// With `Transfer-Encoding: chunked`: the bytes as they came, decoded into `body` as
    /// they arrive (at most [`REFUSED_CHUNKED_MAX`] of them).
    chunked: Option<Vec<u8>>,
}

/// How much of a refusing response's body the error keeps.
const REFUSED_BODY_MAX: usize = 1024;
/// How much of a chunked refusal the client reads for it (chunk sizes and extensions
/// included) before it reports what it decoded.
const REFUSED_CHUNKED_MAX: usize = 4 * REFUSED_BODY_MAX;

/// The opening handshake while it lasts (the driver holds `None` once it succeeded, so an
/// open connection keeps nothing of it).
#[derive(Debug)]
enum Handshake {
    /// Server: the 101 response, until `start_connection`.
    Server(Vec<u8>),
    /// Client: the request (until `start_connection`) and the response check.
    Client(ClientHandshake),
    /// Client: a non-101 response whose body is still arriving.
    Refused(RefusedBody),
    /// Client: the server's response was refused.
    Failed(HandshakeError),
}

/// One WebSocket connection, without IO.
///
/// Bytes read from the transport go in; events and bytes to write come out. The driver
/// reads no clock, opens nothing and never blocks, so it runs over any transport.
///
/// # Inputs
/// - [`Driver::poll_event`] with bytes read from the transport (and with an empty slice to
///   drain queued events);
/// - [`Driver::receive_eof`] when the transport ends (EOF or error);
/// - optionally, for large frames: [`Driver::lend_payload_buffer`] lends the buffer a data
///   message is reassembled in, the transport receives the rest of the frame straight into
///   it and gives it back with [`Driver::payload_received`] (no copy out of a read buffer;
///   [`Driver::payload_to_come`] says how much of the frame is still owed). The events are
///   the same as if those bytes had gone through [`Driver::poll_event`].
///
/// # Commands
/// [`Driver::start_connection`], [`Driver::send`], [`Driver::send_text`],
/// [`Driver::send_binary`], [`Driver::send_ping`], [`Driver::send_pong`],
/// [`Driver::close_connection`].
///
/// # Polled outputs
/// - events, from [`Driver::poll_event`];
/// - bytes to write, from [`Driver::pending_output`] + [`Driver::consume_output`] (zero-copy)
///   or [`Driver::poll_output`] (copies into the caller's buffer);
/// - [`Driver::is_finished`]: closed and everything written, so the transport may close.
///
/// # Call order
/// 1. Create with [`Driver::make_server`] (from a parsed request) or [`Driver::make_client`].
/// 2. [`Driver::start_connection`]: queues the 101 response (server, which is then open) or
///    the upgrade request (client). Until then [`Driver::poll_event`] reads nothing.
/// 3. Loop: write out [`Driver::pending_output`]; read from the transport; call
///    [`Driver::poll_event`] on the read bytes until it has consumed them all and returns no
///    event (an event may come with fewer bytes consumed: call again with the rest).
/// 4. When the transport ends, call [`Driver::receive_eof`] and drain the events.
/// 5. Stop when [`Driver::is_finished`]. A server closes the TCP connection then; a
///    client waits for the server to close it (with a timeout of its own).
#[derive(Debug)]
pub struct Driver {
    role: Role,
    state: ReadyState,
    max_length: usize,
    /// The subprotocol and extensions agreed on, if any (one box for both: most
    /// connections have neither).
    agreed: Option<Box<Negotiated>>,
    /// Boxed, and `None` once done: open connections hold nothing of it.
    handshake: Option<Box<Handshake>>,
    stage: Stage,
    /// Boxed: most connections have no message in progress most of the time.
    message: Option<Box<PartialMessage>>,
    out: Vec<u8>,
    out_pos: usize,
    /// Handshake bytes at `out[out_pos..]` not yet written; only these go out while connecting.
    /// (32 bits: the driver's own handshake is a few hundred bytes; this shares a word
    /// with the small fields.)
    handshake_left: u32,
    /// The driver's own frame bytes written (handed to the transport) so far: a position
    /// in its own byte stream that survives the buffer being compacted or handed over.
    /// The position after the last own byte queued is derived from it
    /// ([`Driver::frames_appended`]), not stored.
    frames_written: u64,
    /// Pub/sub frames queued by reference between the own frames in `out`.
    shared: Option<Box<shared::SharedQueue>>,
    /// Events queued around open, errors and close, and a control frame's payload split
    /// across reads; `None` (no allocation) when there are neither.
    occasional: Option<Box<Occasional>>,
    close_reported: bool,
    /// The peer's Close frame arrived: it sends nothing more (RFC 6455 §5.5.1).
    close_received: bool,
}

/// What a driver holds only now and then, in one box (freed once every part is empty),
/// so that an idle connection pays one pointer for them.
#[derive(Debug, Default)]
struct Occasional {
    /// Events queued around open, errors and close.
    events: VecDeque<Event<'static>>,
    /// A control frame's payload split across reads.
    control: Vec<u8>,
    /// The last automatic pong, queued behind other output, while it may still be unsent:
    /// where it starts in the count of own bytes appended, and its length (see
    /// `Driver::answer_ping`).
    pong: Option<(u64, u8)>,
}

impl Occasional {
    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.control.is_empty() && self.pong.is_none()
    }
}

/// What the opening handshake agreed on beyond RFC 6455.
#[derive(Debug)]
struct Negotiated {
    protocol: Option<Box<str>>,
    deflate: Option<DeflateState>,
}

impl Driver {
    fn new(role: Role, max_length: usize, handshake: Handshake) -> Driver {
        Driver {
            role,
            state: ReadyState::Connecting,
            max_length,
            agreed: None,
            handshake: Some(Box::new(handshake)),
            stage: HEADER_START,
            message: None,
            out: Vec::new(),
            out_pos: 0,
            handshake_left: 0,
            frames_written: 0,
            shared: None,
            occasional: None,
            close_reported: false,
            close_received: false,
        }
    }

    /// A server driver for a parsed upgrade request (the seed's `make-server`).
    ///
    /// Fails with [`Error::Handshake`] for a request that is not a valid upgrade; answer it
    /// with [`handshake::error_response`]. The subprotocol is the first one the client
    /// offers that `options.accept_protocols` holds. With [`Options::deflate`], the first
    /// permessage-deflate offer it can accept is agreed (RFC 7692).
    pub fn make_server(request: &Request, options: &Options) -> Result<Driver, Error> {
        options.validate()?;
        let accept = validate_request(request)?;
        let protocol = select_protocol(request, &options.accept_protocols);
        let agreed = options
            .deflate
            .as_ref()
            .and_then(|d| deflate::negotiate(request, d).map(|(p, header)| (p, header, d)));
        let response = server_response(
            &accept,
            protocol.as_deref(),
            agreed.as_ref().map(|(_, header, _)| header.as_str()),
            &options.additional_headers,
        );
        let mut driver = Driver::new(
            Role::Server,
            options.max_length,
            Handshake::Server(response),
        );
        let deflate = agreed.map(|(params, _, d)| DeflateState::new(params, Role::Server, d));
        driver.set_agreed(protocol, deflate);
        Ok(driver)
    }

    /// A client driver for a `ws://` or `wss://` URL (the seed's `make-client`). TLS, if
    /// any, is the transport's business; the URL sets `Host` and the request target.
    pub fn make_client(url: &str, options: &Options) -> Result<Driver, Error> {
        options.validate()?;
        let url = ClientUrl::parse(url)?;
        let key = generate_key();
        let offer = options.deflate.as_ref().map(DeflateOptions::offer);
        let request = client_request(
            &url,
            &key,
            &options.accept_protocols,
            offer.as_deref(),
            &options.additional_headers,
        );
        let hs = ClientHandshake {
            url,
            request,
            expected_accept: handshake::accept_key(&key),
            offered: options.accept_protocols.clone(),
            deflate: options.deflate.clone(),
            parser: ResponseParser::new(options.head_limits()),
        };
        Ok(Driver::new(
            Role::Client,
            options.max_length,
            Handshake::Client(hs),
        ))
    }

    /// Server or client.
    #[inline]
    pub fn role(&self) -> Role {
        self.role
    }

    /// Always `"hybi-13"` (RFC 6455).
    pub fn version(&self) -> &'static str {
        "hybi-13"
    }

    /// The agreed subprotocol, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.agreed.as_deref().and_then(|a| a.protocol.as_deref())
    }

    /// The agreed permessage-deflate parameters, if the extension is in use.
    pub fn deflate_params(&self) -> Option<DeflateParams> {
        self.deflate().map(DeflateState::params)
    }

    /// Whether this connection holds zlib streams between messages (only with context
    /// takeover, after its first compressed message): what an idle deflate connection
    /// costs beyond a plain one.
    pub fn holds_deflate_streams(&self) -> bool {
        self.deflate().is_some_and(DeflateState::holds_streams)
    }

    /// The largest message accepted ([`Options::max_length`](crate::Options::max_length)).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The connection state.
    #[inline]
    pub fn ready_state(&self) -> ReadyState {
        self.state
    }

    /// Whether the opening handshake completed (the connection was open at some point).
    pub fn is_handshake_complete(&self) -> bool {
        self.handshake.is_none() && self.state != ReadyState::Connecting
    }

    /// Why a client's opening handshake failed, if it did.
    pub fn handshake_error(&self) -> Option<&HandshakeError> {
        match self.handshake.as_deref() {
            Some(Handshake::Failed(e)) => Some(e),
            _ => None,
        }
    }

    /// The parsed URL of a client driver, until its handshake ends (`None` once open or
    /// failed, and for a server: the handshake's state is freed then).
    pub fn url(&self) -> Option<&ClientUrl> {
        match self.handshake.as_deref() {
            Some(Handshake::Client(hs)) => Some(&hs.url),
            _ => None,
        }
    }

    /// Sends the handshake: the 101 response (server, which opens the connection and
    /// queues [`Event::Open`]) or the upgrade request (client). Returns false if the driver
    /// is not connecting or was already started.
    pub fn start_connection(&mut self) -> bool {
        if self.state != ReadyState::Connecting {
            return false;
        }
        match self.handshake.as_deref_mut() {
            Some(Handshake::Server(response)) => {
                let response = std::mem::take(response);
                self.prepend_handshake(response);
                self.handshake = None;
                self.state = ReadyState::Open;
                self.queue_event(Event::Open);
                true
            }
            Some(Handshake::Client(hs)) if !hs.request.is_empty() => {
                let request = std::mem::take(&mut hs.request);
                self.prepend_handshake(request);
                true
            }
            _ => false,
        }
    }

    fn set_agreed(&mut self, protocol: Option<String>, deflate: Option<DeflateState>) {
        self.agreed = (protocol.is_some() || deflate.is_some()).then(|| {
            Box::new(Negotiated {
                protocol: protocol.map(String::into_boxed_str),
                deflate,
            })
        });
    }

    fn deflate(&self) -> Option<&DeflateState> {
        self.agreed.as_deref().and_then(|a| a.deflate.as_ref())
    }

    pub(super) fn deflate_mut(&mut self) -> Option<&mut DeflateState> {
        self.agreed.as_deref_mut().and_then(|a| a.deflate.as_mut())
    }

    /// Handshake bytes go before frames queued while connecting.
    fn prepend_handshake(&mut self, bytes: Vec<u8>) {
        // A head over 4 GiB (extra headers of that size) is refused by every peer anyway.
        self.handshake_left = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.out.splice(self.out_pos..self.out_pos, bytes);
    }

    fn stop(&mut self) {
        self.state = ReadyState::Closed;
        self.stage = Stage::Stopped;
        self.message = None;
        self.take_control();
        // No input is parsed and no message sent any more: the zlib streams go now, not
        // with the driver (a closed connection may wait a while to be dropped).
        if let Some(deflate) = self.deflate_mut() {
            deflate.stop_inflating();
            deflate.stop_compressing();
        }
    }

    fn occasional(&mut self) -> &mut Occasional {
        self.occasional.get_or_insert_with(Box::default)
    }

    /// Frees the occasional box once it holds nothing.
    fn release_occasional(&mut self) {
        if self.occasional.as_deref().is_some_and(Occasional::is_empty) {
            self.occasional = None;
        }
    }

    fn queue_event(&mut self, event: Event<'static>) {
        self.occasional().events.push_back(event);
    }

    /// Queues `event` before every queued one.
    fn queue_event_first(&mut self, event: Event<'static>) {
        self.occasional().events.push_front(event);
    }

    /// The next queued event; the queue is freed once empty, so an idle connection holds
    /// no allocation for it.
    fn next_queued(&mut self) -> Option<Event<'static>> {
        let event = self.occasional.as_deref_mut()?.events.pop_front();
        self.release_occasional();
        event
    }

    /// Keeps a piece of a control frame's payload until the rest arrives.
    fn keep_control(&mut self, piece: &[u8]) {
        self.occasional().control.extend_from_slice(piece);
    }

    /// The control frame's payload kept so far (empty if none), given up.
    fn take_control(&mut self) -> Vec<u8> {
        let Some(occasional) = self.occasional.as_deref_mut() else {
            return Vec::new();
        };
        let payload = std::mem::take(&mut occasional.control);
        self.release_occasional();
        payload
    }

    /// Whether events wait in the queue: without them and without input, `poll_event`
    /// has nothing to return, so a transport may skip the call.
    #[inline]
    pub(crate) fn has_queued_events(&self) -> bool {
        self.occasional
            .as_deref()
            .is_some_and(|o| !o.events.is_empty())
    }

    /// Whether the peer's Close frame arrived. A peer sends nothing after it, so a
    /// transport may close at once once its own output is written, without waiting for
    /// the peer's FIN first.
    pub(crate) fn close_received(&self) -> bool {
        self.close_received
    }

    /// Queues the `Close` event, the first time only.
    fn queue_close(&mut self, code: u16, reason: String) {
        if !self.close_reported {
            self.close_reported = true;
            self.queue_event(Event::Close { code, reason });
        }
    }
}
