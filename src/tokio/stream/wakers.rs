//! The two wakers of a stream split into a reading and a sending task, and the waker that
//! watches a transport's flush.

use std::sync::atomic::{AtomicBool, Ordering};
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

/// Watches a transport's flush while only the transport's own buffer holds output (a TLS
/// stream's records): the stream then flushes with [`FlushWatch::waker`], and the
/// transport waking it (its socket took bytes, so the peer read some) counts as progress
/// for the write timeout, which otherwise sees none until the whole flush is done. Made
/// on first use: a plain socket's flush never waits.
#[derive(Debug, Default)]
pub(crate) struct FlushWatch(Option<Arc<FlushWake>>);

#[derive(Debug, Default)]
struct FlushWake {
    woken: AtomicBool,
    /// The watched flush is being polled: a wake now is the transport yielding, not its
    /// socket taking bytes.
    polling: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for FlushWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.polling.load(Ordering::Acquire) {
            self.woken.store(true, Ordering::Release);
        }
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl FlushWatch {
    /// Runs `flush` (the transport's `poll_flush`) with a waker that wakes `cx`'s task and
    /// notes a later wake (one during the poll is the transport yielding: not noted).
    pub(crate) fn watch<T>(
        &mut self,
        cx: &Context<'_>,
        flush: impl FnOnce(&mut Context<'_>) -> T,
    ) -> T {
        let waker = self.waker(cx);
        let wake = self.0.as_ref().expect("made by `waker`");
        wake.polling.store(true, Ordering::Release);
        let result = flush(&mut Context::from_waker(&waker));
        wake.polling.store(false, Ordering::Release);
        result
    }

    /// A waker for the transport's flush that wakes `cx`'s task and notes the wake.
    fn waker(&mut self, cx: &Context<'_>) -> Waker {
        let wake = self.0.get_or_insert_with(Arc::default);
        let mut task = wake.task.lock().unwrap_or_else(|e| e.into_inner());
        if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *task = Some(cx.waker().clone());
        }
        drop(task);
        Waker::from(wake.clone())
    }

    /// Whether the transport woke the watched flush since the last call.
    pub(crate) fn take_woken(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|wake| wake.woken.swap(false, Ordering::AcqRel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The flush watch's waker wakes the task it was made for and notes the wake, once.
    #[test]
    fn the_flush_watch_forwards_and_notes_a_wake() {
        let mut watch = FlushWatch::default();
        assert!(!watch.take_woken(), "nothing watched yet");
        let task = Arc::new(Count(AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let waker = watch.waker(&Context::from_waker(&task_waker));
        assert!(!watch.take_woken());
        waker.wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(watch.take_woken());
        assert!(!watch.take_woken(), "taken");
        // The task was taken by the wake: another wake is noted but wakes nobody.
        waker.wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(watch.take_woken());
        // A wake during the watched poll (the transport yielding) wakes the task but is
        // not noted.
        watch.watch(&Context::from_waker(&task_waker), |cx| {
            cx.waker().wake_by_ref();
        });
        assert_eq!(task.0.load(Ordering::SeqCst), 2);
        assert!(!watch.take_woken());
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
