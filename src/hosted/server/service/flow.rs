//! What happens as a connection's output drains: write callbacks run, input held back
//! while the output was over the cap is delivered and reading resumes, the connection's
//! senders learn the new backlog; and the policy's close at the cap.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Conn, Phase, WsService, take_callbacks};
use crate::hosted::server::{BackpressurePolicy, Command, Handler, Upgrade, UpgradeRequest, Ws};
use crate::reactor::Io;

impl<F, H> WsService<F, H>
where
    F: Fn(&UpgradeRequest<'_>) -> Upgrade<H> + Send + Sync + 'static,
    H: Handler,
{
    /// Whether a send refused by the cap closes the connection at once.
    pub(super) fn close_on_limit(&self) -> bool {
        self.config.backpressure_policy
            == (BackpressurePolicy::Close {
                grace: Duration::ZERO,
            })
    }

    /// Runs the write callbacks whose bytes the driver has handed on, then, if any ran,
    /// what their calls queued (a close: its events, its deadline, leaving the topics).
    pub(super) fn run_written(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        if self.callbacks.borrow().is_empty() {
            return;
        }
        let outside = Self::queued_outside(conn);
        let Phase::Open(driver, _) = &mut conn.phase else {
            return;
        };
        let ctx = self.ctx(conn.peer.get(), io, outside);
        let mut ran = false;
        loop {
            let due = take_callbacks(&mut self.callbacks.borrow_mut(), io.key, |pending| {
                pending.next_written(driver)
            });
            let Some(callback) = due else { break };
            callback(&mut Ws { driver, ctx: &ctx });
            ran = true;
        }
        if ran {
            self.pump(conn, io, &mut []);
        }
    }

    /// After output progress: delivers held-back input once a paused connection's output
    /// has drained to half the cap, and resumes reading if it all went through.
    /// Also tells the connection's senders, if any, how much output is left.
    pub(super) fn resume_if_drained(&mut self, conn: &mut Conn<H>, io: &mut Io<'_, Command>) {
        if self.held.is_empty() && self.gauges.get_mut().is_empty() {
            return;
        }
        let Phase::Open(driver, _) = &conn.phase else {
            return;
        };
        let backlog = driver.buffered_amount() + Self::queued_outside(conn);
        if let Some(gauge) = self.gauges.get_mut().get(&io.key) {
            gauge.backlog.store(backlog, Ordering::Release);
        }
        if !self.held.contains_key(&io.key) || backlog > self.config.max_backpressure / 2 {
            return;
        }
        let mut input = self.held.remove(&io.key).unwrap_or_default();
        self.pump(conn, io, &mut input);
        if self.held.contains_key(&io.key) {
            return;
        }
        #[cfg(feature = "tls")]
        if self.ended_behind.remove(&io.key) {
            // The input ended behind what was held (a TLS close_notify): now it ends.
            if let Phase::Open(driver, _) = &mut conn.phase
                && driver.ready_state() != crate::protocol::driver::ReadyState::Closed
            {
                driver.receive_eof();
            }
            self.pump(conn, io, &mut []);
            io.close(crate::reactor::CloseRequest::AfterFlush);
            return;
        }
        io.set_reading(true);
    }
}
