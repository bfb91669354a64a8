//! [`WsReceiver`]: the receiving half, an async stream of events.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::tokio::sync::mpsc;

use super::shared::Shared;
use crate::protocol::driver::Event;
use crate::protocol::error::code;

/// The receiving half of a connection: the driver's events, in order.
///
/// Yields [`Event::Open`] first, then messages, pings, pongs and errors, then exactly one
/// [`Event::Close`], then `None`. Dropping it discards later events; the connection runs
/// on for its senders (and closes with 1000 once they are all dropped too).
#[derive(Debug)]
pub struct WsReceiver {
    pub(super) events: mpsc::Receiver<Event<'static>>,
    pub(super) shared: Arc<Shared>,
    /// The connection task was asked for an event that has not come yet.
    pub(super) requested: bool,
    pub(super) closed: bool,
}

impl WsReceiver {
    /// The next event, or `None` after [`Event::Close`]. Cancel-safe.
    pub async fn next(&mut self) -> Option<Event<'static>> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// Polls for the next event (what `Stream::poll_next` does).
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event<'static>>> {
        if self.closed {
            return Poll::Ready(None);
        }
        match self.events.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                self.requested = false;
                if matches!(event, Event::Close { .. }) {
                    self.closed = true;
                    self.events.close();
                }
                Poll::Ready(Some(event))
            }
            Poll::Ready(None) => {
                // The task ended without reporting a close (its runtime shut down).
                self.closed = true;
                Poll::Ready(Some(Event::Close {
                    code: code::ABNORMAL,
                    reason: "connection task ended".into(),
                }))
            }
            Poll::Pending => {
                if !self.requested {
                    // Ask the connection task to parse the next event.
                    self.requested = true;
                    self.shared.demand.notify_one();
                }
                Poll::Pending
            }
        }
    }
}

impl futures_core::Stream for WsReceiver {
    type Item = Event<'static>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event<'static>>> {
        self.get_mut().poll_event(cx)
    }
}

impl futures_core::FusedStream for WsReceiver {
    fn is_terminated(&self) -> bool {
        self.closed
    }
}
