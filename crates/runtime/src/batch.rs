//! Dynamic batching with TorchServe's semantics.
//!
//! A free worker waits as long as it takes for a first request, then keeps collecting until the
//! batch is full or `max_delay` has passed since that first request, whichever comes first. A
//! batch therefore holds between 1 and `batch_size` requests and is never padded. Requests whose
//! client has already gone are dropped instead of batched.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

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
    /// Nothing arrived within the idle timeout; the caller may check for control messages.
    Idle,
    /// The queue is closed and empty.
    Closed,
}

impl Batcher {
    /// Waits up to `idle` for a first item, then gathers a batch. For the first `poll` of that
    /// wait the thread polls the queue, yielding its core at each turn, instead of sleeping.
    pub fn next_batch<T: Batchable>(
        &self,
        queue: &Receiver<T>,
        idle: Duration,
        poll: Duration,
    ) -> Next<T> {
        let spin_until = Instant::now() + poll;
        let first = loop {
            if Instant::now() < spin_until {
                match queue.try_recv() {
                    Ok(item) if item.is_wanted() => break item,
                    Ok(_) => continue,
                    Err(crossbeam_channel::TryRecvError::Empty) => {
                        std::thread::yield_now();
                        continue;
                    }
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return Next::Closed,
                }
            }
            match queue.recv_timeout(idle) {
                Ok(item) if item.is_wanted() => break item,
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => return Next::Idle,
                Err(RecvTimeoutError::Disconnected) => return Next::Closed,
            }
        };
        let deadline = Instant::now() + self.max_delay;
        let mut batch = Vec::with_capacity(self.batch_size);
        batch.push(first);
        while batch.len() < self.batch_size {
            // Take what is already queued without waiting; only wait when the queue is empty.
            let item = match queue.try_recv() {
                Ok(item) => item,
                Err(_) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    match queue.recv_timeout(deadline - now) {
                        Ok(item) => item,
                        Err(_) => break,
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
    use crossbeam_channel::bounded;

    #[derive(Debug, PartialEq)]
    struct Item(u32, bool);

    impl Batchable for Item {
        fn is_wanted(&self) -> bool {
            self.1
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
        let (tx, rx) = bounded(16);
        for i in 0..5 {
            tx.send(Item(i, true)).unwrap();
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
        let (tx, rx) = bounded(16);
        tx.send(Item(1, true)).unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(Item(2, true)).unwrap();
            std::thread::sleep(Duration::from_millis(400));
            tx.send(Item(3, true)).unwrap();
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
    fn abandoned_requests_are_dropped() {
        let (tx, rx) = bounded(16);
        for (i, wanted) in [(0, false), (1, true), (2, false), (3, true)] {
            tx.send(Item(i, wanted)).unwrap();
        }
        let b = Batcher {
            batch_size: 8,
            max_delay: Duration::ZERO,
        };
        assert_eq!(
            batch_of(b.next_batch(&rx, Duration::from_secs(1), Duration::ZERO)),
            [1, 3]
        );
    }

    #[test]
    fn polling_keeps_the_semantics() {
        let (tx, rx) = bounded::<Item>(4);
        let b = Batcher {
            batch_size: 2,
            max_delay: Duration::ZERO,
        };
        let poll = Duration::from_millis(5);
        assert!(matches!(
            b.next_batch(&rx, Duration::from_millis(10), poll),
            Next::Idle
        ));
        tx.send(Item(1, false)).unwrap();
        tx.send(Item(2, true)).unwrap();
        assert_eq!(
            batch_of(b.next_batch(&rx, Duration::from_secs(1), poll)),
            [2]
        );
        let later = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1));
            tx.send(Item(3, true)).unwrap();
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
        let (tx, rx) = bounded::<Item>(1);
        let b = Batcher {
            batch_size: 2,
            max_delay: Duration::ZERO,
        };
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
}
