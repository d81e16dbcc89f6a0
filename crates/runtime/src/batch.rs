//! Dynamic batching with TorchServe's semantics.
//!
//! A free worker waits as long as it takes for a first request, then keeps collecting until the
//! batch is full or `max_delay` has passed since that first request, whichever comes first. A
//! batch therefore holds between 1 and `batch_size` requests and is never padded. Requests whose
//! client has already gone are dropped instead of batched.
//!
//! Of the workers waiting for a first request, a new one wakes the worker that began waiting
//! last. Its caches and its OpenMP team are the warmest, and at low concurrency the same worker
//! then takes every request; woken in the order they began waiting, two workers of one ResNet-18
//! took turns at concurrency 1 and answered a fifth less than one worker alone.
//!
//! Where a batch may wait for more requests (`batch_size` over 1 and a delay), one worker
//! gathers at a time, as TorchServe gathers under one lock per model: requests arriving while a
//! batch is gathered join it rather than wake an idle worker into a batch of its own. Woken per
//! request instead, four workers of one MLP at concurrency 8 each waited out the delay with
//! batches half full, and answered a tenth of what one worker did. A worker done gathering hands
//! the rest of the queue to the next.

use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, bounded};

/// How soon a batch being gathered sees [`Submitter::close_batches`].
const CLOSE_SEEN_WITHIN: Duration = Duration::from_millis(10);

/// A bounded queue of `capacity` items between the callers and a model version's workers.
pub fn queue<T>(capacity: usize) -> (Submitter<T>, Taker<T>) {
    let (tx, rx) = bounded(capacity);
    let waiters = Arc::new(Waiters::default());
    (
        Submitter {
            tx,
            waiters: Arc::clone(&waiters),
        },
        Taker { rx, waiters },
    )
}

/// The callers' end of a [`queue`].
#[derive(Debug)]
pub struct Submitter<T> {
    tx: Sender<T>,
    waiters: Arc<Waiters>,
}

impl<T> Submitter<T> {
    /// Queues `item` and wakes the worker that began waiting last, unless a worker is gathering
    /// a batch, which takes it; gives it back when full.
    pub fn try_send(&self, item: T) -> Result<(), T> {
        self.tx.try_send(item).map_err(|e| e.into_inner())?;
        // Pairs with the fence in `Waiters::release`: either the gatherer that stops sees this
        // item queued, or this sees that nobody gathers any more.
        fence(Ordering::SeqCst);
        if !self.waiters.gathering.load(Ordering::SeqCst) {
            self.waiters.wake_last();
        }
        Ok(())
    }

    /// Queues `item` only if a thread waits for a first item, and wakes it; gives the item back
    /// otherwise, or when full. Each waiting thread admits one item: TorchServe's job tickets.
    pub fn try_send_to_waiting(&self, item: T) -> Result<(), T> {
        // Under the list's lock, so that two callers cannot both count the same thread.
        let mut waiting = self.waiters.waiting();
        let Some(thread) = waiting.pop() else {
            return Err(item);
        };
        if let Err(e) = self.tx.try_send(item) {
            waiting.push(thread);
            return Err(e.into_inner());
        }
        drop(waiting);
        thread.unpark();
        Ok(())
    }

    /// Says that no more items will come (the server stops, the model goes): a batch being
    /// gathered stops waiting to fill, and later batches take only what is queued. What is
    /// queued then has nothing left to wait for.
    pub fn close_batches(&self) {
        self.waiters.closing.store(true, Ordering::SeqCst);
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }
}

/// The workers' end of a [`queue`].
#[derive(Debug)]
pub struct Taker<T> {
    rx: Receiver<T>,
    waiters: Arc<Waiters>,
}

// By hand: a derive would ask for `T: Clone`, and only the ends are cloned.
impl<T> Clone for Taker<T> {
    fn clone(&self) -> Self {
        Taker {
            rx: self.rx.clone(),
            waiters: Arc::clone(&self.waiters),
        }
    }
}

impl<T> Taker<T> {
    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// An item, if one is queued, without waiting.
    pub fn try_take(&self) -> Option<T> {
        self.rx.try_recv().ok()
    }

    /// Takes the calling thread off the list of those waiting, where [`Batcher::next_batch`]
    /// left it on returning [`Next::Idle`]; a thread that stops taking items must call this, or
    /// an item could wake it in vain and wait for another thread's timeout.
    pub fn stop_waiting(&self) {
        self.waiters.leave();
    }
}

/// The threads waiting for a first item, in the order they began, and whether one thread is
/// gathering a batch.
#[derive(Debug, Default)]
struct Waiters {
    waiting: Mutex<Vec<Thread>>,
    gathering: AtomicBool,
    /// Set once no more items will come: a batch then stops waiting to fill.
    closing: AtomicBool,
}

impl Waiters {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<Thread>> {
        // The list holds no invariant a panic could break.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the calling thread the one that gathers; false if another one is.
    fn claim(&self) -> bool {
        self.gathering
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Ends the calling thread's turn at gathering. Returns whether items are queued: a caller
    /// that says so hands them on (or takes them itself), since their senders, seeing a
    /// gatherer, woke nobody.
    fn release<T>(&self, queue: &Receiver<T>) -> bool {
        self.gathering.store(false, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        !queue.is_empty()
    }

    /// Takes the last thread off the list and wakes it. Each item wakes one thread, so as many
    /// items as arrive at once wake as many threads.
    fn wake_last(&self) {
        let last = self.waiting().pop();
        if let Some(thread) = last {
            thread.unpark();
        }
    }

    /// Puts the calling thread last on the list, unless it is on it already: a worker that keeps
    /// waiting through idle timeouts keeps its place, behind any that began waiting since.
    fn join(&self) {
        let me = std::thread::current();
        let mut waiting = self.waiting();
        if !waiting.iter().any(|t| t.id() == me.id()) {
            waiting.push(me);
        }
    }

    fn leave(&self) {
        let me = std::thread::current().id();
        self.waiting().retain(|t| t.id() != me);
    }
}

/// Batch size and delay of one model version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batcher {
    /// Largest batch.
    pub batch_size: usize,
    /// Longest wait, from the first request, for the batch to fill.
    pub max_delay: Duration,
}

/// Something a batcher can collect: it knows whether it is still wanted.
pub trait Batchable {
    /// False once the requester has gone.
    fn is_wanted(&self) -> bool;
}

impl Batchable for crate::job::Job {
    fn is_wanted(&self) -> bool {
        crate::job::Job::is_wanted(self)
    }
}

/// How a wait for the next batch ended.
#[derive(Debug)]
pub enum Next<T> {
    /// A batch of one or more wanted items.
    Batch(Vec<T>),
    /// Nothing arrived within the idle timeout; the caller may check for control messages. The
    /// thread keeps its place among those waiting (see [`Taker::stop_waiting`]).
    Idle,
    /// The queue is closed and empty.
    Closed,
}

impl Batcher {
    /// Waits up to `idle` for a first item, then gathers a batch. For the first `poll` of that
    /// wait the thread polls the queue, yielding its core at each turn, instead of sleeping.
    pub fn next_batch<T: Batchable>(
        &self,
        taker: &Taker<T>,
        idle: Duration,
        poll: Duration,
    ) -> Next<T> {
        let queue = &taker.rx;
        let spin_until = Instant::now() + poll;
        let give_up = spin_until + idle;
        // On the list before looking, so that an item queued after the look wakes this thread
        // (an unpark before the park makes the park return at once). A polling thread is on it
        // too, last, so that a new item goes to it rather than waking another.
        taker.waiters.join();
        // Whether the thread was (put back) on the list before its last look: a wake takes it
        // off, and the item may have gone to another thread.
        let mut listed = true;
        let waiters = &taker.waiters;
        let one_gatherer = self.gathers_one_at_a_time();
        loop {
            // Only the thread that gathers takes a first item; one that cannot gather yet waits
            // to be handed the queue.
            let holds_claim = one_gatherer && waiters.claim();
            let got = if holds_claim || !one_gatherer {
                queue.try_recv()
            } else {
                Err(TryRecvError::Empty)
            };
            if !matches!(got, Err(TryRecvError::Empty)) {
                waiters.leave();
            }
            match got {
                Ok(item) if item.is_wanted() => return self.gather(taker, item),
                // Back on the list before the next look, polling or not.
                Ok(_) => {
                    if holds_claim {
                        waiters.release(queue);
                    }
                    waiters.join();
                    continue;
                }
                Err(TryRecvError::Disconnected) => {
                    if holds_claim {
                        waiters.release(queue);
                    }
                    return Next::Closed;
                }
                Err(TryRecvError::Empty) => {
                    // An item queued while this thread looked, by a sender that saw it
                    // gathering and woke nobody: look again.
                    if holds_claim && waiters.release(queue) {
                        continue;
                    }
                }
            }
            let now = Instant::now();
            if now < spin_until {
                std::thread::yield_now();
            } else if now >= give_up {
                // Still on the list: see Taker::stop_waiting.
                return Next::Idle;
            } else if !listed {
                taker.waiters.join();
                listed = true;
            } else {
                // Returns when woken for an item (and taken off the list), at the timeout, or
                // for nothing.
                std::thread::park_timeout(give_up - now);
                listed = false;
            }
        }
    }

    /// Whether a batch may wait for more items, so that one thread gathers at a time.
    fn gathers_one_at_a_time(&self) -> bool {
        self.batch_size > 1 && !self.max_delay.is_zero()
    }

    /// Collects the rest of a batch whose first item is `first`, then hands what is still
    /// queued to the next thread.
    fn gather<T: Batchable>(&self, taker: &Taker<T>, first: T) -> Next<T> {
        let batch = self.collect(&taker.rx, &taker.waiters.closing, first);
        if self.gathers_one_at_a_time() && taker.waiters.release(&taker.rx) {
            taker.waiters.wake_last();
        }
        batch
    }

    fn collect<T: Batchable>(
        &self,
        queue: &Receiver<T>,
        closing: &AtomicBool,
        first: T,
    ) -> Next<T> {
        let deadline = Instant::now() + self.max_delay;
        let mut batch = Vec::with_capacity(self.batch_size);
        batch.push(first);
        while batch.len() < self.batch_size {
            // Take what is already queued without waiting; only wait when the queue is empty.
            let item = match queue.try_recv() {
                Ok(item) => item,
                Err(_) => {
                    let now = Instant::now();
                    if now >= deadline || closing.load(Ordering::SeqCst) {
                        break;
                    }
                    // In slices, so that a close is seen within one rather than at the
                    // deadline (up to a minute away).
                    match queue.recv_timeout((deadline - now).min(CLOSE_SEEN_WITHIN)) {
                        Ok(item) => item,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            if item.is_wanted() {
                batch.push(item);
            }
        }
        Next::Batch(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Item(u32, bool);

    impl Batchable for Item {
        fn is_wanted(&self) -> bool {
            self.1
        }
    }

    /// A batcher that sends what it has at once.
    fn no_delay(batch_size: usize) -> Batcher {
        Batcher {
            batch_size,
            max_delay: Duration::ZERO,
        }
    }

    fn batch_of(next: Next<Item>) -> Vec<u32> {
        match next {
            Next::Batch(b) => b.into_iter().map(|i| i.0).collect(),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[test]
    fn full_batches_go_at_once() {
        let (tx, rx) = queue(16);
        for i in 0..5 {
            tx.try_send(Item(i, true)).unwrap();
        }
        let b = Batcher {
            batch_size: 4,
            max_delay: Duration::from_secs(10),
        };
        let started = Instant::now();
        assert_eq!(
            batch_of(b.next_batch(&rx, Duration::from_secs(1), Duration::ZERO)),
            [0, 1, 2, 3]
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        // The rest waits for the delay, then goes alone.
        let b = Batcher {
            batch_size: 4,
            max_delay: Duration::from_millis(50),
        };
        let started = Instant::now();
        assert_eq!(
            batch_of(b.next_batch(&rx, Duration::from_secs(1), Duration::ZERO)),
            [4]
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn late_arrivals_join_within_the_delay() {
        let (tx, rx) = queue(16);
        tx.try_send(Item(1, true)).unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.try_send(Item(2, true)).unwrap();
            std::thread::sleep(Duration::from_millis(400));
            tx.try_send(Item(3, true)).unwrap();
        });
        let b = Batcher {
            batch_size: 8,
            max_delay: Duration::from_millis(200),
        };
        assert_eq!(
            batch_of(b.next_batch(&rx, Duration::from_secs(1), Duration::ZERO)),
            [1, 2]
        );
        assert_eq!(
            batch_of(b.next_batch(&rx, Duration::from_secs(2), Duration::ZERO)),
            [3]
        );
        sender.join().unwrap();
    }

    #[test]
    fn a_close_ends_the_wait_for_a_batch_to_fill() {
        let (tx, rx) = queue(16);
        tx.try_send(Item(1, true)).unwrap();
        let b = Batcher {
            batch_size: 8,
            max_delay: Duration::from_secs(20),
        };
        let started = Instant::now();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.close_batches();
            tx
        });
        assert_eq!(
            batch_of(b.next_batch(&rx, Duration::from_secs(1), Duration::ZERO)),
            [1]
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        // Later batches take what is queued and do not wait.
        let tx = closer.join().unwrap();
        tx.try_send(Item(2, true)).unwrap();
        tx.try_send(Item(3, true)).unwrap();
        let started = Instant::now();
        assert_eq!(
            batch_of(b.next_batch(&rx, Duration::from_secs(1), Duration::ZERO)),
            [2, 3]
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn abandoned_requests_are_dropped() {
        let (tx, rx) = queue(16);
        for (i, wanted) in [(0, false), (1, true), (2, false), (3, true)] {
            tx.try_send(Item(i, wanted)).unwrap();
        }
        let b = no_delay(8);
        assert_eq!(
            batch_of(b.next_batch(&rx, Duration::from_secs(1), Duration::ZERO)),
            [1, 3]
        );
    }

    #[test]
    fn polling_keeps_the_semantics() {
        let (tx, rx) = queue::<Item>(4);
        let b = no_delay(2);
        let poll = Duration::from_millis(5);
        assert!(matches!(
            b.next_batch(&rx, Duration::from_millis(10), poll),
            Next::Idle
        ));
        tx.try_send(Item(1, false)).unwrap();
        tx.try_send(Item(2, true)).unwrap();
        assert_eq!(
            batch_of(b.next_batch(&rx, Duration::from_secs(1), poll)),
            [2]
        );
        let later = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1));
            tx.try_send(Item(3, true)).unwrap();
        });
        assert_eq!(
            batch_of(b.next_batch(&rx, Duration::from_secs(1), poll)),
            [3]
        );
        later.join().unwrap();
        assert!(matches!(
            b.next_batch(&rx, Duration::from_millis(10), poll),
            Next::Closed
        ));
    }

    #[test]
    fn idle_and_closed() {
        let (tx, rx) = queue::<Item>(1);
        let b = no_delay(2);
        assert!(matches!(
            b.next_batch(&rx, Duration::from_millis(10), Duration::ZERO),
            Next::Idle
        ));
        drop(tx);
        assert!(matches!(
            b.next_batch(&rx, Duration::from_millis(10), Duration::ZERO),
            Next::Closed
        ));
    }

    #[test]
    fn the_worker_that_began_waiting_last_is_woken_first() {
        let (tx, rx) = queue::<Item>(4);
        let b = no_delay(1);
        let waiter = |name: &'static str| {
            let rx = rx.clone();
            std::thread::spawn(move || {
                let got = b.next_batch(&rx, Duration::from_secs(5), Duration::ZERO);
                (name, batch_of(got))
            })
        };
        let first = waiter("first");
        std::thread::sleep(Duration::from_millis(100));
        let second = waiter("second");
        std::thread::sleep(Duration::from_millis(100));
        tx.try_send(Item(1, true)).unwrap();
        assert_eq!(second.join().unwrap(), ("second", vec![1]));
        // The other is still waiting, and the next item is its.
        tx.try_send(Item(2, true)).unwrap();
        assert_eq!(first.join().unwrap(), ("first", vec![2]));
    }

    #[test]
    fn a_worker_waiting_through_timeouts_keeps_its_place() {
        let (tx, rx) = queue::<Item>(4);
        let b = no_delay(1);
        let early = {
            let rx = rx.clone();
            std::thread::spawn(move || {
                // Times out every 10 ms and waits again, as an idle worker does.
                loop {
                    if let Next::Batch(got) =
                        b.next_batch(&rx, Duration::from_millis(10), Duration::ZERO)
                    {
                        rx.stop_waiting();
                        return got.into_iter().map(|i| i.0).collect::<Vec<_>>();
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let late = {
            let rx = rx.clone();
            std::thread::spawn(move || {
                batch_of(b.next_batch(&rx, Duration::from_secs(5), Duration::ZERO))
            })
        };
        // Several of the early thread's timeouts pass after the late one began waiting.
        std::thread::sleep(Duration::from_millis(100));
        tx.try_send(Item(1, true)).unwrap();
        assert_eq!(late.join().unwrap(), [1]);
        tx.try_send(Item(2, true)).unwrap();
        assert_eq!(early.join().unwrap(), [2]);
    }

    #[test]
    fn one_worker_gathers_at_a_time_so_batches_fill() {
        let (tx, rx) = queue::<Item>(16);
        let b = Batcher {
            batch_size: 4,
            max_delay: Duration::from_secs(3),
        };
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || {
                    match b.next_batch(&rx, Duration::from_secs(1), Duration::ZERO) {
                        Next::Batch(got) => got.into_iter().map(|i| i.0).collect(),
                        _ => Vec::new(),
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        // Eight requests one after another, while three workers wait: two full batches, in
        // order, long before the delay; woken per request, the workers would split them and
        // each wait out the delay.
        let started = Instant::now();
        for i in 0..8 {
            tx.try_send(Item(i, true)).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut batches: Vec<Vec<u32>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        batches.sort();
        assert_eq!(batches, [vec![], vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn job_tickets_admit_one_item_per_waiting_thread() {
        let (tx, rx) = queue::<Item>(8);
        // Nobody waits: refused, though the queue has room.
        assert!(tx.try_send_to_waiting(Item(0, true)).is_err());
        assert!(tx.is_empty());
        let b = no_delay(4);
        let waiter = {
            let rx = rx.clone();
            std::thread::spawn(move || {
                let got = b.next_batch(&rx, Duration::from_secs(5), Duration::ZERO);
                batch_of(got)
            })
        };
        // Once it waits, one item is taken and the next refused: the thread is spoken for.
        let deadline = Instant::now() + Duration::from_secs(5);
        while tx.try_send_to_waiting(Item(1, true)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the waiting thread never admitted an item"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(tx.try_send_to_waiting(Item(2, true)).is_err());
        assert_eq!(waiter.join().unwrap(), [1]);
    }
}
