//! The read side of [`WebSocketStream`]: the receive loop (write first, run the deadlines,
//! parse, read), events owned (`next`) or lent from the read buffer (`recv`), binary frames
//! that fit the read buffer read whole before the driver parses them (so they are lent, not
//! reassembled), and the rest of a larger frame received straight into its message's
//! buffer (so it is not copied out of the read buffer).

use std::borrow::Cow;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use ::tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use bytes::BufMut;

use super::write::{Reply, Sending};
use super::{COALESCE_MAX, Phase, WebSocketStream, now};
use crate::protocol::driver::{Event, Message, ReadyState};
use crate::protocol::frame::{MAX_HEADER_LEN, OpCode, Status, parse_header};
use crate::reactor::low_water::low_water_for;

/// What the receive loop found: an owned event, or a payload left in the read buffer
/// (kind, offset, length) for [`WebSocketStream::recv`] to lend out.
pub(super) enum Slot {
    Owned(Event<'static>),
    Borrowed(Payload, usize, usize),
    /// A whole text frame waits at `start`, not parsed yet: [`WebSocketStream::recv`]
    /// parses it itself, so the driver's checked `&str` is lent as it is (a range would
    /// have to be checked again to become text).
    WholeText,
}

#[derive(Clone, Copy)]
pub(super) enum Payload {
    Text,
    Binary,
    Ping,
    Pong,
}

/// Copies borrowed payloads so an event outlives the read buffer; a data message's copy
/// goes into `spare`'s allocation when there is one.
pub(super) fn owned(event: Event<'_>, spare: &mut Vec<u8>) -> Event<'static> {
    match event {
        Event::Open => Event::Open,
        Event::Message(Message::Binary(Cow::Borrowed(b))) => {
            let mut v = std::mem::take(spare);
            v.clear();
            v.extend_from_slice(b);
            Event::Message(Message::Binary(Cow::Owned(v)))
        }
        Event::Message(Message::Text(Cow::Borrowed(t))) => {
            let mut v = std::mem::take(spare);
            v.clear();
            // An empty buffer is valid UTF-8: nothing is validated twice.
            let mut s = String::from_utf8(v).unwrap_or_default();
            s.push_str(t);
            Event::Message(Message::Text(Cow::Owned(s)))
        }
        Event::Message(m) => Event::Message(m.into_owned()),
        Event::Ping(p) => Event::Ping(Cow::Owned(p.into_owned())),
        Event::Pong(p) => Event::Pong(Cow::Owned(p.into_owned())),
        Event::Error(e) => Event::Error(e),
        Event::Close { code, reason } => Event::Close { code, reason },
    }
}

/// After a `poll_event` on `buf[start..end]` that parsed `used` bytes: moves `start` past
/// them (both back to 0 once everything read is parsed) and notes whether the input ended
/// at a frame boundary (an event other than an error came out of it; an error stops the
/// driver). The input is those bytes, or with `payload_in` also what a payload receive put
/// in the message's buffer (a message it completes ends with its frame). Fields, not
/// `&mut self`: the event may still borrow the read buffer.
fn parsed(
    (start, end): (&mut usize, &mut usize),
    (at_frame, small_frames): (&mut bool, &mut u32),
    (used, payload_in): (usize, bool),
    event: Option<&Event<'_>>,
) {
    if used > 0 || payload_in {
        *at_frame = matches!(
            event,
            Some(Event::Open | Event::Message(_) | Event::Ping(_) | Event::Pong(_))
        );
        if event.is_some() {
            *small_frames = small_frames.saturating_add(1);
        }
    }
    *start += used;
    if *start == *end {
        *start = 0;
        *end = 0;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocketStream<S> {
    /// The next event, or `None` once the connection is over (after [`Event::Close`] and
    /// the end of the transport). Cancel-safe.
    pub async fn next(&mut self) -> Option<Event<'static>> {
        poll_fn(|cx| self.poll_next_event(cx)).await
    }

    /// Polls for the next event (what `Stream::poll_next` does).
    pub fn poll_next_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event<'static>>> {
        self.poll_next_slot(cx, false).map(|slot| {
            slot.map(|slot| match slot {
                Slot::Owned(event) => event,
                // Only asked for with `borrow`.
                Slot::Borrowed(..) | Slot::WholeText => {
                    unreachable!("an owned parse hands out no ranges")
                }
            })
        })
    }

    /// The next event borrowed from the read buffer (no copy of its payload; a message
    /// whose frame was too large to read whole there is lent from its own buffer), with a
    /// [`Reply`] to queue answers on; `None` once the connection is over. The fastest way
    /// to receive: an echo answers from the read buffer straight into the driver's output.
    /// Cancel-safe, like [`WebSocketStream::next`].
    ///
    /// Answers queued on the [`Reply`] go out once the events already read are handed out:
    /// the `recv` that finds no more of them in the read buffer writes everything queued,
    /// in one gathered write, before it reads (sooner once 64 KiB wait), so a peer that
    /// sends a burst gets one write back, not one per message. A task that awaits
    /// something slow between two `recv`s can call [`WebSocketStream::flush`] to send
    /// its answers first. They do not wait for backpressure:
    /// instead, `recv` parses no more input while the unwritten output is over
    /// [`Config::max_backpressure`](crate::tokio::Config::max_backpressure), so the peer is held back by TCP until it reads.
    ///
    /// ```no_run
    /// # async fn demo(mut ws: websocket_driver::tokio::WebSocketStream<tokio::net::TcpStream>)
    /// # -> Result<(), websocket_driver::Error> {
    /// use websocket_driver::Event;
    /// while let Some((event, mut reply)) = ws.recv().await {
    ///     if let Event::Message(message) = event {
    ///         reply.send_message(&message)?; // echo, without copying the message out
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn recv(&mut self) -> Option<(Event<'_>, Reply<'_, S>)> {
        let slot = poll_fn(|cx| self.poll_next_slot(cx, true)).await?;
        let event = match slot {
            Slot::WholeText => return Some(self.take_whole_text()),
            Slot::Owned(event) => event,
            Slot::Borrowed(kind, at, len) => {
                let payload = &self.buf[at..at + len];
                match kind {
                    Payload::Binary => Event::Message(Message::Binary(Cow::Borrowed(payload))),
                    Payload::Ping => Event::Ping(Cow::Borrowed(payload)),
                    Payload::Pong => Event::Pong(Cow::Borrowed(payload)),
                    Payload::Text => match simdutf8::basic::from_utf8(payload) {
                        Ok(text) => Event::Message(Message::Text(Cow::Borrowed(text))),
                        // The driver validated it: unreachable, but not worth a panic.
                        Err(_) => Event::Message(Message::Text(Cow::Owned(
                            String::from_utf8_lossy(payload).into_owned(),
                        ))),
                    },
                }
            }
        };
        let open = self.can_send();
        Some((
            event,
            Reply {
                sending: Sending {
                    io: &mut self.io,
                    driver: &mut self.driver,
                    outbox: &mut self.outbox,
                },
                open,
            },
        ))
    }

    /// The receive loop: write, run the deadlines, parse, read. With `borrow`, payloads
    /// in the read buffer are handed out as ranges of it.
    pub(super) fn poll_next_slot(
        &mut self,
        cx: &mut Context<'_>,
        borrow: bool,
    ) -> Poll<Option<Slot>> {
        loop {
            match self.phase {
                Phase::Done => return Poll::Ready(None),
                Phase::Ending(step) => {
                    ready!(self.poll_linger(cx, step));
                    // Done with the transport: what the linger did not get out never will.
                    self.phase = Phase::Done;
                    self.writing = false;
                    return Poll::Ready(None);
                }
                Phase::Open => {}
            }
            if let Some(event) = self.held.take() {
                return Poll::Ready(Some(Slot::Owned(event)));
            }
            self.poll_timers(cx);
            // Answers wait while the input already read holds more events: a whole read's
            // answers then go out in one gathered write, not one write each (a pipelining
            // peer's burst of small messages). Past `COALESCE_MAX`, or the limit, they go
            // first; and once the input runs out they go before the next read.
            // Events the driver queued itself (an idle close's, say) come out now, not after
            // the rest of a frame the read waits for.
            if self.unwritten() <= self.limit.min(COALESCE_MAX)
                && (self.frame_shortfall(borrow).is_none() || self.driver.has_queued_events())
                && let Some(slot) = self.parse(false, borrow)
            {
                if let Slot::Owned(ref event) = slot {
                    self.delivered(event, cx);
                }
                return Poll::Ready(Some(slot));
            }
            self.poll_write_best_effort(cx);
            self.note_state();
            // Over the limit, queued events still come out but no new input is parsed
            // until the peer takes some output (the write above registered for it).
            let over = self.hold_over_limit
                && self.writing
                && self.driver.ready_state() == ReadyState::Open
                && self.unwritten() > self.limit;
            if !over
                && self.reading
                && !self.eof_seen
                && let Some(want) = self.frame_shortfall(borrow)
            {
                // Read the rest of the frame before the driver sees it: then it is lent
                // (or copied) once, not reassembled piece by piece. A frame of at most a
                // read buffer: no mark may hold its last bytes back.
                if self.low_water.is_some() {
                    self.mark_low_water();
                }
                match self.poll_fill(cx, want) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => {
                        // The driver gets the cut-off frame first, then the EOF.
                        self.eof_seen = true;
                        self.at_frame = false;
                    }
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => self.transport_failed(e),
                }
                continue;
            }
            if let Some(slot) = self.parse(over, borrow) {
                if let Slot::Owned(ref event) = slot {
                    self.delivered(event, cx);
                }
                return Poll::Ready(Some(slot));
            }
            if over {
                return Poll::Pending;
            }
            if let Some(e) = self.write_failure.take() {
                // The input read before a write failed is parsed: now the failure.
                self.transport_failed(e);
                continue;
            }
            if !self.reading {
                // The driver saw the end of the transport and has nothing left to say.
                self.phase = Phase::Done;
                return Poll::Ready(None);
            }
            if self.eof_seen {
                self.reading = false;
                self.driver.receive_eof();
                continue;
            }
            if self.start == self.end && self.low_water.is_some() {
                self.mark_low_water();
            }
            if self.start == self.end
                && let Some((payload, room)) = self.driver.lend_payload_buffer(self.buf_size)
            {
                // The rest of a large frame goes straight into its message's buffer.
                match self.poll_payload(cx, payload, room) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => {
                        self.reading = false;
                        self.driver.receive_eof();
                    }
                    Poll::Ready(Ok(_)) => self.received(),
                    Poll::Ready(Err(e)) => self.transport_failed(e),
                }
                continue;
            }
            self.shrink_buffer();
            let mut read = ReadBuf::new(&mut self.buf);
            match Pin::new(&mut self.io).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        self.reading = false;
                        self.driver.receive_eof();
                    } else {
                        self.start = 0;
                        self.end = n;
                        self.received();
                    }
                }
                Poll::Ready(Err(e)) => self.transport_failed(e),
            }
        }
    }

    /// A whole, final, uncompressed text frame begins the unparsed input, at a frame
    /// boundary of an open connection with no event queued. The driver then answers it with
    /// one event from one `poll_event` (the text, or the error that fails the connection),
    /// which is what lets [`WebSocketStream::take_whole_text`] run that parse outside the poll.
    #[inline]
    fn whole_text_waits(&self) -> bool {
        const FIN_TEXT: u8 = 0x80 | OpCode::Text as u8;
        let input = &self.buf[self.start..self.end];
        if input.first() != Some(&FIN_TEXT)
            || !self.at_frame
            || self.driver.ready_state() != ReadyState::Open
            || self.driver.has_queued_events()
        {
            return false;
        }
        matches!(
            parse_header(input, 0),
            Ok(Status::Complete(header, len))
                if (len as u64).saturating_add(header.payload_len) <= input.len() as u64
        )
    }

    /// Parses the text frame [`Slot::WholeText`] found and lends its text with a [`Reply`].
    /// Only fields other than `buf` are touched once the text borrows it. Kept out of
    /// `recv`'s future, which every binary message goes through too.
    #[inline(never)]
    fn take_whole_text(&mut self) -> (Event<'_>, Reply<'_, S>) {
        let (used, event) = self.driver.poll_event(&mut self.buf[self.start..self.end]);
        parsed(
            (&mut self.start, &mut self.end),
            (&mut self.at_frame, &mut self.small_frames),
            (used, false),
            event.as_ref(),
        );
        let text = matches!(event, Some(Event::Message(_)));
        if !text && self.writing && self.outbox.len() == 0 {
            // The frame failed the connection: its close frame goes out now, as after an
            // error from any other parse (`buf` is lent, so not through `poll_write_out`:
            // one write, no waiting; the rest, or a failing write, is met on the next poll).
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let out = self.driver.pending_output();
            if let Poll::Ready(Ok(n)) = Pin::new(&mut self.io).poll_write(&mut cx, out) {
                self.driver.consume_output(n);
                self.flushed = false;
                self.progressed = true;
            }
        }
        let sending = Sending {
            io: &mut self.io,
            driver: &mut self.driver,
            outbox: &mut self.outbox,
        };
        let open = self.phase == Phase::Open
            && self.writing
            && sending.driver.ready_state() == ReadyState::Open;
        // `whole_text_waits` holds only where the driver answers at once (its unit test
        // `a_whole_text_frame_at_a_boundary_gives_an_event_at_once`).
        let event = event.expect("a whole frame at a frame boundary gives an event");
        (event, Reply { sending, open })
    }

    /// Raises or lowers the transport's receive low-water mark (see
    /// [`WebSocketStream::with_recv_low_water`]) to what the frame being received still
    /// owes. Only with every byte read parsed: the driver's count is then the socket's.
    #[inline]
    fn mark_low_water(&mut self) {
        let Some(set) = self.low_water else {
            return;
        };
        // Raised only while the frame's rest goes to the payload loan (at least a read
        // buffer's worth to come): a read into the read buffer may end the frame and start
        // the next, whose last few bytes must still wake the stream.
        let to_come = self.driver.payload_to_come();
        // Most reads come between small frames, with the mark left low: nothing to do.
        if !self.low_water_raised && to_come < self.buf_size as u64 {
            return;
        }
        self.set_low_water(set, to_come);
    }

    fn set_low_water(&mut self, set: fn(&S, usize) -> io::Result<()>, to_come: u64) {
        let mark = match self.timer_config.idle {
            None if to_come >= self.buf_size as u64 => low_water_for(to_come),
            _ => 1,
        };
        if (mark > 1) == self.low_water_raised {
            return;
        }
        // Not raised: the wake-ups stay as they were. Not lowered: tried again at the next
        // read.
        if set(&self.io, mark).is_ok() {
            self.low_water_raised = mark > 1;
        }
    }

    pub(super) fn received(&mut self) {
        if self.timer_config.idle.is_some() {
            self.timers.received(now(), &self.timer_config);
        }
    }

    /// At a frame boundary with part of a binary frame read: how many bytes (from `start`)
    /// the whole frame takes, if it is read whole into the read buffer (see
    /// [`WebSocketStream::whole_frame_max`]); `None` to let the driver parse (the frame is
    /// whole, too large, over the driver's `max_length`, not binary, or not a frame at all).
    /// A larger frame is the driver's from its header on, and the rest of its payload is
    /// received straight into its message's buffer ([`WebSocketStream::poll_payload`]).
    pub(super) fn frame_shortfall(&self, borrow: bool) -> Option<usize> {
        if !self.at_frame || self.start == self.end {
            return None;
        }
        let input = &self.buf[self.start..self.end];
        // Binary frames only: a text frame's UTF-8 is checked as it arrives, so a bad one
        // fails the connection before the rest of the frame comes (Autobahn 6.4.x).
        if input[0] & 0x0f != OpCode::Binary as u8 {
            return None;
        }
        let fits = self.whole_frame_max(borrow) as u64;
        match parse_header(input, 0b111) {
            Ok(Status::Complete(header, len)) => {
                let total = (len as u64).saturating_add(header.payload_len);
                // Not a frame the driver refuses: that fails the connection at its header,
                // without waiting for the rest.
                let accepted = header.payload_len <= self.driver.max_length() as u64;
                (accepted && total > input.len() as u64 && total <= fits).then_some(total as usize)
            }
            // The header's longest form must fit too, or the read could not complete it.
            Ok(Status::Partial) => (MAX_HEADER_LEN as u64 <= fits).then_some(MAX_HEADER_LEN),
            Err(_) => None,
        }
    }

    /// The largest frame (header included) read whole into the read buffer. For `recv`,
    /// which lends it from there, twice the buffer's size, the buffer growing for it (and
    /// shrinking back once 64 events in a row came without such a frame): a frame a little
    /// over the buffer's size would otherwise be copied almost whole, what its first read
    /// brought, into the message's buffer. For an owned message (`next`), which is copied
    /// out of the read buffer, only the buffer's size.
    fn whole_frame_max(&self, borrow: bool) -> usize {
        match borrow {
            true => self.buf_size.saturating_mul(2),
            false => self.buf_size,
        }
    }

    /// Reads more of a frame that begins at `start` into the read buffer, first moving it
    /// to the front if `want` bytes do not fit after `start`, and growing the buffer
    /// (once, zeroed) if they do not fit at all.
    pub(super) fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        if self.start + want > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if want > self.buf.len() {
                self.buf.resize(want, 0);
            }
        }
        if want > self.buf_size {
            self.small_frames = 0;
        }
        let mut read = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        self.end += n;
        if n > 0 {
            self.received();
        }
        Poll::Ready(Ok(n))
    }

    /// A buffer grown for a large frame goes back to its usual size once 64 events in a
    /// row came without another large frame.
    fn shrink_buffer(&mut self) {
        if self.small_frames >= 64 && self.buf.len() > self.buf_size && self.start == self.end {
            self.buf.truncate(self.buf_size);
            self.buf.shrink_to_fit();
        }
    }

    /// Receives more of the data frame the driver is in into `payload`, its message's
    /// buffer lent by the driver (at most `room` bytes), and gives the buffer back whatever
    /// the read did: a large message arrives where it will be handed out, unmasked (and text
    /// checked) piece by piece by the driver while each read's bytes are in cache, and is
    /// not copied out of the read buffer. The bytes read, 0 at the end of the transport.
    fn poll_payload(
        &mut self,
        cx: &mut Context<'_>,
        mut payload: Vec<u8>,
        room: usize,
    ) -> Poll<io::Result<usize>> {
        // `read_buf` appends to the spare capacity, which the loan guarantees, never past
        // the frame (`limit`). Its future holds no state between polls, so one made per
        // poll and dropped when pending loses nothing.
        let mut spare = BufMut::limit(&mut payload, room);
        let result = std::pin::pin!(self.io.read_buf(&mut spare)).poll(cx);
        let n = match &result {
            Poll::Ready(Ok(n)) => *n,
            _ => 0,
        };
        self.driver.payload_received(payload, n);
        self.payload_in |= n > 0;
        result
    }

    /// Parses up to one event: queued ones first, then (unless `queued_only`) the unparsed
    /// input. With `borrow`, a payload still in the read buffer comes out as its range.
    #[inline]
    pub(super) fn parse(&mut self, queued_only: bool, borrow: bool) -> Option<Slot> {
        // The receive loop asks after every write and read; most asks find nothing, and
        // are answered here, not in a call. A payload received into its message's buffer
        // may have completed a message, which the driver gives out for no input.
        if (queued_only || self.start == self.end)
            && !self.payload_in
            && !self.driver.has_queued_events()
        {
            return None;
        }
        self.parse_some(queued_only, borrow)
    }

    fn parse_some(&mut self, queued_only: bool, borrow: bool) -> Option<Slot> {
        let payload_in = std::mem::take(&mut self.payload_in);
        if borrow && !queued_only && self.whole_text_waits() {
            return Some(Slot::WholeText);
        }
        let input = if queued_only {
            &mut [][..]
        } else {
            &mut self.buf[self.start..self.end]
        };
        // Where the input lies in memory, to find a borrowed payload's offset in `buf`.
        let (lo, hi, start) = (
            input.as_ptr() as usize,
            input.as_ptr() as usize + input.len(),
            self.start,
        );
        let lent = |p: &[u8]| {
            let at = p.as_ptr() as usize;
            (borrow && !p.is_empty() && at >= lo && at + p.len() <= hi)
                .then(|| (at - lo + start, p.len()))
        };
        let (used, event) = self.driver.poll_event(input);
        parsed(
            (&mut self.start, &mut self.end),
            (&mut self.at_frame, &mut self.small_frames),
            (used, payload_in),
            event.as_ref(),
        );
        event.map(|e| {
            let kind = match &e {
                Event::Message(Message::Binary(Cow::Borrowed(p))) => {
                    lent(p).map(|r| (Payload::Binary, r))
                }
                Event::Message(Message::Text(Cow::Borrowed(t))) => {
                    lent(t.as_bytes()).map(|r| (Payload::Text, r))
                }
                Event::Ping(Cow::Borrowed(p)) => lent(p).map(|r| (Payload::Ping, r)),
                Event::Pong(Cow::Borrowed(p)) => lent(p).map(|r| (Payload::Pong, r)),
                _ => None,
            };
            match kind {
                Some((kind, (at, len))) => Slot::Borrowed(kind, at, len),
                None => Slot::Owned(owned(e, &mut self.spare)),
            }
        })
    }
}
