//! Topics: subscribe, unsubscribe and publish with encode-once fan-out over every loop.
//!
//! A publish encodes its frame once ([`SharedFrame`]: server frames are unmasked, so one
//! encoding serves every subscriber) and sends one command per loop that has subscribers
//! of the topic, into its inbox (a handler's publish reaches its own loop's inbox without
//! waking it: the loop drains its inbox before its turn ends).
//! Each loop looks the topic up in its own index ([`LoopTopics`]) and queues a reference
//! to the frame on each subscriber's output, which the backend writes gathered with the
//! connection's other frames: no per-subscriber copy and no per-subscriber allocation.
//!
//! Publications that reach a loop back to back for the same topic (its handlers' in one
//! turn, or several waiting in its inbox) are laid end to end once on that loop
//! ([`FrameRun`], up to [`RUN_MAX`] bytes) and each subscriber queues the run as one part:
//! one reference and one slice of its next write instead of one per message. A subscriber
//! that must get them one by one (permessage-deflate applies, or its output would pass the
//! cap inside the run) gets the frames themselves, as if they had come separately.
//!
//! Ordering: a loop's inbox and its queue of publications are FIFO, and a run only merges
//! neighbours in them, so messages published from one thread to one topic reach every
//! subscriber in publish order; a handler's sends to its own loop (through a `Sender`),
//! its `publish`es and its `Publisher`'s all go through that loop's inbox, so they keep
//! the order it made them in. Frames are queued whole, so they are never interleaved or
//! cut.
//!
//! A subscription gets exactly what is published after it. Every publication takes a
//! number from one server-wide sequence while it holds the topic counts' read lock (which
//! it decides its loops under), and a subscribe notes the sequence under the write lock:
//! a publication numbered below a subscription's mark was decided before it (and may have
//! skipped its loop, if no one else there was subscribed), so the loop leaves it out for
//! that subscriber even if it is still on its way; one numbered at or above it reaches it.
//! Without the mark, a subscriber could get a publication from before it joined and miss
//! the next one, a gap in what one publisher sent.
//!
//! Memory per subscription: one key with its mark and its place in the connection's list
//! in the topic's map on the connection's loop (24 bytes), and one topic reference in
//! that list (16 bytes): about 64 with the map's control byte and the room maps and
//! vectors keep spare, plus the topic's bytes once per loop; the server-wide count is one
//! entry per topic. The maps give their room back once mostly empty.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use super::Command;
use super::backplane::Backplane;
use crate::protocol::driver::MessageType;
use crate::protocol::error::{Error, UsageError};
use crate::protocol::frame::{FrameRun, RunPool, SharedFrame};
use crate::reactor::{Envelope, Remote};

/// The longest topic, in bytes.
pub const MAX_TOPIC_LEN: usize = 1024;

/// A topic name: bytes (usually UTF-8), cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Topic(Arc<[u8]>);

impl Topic {
    fn new(name: &[u8]) -> Result<Topic, Error> {
        check_len(name)?;
        Ok(Topic(Arc::from(name)))
    }

    /// The topic as text, if it is UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

fn check_len(name: &[u8]) -> Result<(), Error> {
    if name.len() > MAX_TOPIC_LEN {
        return Err(UsageError::TopicTooLong {
            len: name.len(),
            max: MAX_TOPIC_LEN,
        }
        .into());
    }
    Ok(())
}

impl std::ops::Deref for Topic {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Borrow<[u8]> for Topic {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Topic {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Topic({:?})", String::from_utf8_lossy(&self.0))
    }
}

/// One published message on its way to the loops: the topic, the frame encoded once,
/// and the connection that must not get it (`Ws::publish` leaves out its sender).
pub(crate) struct Publication {
    pub topic: Topic,
    pub frame: SharedFrame,
    /// `(loop, key)` of the publishing connection, if it is left out.
    pub exclude: Option<(usize, usize)>,
    /// Its place in the server's sequence of publications (see the module docs).
    pub number: u64,
}

/// Publications merged into one run on a loop (see the module docs): consecutive ones to
/// the same topic with the same left-out sender.
pub(crate) struct PublicationRun {
    pub topic: Topic,
    pub exclude: Option<(usize, usize)>,
    /// The lowest number among the run's publications: every subscriber of the topic on
    /// the loop joined at or before it (runs are only made of such publications).
    pub number: u64,
    pub run: FrameRun,
}

/// The most bytes (frames with their headers) one run of merged publications holds: small
/// messages merge by the hundred, a large one is queued alone.
pub(crate) const RUN_MAX: usize = 16 * 1024;

/// Server-wide pub/sub state, shared by every loop, the server handle and every
/// [`Publisher`].
pub(crate) struct PubSub {
    /// Filled once every loop is started (a publish waits for it, which only a publish
    /// racing with the server's start can).
    remotes: OnceLock<Vec<Remote<Command>>>,
    /// Subscribers of each topic, per loop: a publish goes only to loops that have some.
    counts: RwLock<HashMap<Topic, Vec<u32>>>,
    /// The number the next publication takes (see the module docs).
    sequence: AtomicU64,
    loops: usize,
    /// Publishes made outside the loops (server handle, publishers).
    pub published: AtomicU64,
    /// Carries publishes to and from other server processes.
    pub backplane: Option<Arc<dyn Backplane>>,
    /// The server is shutting down: publishes from outside the loops are refused.
    stopped: AtomicBool,
}

/// Where a publish made inside a handler comes from.
pub(crate) struct Origin {
    pub loop_index: usize,
    /// The publishing connection's key, when it is left out.
    pub exclude: Option<usize>,
}

impl PubSub {
    pub fn new(loops: usize, backplane: Option<Arc<dyn Backplane>>) -> PubSub {
        PubSub {
            remotes: OnceLock::new(),
            counts: RwLock::default(),
            sequence: AtomicU64::new(0),
            loops,
            published: AtomicU64::new(0),
            backplane,
            stopped: AtomicBool::new(false),
        }
    }

    /// The server is shutting down: [`Publisher::publish`] fails from now on.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// Connects the loops, once all are started.
    pub fn set_remotes(&self, remotes: Vec<Remote<Command>>) {
        let _ = self.remotes.set(remotes);
    }

    /// Subscribers of `topic` over the whole server.
    pub fn subscribers(&self, topic: &[u8]) -> usize {
        let counts = self.counts.read().expect("topic counts lock");
        counts
            .get(topic)
            .map_or(0, |per_loop| per_loop.iter().map(|&n| n as usize).sum())
    }

    /// Adds `delta` (±1) to the subscribers of `topic` on loop `loop_index`. Returns the
    /// number of the first publication a new subscriber gets.
    fn count(&self, topic: &Topic, loop_index: usize, delta: i32) -> u64 {
        let mut counts = self.counts.write().expect("topic counts lock");
        // Publications number themselves under the read lock: under the write lock the
        // sequence stands still, between those decided before and those decided after.
        let mark = self.sequence.load(Ordering::Relaxed);
        if delta > 0 {
            let per_loop = counts.entry(topic.clone()).or_insert_with(|| {
                // The process's first subscriber of the topic.
                if let Some(backplane) = &self.backplane {
                    backplane.subscribe(topic);
                }
                vec![0; self.loops]
            });
            per_loop[loop_index] += 1;
        } else if let Some(per_loop) = counts.get_mut(&**topic) {
            per_loop[loop_index] = per_loop[loop_index].saturating_sub(1);
            if per_loop.iter().all(|&n| n == 0) {
                counts.remove(&**topic);
                shrink_if_sparse(&mut *counts);
                if let Some(backplane) = &self.backplane {
                    backplane.unsubscribe(topic);
                }
            }
        }
        mark
    }

    /// Encodes `data` once and sends it to every loop with subscribers of `topic`, and
    /// to the backplane (if any) for the other processes. Returns whether anyone in this
    /// process was subscribed.
    pub fn publish(
        &self,
        topic: &[u8],
        data: &[u8],
        kind: MessageType,
        origin: Option<Origin>,
    ) -> Result<bool, Error> {
        check_len(topic)?;
        let frame = SharedFrame::new(data, kind)?;
        if let Some(backplane) = &self.backplane {
            backplane.publish(topic, data, kind);
        }
        self.fan_out(topic, frame, origin)
    }

    /// A message from another process (through the backplane): to this process's
    /// subscribers only.
    pub fn publish_local(
        &self,
        topic: &[u8],
        data: &[u8],
        kind: MessageType,
    ) -> Result<bool, Error> {
        check_len(topic)?;
        let frame = SharedFrame::new(data, kind)?;
        self.fan_out(topic, frame, None)
    }

    /// Sends `frame` to every loop with subscribers of `topic`.
    fn fan_out(
        &self,
        topic: &[u8],
        frame: SharedFrame,
        origin: Option<Origin>,
    ) -> Result<bool, Error> {
        let counts = self.counts.read().expect("topic counts lock");
        let Some((topic, per_loop)) = counts.get_key_value(topic) else {
            return Ok(false);
        };
        let remotes = self.remotes.wait();
        let publication = Arc::new(Publication {
            topic: topic.clone(),
            frame,
            exclude: origin
                .as_ref()
                .and_then(|o| o.exclude.map(|key| (o.loop_index, key))),
            // Under the read lock (see `count`).
            number: self.sequence.fetch_add(1, Ordering::Relaxed),
        });
        for (i, &subscribers) in per_loop.iter().enumerate() {
            if subscribers == 0 {
                continue;
            }
            // The publisher's own loop too, through its inbox: behind whatever the same
            // handler sent there before (its loop drains the inbox before the turn ends).
            // A loop that has stopped has no subscribers left to reach.
            let _ = remotes[i].send(Envelope::Loop(Command::Publish(publication.clone())));
        }
        Ok(true)
    }
}

/// One loop's topic index: who subscribes to what, both ways, so subscribe and
/// unsubscribe cost O(1), a connection's close O(its topics) and a publish O(the loop's
/// subscribers of the topic).
#[derive(Default)]
pub(crate) struct LoopTopics {
    subscribers: HashMap<Topic, Subscribers>,
    by_conn: HashMap<usize, Vec<Topic>>,
    /// Publications taken from the inbox, waiting to be merged with their neighbours
    /// (delivered before the inbox's next command for one connection, or once it is
    /// empty).
    pub local: VecDeque<Arc<Publication>>,
    runs: RunPool,
}

/// A topic's subscribers on one loop, each with the number of the first publication it
/// gets (see the module docs).
#[derive(Default)]
struct Subscribers {
    marks: HashMap<usize, Mark>,
    /// The highest mark: publications numbered at or above it reach every subscriber here.
    newest: u64,
}

/// One subscription on a loop.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// The number of the first publication it gets.
    first: u64,
    /// Where the topic is in the connection's `by_conn` list: an unsubscribe finds it
    /// without a scan.
    slot: u32,
}

/// Gives a map's room back once it is mostly empty: after a burst of topics (or of
/// subscribers) has gone, the index would otherwise keep its largest size for good.
fn shrink_if_sparse<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

impl LoopTopics {
    /// Subscribes connection `key`; false if it already was.
    pub fn subscribe(
        &mut self,
        pubsub: &PubSub,
        loop_index: usize,
        key: usize,
        name: &[u8],
    ) -> Result<bool, Error> {
        let topic = match self.subscribers.get_key_value(name) {
            Some((_, here)) if here.marks.contains_key(&key) => return Ok(false),
            Some((topic, _)) => topic.clone(),
            None => Topic::new(name)?,
        };
        let first = pubsub.count(&topic, loop_index, 1);
        let list = self.by_conn.entry(key).or_default();
        let slot = u32::try_from(list.len()).expect("fewer than 2^32 topics per connection");
        list.push(topic.clone());
        let here = self.subscribers.entry(topic).or_default();
        here.marks.insert(key, Mark { first, slot });
        here.newest = here.newest.max(first);
        Ok(true)
    }

    /// Unsubscribes connection `key`; false if it was not subscribed.
    pub fn unsubscribe(
        &mut self,
        pubsub: &PubSub,
        loop_index: usize,
        key: usize,
        name: &[u8],
    ) -> bool {
        let Some(here) = self.subscribers.get_mut(name) else {
            return false;
        };
        let Some(gone) = here.marks.remove(&key) else {
            return false;
        };
        if here.marks.is_empty() {
            self.subscribers.remove(name);
            shrink_if_sparse(&mut self.subscribers);
        } else {
            shrink_if_sparse(&mut here.marks);
        }
        let topics = self
            .by_conn
            .get_mut(&key)
            .expect("a subscription is in its connection's list");
        let slot = gone.slot as usize;
        let topic = topics.swap_remove(slot);
        if let Some(moved) = topics.get(slot) {
            // The list's last topic took the slot.
            let mark = self
                .subscribers
                .get_mut(&**moved)
                .and_then(|here| here.marks.get_mut(&key))
                .expect("a topic in a connection's list has its subscription");
            mark.slot = gone.slot;
        }
        if topics.is_empty() {
            self.by_conn.remove(&key);
            shrink_if_sparse(&mut self.by_conn);
        }
        pubsub.count(&topic, loop_index, -1);
        true
    }

    /// Connection `key` leaves every topic (it is closing).
    pub fn leave_all(&mut self, pubsub: &PubSub, loop_index: usize, key: usize) {
        let Some(topics) = self.by_conn.remove(&key) else {
            return;
        };
        for topic in topics {
            if let Some(here) = self.subscribers.get_mut(&*topic) {
                here.marks.remove(&key);
                if here.marks.is_empty() {
                    self.subscribers.remove(&*topic);
                } else {
                    shrink_if_sparse(&mut here.marks);
                }
            }
            pubsub.count(&topic, loop_index, -1);
        }
        shrink_if_sparse(&mut self.subscribers);
        shrink_if_sparse(&mut self.by_conn);
    }

    pub fn is_subscribed(&self, key: usize, name: &[u8]) -> bool {
        self.subscribers
            .get(name)
            .is_some_and(|here| here.marks.contains_key(&key))
    }

    pub fn topics(&self, key: usize) -> Vec<Topic> {
        self.by_conn.get(&key).cloned().unwrap_or_default()
    }

    /// The next queued publication, merged with those right behind it for the same topic
    /// and the same left-out sender into one run of up to [`RUN_MAX`] bytes. Only
    /// publications that every subscriber of the topic here gets merge: one made before
    /// someone here joined goes alone, so that subscriber can be left out of it.
    pub fn next_local(&mut self) -> Option<Command> {
        let first = self.local.pop_front()?;
        let newest = self
            .subscribers
            .get(&first.topic)
            .map_or(0, |here| here.newest);
        let mut len = first.frame.len();
        let mut number = first.number;
        let mut more = 0;
        if first.number >= newest {
            for next in &self.local {
                if next.topic != first.topic
                    || next.exclude != first.exclude
                    || next.number < newest
                    || len + next.frame.len() > RUN_MAX
                {
                    break;
                }
                len += next.frame.len();
                number = number.min(next.number);
                more += 1;
            }
        }
        if more == 0 {
            return Some(Command::Publish(first));
        }
        let frames = std::iter::once(first.frame.clone())
            .chain(self.local.drain(..more).map(|p| p.frame.clone()));
        let run = self.runs.make(frames);
        Some(Command::PublishRun(PublicationRun {
            topic: first.topic.clone(),
            exclude: first.exclude,
            number,
            run,
        }))
    }

    /// The loop's subscribers of `topic` that get publication `number`, but the excluded
    /// one.
    pub fn targets(
        &self,
        loop_index: usize,
        topic: &[u8],
        exclude: Option<(usize, usize)>,
        number: u64,
        out: &mut Vec<usize>,
    ) {
        let Some(here) = self.subscribers.get(topic) else {
            return;
        };
        let excluded = match exclude {
            Some((l, key)) if l == loop_index => Some(key),
            _ => None,
        };
        out.extend(
            here.marks
                .iter()
                .filter(|&(&key, mark)| mark.first <= number && Some(key) != excluded)
                .map(|(&key, _)| key),
        );
    }
}

/// Publishes to every subscriber of a topic from any thread (`Send + Sync + Clone`):
/// what [`ServerHandle::publisher`](super::ServerHandle::publisher) and
/// [`Ws::publisher`](super::Ws::publisher) give.
#[derive(Clone)]
pub struct Publisher {
    pub(crate) pubsub: Arc<PubSub>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Publisher {
    /// Sends `data` as `kind` (text or binary) to every subscriber of `topic`, on every
    /// loop, encoded once. Messages published from one thread to one topic arrive in
    /// order. A subscriber whose output is over the cap does not get it (counted in
    /// `Stats::dropped`, or closed with 1008 under `BackpressurePolicy::Close`).
    /// Fails for a topic over [`MAX_TOPIC_LEN`], text that is not UTF-8, or another kind,
    /// and (`Error::Io`, `NotConnected`) once the server is shutting down.
    pub fn publish(
        &self,
        topic: impl AsRef<[u8]>,
        data: &[u8],
        kind: MessageType,
    ) -> Result<(), Error> {
        if self.pubsub.stopped.load(Ordering::Acquire) {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the server has shut down",
            )));
        }
        self.pubsub.publish(topic.as_ref(), data, kind, None)?;
        self.pubsub.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Subscribers of `topic` over the whole server, now.
    pub fn subscribers(&self, topic: impl AsRef<[u8]>) -> usize {
        self.pubsub.subscribers(topic.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one subscription stores on its loop, as the module docs count it: a key and
    /// its mark (with its place in the connection's list) in the topic's map, and a topic
    /// reference in the connection's list (24 and 16 bytes; about 64 with the map's
    /// control byte and the spare room maps and vectors keep).
    #[test]
    fn a_subscription_stores_entries_of_24_and_16_bytes() {
        assert_eq!(std::mem::size_of::<(usize, Mark)>(), 24);
        assert_eq!(std::mem::size_of::<Topic>(), 16);
    }

    /// Checks the index both ways against what `model` says each connection holds.
    fn check_index(topics: &LoopTopics, pubsub: &PubSub, model: &HashMap<usize, Vec<String>>) {
        let held: usize = model.values().map(Vec::len).sum();
        let indexed: usize = topics.subscribers.values().map(|h| h.marks.len()).sum();
        assert_eq!(indexed, held);
        for (&key, names) in model {
            let mut listed: Vec<String> = topics
                .topics(key)
                .iter()
                .map(|t| String::from_utf8(t.to_vec()).unwrap())
                .collect();
            let mut want = names.clone();
            listed.sort();
            want.sort();
            assert_eq!(listed, want, "connection {key}");
            // Every mark's slot names its own topic in the connection's list.
            for (slot, topic) in topics.by_conn.get(&key).into_iter().flatten().enumerate() {
                assert_eq!(topics.subscribers[&**topic].marks[&key].slot as usize, slot);
            }
            for name in names {
                assert!(topics.is_subscribed(key, name.as_bytes()));
            }
        }
        for (topic, here) in &topics.subscribers {
            assert_eq!(pubsub.subscribers(topic), here.marks.len());
        }
    }

    /// Unsubscribes find the topic by its slot, not by a scan of the connection's list
    /// (which was O(its topics): leaving 40 000 topics one by one took a second); the
    /// slots stay right through any order of subscribes, unsubscribes and closes.
    #[test]
    fn unsubscribes_keep_every_slot_right_in_any_order() {
        let pubsub = PubSub::new(1, None);
        let mut topics = LoopTopics::default();
        let mut model: HashMap<usize, Vec<String>> = HashMap::new();
        // A small deterministic generator: the same sequence every run.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for step in 0..20_000 {
            let key = next(8) as usize;
            let name = format!("t{}", next(40));
            let held = model.entry(key).or_default();
            match next(10) {
                0..=4 => {
                    let new = topics.subscribe(&pubsub, 0, key, name.as_bytes()).unwrap();
                    assert_eq!(new, !held.contains(&name), "step {step}");
                    if new {
                        held.push(name);
                    }
                }
                5..=8 => {
                    let was = topics.unsubscribe(&pubsub, 0, key, name.as_bytes());
                    assert_eq!(was, held.contains(&name), "step {step}");
                    held.retain(|n| *n != name);
                }
                _ => {
                    topics.leave_all(&pubsub, 0, key);
                    held.clear();
                }
            }
            if step % 97 == 0 {
                check_index(&topics, &pubsub, &model);
            }
        }
        check_index(&topics, &pubsub, &model);
    }

    /// Once a burst of topics has gone, the loop's index and the server-wide counts give
    /// their room back (they kept their largest size: about 14 MB after 100 000 topics).
    #[test]
    fn the_maps_give_their_room_back_once_topics_are_gone() {
        let pubsub = PubSub::new(1, None);
        let mut topics = LoopTopics::default();
        let names: Vec<String> = (0..20_000).map(|t| format!("t{t}")).collect();
        for (i, name) in names.iter().enumerate() {
            topics
                .subscribe(&pubsub, 0, i % 3, name.as_bytes())
                .unwrap();
        }
        assert!(topics.subscribers.capacity() >= 20_000);
        for (i, name) in names.iter().enumerate().skip(10) {
            assert!(topics.unsubscribe(&pubsub, 0, i % 3, name.as_bytes()));
        }
        assert!(
            topics.subscribers.capacity() <= 64,
            "{}",
            topics.subscribers.capacity()
        );
        assert!(pubsub.counts.read().unwrap().capacity() <= 64);
        check_index(
            &topics,
            &pubsub,
            &(0..3)
                .map(|key| {
                    let held = names[..10].iter().enumerate().filter(|(i, _)| i % 3 == key);
                    (key, held.map(|(_, n)| n.clone()).collect())
                })
                .collect(),
        );
        // One topic's subscribers likewise.
        for key in 0..5_000 {
            topics.subscribe(&pubsub, 0, 100 + key, b"crowd").unwrap();
        }
        for key in 10..5_000 {
            assert!(topics.unsubscribe(&pubsub, 0, 100 + key, b"crowd"));
        }
        assert!(topics.subscribers[&b"crowd"[..]].marks.capacity() <= 64);
        assert!(topics.by_conn.capacity() <= 64 * 2);
    }

    fn publication(topic: &str, len: usize, exclude: Option<(usize, usize)>) -> Arc<Publication> {
        // A frame of `len` bytes in all: its header (2 bytes, or 4 past 125 bytes of
        // payload) and the payload.
        let header = if len - 2 <= 125 { 2 } else { 4 };
        let payload = vec![b'x'; len - header];
        Arc::new(Publication {
            topic: Topic::new(topic.as_bytes()).unwrap(),
            frame: SharedFrame::new(&payload, MessageType::Binary).unwrap(),
            exclude,
            number: 0,
        })
    }

    /// What `next_local` hands out: `1` for a single publication, `n` for a run of `n`.
    fn drain(topics: &mut LoopTopics) -> Vec<usize> {
        std::iter::from_fn(|| topics.next_local())
            .map(|command| match command {
                Command::Publish(_) => 1,
                Command::PublishRun(run) => {
                    assert!(run.run.frames().len() >= 2);
                    run.run.frames().len()
                }
                _ => panic!("not a publication"),
            })
            .collect()
    }

    #[test]
    fn neighbours_with_the_same_topic_and_exclusion_merge() {
        let mut topics = LoopTopics::default();
        let me = Some((0, 7));
        for p in [
            publication("a", 10, None),
            publication("a", 10, None),
            publication("a", 10, None),
            publication("b", 10, None), // another topic
            publication("a", 10, None),
            publication("a", 10, me), // another left-out sender
            publication("a", 10, me),
            publication("a", 10, None),
        ] {
            topics.local.push_back(p);
        }
        assert_eq!(drain(&mut topics), [3, 1, 1, 2, 1]);
        assert!(topics.local.is_empty());
    }

    #[test]
    fn a_run_holds_at_most_run_max_bytes() {
        let mut topics = LoopTopics::default();
        // Exactly RUN_MAX in two frames: one run; one byte more: two publications.
        let (big, small) = (
            publication("a", RUN_MAX - 100, None),
            publication("a", 100, None),
        );
        assert_eq!(big.frame.len() + small.frame.len(), RUN_MAX);
        topics.local.push_back(big);
        topics.local.push_back(small);
        assert_eq!(drain(&mut topics), [2]);
        topics
            .local
            .push_back(publication("a", RUN_MAX - 100, None));
        topics.local.push_back(publication("a", 101, None));
        assert_eq!(drain(&mut topics), [1, 1]);
    }

    #[test]
    fn a_run_keeps_publish_order() {
        let mut topics = LoopTopics::default();
        for n in 0..5u8 {
            topics.local.push_back(Arc::new(Publication {
                topic: Topic::new(b"t").unwrap(),
                frame: SharedFrame::new(&[n], MessageType::Binary).unwrap(),
                exclude: None,
                number: n.into(),
            }));
        }
        let Some(Command::PublishRun(run)) = topics.next_local() else {
            panic!("one run")
        };
        assert_eq!(
            run.run.as_bytes(),
            [0x82, 1, 0, 0x82, 1, 1, 0x82, 1, 2, 0x82, 1, 3, 0x82, 1, 4]
        );
        assert!(topics.next_local().is_none());
    }

    /// Publications numbered below a subscriber's mark go alone (that subscriber is left
    /// out of them); those at or above it merge and reach everyone. Marks count the
    /// publications made before the subscribe.
    #[test]
    fn a_subscriber_gets_publications_from_its_mark_on() {
        let pubsub = PubSub::new(1, None);
        let mut topics = LoopTopics::default();
        let numbered = |n: u64| {
            let mut p = Arc::into_inner(publication("t", 10, None)).unwrap();
            p.number = n;
            Arc::new(p)
        };
        assert!(topics.subscribe(&pubsub, 0, 1, b"t").unwrap());
        pubsub.sequence.store(3, Ordering::Relaxed);
        assert!(topics.subscribe(&pubsub, 0, 2, b"t").unwrap());
        // Subscribing again keeps the first mark.
        pubsub.sequence.store(5, Ordering::Relaxed);
        assert!(!topics.subscribe(&pubsub, 0, 2, b"t").unwrap());
        for n in [1, 2, 3, 4, 5] {
            topics.local.push_back(numbered(n));
        }
        let mut got = Vec::new();
        while let Some(command) = topics.next_local() {
            let (number, frames) = match &command {
                Command::Publish(p) => (p.number, 1),
                Command::PublishRun(r) => (r.number, r.run.frames().len()),
                _ => panic!("not a publication"),
            };
            let mut targets = Vec::new();
            topics.targets(0, b"t", None, number, &mut targets);
            targets.sort();
            got.push((number, frames, targets));
        }
        assert_eq!(got, [(1, 1, vec![1]), (2, 1, vec![1]), (3, 3, vec![1, 2])]);
    }
}
