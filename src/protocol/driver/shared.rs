//! Parts queued by reference in a driver's output: pub/sub frames shared between
//! connections and the payloads of messages sent by value
//! ([`Driver::send_message_owned`]), between the driver's own bytes; the gathered view a
//! readiness transport writes with one `writev`, and the owned batch ([`Outgoing`]) a
//! completion transport hands to the kernel.
//!
//! The driver's own frames live in its output buffer; a queued part is recorded with the
//! number of own frame bytes appended before it (`after`), so the output is, in order:
//! own bytes up to the first part, that part, own bytes up to the next one, …
//! (a payload sent by value follows its header, the last own bytes before it).
//! Positions are counted in the own byte stream (`Driver::frames_appended` / `frames_written`),
//! which survives the buffer being compacted or handed over.

use std::collections::VecDeque;
use std::io::IoSlice;

use super::{Driver, ReadyState, Role};
use crate::protocol::error::{Error, UsageError};
use crate::protocol::frame::{FrameRef, FrameRun, SharedFrame, header_len};

/// Shared frames waiting in one driver's output. Boxed in the driver and kept once made,
/// so a subscriber's deliveries allocate nothing after its first.
#[derive(Debug, Default)]
pub(super) struct SharedQueue {
    frames: VecDeque<Queued>,
    /// Bytes of `frames[0]` already written.
    pos: usize,
    /// Unwritten bytes of all queued frames.
    bytes: usize,
    /// The receive buffer of a reply sent in place and written since (readiness
    /// transports), until [`Driver::reclaim_received`] takes it; empty otherwise.
    spent: Vec<u8>,
}

#[derive(Debug)]
struct Queued {
    /// Own frame bytes appended before this frame (`Driver::frames_appended` then).
    after: u64,
    frame: FrameRef,
}

impl SharedQueue {
    /// Unwritten bytes of all queued frames.
    #[inline]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many own bytes came before the last queued frame (none queued: `None`).
    pub(super) fn last_after(&self) -> Option<u64> {
        self.frames.back().map(|queued| queued.after)
    }
}

/// Output handed over whole, for completion transports (io_uring) that give the kernel
/// buffers it holds until the send completes: the driver's own bytes and the parts that go
/// between them (shared frames by reference, payloads sent by value by ownership). Reuse one (after [`Outgoing::clear`]) to
/// keep its buffers.
#[derive(Debug, Default)]
pub struct Outgoing {
    own: Vec<u8>,
    /// `(offset in own, frame)`: the frame goes before `own[offset..]`.
    frames: Vec<(usize, FrameRef)>,
    /// Bytes of the first frame written before the hand-over (it is at offset 0 then).
    skip: usize,
    len: usize,
}

impl Outgoing {
    /// Total bytes to send.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether it holds any shared frame (else [`Outgoing::own`] is everything).
    pub fn has_frames(&self) -> bool {
        !self.frames.is_empty()
    }

    /// The driver's own bytes (all of the output when there are no shared frames).
    pub fn own(&self) -> &[u8] {
        &self.own
    }

    /// Plain bytes to send (a response, a tunnel request): replaces the contents.
    pub fn set_bytes(&mut self, bytes: &[u8]) {
        self.clear();
        self.own.extend_from_slice(bytes);
        self.len = bytes.len();
    }

    /// Makes `bytes` the whole batch without copying; returns the batch's previous buffer,
    /// emptied, for reuse.
    pub fn set_own(&mut self, bytes: Vec<u8>) -> Vec<u8> {
        self.clear();
        self.len = bytes.len();
        std::mem::replace(&mut self.own, bytes)
    }

    /// Calls `f` with each part left after the first `sent` bytes, in order.
    pub fn parts<'a>(&'a self, sent: usize, mut f: impl FnMut(&'a [u8])) {
        let mut skip = sent;
        let mut own_at = 0;
        let mut part = |bytes: &'a [u8]| {
            if skip >= bytes.len() {
                skip -= bytes.len();
            } else {
                f(&bytes[skip..]);
                skip = 0;
            }
        };
        for (i, (offset, frame)) in self.frames.iter().enumerate() {
            part(&self.own[own_at..*offset]);
            own_at = *offset;
            let start = if i == 0 { self.skip } else { 0 };
            part(&frame.as_bytes()[start..]);
        }
        part(&self.own[own_at..]);
    }

    /// The parts left after the first `sent` bytes, in order, into `out` (cleared first).
    pub fn slices<'a>(&'a self, sent: usize, out: &mut Vec<IoSlice<'a>>) {
        out.clear();
        self.parts(sent, |part| out.push(IoSlice::new(part)));
    }

    /// Drops the own bytes' copy of the header of each payload sent in place, whose receive
    /// buffer holds it just before the payload (put there by `Driver::hand_received`, where
    /// the received frame's header was), so that header and payload leave as one part:
    /// an echo's batch is then a single buffer, sent without an iovec.
    fn join_received_headers(&mut self) {
        let mut moved = 0;
        for (i, (offset, frame)) in self.frames.iter_mut().enumerate() {
            *offset -= moved;
            let FrameRef::Received { buf, start, len } = frame else {
                continue;
            };
            let h = header_len(*len as u64, false);
            // The header is the `h` own bytes just before the payload (`send_received`
            // writes it and queues the part at once); fewer than `h` are left when some
            // were written already, and then it stays where it is, as does the header of
            // a part partly written (`skip`).
            if buf.is_empty() || *start < h || *offset < h || (i == 0 && self.skip > 0) {
                continue;
            }
            // `Driver::hand_received` already copied the header there (it was wholly
            // unwritten then too): only the own bytes' copy goes.
            debug_assert_eq!(buf[*start - h..*start], self.own[*offset - h..*offset]);
            self.own.drain(*offset - h..*offset);
            *offset -= h;
            *start -= h;
            *len += h;
            moved += h;
        }
    }

    /// The whole batch when it is one contiguous part (own bytes alone, or one part with
    /// no own bytes), after the first `sent` bytes; `None` when it takes a gathered write.
    pub fn single_part(&self, sent: usize) -> Option<&[u8]> {
        match &self.frames[..] {
            [] => Some(&self.own[sent..]),
            [(0, frame)] if self.own.is_empty() => Some(&frame.as_bytes()[self.skip + sent..]),
            _ => None,
        }
    }

    /// Takes out the receive buffers of the payloads sent from them in place (see
    /// `Driver::send_received`), for the transport to receive into again: call once the
    /// send ended, before [`Outgoing::clear`].
    pub(crate) fn take_received(&mut self, mut f: impl FnMut(Vec<u8>)) {
        for (_, frame) in &mut self.frames {
            if let FrameRef::Received { buf, .. } = frame
                && !buf.is_empty()
            {
                f(std::mem::take(buf));
            }
        }
    }

    /// Empties it, dropping its frame references and keeping its buffers.
    pub fn clear(&mut self) {
        self.own.clear();
        self.frames.clear();
        self.skip = 0;
        self.len = 0;
    }

    /// Bytes the own-bytes buffer keeps allocated.
    pub fn own_capacity(&self) -> usize {
        self.own.capacity()
    }
}

impl Driver {
    /// Queues a shared frame (pub/sub) behind everything queued so far, by reference.
    /// Only on an open server connection: a client must mask each frame itself
    /// ([`UsageError::NotPublishable`]), and a closing one takes no more messages
    /// ([`UsageError::NotOpen`]).
    ///
    /// With permessage-deflate agreed without server context takeover, the frame's
    /// compressed variant for this connection's window goes out (made on first need and
    /// then shared, see [`SharedFrame`]); with context takeover, the payload is compressed
    /// on this connection's own stream into its own output. Messages under the deflate
    /// threshold, or that do not shrink, go plain.
    pub fn send_shared(&mut self, frame: &SharedFrame) -> Result<(), Error> {
        if self.role != Role::Server {
            return Err(UsageError::NotPublishable.into());
        }
        if self.state != ReadyState::Open {
            return Err(UsageError::NotOpen.into());
        }
        let queued = match self.deflate() {
            Some(d) if frame.payload().len() >= d.threshold() => {
                if !d.own_no_context_takeover() {
                    self.push_data(frame.opcode(), frame.payload());
                    return Ok(());
                }
                let bits = d.own_window_bits();
                match frame.prepare_deflate(bits, d.level()) {
                    Some(_) => FrameRef::deflated(frame, bits),
                    None => FrameRef::plain(frame),
                }
            }
            _ => FrameRef::plain(frame),
        };
        self.queue_part(queued);
        Ok(())
    }

    /// Queues a run of shared frames as one part, by reference, when this connection
    /// takes every frame in it plain; returns `Ok(false)`, queueing nothing, when
    /// permessage-deflate applies to one of them (the caller sends them one by one with
    /// [`Driver::send_shared`]). Refused as [`Driver::send_shared`] refuses.
    pub(crate) fn send_shared_run(&mut self, run: &FrameRun) -> Result<bool, Error> {
        if self.role != Role::Server {
            return Err(UsageError::NotPublishable.into());
        }
        if self.state != ReadyState::Open {
            return Err(UsageError::NotOpen.into());
        }
        if self
            .deflate()
            .is_some_and(|d| run.max_payload() >= d.threshold())
        {
            return Ok(false);
        }
        self.queue_part(FrameRef::Run(run.clone()));
        Ok(true)
    }

    /// Queues `part` by reference behind everything queued so far.
    pub(super) fn queue_part(&mut self, part: FrameRef) {
        let after = self.frames_appended();
        let queue = self.shared.get_or_insert_with(Box::default);
        queue.bytes += part.len();
        queue.frames.push_back(Queued { after, frame: part });
    }

    /// Hands over the receive buffer a [`Driver::send_received`] of the same read refers
    /// to. Returns it when no queued part waits for it (the driver refused the reply).
    pub(crate) fn hand_received(&mut self, mut buffer: Vec<u8>) -> Option<Vec<u8>> {
        let waiting = self.shared.as_deref().and_then(|queue| {
            queue
                .frames
                .iter()
                .enumerate()
                .rev()
                .find_map(|(i, queued)| match &queued.frame {
                    FrameRef::Received { buf, start, len } if buf.is_empty() => {
                        Some((i, queued.after, *start, *len))
                    }
                    _ => None,
                })
        });
        let Some((index, after, start, len)) = waiting else {
            return Some(buffer);
        };
        assert!(start + len <= buffer.len(), "the payload is in the buffer");
        // The header also goes in front of the payload, where the client's longer one was
        // (parsed by now), so that a gathered write can take header and payload as one
        // slice (`pending_output_vectored`). The own bytes keep their copy (the header is
        // the last own bytes before the part): the stream and its accounting do not change.
        let h = header_len(len as u64, false);
        let header_end = self.out_pos + self.own_before(after);
        if start >= h && header_end >= self.out_pos + h {
            buffer[start - h..start].copy_from_slice(&self.out[header_end - h..header_end]);
        }
        let queue = self.shared.as_deref_mut().expect("a part is queued");
        if let FrameRef::Received { buf, .. } = &mut queue.frames[index].frame {
            *buf = buffer;
        }
        None
    }

    /// Whether the next part to write is a message's owned payload queued at own-byte
    /// position `at` (its header ends there, so the message is not yet written).
    pub(super) fn owned_part_at(&self, at: u64) -> bool {
        self.shared
            .as_deref()
            .and_then(|q| q.frames.front())
            .is_some_and(|f| f.after == at && f.frame.is_owned())
    }

    /// Own bytes between the write position and the point where a shared frame recorded
    /// at `after` goes.
    fn own_before(&self, after: u64) -> usize {
        self.handshake_left as usize + (after - self.frames_written) as usize
    }

    /// The first shared frame and the own bytes before it, if any frame is queued.
    fn next_shared(&self) -> Option<(usize, &[u8])> {
        let queue = self.shared.as_deref()?;
        let front = queue.frames.front()?;
        Some((
            self.own_before(front.after),
            &front.frame.as_bytes()[queue.pos..],
        ))
    }

    /// Bytes ready for the transport, without copying: the first contiguous part of the
    /// output (own bytes, or a shared frame). Report what was written with
    /// [`Driver::consume_output`]; [`Driver::pending_output_vectored`] gives every part.
    pub fn pending_output(&self) -> &[u8] {
        match self.next_shared() {
            Some((0, frame)) => frame,
            Some((own, _)) => &self.out[self.out_pos..self.out_pos + own],
            None => &self.out[self.out_pos..self.releasable_end()],
        }
    }

    /// Every part of the pending output in order, as slices for one vectored write (up to
    /// `parts.len()` of them); returns how many were filled.
    pub fn pending_output_vectored<'a>(&'a self, parts: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let mut own_at = self.out_pos;
        if let Some(queue) = self.shared.as_deref() {
            for (i, queued) in queue.frames.iter().enumerate() {
                let mut own_end = self.out_pos + self.own_before(queued.after);
                let first = if i == 0 { queue.pos } else { 0 };
                // A reply in place whose header `hand_received` copied in front of its
                // payload: header and payload as one slice (an echo is then one plain
                // send), its own bytes' copy of the header skipped.
                let joined = match &queued.frame {
                    FrameRef::Received { buf, start, len } if !buf.is_empty() && first == 0 => {
                        let h = header_len(*len as u64, false);
                        (*start >= h && own_end >= own_at + h).then(|| {
                            own_end -= h;
                            &buf[*start - h..*start + *len]
                        })
                    }
                    _ => None,
                };
                if own_end > own_at {
                    if n == parts.len() {
                        return n;
                    }
                    parts[n] = IoSlice::new(&self.out[own_at..own_end]);
                    n += 1;
                    own_at = own_end;
                }
                if n == parts.len() {
                    return n;
                }
                parts[n] = IoSlice::new(match joined {
                    Some(frame) => {
                        own_at = own_end + frame.len() - queued.frame.len();
                        frame
                    }
                    None => &queued.frame.as_bytes()[first..],
                });
                n += 1;
            }
        }
        let end = self.releasable_end();
        if end > own_at && n < parts.len() {
            parts[n] = IoSlice::new(&self.out[own_at..end]);
            n += 1;
        }
        n
    }

    /// Marks the first `n` bytes of the pending output as written.
    pub fn consume_output(&mut self, mut n: usize) {
        while n > 0 {
            let Some((own, frame_left)) = self.next_shared().map(|(own, f)| (own, f.len())) else {
                return self.consume_own(n);
            };
            let k = n.min(own);
            if k > 0 {
                self.consume_own(k);
                n -= k;
                continue;
            }
            let k = n.min(frame_left);
            let queue = self.shared.as_deref_mut().expect("a frame is queued");
            queue.pos += k;
            queue.bytes -= k;
            n -= k;
            if k == frame_left {
                let written = queue.frames.pop_front().expect("a frame is queued");
                queue.pos = 0;
                if let FrameRef::Received { buf, .. } = written.frame
                    && !buf.is_empty()
                {
                    queue.spent = buf;
                }
            }
        }
    }

    /// Takes back the receive buffer a reply sent in place holds (see
    /// [`Driver::send_received`]), for a readiness transport that reads into it again right
    /// after its write: as it is once the reply is written; with the reply still queued
    /// (the socket took only part of it), after copying what is left of the payload into
    /// an owned part of its own, as if it had been sent by value. `None` when no such
    /// buffer is held.
    pub(crate) fn reclaim_received(&mut self) -> Option<Vec<u8>> {
        let queue = self.shared.as_deref_mut()?;
        if !queue.spent.is_empty() {
            return Some(std::mem::take(&mut queue.spent));
        }
        let pos = &mut queue.pos;
        queue
            .frames
            .iter_mut()
            .enumerate()
            .find_map(|(i, queued)| match &mut queued.frame {
                FrameRef::Received { buf, start, len } if !buf.is_empty() => {
                    // Only the unwritten rest (a part written in part is the first, `pos`
                    // bytes in).
                    let written = if i == 0 { std::mem::take(pos) } else { 0 };
                    let rest = buf[*start + written..*start + *len].to_vec();
                    let buf = std::mem::take(buf);
                    queued.frame = FrameRef::Owned(rest);
                    Some(buf)
                }
                _ => None,
            })
    }

    /// Hands all pending output over as an [`Outgoing`] batch, for completion-based
    /// transports (io_uring) where the kernel holds the bytes until the send completes.
    /// `into` must be empty; its own-bytes buffer becomes the driver's next output buffer
    /// (a pool's spare). The bytes count as written (for [`Driver::is_sent`]) from this
    /// moment. Returns false, leaving `into` empty, when nothing is pending.
    pub fn take_output(&mut self, into: &mut Outgoing) -> bool {
        into.clear();
        let end = self.releasable_end();
        let own = end - self.out_pos;
        let shared = self.shared.as_deref().map_or(0, SharedQueue::bytes);
        if own + shared == 0 {
            return false;
        }
        if end < self.out.len() {
            // Still connecting: only the handshake may go, frames stay queued behind it
            // (and no shared frame can be queued yet).
            into.own.extend_from_slice(&self.out[self.out_pos..end]);
            into.len = own;
            self.consume_own(own);
            return true;
        }
        let mut received = false;
        if let Some(queue) = self.shared.as_deref_mut() {
            for queued in queue.frames.drain(..) {
                let offset =
                    self.handshake_left as usize + (queued.after - self.frames_written) as usize;
                received |= matches!(queued.frame, FrameRef::Received { .. });
                into.frames.push((offset, queued.frame));
            }
            into.skip = queue.pos;
            queue.pos = 0;
            queue.bytes = 0;
        }
        std::mem::swap(&mut self.out, &mut into.own);
        into.own.drain(..self.out_pos);
        into.len = own + shared;
        // A second pass over the parts only for a batch with an in-place reply in it
        // (a fan-out's batches, which can hold many parts, have none).
        if received {
            into.join_received_headers();
        }
        self.out_pos = 0;
        let handshake = own.min(self.handshake_left as usize);
        self.handshake_left -= handshake as u32;
        self.frames_written += (own - handshake) as u64;
        // Everything counts as written: a pong recorded as unsent no longer is.
        if self.occasional.is_some() {
            self.forget_pong();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::driver::MessageType;
    use crate::protocol::driver::testing::open_server_with;
    use crate::protocol::options::Options;

    /// An open server driver whose 101 response is already written.
    fn open_server() -> Driver {
        open_server_with(&Options::default(), "").0
    }

    fn frame(text: &str) -> SharedFrame {
        SharedFrame::new(text.as_bytes(), MessageType::Text).unwrap()
    }

    /// Everything pending, gathered.
    fn gathered(driver: &Driver) -> Vec<u8> {
        let mut parts = [IoSlice::new(&[]); 16];
        let n = driver.pending_output_vectored(&mut parts);
        parts[..n].iter().flat_map(|p| p.iter().copied()).collect()
    }

    /// The pending output is `expected`, gathered and counted, and written one byte at a
    /// time through the contiguous view it is the same stream.
    fn assert_pending(driver: &mut Driver, expected: &[u8]) {
        assert_eq!(gathered(driver), expected);
        assert_eq!(driver.buffered_amount(), expected.len());
        let mut written = Vec::new();
        while !driver.pending_output().is_empty() {
            written.push(driver.pending_output()[0]);
            driver.consume_output(1);
        }
        assert_eq!(written, expected);
        assert_eq!(driver.buffered_amount(), 0);
    }

    #[test]
    fn shared_frames_go_between_own_frames_in_queue_order() {
        let mut driver = open_server();
        driver.send_text("a").unwrap();
        driver.send_shared(&frame("S1")).unwrap();
        driver.send_shared(&frame("S2")).unwrap();
        driver.send_text("b").unwrap();
        let expected = [
            &[0x81, 1, b'a'][..],
            &[0x81, 2, b'S', b'1'],
            &[0x81, 2, b'S', b'2'],
            &[0x81, 1, b'b'],
        ]
        .concat();
        assert_pending(&mut driver, &expected);
    }

    #[test]
    fn partial_writes_across_parts_resume_mid_frame() {
        let mut driver = open_server();
        driver.send_shared(&frame("hello")).unwrap();
        driver.send_binary(&[9; 3]).unwrap();
        driver.send_shared(&frame("world")).unwrap();
        let all = gathered(&driver);
        for cut in [3, 4, 9, 10] {
            let mut d = open_server();
            d.send_shared(&frame("hello")).unwrap();
            d.send_binary(&[9; 3]).unwrap();
            d.send_shared(&frame("world")).unwrap();
            d.consume_output(cut);
            assert_eq!(gathered(&d), all[cut..], "cut at {cut}");
            assert_eq!(d.buffered_amount(), all.len() - cut);
        }
    }

    #[test]
    fn write_tokens_count_own_frames_only() {
        let mut driver = open_server();
        driver.send_shared(&frame("first")).unwrap();
        let token = driver.send_text("mine").unwrap();
        assert!(!driver.is_sent(token));
        // The shared frame (7 bytes) goes first; the token is due after the own frame.
        driver.consume_output(7);
        assert!(!driver.is_sent(token));
        driver.consume_output(6);
        assert!(driver.is_sent(token));
    }

    /// A token falls due with the last byte of its frame however the output goes out:
    /// behind the handshake response that was put before it, in pieces, across the
    /// compaction of a large buffer, and handed over whole. (The position a token names
    /// is derived from what is written and what waits, so each of these must keep it.)
    #[test]
    fn tokens_fall_due_with_the_last_byte_of_their_frame() {
        use crate::protocol::driver::testing::server_before_start;
        let mut driver = server_before_start(&Options::default(), "");
        let early = driver.send_text("early").unwrap();
        driver.start_connection();
        let response = driver.handshake_left as usize;
        let next = driver.send_text("next").unwrap();
        assert_eq!(driver.pending_output().len(), response + 7 + 6);
        driver.consume_output(response);
        assert!(!driver.is_sent(early), "the response is out, not the frame");
        driver.consume_output(6);
        assert!(!driver.is_sent(early), "one byte short");
        driver.consume_output(1);
        assert!(driver.is_sent(early));
        assert!(!driver.is_sent(next));
        driver.consume_output(6);
        assert!(driver.is_sent(next));

        let big = driver.send_binary(&vec![1; 100_000]).unwrap();
        let small = driver.send_binary(b"x").unwrap();
        let total = driver.pending_output().len();
        assert_eq!(total, 10 + 100_000 + 3);
        driver.consume_output(80_000);
        assert_eq!(driver.out_pos, 0, "compacted: the written part is dropped");
        assert!(!driver.is_sent(big));
        driver.consume_output(total - 80_000 - 4);
        assert!(!driver.is_sent(big), "one byte short");
        driver.consume_output(1);
        assert!(driver.is_sent(big));
        assert!(!driver.is_sent(small));

        let last = driver.send_text("last").unwrap();
        let mut out = Outgoing::default();
        assert!(driver.take_output(&mut out));
        assert_eq!(out.len(), 3 + 6);
        assert!(driver.is_sent(small) && driver.is_sent(last));
        let after = driver.send_text("after").unwrap();
        assert!(!driver.is_sent(after));
        driver.consume_output(7);
        assert!(driver.is_sent(after));
    }

    #[test]
    fn take_output_hands_over_frames_by_reference() {
        let mut driver = open_server();
        let shared = frame("x");
        driver.send_text("a").unwrap();
        driver.send_shared(&shared).unwrap();
        driver.send_text("b").unwrap();
        let expected = gathered(&driver);
        let mut out = Outgoing::default();
        assert!(driver.take_output(&mut out));
        assert!(out.has_frames());
        assert_eq!(out.len(), expected.len());
        assert_eq!(driver.buffered_amount(), 0);
        let mut slices = Vec::new();
        for sent in 0..expected.len() {
            out.slices(sent, &mut slices);
            let bytes: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            assert_eq!(bytes, expected[sent..]);
        }
        // The frame itself was not copied: the batch holds the same allocation.
        assert!(
            out.frames
                .iter()
                .any(|(_, f)| std::ptr::eq(f.as_bytes().as_ptr(), shared.as_bytes().as_ptr()))
        );
        out.clear();
        assert!(!driver.take_output(&mut out));
    }

    /// A received payload queued with `send_received` goes out from the very buffer it
    /// was received in, between the frames sent before and after it, and its token is due
    /// only once it is written; the buffer comes back out of the batch for the transport.
    #[test]
    fn a_received_payload_is_sent_from_its_buffer_in_place() {
        let mut driver = open_server();
        let mut buffer = vec![0u8; 64];
        buffer[10..15].copy_from_slice(b"hello");
        let address = buffer.as_ptr() as usize;
        driver.send_text("a").unwrap();
        let token = driver
            .send_received(crate::protocol::frame::OpCode::Text, 10, 5)
            .expect("an open server sends in place");
        driver.send_text("b").unwrap();
        assert_eq!(
            driver.buffered_amount(),
            3 + 7 + 3,
            "counted before the hand-over"
        );
        assert!(
            driver.hand_received(buffer).is_none(),
            "taken by the queued reply"
        );
        let expected = [&[0x81, 1, b'a'][..], &[0x81, 5], b"hello", &[0x81, 1, b'b']].concat();
        let mut out = Outgoing::default();
        assert!(driver.take_output(&mut out));
        assert!(driver.is_sent(token), "handed over whole");
        let mut slices = Vec::new();
        out.slices(0, &mut slices);
        let bytes: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(bytes, expected);
        assert!(
            slices
                .iter()
                .any(|s| s.as_ptr() as usize == address + 8 && s.len() == 7),
            "the payload is not copied; its header moved in front of it"
        );
        assert!(out.single_part(0).is_none(), "three parts");
        let mut back = Vec::new();
        out.take_received(|buffer| back.push(buffer));
        assert_eq!(back.len(), 1);
        assert_eq!(
            back[0].as_ptr() as usize,
            address,
            "the same allocation returns"
        );
        assert_eq!(back[0].len(), 64);
    }

    /// An echo's batch is its header and payload in the receive buffer, one part; where
    /// the receive buffer has no room before the payload the header stays in the own
    /// bytes and the batch is gathered.
    #[test]
    fn an_echo_in_place_is_one_part() {
        use crate::protocol::frame::OpCode;
        let mut driver = open_server();
        let mut buffer = vec![0u8; 300];
        buffer[8..208].fill(b'x');
        driver.send_received(OpCode::Binary, 8, 200).unwrap();
        assert!(driver.hand_received(buffer).is_none());
        let mut out = Outgoing::default();
        assert!(driver.take_output(&mut out));
        let expected = [&[0x82, 126, 0, 200][..], &[b'x'; 200]].concat();
        assert_eq!(out.single_part(0), Some(&expected[..]));
        assert_eq!(out.single_part(5), Some(&expected[5..]));
        assert_eq!(out.len(), 204);

        let mut driver = open_server();
        driver.send_received(OpCode::Binary, 1, 200).unwrap();
        assert!(driver.hand_received(vec![b'y'; 201]).is_none());
        assert!(driver.take_output(&mut out));
        assert!(out.single_part(0).is_none(), "header and payload apart");
        let mut slices = Vec::new();
        out.slices(0, &mut slices);
        let bytes: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(bytes, [&[0x82, 126, 0, 200][..], &[b'y'; 200]].concat());
    }

    /// Through the gathered view (epoll) too: the header is copied in front of the
    /// payload at hand-over, so an echo is one slice in the receive buffer, and frames
    /// before it stay apart; once part of the header is written, the two are apart again.
    #[test]
    fn an_echo_in_place_is_one_slice_when_gathered() {
        use crate::protocol::frame::OpCode;
        let slices = |driver: &Driver| {
            let mut parts = [IoSlice::new(&[]); 8];
            let n = driver.pending_output_vectored(&mut parts);
            parts[..n]
                .iter()
                .map(|p| (p.as_ptr() as usize, p.len()))
                .collect::<Vec<_>>()
        };
        let received = || {
            let mut buffer = vec![0u8; 300];
            buffer[8..208].fill(b'x');
            buffer
        };
        let expected = [&[0x82, 126, 0, 200][..], &[b'x'; 200]].concat();

        let mut driver = open_server();
        let buffer = received();
        let address = buffer.as_ptr() as usize;
        driver.send_received(OpCode::Binary, 8, 200).unwrap();
        assert!(driver.hand_received(buffer).is_none());
        assert_eq!(slices(&driver), [(address + 4, 204)]);
        assert_eq!(gathered(&driver), expected);
        driver.consume_output(2);
        assert_eq!(
            slices(&driver).len(),
            2,
            "the header's rest, then the payload"
        );
        assert_eq!(gathered(&driver), expected[2..]);

        let mut driver = open_server();
        let buffer = received();
        let address = buffer.as_ptr() as usize;
        driver.send_text("a").unwrap();
        driver.send_received(OpCode::Binary, 8, 200).unwrap();
        assert!(driver.hand_received(buffer).is_none());
        driver.send_text("b").unwrap();
        let parts = slices(&driver);
        assert_eq!(parts.len(), 3);
        assert_eq!(
            (parts[0].1, parts[1], parts[2].1),
            (3, (address + 4, 204), 3)
        );
        let all = [&[0x81, 1, b'a'][..], &expected, &[0x81, 1, b'b']].concat();
        assert_eq!(gathered(&driver), all);
        assert_pending(&mut driver, &all);
    }

    /// Through the readiness view too, and written a byte at a time: the token waits for
    /// the payload, not only its header.
    #[test]
    fn a_received_payload_token_waits_for_the_payload() {
        let mut driver = open_server();
        let token = driver
            .send_received(crate::protocol::frame::OpCode::Binary, 0, 3)
            .unwrap();
        assert!(driver.hand_received(vec![7, 8, 9, 0]).is_none());
        driver.consume_output(2);
        assert!(!driver.is_sent(token), "only the header is out");
        assert_eq!(gathered(&driver), [7, 8, 9]);
        driver.consume_output(3);
        assert!(driver.is_sent(token));
    }

    /// A readiness transport takes its read buffer back after each write: the very
    /// allocation, once the reply is written; with part of the reply unwritten, after the
    /// payload was copied into the output, which then still gives exactly the rest, in
    /// order, and the token still waits for it.
    #[test]
    fn a_received_buffer_comes_back_written_or_not() {
        use crate::protocol::frame::OpCode;
        let payload: Vec<u8> = (0..200u8).collect();
        let received = |start: usize| {
            let mut buffer = vec![0u8; 1024];
            buffer[start..start + 200].copy_from_slice(&payload);
            buffer
        };
        let header = [0x82, 126, 0, 200];

        // Written whole (header, payload and the frame behind it).
        let mut driver = open_server();
        let buffer = received(8);
        let address = buffer.as_ptr();
        let token = driver.send_received(OpCode::Binary, 8, 200).unwrap();
        assert!(driver.hand_received(buffer).is_none());
        driver.send_text("z").unwrap();
        assert_eq!(
            gathered(&driver),
            [&header[..], &payload, &[0x81, 1, b'z']].concat()
        );
        driver.consume_output(4 + 200 + 3);
        assert!(driver.is_sent(token));
        let back = driver
            .reclaim_received()
            .expect("the written reply's buffer");
        assert_eq!((back.as_ptr(), back.len()), (address, 1024));
        assert!(driver.reclaim_received().is_none(), "given back once");

        // Written in part, at every point: before the header ends, inside the payload.
        for written in [0, 3, 4, 5, 150, 203] {
            let mut driver = open_server();
            let buffer = received(100);
            let address = buffer.as_ptr();
            let token = driver.send_received(OpCode::Binary, 100, 200).unwrap();
            assert!(driver.hand_received(buffer).is_none());
            driver.send_text("z").unwrap();
            driver.consume_output(written);
            let mut back = driver
                .reclaim_received()
                .expect("the buffer, copied out of");
            assert_eq!((back.as_ptr(), back.len()), (address, 1024), "{written}");
            back.fill(0xEE); // Read into again: the output must not see it.
            let expected = [&header[..], &payload, &[0x81, 1, b'z']].concat();
            assert_eq!(gathered(&driver), expected[written..], "{written}");
            assert!(!driver.is_sent(token));
            assert_eq!(driver.buffered_amount(), expected.len() - written);
            assert!(driver.reclaim_received().is_none(), "{written}");
            driver.consume_output(4 + 200 - written);
            assert!(driver.is_sent(token), "{written}");
        }

        // Nothing sent in place: nothing to give back.
        let mut driver = open_server();
        driver.send_binary(&payload).unwrap();
        driver.consume_output(204);
        assert!(driver.reclaim_received().is_none());
    }

    /// Only an open server connection without permessage-deflate sends in place (a
    /// client masks, deflate compresses); a buffer no queued reply waits for comes back.
    #[test]
    fn only_open_servers_send_in_place() {
        use crate::protocol::frame::OpCode;
        let mut closing = open_server();
        closing.close_connection(1000, "").unwrap();
        assert!(closing.send_received(OpCode::Binary, 0, 1).is_none());
        assert_eq!(closing.hand_received(vec![1]), Some(vec![1]));

        let mut client = Driver::make_client("ws://example.com/", &Options::default()).unwrap();
        assert!(client.send_received(OpCode::Binary, 0, 1).is_none());

        let mut deflating = open_deflate_server(0);
        assert!(deflating.send_received(OpCode::Binary, 0, 1).is_none());
        assert_eq!(deflating.hand_received(vec![2]), Some(vec![2]));

        // Queued before an abort, the reply still goes, ahead of the abort's close.
        let mut aborted = open_server();
        aborted.send_received(OpCode::Binary, 0, 1).unwrap();
        aborted.abort(1011, "gone");
        assert_eq!(aborted.hand_received(vec![5]), None);
        assert_eq!(gathered(&aborted)[..3], [0x82, 1, 5]);
    }

    #[test]
    fn take_output_after_a_partial_frame_write() {
        let mut driver = open_server();
        driver.send_shared(&frame("abcdef")).unwrap();
        driver.consume_output(3);
        let mut out = Outgoing::default();
        assert!(driver.take_output(&mut out));
        let mut slices = Vec::new();
        out.slices(0, &mut slices);
        let bytes: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(bytes, b"bcdef");
    }

    #[test]
    fn shared_frames_only_on_open_server_connections() {
        let mut driver = open_server();
        driver.close_connection(1000, "").unwrap();
        assert!(matches!(
            driver.send_shared(&frame("late")),
            Err(Error::Usage(UsageError::NotOpen))
        ));
        let mut client = Driver::make_client("ws://example.com/", &Options::default()).unwrap();
        assert!(matches!(
            client.send_shared(&frame("masked?")),
            Err(Error::Usage(UsageError::NotPublishable))
        ));
    }

    /// An open server driver that agreed on permessage-deflate (messages of at least
    /// `threshold` bytes are compressed).
    fn open_deflate_server(threshold: usize) -> Driver {
        use crate::protocol::deflate::DeflateOptions;
        let options = Options::default().deflate_options(DeflateOptions {
            threshold,
            ..DeflateOptions::default()
        });
        let (driver, response) =
            open_server_with(&options, "Sec-WebSocket-Extensions: permessage-deflate\r\n");
        assert!(response.contains("permessage-deflate"), "deflate agreed");
        driver
    }

    #[test]
    fn a_run_is_queued_as_one_part_between_own_frames() {
        let mut pool = crate::protocol::frame::RunPool::default();
        let run = pool.make([frame("S1"), frame("S22"), frame("S333")]);
        let mut driver = open_server();
        driver.send_text("a").unwrap();
        assert!(driver.send_shared_run(&run).unwrap());
        driver.send_text("b").unwrap();
        let mut parts = [IoSlice::new(&[]); 16];
        let n = driver.pending_output_vectored(&mut parts);
        assert_eq!(n, 3, "own bytes, the run, own bytes");
        assert_eq!(&*parts[1], run.as_bytes());
        let expected = [
            &[0x81, 1, b'a'][..],
            &[0x81, 2, b'S', b'1'],
            &[0x81, 3, b'S', b'2', b'2'],
            &[0x81, 4, b'S', b'3', b'3', b'3'],
            &[0x81, 1, b'b'],
        ]
        .concat();
        // Also written across the run's frame boundaries.
        assert_pending(&mut driver, &expected);
    }

    #[test]
    fn a_run_is_refused_where_deflate_applies_to_one_of_its_frames() {
        let mut pool = crate::protocol::frame::RunPool::default();
        // Payloads of 2, 3 and 4 bytes: the longest decides.
        let run = pool.make([frame("S1"), frame("S22"), frame("S333")]);
        // At the threshold, deflate applies to the last frame: one by one, nothing queued.
        let mut driver = open_deflate_server(4);
        assert!(!driver.send_shared_run(&run).unwrap());
        assert_eq!(driver.buffered_amount(), 0);
        // One byte over every payload: the run goes plain, as one part.
        let mut driver = open_deflate_server(5);
        assert!(driver.send_shared_run(&run).unwrap());
        assert_eq!(gathered(&driver), run.as_bytes());
        // Refused like a single shared frame on a closing or client connection.
        let mut driver = open_server();
        driver.close_connection(1000, "").unwrap();
        assert!(matches!(
            driver.send_shared_run(&run),
            Err(Error::Usage(UsageError::NotOpen))
        ));
        let mut client = Driver::make_client("ws://example.com/", &Options::default()).unwrap();
        assert!(matches!(
            client.send_shared_run(&run),
            Err(Error::Usage(UsageError::NotPublishable))
        ));
    }

    #[test]
    fn take_output_hands_over_a_run_by_reference() {
        let mut pool = crate::protocol::frame::RunPool::default();
        let run = pool.make([frame("x"), frame("yz")]);
        let mut driver = open_server();
        driver.send_shared_run(&run).unwrap();
        driver.send_text("b").unwrap();
        let expected = gathered(&driver);
        let mut out = Outgoing::default();
        assert!(driver.take_output(&mut out));
        let mut slices = Vec::new();
        out.slices(0, &mut slices);
        assert_eq!(slices.len(), 2);
        assert!(std::ptr::eq(slices[0].as_ptr(), run.as_bytes().as_ptr()));
        let bytes: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn shared_frame_validates_its_kind() {
        assert!(SharedFrame::new(&[0xff], MessageType::Text).is_err());
        assert!(SharedFrame::new(b"x", MessageType::Ping).is_err());
        let big = vec![7u8; 70_000];
        let f = SharedFrame::new(&big, MessageType::Binary).unwrap();
        assert_eq!(&f.as_bytes()[..2], &[0x82, 127]);
        assert_eq!(f.len(), 10 + big.len());
    }
}
