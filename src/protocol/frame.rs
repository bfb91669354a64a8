//! Frame headers (RFC 6455 §5.2): parsing and encoding.
//!
//! The parser follows httparse: it returns `Complete(header, length)` or `Partial` and
//! consumes nothing on partial input. Everything that can be judged from the bytes seen
//! so far is judged at once, so a bad frame is rejected before any payload is buffered.

use super::error::ProtocolError;

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    /// Continues a fragmented message.
    Continuation = 0x0,
    /// First frame of a text message.
    Text = 0x1,
    /// First frame of a binary message.
    Binary = 0x2,
    /// Close control frame.
    Close = 0x8,
    /// Ping control frame.
    Ping = 0x9,
    /// Pong control frame.
    Pong = 0xa,
}

impl OpCode {
    /// Decodes the low nibble of the first header byte.
    pub fn from_u8(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xa => OpCode::Pong,
            _ => return None,
        })
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Largest control frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Longest possible frame header: 2 + 8 (length) + 4 (mask).
pub const MAX_HEADER_LEN: usize = 14;

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Last frame of the message.
    pub fin: bool,
    /// RSV1..RSV3 as the top bits of a nibble (`0b100` = RSV1).
    pub rsv: u8,
    /// The frame type.
    pub opcode: OpCode,
    /// The masking key, if the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// Declared payload length.
    pub payload_len: u64,
}

/// Outcome of parsing input that may be incomplete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status<T> {
    /// Parsed; the `usize` is how many bytes it took.
    Complete(T, usize),
    /// More bytes are needed; nothing was consumed.
    Partial,
}

impl FrameHeader {
    /// Length of this header on the wire.
    pub fn encoded_len(&self) -> usize {
        header_len(self.payload_len, self.mask.is_some())
    }
}

/// Length of a header for a payload of `payload_len` bytes.
pub fn header_len(payload_len: u64, masked: bool) -> usize {
    let ext = match payload_len {
        0..=125 => 0,
        126..=0xffff => 2,
        _ => 8,
    };
    2 + ext + if masked { 4 } else { 0 }
}

/// Parses a frame header from the start of `buf`.
///
/// `allowed_rsv` holds the RSV bits an extension has claimed (0 without extensions).
// Inlined: its result then stays in registers; returned through memory it was read back
// before its stores had landed (a stall on every frame of a subscriber's small messages).
#[inline]
pub fn parse_header(buf: &[u8], allowed_rsv: u8) -> Result<Status<FrameHeader>, ProtocolError> {
    let Some(&b0) = buf.first() else {
        return Ok(Status::Partial);
    };
    let rsv = (b0 >> 4) & 0x7;
    if rsv & !allowed_rsv != 0 {
        return Err(ProtocolError::ReservedBits(rsv));
    }
    let opcode = OpCode::from_u8(b0 & 0xf).ok_or(ProtocolError::ReservedOpcode(b0 & 0xf))?;
    let fin = b0 & 0x80 != 0;
    if opcode.is_control() && !fin {
        return Err(ProtocolError::FragmentedControlFrame);
    }
    let Some(&b1) = buf.get(1) else {
        return Ok(Status::Partial);
    };
    let masked = b1 & 0x80 != 0;
    let short_len = b1 & 0x7f;
    if opcode.is_control() && short_len > MAX_CONTROL_PAYLOAD as u8 {
        return Err(ProtocolError::ControlFrameTooLong);
    }
    let (payload_len, mut at) = match short_len {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(Status::Partial);
            };
            (u16::from_be_bytes([b[0], b[1]]) as u64, 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(Status::Partial);
            };
            let len = u64::from_be_bytes(b.try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(ProtocolError::LengthTopBitSet);
            }
            (len, 10)
        }
        n => (n as u64, 2),
    };
    let mask = if masked {
        let Some(b) = buf.get(at..at + 4) else {
            return Ok(Status::Partial);
        };
        at += 4;
        Some([b[0], b[1], b[2], b[3]])
    } else {
        None
    };
    Ok(Status::Complete(
        FrameHeader {
            fin,
            rsv,
            opcode,
            mask,
            payload_len,
        },
        at,
    ))
}

/// Writes the header into `out` (at least [`MAX_HEADER_LEN`] bytes) and returns its length.
/// Uses the shortest length form, as RFC 6455 §5.2 requires.
pub fn encode_header(out: &mut [u8], header: &FrameHeader) -> usize {
    out[0] = (header.fin as u8) << 7 | (header.rsv & 7) << 4 | header.opcode as u8;
    let mask_bit = if header.mask.is_some() { 0x80 } else { 0 };
    let len = header.payload_len;
    let mut at = match len {
        0..=125 => {
            out[1] = mask_bit | len as u8;
            2
        }
        126..=0xffff => {
            out[1] = mask_bit | 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            out[1] = mask_bit | 127;
            out[2..10].copy_from_slice(&len.to_be_bytes());
            10
        }
    };
    if let Some(key) = header.mask {
        out[at..at + 4].copy_from_slice(&key);
        at += 4;
    }
    at
}

/// Appends the header of a whole (FIN) frame of `payload_len` bytes to `out`; returns its
/// length.
pub fn write_header(
    out: &mut Vec<u8>,
    opcode: OpCode,
    payload_len: usize,
    mask: Option<[u8; 4]>,
) -> usize {
    let header = FrameHeader {
        fin: true,
        rsv: 0,
        opcode,
        mask,
        payload_len: payload_len as u64,
    };
    let mut head = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut head, &header);
    out.extend_from_slice(&head[..n]);
    n
}

/// Appends a whole frame (header, then the payload masked with `mask` if given) to `out`.
pub fn write_frame(
    out: &mut Vec<u8>,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> usize {
    out.reserve(MAX_HEADER_LEN + payload.len());
    let n = write_header(out, opcode, payload.len(), mask);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        super::mask::apply_mask(&mut out[start..], key, 0);
    }
    n + payload.len()
}

/// A complete server frame (header + payload, unmasked), encoded once and shared by
/// reference: the unit of pub/sub fan-out. Server frames carry no mask, so one encoding
/// serves every subscriber; queueing it on a connection
/// ([`Driver::send_shared`](super::driver::Driver::send_shared)) clones a reference, never
/// the bytes.
///
/// # permessage-deflate
/// A frame also carries its compressed variants, one per server window size (9–15 bits;
/// 8 shares 9's), each made the first time a connection that negotiated
/// `server_no_context_takeover` with that window needs it, then shared like the plain
/// frame: a publish is compressed at most once per distinct window size, whatever the
/// number of subscribers, and by whichever thread first needs it (at the level of that
/// connection's options). A connection that keeps its context gets the payload compressed
/// on its own stream instead. [`SharedFrame::prepare_deflate`] makes a variant ahead of
/// time.
#[derive(Clone)]
pub struct SharedFrame {
    inner: std::sync::Arc<SharedInner>,
}

struct SharedInner {
    bytes: Box<[u8]>,
    header_len: u8,
    opcode: OpCode,
    /// Compressed variants by window bits − 9; `None` inside: compressing does not pay.
    deflated: [std::sync::OnceLock<Option<Box<[u8]>>>; 7],
}

impl SharedFrame {
    /// Encodes one unfragmented text or binary frame. Text must be UTF-8; other kinds are
    /// refused with [`UsageError::NotPublishable`](super::error::UsageError::NotPublishable).
    pub fn new(
        data: &[u8],
        kind: super::driver::MessageType,
    ) -> Result<SharedFrame, super::error::Error> {
        use super::driver::MessageType;
        use super::error::UsageError;
        let opcode = match kind {
            MessageType::Text => {
                simdutf8::basic::from_utf8(data).map_err(|_| UsageError::InvalidUtf8)?;
                OpCode::Text
            }
            MessageType::Binary => OpCode::Binary,
            _ => return Err(UsageError::NotPublishable.into()),
        };
        let header = FrameHeader {
            fin: true,
            rsv: 0,
            opcode,
            mask: None,
            payload_len: data.len() as u64,
        };
        let mut head = [0u8; MAX_HEADER_LEN];
        let n = encode_header(&mut head, &header);
        // One allocation of the exact size: a chain of slices has a trusted length.
        let bytes = head[..n].iter().chain(data).copied().collect();
        Ok(SharedFrame {
            inner: std::sync::Arc::new(SharedInner {
                bytes,
                header_len: n as u8,
                opcode,
                deflated: Default::default(),
            }),
        })
    }

    /// The frame as it goes on the wire (uncompressed).
    pub fn as_bytes(&self) -> &[u8] {
        &self.inner.bytes
    }

    /// The message itself, without the frame header.
    pub fn payload(&self) -> &[u8] {
        &self.inner.bytes[self.inner.header_len as usize..]
    }

    /// Header plus payload, in bytes (uncompressed).
    pub fn len(&self) -> usize {
        self.inner.bytes.len()
    }

    /// Never true: a frame has at least a two-byte header.
    pub fn is_empty(&self) -> bool {
        self.inner.bytes.is_empty()
    }

    pub(crate) fn opcode(&self) -> OpCode {
        self.inner.opcode
    }

    /// The frame compressed without context for a server window of `window_bits` (8–15)
    /// at `level` (0–9), made now unless it was already: the whole frame (RSV1 set) as it
    /// goes to every connection that agreed on `server_no_context_takeover` with that
    /// window. `None` when compressing does not make the message smaller (such
    /// connections get the plain frame). The level of whoever makes a variant first wins.
    pub fn prepare_deflate(&self, window_bits: u8, level: u32) -> Option<&[u8]> {
        let bits = window_bits.clamp(9, 15);
        self.inner.deflated[(bits - 9) as usize]
            .get_or_init(|| {
                super::deflate::compress_shared_frame(
                    self.inner.opcode,
                    self.payload(),
                    bits,
                    level.min(9),
                )
            })
            .as_deref()
    }

    /// Whether the variant for `window_bits` exists (made by a delivery or by
    /// [`SharedFrame::prepare_deflate`]): tells how often a publish was compressed.
    pub fn has_deflated(&self, window_bits: u8) -> bool {
        let bits = window_bits.clamp(9, 15);
        self.inner.deflated[(bits - 9) as usize].get().is_some()
    }
}

impl std::fmt::Debug for SharedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedFrame")
            .field("len", &self.inner.bytes.len())
            .finish()
    }
}

/// Consecutive published frames laid end to end once, for the subscribers that take them
/// all plain: a run of small publications costs each subscriber one queued part (and one
/// slice of a gathered write) instead of one per message, and the kernel copies one slice
/// instead of many. A loop makes one per run of publications to one topic
/// ([`RunPool::make`]); the frames themselves stay reachable for subscribers that must get
/// them one by one (permessage-deflate, or an output near its cap).
#[derive(Clone)]
pub(crate) struct FrameRun(std::sync::Arc<RunInner>);

#[derive(Default)]
struct RunInner {
    bytes: Vec<u8>,
    frames: Vec<SharedFrame>,
    max_payload: usize,
}

impl FrameRun {
    /// Every frame, end to end, as they go on the wire (uncompressed).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0.bytes
    }

    /// The frames it was made of, in order.
    pub(crate) fn frames(&self) -> &[SharedFrame] {
        &self.0.frames
    }

    /// The longest payload among its frames (what decides whether deflate applies).
    pub(crate) fn max_payload(&self) -> usize {
        self.0.max_payload
    }

    pub(crate) fn len(&self) -> usize {
        self.0.bytes.len()
    }
}

impl std::fmt::Debug for FrameRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameRun")
            .field("frames", &self.0.frames.len())
            .field("len", &self.0.bytes.len())
            .finish()
    }
}

/// A loop's runs, reused once every connection has written them (no other reference is
/// left), so that merging publications allocates nothing once warm. Keeps at most
/// [`RunPool::KEEP`]; a run still queued on a slow connection is not waited for (a new one
/// is made).
#[derive(Default)]
pub(crate) struct RunPool {
    runs: Vec<std::sync::Arc<RunInner>>,
}

impl RunPool {
    /// Runs kept for reuse. Each holds up to one run's bytes (the caller bounds a run's
    /// length) and its frames until it is reused.
    pub(crate) const KEEP: usize = 4;

    /// Lays `frames` end to end in a free run (or a new one).
    pub(crate) fn make(&mut self, frames: impl IntoIterator<Item = SharedFrame>) -> FrameRun {
        let free = self
            .runs
            .iter_mut()
            .position(|run| std::sync::Arc::get_mut(run).is_some());
        let mut run = match free {
            Some(at) => self.runs.swap_remove(at),
            None => std::sync::Arc::default(),
        };
        let inner = std::sync::Arc::get_mut(&mut run).expect("a free or new run");
        inner.bytes.clear();
        inner.frames.clear();
        inner.max_payload = 0;
        for frame in frames {
            inner.bytes.extend_from_slice(frame.as_bytes());
            inner.max_payload = inner.max_payload.max(frame.payload().len());
            inner.frames.push(frame);
        }
        if self.runs.len() < Self::KEEP {
            self.runs.push(run.clone());
        }
        FrameRun(run)
    }
}

/// A part of one connection's output queued by reference instead of copied in: a shared
/// frame (the plain bytes or a compressed variant), the payload of a message sent by
/// value, or a received message's payload sent back from the buffer it arrived in (for
/// the last two, the header is in the connection's own bytes, just before it).
#[derive(Debug)]
pub(crate) enum FrameRef {
    Shared {
        frame: SharedFrame,
        /// Window bits of the compressed variant; 0 for the plain frame.
        variant: u8,
    },
    Owned(Vec<u8>),
    /// Several shared frames, laid end to end once per loop.
    Run(FrameRun),
    /// `buf[start..start + len]`: a payload still in the receive buffer it arrived in,
    /// which the transport gave away (see `Driver::send_received`). `buf` is empty until
    /// the buffer is handed over, right after the read that queued it.
    Received {
        buf: Vec<u8>,
        start: usize,
        len: usize,
    },
}

impl FrameRef {
    pub(crate) fn plain(frame: &SharedFrame) -> FrameRef {
        FrameRef::Shared {
            frame: frame.clone(),
            variant: 0,
        }
    }

    /// The compressed variant for `bits` (already made).
    pub(crate) fn deflated(frame: &SharedFrame, bits: u8) -> FrameRef {
        FrameRef::Shared {
            frame: frame.clone(),
            variant: bits,
        }
    }

    /// Whether this is a message's own payload (which its send token waits for).
    pub(crate) fn is_owned(&self) -> bool {
        matches!(self, FrameRef::Owned(_) | FrameRef::Received { .. })
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            FrameRef::Owned(payload) => payload,
            FrameRef::Received { buf, start, len } => &buf[*start..*start + *len],
            FrameRef::Run(run) => run.as_bytes(),
            FrameRef::Shared { frame, variant: 0 } => frame.as_bytes(),
            FrameRef::Shared { frame, variant } => {
                match frame.inner.deflated[(variant - 9) as usize].get() {
                    Some(Some(bytes)) => bytes,
                    _ => frame.as_bytes(),
                }
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            // Counted before its buffer is handed over.
            FrameRef::Received { len, .. } => *len,
            _ => self.as_bytes().len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shared(text: &str) -> SharedFrame {
        SharedFrame::new(text.as_bytes(), crate::protocol::driver::MessageType::Text).unwrap()
    }

    #[test]
    fn a_run_lays_its_frames_end_to_end() {
        let frames = [shared("a"), shared("bcd"), shared("")];
        let run = RunPool::default().make(frames.clone());
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.as_bytes().to_vec()).collect();
        assert_eq!(run.as_bytes(), expected);
        assert_eq!(run.len(), expected.len());
        assert_eq!(run.max_payload(), 3);
        assert_eq!(run.frames().len(), 3);
        assert!(
            run.frames()
                .iter()
                .zip(&frames)
                .all(|(a, b)| std::ptr::eq(a.as_bytes(), b.as_bytes())),
            "the frames themselves, by reference"
        );
    }

    #[test]
    fn a_run_is_reused_once_nothing_else_holds_it() {
        let mut pool = RunPool::default();
        let first = pool.make([shared("one"), shared("two")]);
        let at = first.as_bytes().as_ptr();
        // Still held (queued on a connection): a new run.
        let second = pool.make([shared("three"), shared("four")]);
        assert!(!std::ptr::eq(second.as_bytes().as_ptr(), at));
        drop(first);
        // Written everywhere: its buffer is reused, with the old frames replaced.
        let third = pool.make([shared("five"), shared("six")]);
        assert!(std::ptr::eq(third.as_bytes().as_ptr(), at));
        assert_eq!(third.frames().len(), 2);
        assert_eq!(&third.frames()[0].payload(), b"five");
        assert_eq!(third.max_payload(), 4);
        // The pool keeps at most KEEP runs, however many are out.
        let held: Vec<FrameRun> = (0..RunPool::KEEP + 3)
            .map(|_| pool.make([shared("x"), shared("y")]))
            .collect();
        assert_eq!(pool.runs.len(), RunPool::KEEP);
        drop((held, second, third));
        let reused = pool.make([shared("z"), shared("w")]);
        assert!(
            pool.runs
                .iter()
                .any(|r| std::ptr::eq(r.bytes.as_ptr(), reused.as_bytes().as_ptr()))
        );
    }

    #[test]
    fn fast_websocket_vectors() {
        let mut out = Vec::new();
        write_frame(&mut out, OpCode::Text, b"hi", None);
        assert_eq!(out, [129, 2, 104, 105]);
        out.clear();
        write_frame(&mut out, OpCode::Text, b"hi", Some([186, 43, 99, 37]));
        assert_eq!(out, [129, 130, 186, 43, 99, 37, 210, 66]);
        out.clear();
        write_frame(&mut out, OpCode::Close, &[3, 232, b'b', b'y', b'e'], None);
        assert_eq!(out, [136, 5, 3, 232, 98, 121, 101]);
        for (len, total) in [
            (124, 126),
            (125, 127),
            (126, 130),
            (65534, 65538),
            (65535, 65539),
            (65536, 65546),
        ] {
            out.clear();
            assert_eq!(
                write_frame(&mut out, OpCode::Text, &vec![b'a'; len], None),
                total
            );
            assert_eq!(out.len(), total);
        }
    }

    #[test]
    fn rejections_need_only_the_bytes_that_show_them() {
        assert_eq!(
            parse_header(&[0xc1], 0),
            Err(ProtocolError::ReservedBits(4))
        );
        assert_eq!(
            parse_header(&[0xa1], 0),
            Err(ProtocolError::ReservedBits(2))
        );
        assert_eq!(
            parse_header(&[0x83], 0),
            Err(ProtocolError::ReservedOpcode(3))
        );
        assert_eq!(
            parse_header(&[0x8b], 0),
            Err(ProtocolError::ReservedOpcode(0xb))
        );
        assert_eq!(
            parse_header(&[0x09], 0),
            Err(ProtocolError::FragmentedControlFrame)
        );
        assert_eq!(
            parse_header(&[0x89, 126], 0),
            Err(ProtocolError::ControlFrameTooLong)
        );
        let mut huge = vec![0x82, 0xff];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(parse_header(&huge, 0), Err(ProtocolError::LengthTopBitSet));
        // RSV1 is fine once an extension claims it.
        assert!(matches!(
            parse_header(&[0xc1, 0], 4),
            Ok(Status::Complete(_, 2))
        ));
    }

    #[test]
    fn partial_consumes_nothing() {
        let mut frame = Vec::new();
        write_frame(&mut frame, OpCode::Binary, &[7; 70000], Some([1, 2, 3, 4]));
        for cut in 0..14 {
            assert_eq!(
                parse_header(&frame[..cut], 0),
                Ok(Status::Partial),
                "cut {cut}"
            );
        }
        assert!(
            matches!(parse_header(&frame, 0), Ok(Status::Complete(h, 14)) if h.payload_len == 70000)
        );
    }

    fn any_header() -> impl Strategy<Value = FrameHeader> {
        let opcode = prop_oneof![
            Just(OpCode::Continuation),
            Just(OpCode::Text),
            Just(OpCode::Binary),
            Just(OpCode::Close),
            Just(OpCode::Ping),
            Just(OpCode::Pong)
        ];
        let len = prop_oneof![
            0u64..=125,
            Just(126u64),
            Just(127),
            Just(65535),
            Just(65536),
            Just((1 << 32) - 1),
            Just((1 << 32) + 1),
            0u64..(1 << 63)
        ];
        (
            any::<bool>(),
            opcode,
            proptest::option::of(any::<[u8; 4]>()),
            len,
        )
            .prop_map(|(fin, opcode, mask, len)| {
                let control = opcode.is_control();
                FrameHeader {
                    fin: fin || control,
                    rsv: 0,
                    opcode,
                    mask,
                    payload_len: if control { len % 126 } else { len },
                }
            })
    }

    proptest! {
        #[test]
        fn encode_parse_round_trip(header in any_header()) {
            let mut buf = [0u8; MAX_HEADER_LEN];
            let n = encode_header(&mut buf, &header);
            prop_assert_eq!(n, header.encoded_len());
            prop_assert_eq!(parse_header(&buf[..n], 0), Ok(Status::Complete(header, n)));
            for cut in 0..n {
                prop_assert_eq!(parse_header(&buf[..cut], 0), Ok(Status::Partial));
            }
        }
    }
}
