//! The reactor's `Service` trait for [`WsService`]: for wss connections, TLS is peeled off
//! incoming bytes and put around outgoing ones here, so the plaintext methods of the
//! parent module never see ciphertext.

use std::io::{self, IoSlice};
use std::net::SocketAddr;

use super::{Conn, Phase, WsService};
#[cfg(feature = "tls")]
use crate::hosted::server::Ws;
use crate::hosted::server::{ClientInit, Command, Handler, Upgrade, UpgradeRequest};
#[cfg(feature = "tls")]
use crate::protocol::driver::ReadyState;
#[cfg(feature = "tls")]
use crate::protocol::error::code;
use crate::protocol::handshake::http_response;
#[cfg(feature = "tls")]
use crate::reactor::CloseRequest;
use crate::reactor::{Io, Outgoing, PayloadLoan, Service};

impl<F, H> Service for WsService<F, H>
where
    F: Fn(&UpgradeRequest<'_>) -> Upgrade<H> + Send + Sync + 'static,
    H: Handler,
{
    type Session = Conn<H>;
    type Command = Command;
    type Connect = ClientInit<H>;

    fn open(&mut self, io: &mut Io<'_, Command>, peer: SocketAddr) -> Conn<H> {
        #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
        let mut conn = self.open_plain(io, peer);
        #[cfg(feature = "tls")]
        if let Some(config) = &self.config.tls {
            match crate::tls::TlsStream::server(config.clone()) {
                Ok(tls) => conn.tls = Some(Box::new(tls)),
                Err(_) => io.close(CloseRequest::Now),
            }
        }
        conn
    }

    fn connected(
        &mut self,
        io: &mut Io<'_, Command>,
        peer: SocketAddr,
        init: ClientInit<H>,
    ) -> Conn<H> {
        let mut conn = self.connected_plain(io, peer, init);
        self.seal(&mut conn, io);
        conn
    }

    fn connect_failed(
        &mut self,
        io: &mut Io<'_, Command>,
        init: ClientInit<H>,
        error: io::Error,
    ) -> Option<(SocketAddr, ClientInit<H>)> {
        self.connect_failed_plain(io, init, error)
    }

    fn read(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, data: &mut [u8]) {
        if !self.redials.is_empty() {
            // Connected: no other address will be needed.
            self.redials.remove(&io.key);
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = conn.tls.as_mut() {
            let mut plain = std::mem::take(&mut self.plain);
            plain.clear();
            match tls.decrypt(data, &mut plain) {
                Ok(()) => {
                    let peer_closed = tls.peer_closed();
                    self.read_plain(conn, io, &mut plain);
                    // After its close_notify the peer can send nothing, not even its Close:
                    // for the connection that is the end of its input, as a FIN is. Input
                    // held back over the cap (the peer's Close among it, perhaps) goes
                    // first: the end waits for it (`resume_if_drained`), as a FIN behind
                    // held input waits for the resumed read.
                    if peer_closed && self.held.contains_key(&io.key) {
                        self.ended_behind.insert(io.key);
                    } else if peer_closed
                        && let Phase::Open(driver, _) = &mut conn.phase
                        && driver.ready_state() != ReadyState::Closed
                    {
                        driver.receive_eof();
                        self.pump(conn, io, &mut []);
                        io.close(CloseRequest::AfterFlush);
                    } else if peer_closed && matches!(conn.phase, Phase::Handshake(_)) {
                        // The upgrade request can never be completed now: as a FIN there.
                        io.close(CloseRequest::Now);
                    }
                }
                Err(e) => {
                    // What decrypted before the bad record came first: it is delivered.
                    if !plain.is_empty() {
                        self.read_plain(conn, io, &mut plain);
                    }
                    // A TLS failure ends the connection; the alert (if any) goes out first.
                    let outside = WsService::<F, H>::queued_outside(conn);
                    // Not once the close was reported: `on_error` never follows `on_close`.
                    if let Phase::Open(driver, handler) = &mut conn.phase
                        && driver.ready_state() != ReadyState::Closed
                    {
                        let ctx = self.ctx(conn.peer.get(), io, outside);
                        handler.on_error(&mut Ws { driver, ctx: &ctx }, &e);
                        driver.abort(code::ABNORMAL, "TLS failure");
                    }
                    self.pump(conn, io, &mut []);
                    io.close(CloseRequest::AfterFlush);
                }
            }
            self.plain = plain;
            self.seal(conn, io);
            return;
        }
        self.read_plain(conn, io, data)
    }

    fn read_lendable(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        input: &mut Vec<u8>,
        len: usize,
        min_reply: usize,
    ) {
        // Over TLS the messages are in the decrypted copy, not in the receive buffer.
        #[cfg(feature = "tls")]
        if conn.tls.is_some() {
            return self.read(conn, io, &mut input[..len]);
        }
        self.read_plain_lendable(conn, io, input, len, min_reply)
    }

    fn reclaim_received(&mut self, conn: &mut Conn<H>) -> Option<Vec<u8>> {
        match &mut conn.phase {
            Phase::Open(driver, _) => driver.reclaim_received(),
            _ => None,
        }
    }

    fn lend_payload_buffer(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        min: usize,
    ) -> Option<PayloadLoan> {
        // Over TLS the payload is in the decrypted copy, not on the socket.
        #[cfg(feature = "tls")]
        if conn.tls.is_some() {
            return None;
        }
        self.lend_payload_plain(conn, io, min)
    }

    fn payload_to_come(&self, conn: &Conn<H>) -> u64 {
        #[cfg(feature = "tls")]
        if conn.tls.is_some() {
            return 0;
        }
        match &conn.phase {
            Phase::Open(driver, _) => driver.payload_to_come(),
            _ => 0,
        }
    }

    fn payload_received(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        buffer: Vec<u8>,
        n: usize,
    ) {
        self.payload_received_plain(conn, io, buffer, n);
    }

    fn timeout(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        self.timeout_plain(conn, io);
        self.seal(conn, io);
    }

    fn command(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, command: Command) {
        self.command_plain(conn, io, command);
        self.seal(conn, io);
    }

    fn targets(&mut self, command: &Command, targets: &mut Vec<usize>) {
        let (topic, exclude, number) = match command {
            Command::Publish(p) => (&p.topic, p.exclude, p.number),
            Command::PublishRun(p) => (&p.topic, p.exclude, p.number),
            _ => return,
        };
        self.topics
            .get_mut()
            .targets(self.loop_index, topic, exclude, number, targets);
    }

    fn deliver(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, command: &Command) {
        match command {
            Command::Publish(publication) => self.deliver_plain(conn, io, &publication.frame),
            Command::PublishRun(publication) => self.deliver_run(conn, io, &publication.run),
            _ => return,
        }
        self.seal(conn, io);
    }

    fn queue_local(&mut self, command: Command) -> Option<Command> {
        match command {
            Command::Publish(publication) => {
                self.topics.get_mut().local.push_back(publication);
                None
            }
            other => Some(other),
        }
    }

    fn next_local(&mut self) -> Option<Command> {
        self.topics.get_mut().next_local()
    }

    fn drained(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        self.drained_plain(conn, io);
        self.seal(conn, io);
    }

    fn shutdown(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        self.shutdown_plain(conn, io);
        self.seal(conn, io);
    }

    fn output<'s>(&self, conn: &'s Conn<H>, parts: &mut [IoSlice<'s>]) -> usize {
        #[cfg(feature = "tls")]
        if let Some(tls) = &conn.tls {
            return one_part(tls.output(), parts);
        }
        self.output_plain(conn, parts)
    }

    fn consume(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, n: usize) {
        self.wrote(io.key, n);
        #[cfg(feature = "tls")]
        if let Some(tls) = conn.tls.as_mut() {
            tls.consume(n);
            if conn.timers.is_over_limit() {
                self.settle(conn, io);
            }
            self.resume_if_drained(conn, io);
            self.seal(conn, io);
            return;
        }
        self.consume_plain(conn, io, n)
    }

    fn take_output(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        into: &mut Outgoing,
    ) -> bool {
        #[cfg(feature = "tls")]
        if let Some(tls) = conn.tls.as_mut() {
            if tls.output().is_empty() {
                return false;
            }
            let spare = into.set_own(Vec::new());
            let taken = tls.take_output(spare).expect("TLS output is pending");
            into.set_own(taken);
            conn.in_flight += into.len();
            return true;
        }
        self.take_output_plain(conn, io, into)
    }

    fn sent(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>, n: usize) {
        self.wrote(io.key, n);
        self.sent_plain(conn, io, n);
        // Held-back input delivered as the output drained may have queued replies.
        self.seal(conn, io);
    }

    fn closed(
        &mut self,
        conn: Conn<H>,
        io: &mut Io<'_, Command>,
        cause: Option<io::Error>,
    ) -> Option<(SocketAddr, ClientInit<H>)> {
        self.closed_plain(conn, io, cause)
    }

    fn fail(
        &mut self,
        conn: &mut Conn<H>,
        io: &mut Io<'_, Command>,
        input: Option<&mut Vec<u8>>,
    ) -> bool {
        let failing = self.fail_plain(conn, io, input);
        if failing {
            self.seal(conn, io);
        }
        failing
    }

    fn abandoned(&mut self, io: &mut Io<'_, Command>) {
        // A handler that panicked during a lendable read left its offer standing: a later
        // delivery that is not from a receive buffer must not find it.
        self.input.withdraw();
        self.forget(io.key);
    }

    fn over_capacity(&self) -> Vec<u8> {
        // A TLS client would read a plaintext 503 as a broken record: it is closed
        // without an answer.
        #[cfg(feature = "tls")]
        if self.config.tls.is_some() {
            return Vec::new();
        }
        http_response(
            503,
            &[("Retry-After", "1")],
            "server is at its connection limit",
        )
    }
}

/// `bytes` as the only part of a vectored write (none when empty).
pub(super) fn one_part<'s>(bytes: &'s [u8], parts: &mut [IoSlice<'s>]) -> usize {
    match (bytes.is_empty(), parts.first_mut()) {
        (false, Some(first)) => {
            *first = IoSlice::new(bytes);
            1
        }
        _ => 0,
    }
}
