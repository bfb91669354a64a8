//! What waits for a pong on one connection: the callbacks of `send_ping` (on
//! [`WebSocket`](crate::WebSocket), the reactor's `Ws` and the blocking client) and the
//! tokio split API's ping receipts, in ping order.
//!
//! A pong answers the oldest waiting ping with its payload and every ping sent before that
//! one: RFC 6455 §5.5.3 lets a peer that has not answered several pings answer only the
//! latest, and it reads them in order, so a pong for a later ping means the earlier ones
//! arrived too (this crate's own driver answers only the latest once 16 KiB of its output
//! waits). A pong that matches no waiting ping (an unsolicited one) answers nothing.

/// The pings of one connection waiting for their pong, oldest first, each with what waits
/// for it (`W`: a callback, a receipt).
#[derive(Debug)]
pub struct PongWaiters<W> {
    pings: Vec<(Vec<u8>, W)>,
}

impl<W> Default for PongWaiters<W> {
    fn default() -> Self {
        PongWaiters { pings: Vec::new() }
    }
}

impl<W> PongWaiters<W> {
    /// A ping with `payload` went out; `waiter` waits for its pong.
    pub fn push(&mut self, payload: Vec<u8>, waiter: W) {
        self.pings.push((payload, waiter));
    }

    /// A pong with `payload` arrived: takes what waited for the pings it answers, oldest
    /// first (none for an unsolicited pong).
    pub fn answered(&mut self, payload: &[u8]) -> impl Iterator<Item = W> + '_ {
        let end = self.answers(payload);
        self.pings.drain(..end).map(|(_, waiter)| waiter)
    }

    /// How many waiters a pong with `payload` answers (see [`PongWaiters::answered`]),
    /// for a caller that takes them one at a time with [`PongWaiters::take_oldest`].
    pub fn answers(&self, payload: &[u8]) -> usize {
        self.pings
            .iter()
            .position(|(ping, _)| ping[..] == payload[..])
            .map_or(0, |at| at + 1)
    }

    /// Takes the oldest waiter.
    pub fn take_oldest(&mut self) -> Option<W> {
        (!self.pings.is_empty()).then(|| self.pings.remove(0).1)
    }

    /// Keeps only the waiters `keep` says to, in order; it may change them.
    pub fn retain(&mut self, mut keep: impl FnMut(&mut W) -> bool) {
        self.pings.retain_mut(|(_, waiter)| keep(waiter));
    }

    /// The waiters, newest first, to change in place.
    pub fn newest_first(&mut self) -> impl Iterator<Item = &mut W> {
        self.pings.iter_mut().rev().map(|(_, waiter)| waiter)
    }

    /// No pong comes any more (the connection closed): drops every waiter.
    pub fn clear(&mut self) {
        self.pings.clear();
    }

    /// Whether no ping waits.
    pub fn is_empty(&self) -> bool {
        self.pings.is_empty()
    }

    /// How many pings wait.
    pub fn len(&self) -> usize {
        self.pings.len()
    }

    /// The payloads of the waiting pings, oldest first.
    pub fn payloads(&self) -> impl Iterator<Item = &[u8]> {
        self.pings.iter().map(|(payload, _)| &payload[..])
    }
}

#[cfg(test)]
mod tests {
    use super::PongWaiters;

    fn waiting(names: &[(&str, u8)]) -> PongWaiters<u8> {
        let mut waiters = PongWaiters::default();
        for (payload, id) in names {
            waiters.push(payload.as_bytes().to_vec(), *id);
        }
        waiters
    }

    #[test]
    fn a_pong_answers_its_ping_and_every_earlier_one() {
        let mut waiters = waiting(&[("a", 1), ("b", 2), ("c", 3)]);
        assert_eq!(waiters.answered(b"b").collect::<Vec<_>>(), [1, 2]);
        assert_eq!(waiters.answered(b"c").collect::<Vec<_>>(), [3]);
        assert!(waiters.is_empty());
    }

    #[test]
    fn an_unsolicited_or_repeated_pong_answers_nothing() {
        let mut waiters = waiting(&[("a", 1), ("b", 2)]);
        assert_eq!(waiters.answered(b"zz").count(), 0);
        assert_eq!(waiters.answered(b"a").collect::<Vec<_>>(), [1]);
        assert_eq!(waiters.answered(b"a").count(), 0, "already answered");
        assert_eq!(waiters.answered(b"b").collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn pings_with_one_payload_are_answered_one_pong_each() {
        let mut waiters = waiting(&[("same", 1), ("same", 2)]);
        assert_eq!(waiters.answered(b"same").collect::<Vec<_>>(), [1]);
        assert_eq!(waiters.answered(b"same").collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn answers_counts_what_answered_would_take_and_take_oldest_takes_them_in_order() {
        let mut waiters = waiting(&[("a", 1), ("b", 2), ("c", 3)]);
        assert_eq!(waiters.answers(b"zz"), 0);
        assert_eq!(waiters.answers(b"b"), 2);
        assert_eq!(waiters.len(), 3, "counting takes nothing");
        assert_eq!(waiters.take_oldest(), Some(1));
        assert_eq!(waiters.take_oldest(), Some(2));
        assert_eq!(waiters.answers(b"c"), 1);
        assert_eq!(waiters.take_oldest(), Some(3));
        assert_eq!(waiters.take_oldest(), None);
    }

    #[test]
    fn retained_and_cleared_waiters_are_gone() {
        let mut waiters = waiting(&[("a", 1), ("b", 2), ("c", 3)]);
        waiters.retain(|id| *id != 2);
        assert_eq!(
            waiters.newest_first().map(|id| *id).collect::<Vec<_>>(),
            [3, 1]
        );
        assert_eq!(waiters.answered(b"b").count(), 0, "its ping is forgotten");
        waiters.clear();
        assert!(waiters.is_empty());
        assert_eq!(waiters.answered(b"c").count(), 0);
    }
}
