//! The io_uring backend: multishot accept, multishot recv into a provided-buffer ring, one
//! send in flight per connection, everything submitted with one `io_uring_enter` per loop
//! turn (plus non-waiting ones when more completed receives are pending than one wait runs
//! and the turn's input is still small: see `Ring::run_pending`, `DRAIN_BYTES` and
//! `DRAIN_RECEIVES`).
//!
//! A turn's completions are handled in batches of one enter's worth (~20 receives), each
//! handing its receive buffers back before the next enter, so a small ring (`BUF_COUNT`)
//! serves every turn and the kernel keeps receiving into memory the cache still holds.
//!
//! Operations name a connection's socket by its slot in the ring's table of registered
//! files (slot = slab key, for the first `SOCKET_SLOTS` keys), so the kernel skips the
//! descriptor lookup; past the table they use the descriptor. A slot is filled and emptied
//! by updates queued in the ring ahead of the operations that use it, not by syscalls of
//! their own.
//!
//! A receive's buffer goes to the session by `&mut Vec`: a message of at least half a
//! buffer that a handler sends back while it is delivered takes the buffer with it (the
//! driver queues the payload by ownership, see `Service::read_lendable`), so the reply is
//! sent from where the kernel received it instead of being copied into the output; the
//! slot takes a buffer back from an earlier such send, and the send's completion gives
//! this one back (`BufRing::give_back`).
//!
//! A large frame's rest (`PAYLOAD_MIN` or more still to come) goes straight into its
//! message's buffer: the multishot receive that would take it into provided buffers is
//! cancelled (`make_way_for_payload`), and once it has ended `rearm_receives` arms a
//! receive into the buffer the session lends (`Ring::recv_payload`, which owns it until its
//! completion; one such receive per 256 KiB piece, so each piece is unmasked while it is in
//! cache), then one single receive into the ring (`Ring::recv_once`) to see the next
//! frame's header, then the multishot receive again.
//!
//! The multishot accept takes the whole listen backlog at once; a turn sets up at most
//! `ACCEPTS_PER_TURN` of what it brought, and past `ACCEPT_QUEUE_MAX` waiting the accept
//! is cancelled and armed again at half, so a flood of connects waits in the kernel's
//! backlog (as on epoll) instead of in descriptors the loop holds.
//!
//! A connection that closes cancels its receive, empties its slot, and stays in the core's
//! slab, holding its socket, until its last operation completed; only then is the socket
//! closed and the slab key (and slot) reused. All `unsafe` lives in [`ring`]; this module is
//! safe code over its API.

#[allow(unsafe_code)]
mod ring;

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use ring::probe;
use ring::{BufRing, Completion, Op, Ring, SendBatch, SocketRef};

use super::core::{Backend, Core, Output, Written};
use super::{KeepBudget, Service, Waker};

const RING_ENTRIES: u32 = 4096;
/// Accepted connections registered per turn (see `Uring::accepted`).
const ACCEPTS_PER_TURN: usize = 64;
/// Accepted connections held unregistered before the loop stops accepting (it cancels the
/// multishot accept): further connections wait in the kernel's listen backlog, as they do
/// on epoll, which accepts only what a turn registers. So a flood of connects to a busy
/// loop takes neither descriptors nor memory past this. One run of the multishot accept
/// drains the whole backlog before the cancel lands, so the queue can pass this by up to
/// one backlog. The loop accepts again once the queue is down to half.
const ACCEPT_QUEUE_MAX: usize = 1024;

/// With `queued` accepted connections waiting to be set up, stop accepting.
fn accept_queue_full(queued: usize) -> bool {
    queued >= ACCEPT_QUEUE_MAX
}

/// With `queued` accepted connections waiting to be set up, accept (again).
fn accept_queue_has_room(queued: usize) -> bool {
    queued <= ACCEPT_QUEUE_MAX / 2
}

/// Completions handled per batch within a turn (48 bytes each).
const REAP_BATCH: usize = 256;
/// Provided buffers per loop: 32 × 32 KiB, 1 MiB. The kernel hands them out in ring order,
/// so a receive lands where one last landed 32 receives earlier: at 16 KiB messages 512 KiB
/// of data, still in the core's L2 cache when the kernel copies into it and the session
/// unmasks and answers it. With 128 (4 MiB), each receive landed where one last landed
/// 2 MiB earlier, and the kernel's copy into the buffer (`_copy_to_iter`) took 11–12 % of
/// a 500 × 16 KiB echo's samples, against 8–9 % now and epoll's 7 % (epoll reads into one
/// 64 KiB buffer). An enter usually runs ~20 receives, but can run more than 32 (broadcast
/// 100: about 2 receives a turn end on `ENOBUFS`); those are re-armed within the turn (see
/// `Uring::wait`), so they cost a re-arm, not a turn. 16 buffers ran out 0.3 times per
/// echoed message; 64 never did, and did no better.
const BUF_COUNT: u16 = 32;
/// Bytes received in a turn past which the receives still pending wait for the next turn
/// (see `Uring::wait`): a quarter of a typical 1 MiB L2 cache.
const DRAIN_BYTES: usize = 256 * 1024;
/// Receives a turn takes in before the rest wait for the next turn: as many sockets'
/// input as epoll takes per wait. A broadcast round of 500 messages took four turns when
/// the bound was five enters (~120 receives), so each subscriber got about four sends a
/// round against epoll's two.
const DRAIN_RECEIVES: usize = super::INPUTS_PER_TURN;
/// Non-waiting enters a turn makes at most for receives its wait left pending (see
/// `Ring::run_pending`); each runs about 20.
const DRAIN_ENTERS: usize = 64;
/// Whether a turn that has taken in `bytes` over `receives` receives and made `enters`
/// non-waiting enters runs the receives still pending (else they wait for the next turn).
fn drains_more(bytes: usize, receives: usize, enters: usize) -> bool {
    bytes < DRAIN_BYTES && receives < DRAIN_RECEIVES && enters < DRAIN_ENTERS
}

/// Bytes of a frame still to come from which they are received straight into the
/// message's buffer (`Ring::recv_payload`) instead of into provided buffers and copied
/// from there: 4 of them. Switching costs a cancel and its completion, then the payload
/// receive and the multishot receive's re-arm.
const PAYLOAD_MIN: usize = 128 * 1024;
/// A payload receive completes once this much has arrived (or the rest of the frame, when
/// less than `PAYLOAD_MIN` would be left after it): the session unmasks each piece as it
/// completes, while it is in cache, and only the last piece's unmask follows the frame's
/// last byte. One completion for the whole rest of a 1 MiB frame left all of its unmask
/// there, on cold bytes (io_uring 9 % fewer msgs/s than with these pieces at 1 × 1 MiB).
const PAYLOAD_PIECE: usize = 256 * 1024;

/// When a loop busy-polls before it sleeps: every time while polls find work; after a
/// poll that found none, it skips the next 1, 3, 7, … 63 waits, so a loop whose work comes
/// further apart than the poll lasts (a lightly loaded server) rarely spins.
#[derive(Debug, Default)]
struct SpinBackoff {
    skip: u32,
    misses: u32,
}

impl SpinBackoff {
    /// Whether this wait polls first.
    fn due(&mut self) -> bool {
        if self.skip == 0 {
            return true;
        }
        self.skip -= 1;
        false
    }

    /// Notes whether a poll found work.
    fn note(&mut self, found: bool) {
        if found {
            self.misses = 0;
        } else {
            self.misses = (self.misses + 1).min(6);
            self.skip = (1 << self.misses) - 1;
        }
    }
}

/// How much of a lent payload buffer's `room` one payload receive takes.
fn payload_piece(room: usize) -> usize {
    if room < PAYLOAD_PIECE + PAYLOAD_MIN {
        room
    } else {
        PAYLOAD_PIECE
    }
}

/// 32 KiB: a 16 KiB message with its header fits one buffer, so it is parsed in place
/// instead of being reassembled from two receives. (Buffers the kernel fills a receive at
/// a time, `IOU_PBUF_RING_INC`, were tried: 8 × 64 KiB gave the same CPU per message, but
/// a quarter of 16 KiB frames then straddle two buffers, and each such frame costs the
/// session a reassembly copy and two allocations.)
const BUF_SIZE: usize = 32 * 1024;
/// Send batches kept for reuse: enough for a loop's fan-out to many subscribers at once
/// (each has its own send in flight) without allocating a batch per send.
const SPARE_MAX: usize = 1024;
/// Spares keep their byte buffers (the connection's next output buffer, see
/// `Service::take_output`) within a [`KeepBudget`] of `SPARE_BYTES`, each at most
/// `SPARE_MAX_CAPACITY`: 500 connections' 16 KiB replies in flight at once allocate nothing.
const SPARE_BYTES: usize = 16 * 1024 * 1024;
const SPARE_MAX_CAPACITY: usize = 256 * 1024;

/// A connection's socket and the operations in flight on it: 8 bytes, the same slab entry
/// size as epoll's socket once aligned.
pub(crate) struct Socket {
    stream: TcpStream,
    ops: SocketOps,
}

impl Socket {
    /// How operations name this socket (connection `key`'s).
    fn target(&self, key: usize) -> SocketRef {
        match self.ops.in_slot() {
            true => SocketRef::Slot(key as u32),
            false => SocketRef::Fd(self.stream.as_raw_fd()),
        }
    }
}

/// Whether a socket's receive is armed (until its last completion; the top bit), whether
/// the socket sits in the ring's registered-socket table at its connection's key (the next
/// bit), whether the armed receive is a payload receive (`Ring::recv_payload`) rather than
/// the multishot one, whether the multishot one is being cancelled to make way for one,
/// whether the last receive was a payload receive, and the id of its send op in flight (the
/// low 27 bits; all ones: none), in 4 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketOps(u32);

impl SocketOps {
    const RECEIVING: u32 = 1 << 31;
    const IN_SLOT: u32 = 1 << 30;
    const PAYLOAD: u32 = 1 << 29;
    const SWITCHING: u32 = 1 << 28;
    const AFTER_PAYLOAD: u32 = 1 << 27;
    const NO_SEND: u32 = Self::AFTER_PAYLOAD - 1;

    /// Receiving, nothing sent yet: a new connection.
    fn receiving() -> SocketOps {
        SocketOps(Self::RECEIVING | Self::NO_SEND)
    }

    fn in_slot(self) -> bool {
        self.0 & Self::IN_SLOT != 0
    }

    fn set_in_slot(&mut self, on: bool) {
        self.0 = (self.0 & !Self::IN_SLOT) | if on { Self::IN_SLOT } else { 0 };
    }

    fn is_receiving(self) -> bool {
        self.0 & Self::RECEIVING != 0
    }

    /// Armed (`Some`: a payload receive or not), or not.
    fn set_receiving(&mut self, payload: Option<bool>) {
        let after_payload = payload.is_none() && self.is_payload();
        self.0 &= !(Self::RECEIVING | Self::PAYLOAD | Self::SWITCHING | Self::AFTER_PAYLOAD);
        if after_payload {
            self.0 |= Self::AFTER_PAYLOAD;
        }
        match payload {
            Some(true) => self.0 |= Self::RECEIVING | Self::PAYLOAD,
            Some(false) => self.0 |= Self::RECEIVING,
            None => {}
        }
    }

    fn is_payload(self) -> bool {
        self.0 & Self::PAYLOAD != 0
    }

    /// The last receive, now ended, was a payload receive.
    fn is_after_payload(self) -> bool {
        self.0 & Self::AFTER_PAYLOAD != 0
    }

    fn is_switching(self) -> bool {
        self.0 & Self::SWITCHING != 0
    }

    fn set_switching(&mut self) {
        self.0 |= Self::SWITCHING;
    }

    fn is_sending(self) -> bool {
        self.0 & Self::NO_SEND != Self::NO_SEND
    }

    fn set_send(&mut self, op: usize) {
        let id = u32::try_from(op)
            .ok()
            .filter(|&id| id < Self::NO_SEND)
            .expect("fewer than 134 million ops in flight");
        self.0 = (self.0 & !Self::NO_SEND) | id;
    }

    fn clear_send(&mut self) {
        self.0 |= Self::NO_SEND;
    }
}

pub(crate) struct Uring {
    // Declared first so it is dropped first. Closing the ring does not end the kernel's
    // use of loop memory at once (its teardown runs later, in a kernel worker), so `Drop`
    // quiesces first when the loop did not (a panic in a handler unwinds past it).
    ring: Ring,
    /// Lent out while completions are handled (`None` only then, and after quiesce).
    bufs: Option<BufRing>,
    /// The loop ended its kernel operations ([`Backend::quiesce`]); else `Drop` does.
    quiesced: bool,
    listener: Option<TcpListener>,
    accept_op: Option<usize>,
    /// Accepted connections not registered yet: one run of the multishot accept can bring
    /// a whole backlog (thousands), and a turn registers at most `ACCEPTS_PER_TURN`, so
    /// the connections already open are served in between. Past `ACCEPT_QUEUE_MAX` the
    /// accept is cancelled, and armed again once the queue is down to half.
    accepted: VecDeque<TcpStream>,
    /// Busy polls before a sleep (`ServerConfig::busy_poll`) back off while they find
    /// nothing: waits to go without one, and misses in a row.
    spin: SpinBackoff,
    /// Registrations left in this turn.
    accept_budget: usize,
    wake_reader: std::io::PipeReader,
    completions: Vec<Completion>,
    /// Connections whose receive is to be armed again before the next enter, if they still
    /// read then (their multishot receive ended, or reading resumed).
    rearm_recv: Vec<usize>,
    /// Boxed on purpose: a batch's `msghdr` must not move while the kernel reads it, and
    /// reusing the boxes saves an allocation per send.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<SendBatch>>,
    /// What the byte buffers in `spare` may hold.
    spare_budget: KeepBudget,
}

impl Backend for Uring {
    type Socket = Socket;
    type Prepared = std::io::PipeReader;

    fn prepare() -> io::Result<(std::io::PipeReader, Waker)> {
        let (reader, writer) = std::io::pipe()?;
        Ok((reader, Waker::Pipe(Arc::new(writer))))
    }

    fn new(wake_reader: std::io::PipeReader, listener: Option<TcpListener>) -> io::Result<Self> {
        let mut ring = Ring::new(RING_ENTRIES)?;
        let bufs = ring.buffers(BUF_COUNT, BUF_SIZE)?;
        let accept_op = match &listener {
            Some(listener) => {
                listener.set_nonblocking(false)?;
                Some(ring.accept(listener.as_raw_fd())?)
            }
            None => None,
        };
        ring.read_wake(wake_reader.as_raw_fd())?;
        Ok(Uring {
            ring,
            bufs: Some(bufs),
            quiesced: false,
            listener,
            accept_op,
            accepted: VecDeque::new(),
            spin: SpinBackoff::default(),
            accept_budget: ACCEPTS_PER_TURN,
            wake_reader,
            completions: Vec::new(),
            rearm_recv: Vec::new(),
            spare: Vec::new(),
            spare_budget: KeepBudget::new(SPARE_BYTES, SPARE_MAX_CAPACITY),
        })
    }

    fn wait<S: Service>(
        &mut self,
        core: &mut Core<S, Self>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        // Accepted connections still to register are due now: do not sleep.
        let timeout = match self.accepted.is_empty() {
            true => timeout,
            false => Some(Duration::ZERO),
        };
        // Queued by the last turn's completions and by the connections it resumed, so
        // they go in with this enter: one resumed after the last completion would
        // otherwise wait for the next completion, which may never come (a paused
        // connection with nothing in flight).
        self.rearm_receives(core)?;
        // Before sleeping, look for work a little while: the kernel's wake-up of a
        // sleeping loop can cost more than the wait (see `ServerConfig::busy_poll`).
        let spin = core.busy_poll();
        let found = if timeout != Some(Duration::ZERO) && !spin.is_zero() && self.spin.due() {
            let found = self.ring.poll_for(spin.min(timeout.unwrap_or(spin)))?;
            self.spin.note(found);
            found
        } else {
            false
        };
        // The poll submitted what was queued: with completions found, no enter is needed.
        if !found {
            self.ring.enter(timeout)?;
        }
        self.accept_budget = ACCEPTS_PER_TURN;
        self.register_accepted(core);
        if !core.accept_paused() {
            // Stopped with a full queue (`ACCEPT_QUEUE_MAX`): go on once it has room.
            self.resume_accepting(core)?;
        }
        let mut completions = std::mem::take(&mut self.completions);
        // Not dropped if a handler panics meanwhile: the kernel still references it.
        let mut bufs = std::mem::ManuallyDrop::new(
            self.bufs
                .take()
                .expect("the buffer ring is only lent out here"),
        );
        let result = self.complete_turn(core, &mut bufs, &mut completions);
        self.bufs = Some(std::mem::ManuallyDrop::into_inner(bufs));
        self.completions = completions;
        result
    }

    fn attach(&mut self, key: usize, stream: TcpStream) -> io::Result<Socket> {
        let target = self.ring.register_socket(key, stream.as_raw_fd());
        if let Err(e) = self.ring.recv(target, key) {
            self.ring.release_socket(target);
            return Err(e);
        }
        let mut ops = SocketOps::receiving();
        ops.set_in_slot(matches!(target, SocketRef::Slot(_)));
        Ok(Socket { stream, ops })
    }

    fn write<S: Service>(
        &mut self,
        key: usize,
        socket: &mut Socket,
        out: &mut Output<'_, '_, S>,
    ) -> io::Result<Written> {
        if socket.ops.is_sending() {
            // One send in flight per connection; the rest goes when it completes.
            let mut parts = [std::io::IoSlice::new(&[])];
            return Ok(match out.parts(&mut parts) {
                0 => Written::Submitted,
                _ => Written::Blocked,
            });
        }
        let mut batch = match self.spare.pop() {
            Some(batch) => {
                self.spare_budget.release(batch.out.own_capacity());
                batch
            }
            None => Box::default(),
        };
        if !out.take(&mut batch.out) {
            self.keep_spare(batch);
            return Ok(Written::All);
        }
        let op = self.ring.send(socket.target(key), key, batch)?;
        socket.ops.set_send(op);
        Ok(Written::Submitted)
    }

    fn fd(socket: &Socket) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&socket.stream)
    }

    fn finish_writes(&mut self, socket: &mut Socket) {
        let _ = socket.stream.shutdown(Shutdown::Write);
    }

    fn detach(&mut self, key: usize, socket: &mut Socket) {
        // An armed receive ends with its cancel, queued in the ring (a server that closes
        // after the peer's Close, without waiting for its FIN, has one). A send in flight
        // may wait on a full socket buffer: the shutdown makes it fail fast, and it also
        // ends the receive if its cancel cannot be queued. With neither in flight (the
        // peer's EOF ended the receive) there is nothing to stop, and closing the socket
        // does the rest: no syscall for it.
        let mut stop = socket.ops.is_sending();
        if socket.ops.is_receiving() && self.ring.cancel_recv(key, socket.ops.is_payload()).is_err()
        {
            stop = true;
        }
        if stop {
            let _ = socket.stream.shutdown(Shutdown::Both);
        }
        // The table lets go of the socket (operations under way keep theirs), so it closes
        // with its descriptor; and the key's slot is free for the next connection. Later
        // operations (a short send's rest) name the socket by its descriptor.
        if socket.ops.in_slot() {
            self.ring.release_socket(socket.target(key));
            socket.ops.set_in_slot(false);
        }
    }

    fn pause_reading(&mut self, key: usize, socket: &mut Socket) {
        // Receives already completed still arrive (the session holds them back); the
        // cancel's completion ends the multishot receive.
        if socket.ops.is_receiving() {
            let _ = self.ring.cancel_recv(key, socket.ops.is_payload());
        }
    }

    fn resume_reading<S: Service>(&mut self, core: &mut Core<S, Self>, key: usize) {
        // Armed before the next enter (or, if the cancelled receive has not completed yet,
        // before the one after its completion).
        let _ = core;
        self.rearm_recv.push(key);
    }

    fn is_idle(socket: &Socket) -> bool {
        !socket.ops.is_receiving() && !socket.ops.is_sending()
    }

    fn resume_accepting<S: Service>(&mut self, _core: &mut Core<S, Self>) -> io::Result<()> {
        if let Some(listener) = &self.listener
            && self.accept_op.is_none()
            && accept_queue_has_room(self.accepted.len())
        {
            self.accept_op = Some(self.ring.accept(listener.as_raw_fd())?);
        }
        Ok(())
    }

    fn stop_accepting(&mut self) -> io::Result<()> {
        let cancelled = match self.accept_op.take() {
            Some(op) => self.ring.cancel(op),
            None => Ok(()),
        };
        // The accept names the listener by its descriptor and may have been re-armed this
        // turn, not submitted yet: it goes in, with its cancel, while the descriptor is
        // still the listener's (closed first, its number could be another file's by then).
        let submitted = self.ring.run_pending(true).map(drop);
        self.listener = None;
        // Accepted but never served: closed now.
        self.accepted.clear();
        cancelled.and(submitted)
    }

    fn quiesce<S: Service>(&mut self, _core: &mut Core<S, Self>) {
        self.quiesced = true;
        self.ring.quiesce(self.bufs.take());
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if !self.quiesced {
            self.ring.quiesce(self.bufs.take());
        }
    }
}

impl Uring {
    /// Handles the turn's completions in batches, and runs what the wait left pending.
    ///
    /// The wait ran at most ~20 completed receives (see `Ring::run_pending`). What it left
    /// pending joins this turn, run right away, while the turn's input is small (many
    /// small messages: one write per connection for all of them); after large ones it
    /// waits for the next turn, so that what is received is parsed and answered while
    /// the CPU's cache still holds it.
    fn complete_turn<S: Service>(
        &mut self,
        core: &mut Core<S, Self>,
        bufs: &mut BufRing,
        completions: &mut Vec<Completion>,
    ) -> io::Result<()> {
        let (mut received, mut receives) = (0, 0);
        for enters in 0..=DRAIN_ENTERS {
            // In batches: a burst (thousands of accepts, a fan-out's send completions) would
            // otherwise grow the batch vector to the CQ's size and keep it that big.
            loop {
                self.ring.reap(completions, REAP_BATCH);
                if completions.is_empty() {
                    break;
                }
                let mut batch = completions.drain(..);
                while let Some(completion) = batch.next() {
                    if completion.recv.is_some() && completion.result > 0 {
                        received += completion.result as usize;
                        receives += 1;
                    }
                    if let Err(e) = self.complete(core, bufs, completion) {
                        // The loop ends on this error: the batch's other ops leave the
                        // table, or the exit's quiesce would wait for completions already
                        // reaped (and then leak every buffer).
                        batch.for_each(|rest| self.ring.forget_reaped(rest));
                        return Err(e);
                    }
                }
                // Before the next enter: the kernel receives into these again.
                bufs.publish();
            }
            if !drains_more(received, receives, enters) {
                break;
            }
            // Receives that ran out of buffers in this turn go again now that the batch
            // handed its buffers back: their input then joins this turn instead of the
            // next (a broadcast round split over two turns writes every subscriber twice).
            let rearmed = self.rearm_receives(core)?;
            if !self.ring.run_pending(rearmed > 0)? {
                break;
            }
        }
        Ok(())
    }

    /// Re-arms the receives of connections that read again (see `rearm_recv`).
    /// Returns how many were queued.
    fn rearm_receives<S: Service>(&mut self, core: &mut Core<S, Self>) -> io::Result<usize> {
        let mut rearmed = 0;
        // Drained, not taken: the list keeps its capacity, so a busy loop whose receives
        // end on ENOBUFS every turn does not grow it again each turn.
        for key in self.rearm_recv.drain(..) {
            let Some((target, after_payload)) = core
                .reading_socket(key)
                .filter(|socket| !socket.ops.is_receiving())
                .map(|socket| (socket.target(key), socket.ops.is_after_payload()))
            else {
                continue;
            };
            // The rest of a large frame goes straight into its message's buffer.
            let payload = core.lend_payload(key, PAYLOAD_MIN);
            let is_payload = payload.is_some();
            match payload {
                Some(loan) => self.ring.recv_payload(
                    target,
                    key,
                    loan.buffer,
                    payload_piece(loan.room),
                    loan.whole,
                )?,
                // A connection that sends large frames most likely sends another: one
                // receive shows its header before the multishot receive would have taken
                // all of it into provided buffers.
                None if after_payload => self.ring.recv_once(target, key)?,
                // The socket most likely holds data (the receive ran out of buffers, or
                // reading was paused): polled first, so it waits its turn for buffers.
                None => self.ring.recv_polled(target, key)?,
            }
            if let Some(socket) = core.any_socket(key) {
                socket.ops.set_receiving(Some(is_payload));
            }
            rearmed += 1;
        }
        Ok(rearmed)
    }

    /// After a receive left connection `key` in a frame with at least [`PAYLOAD_MIN`]
    /// bytes still to come: cancels its multishot receive, so that once it has ended,
    /// `rearm_receives` arms a payload receive into the message's buffer instead.
    fn make_way_for_payload<S: Service>(&mut self, core: &mut Core<S, Self>, key: usize) {
        if core.payload_to_come(key) < PAYLOAD_MIN as u64 {
            return;
        }
        if let Some(socket) = core.reading_socket(key)
            && socket.ops.is_receiving()
            && !socket.ops.is_payload()
            && !socket.ops.is_switching()
            && self.ring.cancel_recv(key, false).is_ok()
        {
            socket.ops.set_switching();
        }
    }

    /// Keeps a finished (cleared) send batch for reuse, with its byte buffer if the
    /// spares' budget admits it.
    fn keep_spare(&mut self, mut batch: Box<SendBatch>) {
        if self.spare.len() >= SPARE_MAX {
            return;
        }
        if !self.spare_budget.admit(batch.out.own_capacity()) {
            batch.out.set_own(Vec::new());
        }
        self.spare.push(batch);
    }

    /// Registers accepted connections, oldest first, while this turn's budget lasts.
    fn register_accepted<S: Service>(&mut self, core: &mut Core<S, Self>) {
        while self.accept_budget > 0 {
            let Some(stream) = self.accepted.pop_front() else {
                return;
            };
            self.accept_budget -= 1;
            if let Ok(peer) = stream.peer_addr() {
                core.on_accept(self, stream, peer);
            }
        }
    }

    fn complete<S: Service>(
        &mut self,
        core: &mut Core<S, Self>,
        bufs: &mut BufRing,
        completion: Completion,
    ) -> io::Result<()> {
        let Completion {
            op,
            recv,
            result,
            more,
            buffer,
            accepted,
            payload,
        } = completion;
        if let Some(key) = recv {
            if !more {
                if let Some(socket) = core.any_socket(key) {
                    socket.ops.set_receiving(None);
                }
                // Re-armed before the next enter if the connection still reads (a
                // multishot receive ends on ENOBUFS, a cancel, or a full CQ; a payload
                // receive once its room is filled).
                self.rearm_recv.push(key);
            }
            if let Some(payload) = payload {
                // Back to the session whatever the receive did.
                core.on_payload(self, key, payload, result.max(0) as usize);
            } else if result > 0 {
                let bid = buffer.expect("multishot recv always selects a buffer");
                // The session may keep the buffer (a reply sent from it in place); the
                // slot then takes another.
                // Kept until the send completes: only for a reply that fills half of it.
                let input = bufs.received(bid);
                let min_reply = input.len().div_ceil(2);
                core.on_received(self, key, input, result as usize, min_reply);
                bufs.recycle(bid);
                if more {
                    self.make_way_for_payload(core, key);
                }
            }
            if result == 0 {
                // A reset in the middle of a payload receive (`MSG_WAITALL`) completes it
                // with what had arrived (io_uring drops the error for the partial count),
                // and the next receive finds the socket done: 0, as for a FIN. A FIN
                // leaves the socket connected (the peer may still read), a reset does
                // not: that tells them apart. (A lingering socket that saw the FIN after
                // ours is not connected either; its close was reported already.)
                let reset = core.any_socket(key).is_some_and(|socket| {
                    matches!(socket.stream.peer_addr(),
                        Err(e) if e.kind() == io::ErrorKind::NotConnected)
                });
                if reset {
                    let error = io::Error::from_raw_os_error(libc::ECONNRESET);
                    core.on_read_error(self, key, error);
                } else {
                    core.on_eof(self, key);
                }
            } else if result < 0 && result != -libc::ENOBUFS && result != -libc::ECANCELED {
                core.on_read_error(self, key, io::Error::from_raw_os_error(-result));
            }
            core.on_released(key);
            return Ok(());
        }
        match self.ring.op(op) {
            None => {}
            Some(Op::Cancel) => {
                self.ring.finish(op);
            }
            Some(Op::Wake(_)) => {
                self.ring.finish(op);
                core.on_wake(self);
                if result >= 0 || result == -libc::EINTR {
                    self.ring.read_wake(self.wake_reader.as_raw_fd())?;
                }
            }
            Some(Op::Accept) => {
                if !more {
                    self.ring.finish(op);
                    // (Not a newer accept armed after this one was cancelled.)
                    if self.accept_op == Some(op) {
                        self.accept_op = None;
                    }
                }
                // Accepted in the kernel before a shutdown's cancel landed: not served (it
                // would miss the 1001 every open connection got and hold the loop until
                // the deadline); dropped, so closed, as epoll leaves such connections in
                // the backlog of the listener it closes.
                let accepted = accepted.filter(|_| self.listener.is_some());
                if let Some(stream) = accepted {
                    self.accepted.push_back(stream);
                    self.register_accepted(core);
                    if accept_queue_full(self.accepted.len())
                        && let Some(accept) = self.accept_op.take()
                    {
                        // Leave the rest in the listen backlog until the queue has room.
                        self.ring.cancel(accept)?;
                        core.on_accept_queue_full();
                    } else if !more {
                        self.resume_accepting(core)?;
                    }
                } else if !more && self.listener.is_some() && result != -libc::ECANCELED {
                    // EMFILE, ENFILE, ENOBUFS…: retry after a back-off instead of spinning.
                    core.on_accept_error();
                }
            }
            Some(Op::Send(batch)) => {
                let key = batch.key;
                self.sent(core, bufs, op, key, result)?
            }
        }
        Ok(())
    }

    fn sent<S: Service>(
        &mut self,
        core: &mut Core<S, Self>,
        bufs: &mut BufRing,
        op: usize,
        key: usize,
        result: i32,
    ) -> io::Result<()> {
        let Some(Op::Send(batch)) = self.ring.op_mut(op) else {
            unreachable!("a send op")
        };
        let sent = result.max(0) as usize;
        batch.sent += sent;
        let whole = batch.sent == batch.out.len();
        if sent > 0 {
            core.on_sent(self, key, sent);
        }
        let live = core.socket(key).map(|s| s.target(key));
        if let Some(target) = live
            && sent > 0
            && !whole
        {
            // Short send: the rest goes from the same buffer, same op.
            return self.ring.resend(op, target);
        }
        let Op::Send(mut batch) = self.ring.finish(op) else {
            unreachable!("a send op")
        };
        // Receive buffers replies were sent from go back to the ring's spares; the
        // batch's references to shared frames are dropped now, not when it is reused.
        batch.out.take_received(|buffer| bufs.give_back(buffer));
        batch.clear();
        self.keep_spare(batch);
        if let Some(socket) = core.any_socket(key) {
            socket.ops.clear_send();
        }
        if live.is_some() && result <= 0 && result != -libc::ECANCELED {
            // A send of 0 bytes is as final as an error: the socket takes nothing more.
            let error = match result {
                0 => io::Error::from(io::ErrorKind::WriteZero),
                _ => io::Error::from_raw_os_error(-result),
            };
            core.on_write_error(self, key, error);
        } else if live.is_some() {
            // Write on: the session may have queued more while this send was in flight.
            core.on_writable(key);
        }
        core.on_released(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SocketOps;

    /// A turn drains until any one bound is reached: bytes, receives or enters.
    #[test]
    fn a_turn_drains_up_to_each_bound() {
        use super::{DRAIN_BYTES, DRAIN_ENTERS, DRAIN_RECEIVES, drains_more};
        assert!(drains_more(0, 0, 0));
        assert!(drains_more(
            DRAIN_BYTES - 1,
            DRAIN_RECEIVES - 1,
            DRAIN_ENTERS - 1
        ));
        assert!(!drains_more(DRAIN_BYTES, 0, 0), "at the byte bound");
        assert!(!drains_more(0, DRAIN_RECEIVES, 0), "at the receive bound");
        assert!(!drains_more(0, 0, DRAIN_ENTERS), "at the enter bound");
    }

    /// Busy polls back off while they find nothing (1, 3, 7 … 63 waits skipped) and
    /// resume at once when one finds work.
    #[test]
    fn busy_polls_back_off_while_they_find_nothing() {
        let mut spin = super::SpinBackoff::default();
        assert!(spin.due());
        spin.note(true);
        assert!(spin.due(), "work found: poll again");
        for skipped in [1, 3, 7, 15, 31, 63, 63] {
            assert!(spin.due());
            spin.note(false);
            for _ in 0..skipped {
                assert!(!spin.due());
            }
        }
        assert!(spin.due());
        spin.note(true);
        assert!(
            spin.due() && spin.due(),
            "no skipping after a poll that found work"
        );
    }

    /// The loop stops accepting once 1 024 accepted connections wait to be set up, not
    /// before, and accepts again once at most half of that wait.
    #[test]
    fn accepting_stops_at_a_full_queue_and_resumes_at_half() {
        use super::{ACCEPT_QUEUE_MAX, accept_queue_full, accept_queue_has_room};
        assert_eq!(
            ACCEPT_QUEUE_MAX, 1024,
            "the README's limits table says 1 024"
        );
        assert!(!accept_queue_full(ACCEPT_QUEUE_MAX - 1));
        assert!(accept_queue_full(ACCEPT_QUEUE_MAX), "at the limit");
        assert!(accept_queue_has_room(ACCEPT_QUEUE_MAX / 2));
        assert!(!accept_queue_has_room(ACCEPT_QUEUE_MAX / 2 + 1));
    }

    /// A payload receive takes a piece of `PAYLOAD_PIECE`, or all of its room where a
    /// piece would leave less than `PAYLOAD_MIN` (which would then go through provided
    /// buffers and a copy).
    #[test]
    fn payload_receives_take_pieces_but_leave_no_small_rest() {
        use super::{PAYLOAD_MIN, PAYLOAD_PIECE, payload_piece};
        assert_eq!(payload_piece(PAYLOAD_MIN), PAYLOAD_MIN);
        let last_whole = PAYLOAD_PIECE + PAYLOAD_MIN - 1;
        assert_eq!(payload_piece(last_whole), last_whole);
        assert_eq!(payload_piece(last_whole + 1), PAYLOAD_PIECE);
        assert_eq!(payload_piece(1 << 20), PAYLOAD_PIECE);
    }

    #[test]
    fn socket_ops_keep_receiving_the_slot_and_the_send_apart() {
        let mut ops = SocketOps::receiving();
        assert!(ops.is_receiving() && !ops.is_sending() && !ops.in_slot());
        ops.set_in_slot(true);
        ops.set_send(0);
        assert!(ops.is_receiving() && ops.is_sending() && ops.in_slot());
        ops.set_receiving(None);
        assert!(!ops.is_receiving() && ops.is_sending() && ops.in_slot());
        ops.clear_send();
        assert!(!ops.is_receiving() && !ops.is_sending() && ops.in_slot());
        // The largest id there is room for, and the other bits left alone by it.
        ops.set_receiving(Some(false));
        ops.set_send((1 << 27) - 2);
        assert!(ops.is_receiving() && ops.is_sending() && ops.in_slot());
        ops.set_in_slot(false);
        assert!(ops.is_receiving() && ops.is_sending() && !ops.in_slot());
        ops.clear_send();
        assert_eq!(ops, SocketOps::receiving());
    }

    /// A payload receive: armed as one, then ended, it leaves the mark that makes the next
    /// receive a single one; a cancel under way to switch ends with the receive.
    #[test]
    fn socket_ops_remember_a_payload_receive_until_the_next_one_is_armed() {
        let mut ops = SocketOps::receiving();
        ops.set_send(5);
        ops.set_switching();
        assert!(ops.is_switching() && !ops.is_payload());
        ops.set_receiving(None);
        assert!(
            !ops.is_switching() && !ops.is_after_payload(),
            "a multishot receive ended"
        );
        ops.set_receiving(Some(true));
        assert!(ops.is_receiving() && ops.is_payload() && !ops.is_after_payload());
        ops.set_receiving(None);
        assert!(!ops.is_receiving() && !ops.is_payload() && ops.is_after_payload());
        ops.set_receiving(Some(false));
        assert!(ops.is_receiving() && !ops.is_payload() && !ops.is_after_payload());
        assert!(ops.is_sending(), "the send left alone throughout");
    }

    #[test]
    #[should_panic(expected = "fewer than 134 million ops")]
    fn a_send_id_that_does_not_fit_is_refused() {
        SocketOps::receiving().set_send((1 << 27) - 1);
    }
}
