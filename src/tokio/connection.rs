//! The connection task behind [`WsSender`] / [`WsReceiver`]: one per connection, it owns a
//! [`WebSocketStream`] and moves events to the receiver and the senders' commands to the
//! driver. Everything else (reading, parsing, writing, the deadlines, the close) is the
//! stream's.
//!
//! What the task and its channels cost over polling the stream directly is measured in
//! `loadtest/results/tokio-adapters/` (the split rows).
//!
//! Writes: woken by a command, the task applies the commands already queued behind it
//! before it writes, up to `GATHER_MAX` of output, so sends made faster than the socket
//! takes them share writes (`loadtest/results/split-push-2026-12-04/`). Its `select!`
//! takes commands first and writes last, and after handing out an event while more input
//! waits it lets the app answer before writing, so a pipelining peer's burst is answered
//! in one or two writes (`loadtest/results/split-pipelined-2026-12-04/`).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use ::tokio::io::{AsyncRead, AsyncWrite};
use ::tokio::sync::{Notify, mpsc, oneshot};

use super::config::Config;
use super::receiver::WsReceiver;
use super::sender::WsSender;
use super::shared::{Ack, Command, Queued, Shared, state_code};
use super::stream::WebSocketStream;
use crate::protocol::driver::{Driver, Event, ReadyState, SendToken};
use crate::protocol::error::code;
use crate::session::PongWaiters;

/// Events the receiver may lag behind before the connection stops reading.
const EVENT_QUEUE: usize = 32;
/// Commands senders may queue ahead of the connection task (on top of the byte budget).
const COMMAND_QUEUE: usize = 64;
/// Commands queued behind the one the task wakes for are applied before it writes, while
/// the unwritten output is under this many bytes.
const GATHER_MAX: usize = 256 * 1024;

/// Runs a started driver over `stream` on a new task, for transports whose handshake
/// happened elsewhere. `read_ahead` holds bytes already read from the stream past the
/// handshake. Queued driver events (a server's `Open`) come out of the receiver first.
///
/// For an `Unpin` stream, [`WebSocketStream::from_driver`] and [`WebSocketStream::spawn`]
/// do the same without boxing the stream.
pub fn spawn<S>(
    stream: S,
    driver: Driver,
    read_ahead: Vec<u8>,
    config: &Config,
) -> (WsSender, WsReceiver)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    WebSocketStream::from_driver(Box::pin(stream), driver, &read_ahead, config).spawn()
}

impl<S> WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Moves the connection onto a task of its own and returns the split API: a cloneable
    /// [`WsSender`] for any number of tasks and a [`WsReceiver`] of the events. Needs a
    /// tokio runtime.
    ///
    /// Cost: the task and its channels put a task switch and two channel hops between the
    /// socket and the app on every message (see `loadtest/results/tokio-adapters/`), and
    /// every message is copied into an owned command. Poll the stream directly when one
    /// task does all the sending. Sends queued while the task is busy go out together
    /// (one write for up to 256 KiB of them).
    pub fn spawn(mut self) -> (WsSender, WsReceiver) {
        self.parse_over_limit();
        let driver = self.driver();
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            buffered: AtomicUsize::new(self.buffered_amount()),
            state: AtomicU8::new(state_code(driver.ready_state())),
            finished: AtomicBool::new(false),
            close_queued: AtomicBool::new(false),
            dropped: AtomicBool::new(false),
            changed: Notify::new(),
            demand: Notify::new(),
            protocol: driver.protocol().map(str::to_string),
            limit: self.limit(),
        });
        let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
        let connection = Connection {
            ws: self,
            inbox: VecDeque::new(),
            shared: shared.clone(),
            commands: command_rx,
            written: VecDeque::new(),
            pongs: PingReceipts::default(),
            events: event_tx,
            close_seen: false,
            credit: false,
            answer_pending: false,
            receiver_gone: false,
        };
        ::tokio::spawn(connection.run());
        (
            WsSender {
                commands: command_tx,
                shared: shared.clone(),
            },
            WsReceiver {
                events: event_rx,
                shared,
                requested: false,
                closed: false,
            },
        )
    }
}

struct Connection<S> {
    ws: WebSocketStream<S>,
    /// Events taken from the stream, not yet handed to the receiver.
    inbox: VecDeque<Event<'static>>,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Queued>,
    /// Receipts of confirmed sends, in send order, until their frame is written.
    written: VecDeque<(SendToken, oneshot::Sender<()>)>,
    /// Pings waiting for their pong.
    pongs: PingReceipts,
    events: mpsc::Sender<Event<'static>>,
    /// A `Close` went into the inbox: nothing may follow it.
    close_seen: bool,
    /// The receiver asked for an event and has not been given one since.
    credit: bool,
    /// An event was just handed out while more input waits in the read buffer (a peer
    /// that pipelines): the next write waits one turn of the scheduler, so that the app's
    /// answer and next request come first, and the answers to a burst read at once share
    /// a write, as on the stream's `recv`. Not when the input ran out: a self-wake per
    /// message costs a one-in-flight echo more than it saves.
    answer_pending: bool,
    receiver_gone: bool,
}

/// What one turn of the stream gave the task.
enum Step {
    /// An event, or `None`: the stream is over.
    Event(Option<Event<'static>>),
    /// Bytes were written or a deadline fired.
    Progress,
}

/// Pings whose receipt was dropped kept as placeholders, the newest this many: their pongs
/// may still come, and must answer them, not a later ping with the same payload.
const DROPPED_PINGS_KEPT: usize = 16;

/// The pings of [`WsSender::ping`] waiting for their pong, with their receipts (`None`
/// once the app dropped it), oldest first. A pong answers as
/// [`PongWaiters`](crate::session::PongWaiters) says.
#[derive(Debug, Default)]
struct PingReceipts(PongWaiters<Option<oneshot::Sender<()>>>);

impl PingReceipts {
    /// A ping went out. Receipts dropped meanwhile (an app's `timeout` around one that
    /// never got its pong) become placeholders, and only the newest
    /// [`DROPPED_PINGS_KEPT`] of those are kept, so a peer that never answers cannot grow
    /// the list beyond the receipts the app still holds.
    fn add(&mut self, payload: Vec<u8>, done: oneshot::Sender<()>) {
        let mut dropped = 0;
        for done in self.0.newest_first() {
            if done.as_ref().is_some_and(oneshot::Sender::is_closed) {
                *done = None;
            }
            dropped += usize::from(done.is_none());
        }
        let mut excess = dropped.saturating_sub(DROPPED_PINGS_KEPT);
        self.0.retain(|done| {
            let forget = excess > 0 && done.is_none();
            excess -= usize::from(forget);
            !forget
        });
        self.0.push(payload, Some(done));
    }

    /// A pong arrived: the receipts of the pings it answers are done.
    fn pong(&mut self, payload: &[u8]) {
        for done in self.0.answered(payload).flatten() {
            let _ = done.send(());
        }
    }

    /// No pong comes any more: the receipts fail.
    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Marks the connection finished when dropped: the end of the task, however it came.
struct Finished(Arc<Shared>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Drives the stream: parses the next event if `parse`, otherwise only writes and runs
/// the deadlines.
fn drive<S>(ws: &mut WebSocketStream<S>, cx: &mut Context<'_>, parse: bool) -> Poll<Step>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if parse {
        if let Poll::Ready(event) = ws.poll_next_event(cx) {
            return Poll::Ready(Step::Event(event));
        }
        ws.take_progress().map(|()| Step::Progress)
    } else {
        ws.input_held();
        ws.poll_background(cx).map(|()| Step::Progress)
    }
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn push(&mut self, event: Event<'static>) {
        match event {
            Event::Close { .. } => {
                self.close_seen = true;
                // No pong comes after the close: the pings' receipts fail.
                self.pongs.clear();
            }
            Event::Pong(ref payload) => self.pongs.pong(payload),
            _ => {}
        }
        self.credit = false;
        self.answer_pending = self.ws.has_unparsed_input();
        self.inbox.push_back(event);
    }

    /// Whether the next event may be parsed now.
    ///
    /// While the connection is open, input is parsed one event per request of the
    /// receiver, after the commands queued before that request: an app that answers each
    /// message before asking for the next (an echo) sees its answer go out before whatever
    /// the following frames cause (a protocol error's close, a pong), as with a
    /// synchronous handler. Once closing, nothing can be sent any more, and input is parsed
    /// as it comes (up to the receiver's queue). After the close, the stream only ends
    /// the transport. After a failed write too, whatever the receiver does: the rest of
    /// what was read (no more is) comes out, then the failure, and the senders see the
    /// connection closed (they queued on, their sends accepted and then waiting for good).
    fn may_parse(&self) -> bool {
        self.close_seen
            || !self.ws.can_write()
            || (self.inbox.is_empty()
                && (self.credit || self.receiver_gone || self.ws.ready_state() != ReadyState::Open))
    }

    fn apply(&mut self, command: Command, ack: Option<Ack>) {
        let cost = command.cost();
        let mut ping = None;
        let driver = self.ws.driver_mut();
        // Refused commands (the connection closed meanwhile) are dropped, and so are their
        // receipts' senders: the receipts fail.
        let sent = match command {
            Command::Text(t) => driver.send_text(&t),
            Command::Binary(b) => driver.send_binary(&b),
            Command::Ping(p) => {
                let sent = driver.send_ping(&p);
                ping = Some(p);
                sent
            }
            Command::Pong(p) => driver.send_pong(&p),
            Command::Close(c, r) => driver.close_connection(c, &r),
            Command::Flush => Ok(driver.output_token()),
        };
        let refused = sent.is_err();
        match (sent, ack, ping) {
            (Ok(token), Some(Ack::Written(done)), _) => self.written.push_back((token, done)),
            (Ok(_), Some(Ack::Pong(done)), Some(payload)) => self.pongs.add(payload, done),
            _ => {}
        }
        let buffered = self.ws.buffered_amount();
        let before = self.shared.buffered.swap(buffered, Ordering::AcqRel);
        self.shared.queued.fetch_sub(cost, Ordering::AcqRel);
        if refused {
            // Never written: a waiting `flush` fails now rather than when the task ends.
            self.shared.dropped.store(true, Ordering::Release);
        }
        if buffered < before + cost {
            // The total went down (a refused command, a message compressed smaller than
            // its payload): a send waiting on the limit may go now, and nothing else would
            // wake it (the buffer did not shrink by writing).
            self.shared.changed.notify_waiters();
        }
    }

    /// Applies `command` and the commands already queued behind it, so they share a write:
    /// up to a channel's worth (control frames do not wait on the byte limit) or
    /// `GATHER_MAX` bytes of output (past that, a bigger buffer written later costs more
    /// than the writes it saves). Returns whether it stopped at either bound.
    fn apply_queued(&mut self, command: Command, ack: Option<Ack>) -> bool {
        self.apply(command, ack);
        for _ in 1..COMMAND_QUEUE {
            if self.ws.buffered_amount() >= GATHER_MAX {
                return true;
            }
            let Ok((command, ack)) = self.commands.try_recv() else {
                return false;
            };
            self.apply(command, ack);
        }
        true
    }

    /// Completes the receipts of the sends whose frames are now written.
    fn confirm_written(&mut self) {
        while let Some((token, _)) = self.written.front() {
            // A frame the stream wrote around the driver before `spawn` goes out before
            // everything the driver holds: nothing queued since is written before it.
            if !self.ws.driver().is_sent(*token) || self.ws.unwritten_around_driver() > 0 {
                break;
            }
            let (_, done) = self.written.pop_front().expect("front exists");
            let _ = done.send(());
        }
    }

    /// Hands inbox events to the receiver as far as its queue has room.
    fn try_deliver(&mut self) {
        while let Some(event) = self.inbox.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.inbox.push_front(event);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.receiver_gone = true;
                    self.inbox.clear();
                    return;
                }
            }
        }
    }

    async fn run(mut self) {
        let shared = self.shared.clone();
        // However the task ends (a panic in the transport, a runtime shutting down and
        // dropping it), the senders stop waiting on it.
        let _finish = Finished(shared.clone());
        let mut commands_open = true;
        loop {
            // The state goes out before the events: a receiver that sees `Close` finds the
            // senders refusing already.
            self.shared
                .publish(self.ws.buffered_amount(), self.ws.ready_state());
            self.confirm_written();
            self.try_deliver();
            let state = self.ws.ready_state();
            if self.receiver_gone && !commands_open && state == ReadyState::Open {
                // Nobody can use the connection any more: close it properly.
                let _ = self.ws.driver_mut().close_connection(code::NORMAL, "");
                continue;
            }
            let parse = self.may_parse();
            let ws = &mut self.ws;
            let answer_pending = &mut self.answer_pending;
            // In this order: the senders' commands before the receiver's next request
            // (commands queued before a request go first: an answer is queued before the
            // next event is parsed), and the writing last, so the answers to events
            // already read wait until the read buffer holds no more of them, as on the
            // stream itself (one write per burst).
            ::tokio::select! {
                biased;
                command = self.commands.recv(), if commands_open => match command {
                    Some((command, ack)) => {
                        if self.apply_queued(command, ack) {
                            // More may be queued already, and this arm comes first in the
                            // next `select!` too: write now, or senders that keep the
                            // channel full would hold the writing off.
                            poll_fn(|cx| {
                                let _ = self.ws.poll_background(cx);
                                Poll::Ready(())
                            })
                            .await;
                        }
                    }
                    None => commands_open = false,
                },
                _ = shared.demand.notified(), if !self.credit => self.credit = true,
                permit = self.events.clone().reserve_owned(), if !self.inbox.is_empty() => {
                    match permit {
                        Ok(permit) => {
                            permit.send(self.inbox.pop_front().expect("the inbox has an event"));
                        }
                        Err(_) => {
                            self.receiver_gone = true;
                            self.inbox.clear();
                        }
                    }
                }
                _ = self.events.closed(), if !self.receiver_gone && self.inbox.is_empty() => {
                    self.receiver_gone = true;
                }
                step = poll_fn(|cx| {
                    if !parse && std::mem::take(answer_pending) {
                        // Once, then write whatever came or did not.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    drive(ws, cx, parse)
                }) => match step {
                    Step::Event(Some(event)) => self.push(event),
                    Step::Event(None) => break,
                    Step::Progress => {}
                },
            }
        }
        // Closed: what the last writes took is confirmed; then stop taking commands, tell
        // the senders, hand out the last events.
        self.confirm_written();
        self.shared
            .publish(self.ws.buffered_amount(), self.ws.ready_state());
        if self.ws.driver().handshake_error().is_some() {
            // A client whose handshake failed: what was queued behind it was dropped
            // unwritten, so a `flush` fails.
            self.shared.dropped.store(true, Ordering::Release);
        }
        self.commands.close();
        self.shared.finish();
        // What was not confirmed by now never will be: fail the receipts (unapplied
        // commands included).
        while self.commands.try_recv().is_ok() {}
        self.written.clear();
        self.pongs.clear();
        let Connection {
            ws, inbox, events, ..
        } = self;
        drop(ws);
        for event in inbox {
            if events.send(event).await.is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(receipts: &PingReceipts) -> Vec<&[u8]> {
        receipts.0.payloads().collect()
    }

    #[test]
    fn a_pong_answers_its_ping_and_every_earlier_one_only() {
        let mut receipts = PingReceipts::default();
        let mut rx: Vec<_> = [b"a", b"b", b"c"]
            .into_iter()
            .map(|p| {
                let (tx, rx) = oneshot::channel();
                receipts.add(p.to_vec(), tx);
                rx
            })
            .collect();
        // Unsolicited: nothing.
        receipts.pong(b"z");
        assert_eq!(waiting(&receipts), [b"a", b"b", b"c"]);
        receipts.pong(b"b");
        assert_eq!(waiting(&receipts), [b"c"]);
        assert_eq!(rx[0].try_recv(), Ok(()));
        assert_eq!(rx[1].try_recv(), Ok(()));
        assert!(rx[2].try_recv().is_err(), "c is still waiting");
        receipts.clear();
        assert_eq!(rx[2].try_recv(), Err(oneshot::error::TryRecvError::Closed));
    }

    #[test]
    fn dropped_receipts_are_kept_as_the_newest_placeholders_only() {
        let mut receipts = PingReceipts::default();
        for n in 0..1000u32 {
            let (tx, rx) = oneshot::channel();
            receipts.add(n.to_le_bytes().to_vec(), tx);
            // The app gave up on it (a timeout around a pong that never came).
            drop(rx);
        }
        // The newest dropped ones as placeholders, and the last, dropped after its `add`.
        assert_eq!(receipts.0.len(), DROPPED_PINGS_KEPT + 1);
        let (tx, mut kept) = oneshot::channel();
        receipts.add(b"kept".to_vec(), tx);
        assert_eq!(receipts.0.len(), DROPPED_PINGS_KEPT + 1);
        assert_eq!(waiting(&receipts).last(), Some(&&b"kept"[..]));
        assert_eq!(waiting(&receipts)[0], 984u32.to_le_bytes());
        receipts.pong(b"kept");
        assert_eq!(kept.try_recv(), Ok(()));
        assert!(receipts.0.is_empty());
    }

    /// A heartbeat with one payload: the late pong of a ping whose receipt was dropped
    /// answers that ping, not the next one.
    #[test]
    fn a_late_pong_for_a_dropped_ping_does_not_answer_the_next_one() {
        let mut receipts = PingReceipts::default();
        let (tx, rx) = oneshot::channel();
        receipts.add(b"hb".to_vec(), tx);
        drop(rx);
        let (tx, mut second) = oneshot::channel();
        receipts.add(b"hb".to_vec(), tx);
        receipts.pong(b"hb");
        assert!(
            second.try_recv().is_err(),
            "answered by the first one's pong"
        );
        receipts.pong(b"hb");
        assert_eq!(second.try_recv(), Ok(()));
    }

    /// A pong for a ping whose receipt was dropped still answers the earlier ones.
    #[test]
    fn a_pong_for_a_dropped_ping_answers_the_earlier_ones() {
        let mut receipts = PingReceipts::default();
        let (tx, mut first) = oneshot::channel();
        receipts.add(b"a".to_vec(), tx);
        let (tx, rx) = oneshot::channel();
        receipts.add(b"b".to_vec(), tx);
        drop(rx);
        let (tx, mut third) = oneshot::channel();
        receipts.add(b"c".to_vec(), tx);
        receipts.pong(b"b");
        assert_eq!(first.try_recv(), Ok(()));
        assert!(third.try_recv().is_err());
    }
}
