//! The two wakers of a stream split into a reading and a sending task.

use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};

/// Wakes both the task that last polled the receiving side (`Stream`) and the one that
/// last polled the sending side (`Sink`), for a stream that `StreamExt::split` shares
/// between two tasks. The socket and the deadline keep one waker each (the last poll's),
/// so without this the receiving task's poll, which also writes, replaced the sending
/// task's waker, and the sender waited for good once the socket drained.
///
/// The stream's inner polls get [`SplitWakers::waker`], which wakes both; each side
/// registers its own task's waker first. One task polling both sides costs a double wake
/// of that task.
#[derive(Debug)]
pub(crate) struct SplitWakers {
    pair: Arc<WakerPair>,
    proxy: Waker,
}

#[derive(Debug, Default)]
struct WakerPair {
    receiving: Mutex<Option<Waker>>,
    sending: Mutex<Option<Waker>>,
}

impl Wake for WakerPair {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        for slot in [&self.receiving, &self.sending] {
            let waker = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// Which side is polling.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Side {
    Receiving,
    Sending,
}

impl Default for SplitWakers {
    fn default() -> Self {
        let pair = Arc::new(WakerPair::default());
        SplitWakers {
            proxy: Waker::from(pair.clone()),
            pair,
        }
    }
}

impl SplitWakers {
    /// Notes `cx`'s task as the one polling `side`, and returns the waker for the stream's
    /// inner polls, which wakes both sides' tasks.
    pub(crate) fn waker(&self, side: Side, cx: &Context<'_>) -> &Waker {
        let slot = match side {
            Side::Receiving => &self.pair.receiving,
            Side::Sending => &self.pair.sending,
        };
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *slot = Some(cx.waker().clone());
        }
        &self.proxy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A wake through the proxy reaches the last task of each side, once per
    /// registration.
    #[test]
    fn the_proxy_wakes_both_sides_once_per_registration() {
        let wakers = SplitWakers::default();
        let (reader, sender) = (
            Arc::new(Count(AtomicUsize::new(0))),
            Arc::new(Count(AtomicUsize::new(0))),
        );
        let (rw, sw) = (Waker::from(reader.clone()), Waker::from(sender.clone()));
        let proxy = wakers
            .waker(Side::Receiving, &Context::from_waker(&rw))
            .clone();
        wakers.waker(Side::Sending, &Context::from_waker(&sw));
        proxy.wake_by_ref();
        assert_eq!(reader.0.load(Ordering::SeqCst), 1);
        assert_eq!(sender.0.load(Ordering::SeqCst), 1);
        // Taken by the wake: nothing more until a side polls again.
        proxy.wake_by_ref();
        assert_eq!(reader.0.load(Ordering::SeqCst), 1);
        wakers.waker(Side::Sending, &Context::from_waker(&sw));
        proxy.wake();
        assert_eq!(
            (
                reader.0.load(Ordering::SeqCst),
                sender.0.load(Ordering::SeqCst)
            ),
            (1, 2)
        );
    }
}
