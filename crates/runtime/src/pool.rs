//! A model version's worker pool: a bounded job queue served by worker threads.
//!
//! Each worker is a dedicated OS thread that owns a loaded TorchScript module on its device.
//! Workers share one queue, so scaling down never drops a queued request: a stopped worker
//! finishes its batch and leaves the rest to the others.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use tchserve_mar::HandlerManifest;

use crate::batch::Batcher;
use crate::job::Job;
use crate::worker;

/// Everything a worker needs to load the model.
#[derive(Debug)]
pub struct ModelSpec {
    /// Folder holding the unpacked archive.
    pub model_dir: PathBuf,
    /// The TorchScript file inside it.
    pub serialized_file: String,
    /// The resolved handler.
    pub handler: HandlerManifest,
}

/// Serving settings of one model version.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Model name, for logs.
    pub model_name: String,
    /// Model version, for logs.
    pub version: String,
    /// Batching.
    pub batcher: Batcher,
    /// Capacity of the job queue; a full queue refuses new requests.
    pub job_queue_size: usize,
    /// How long a request may wait for its answer.
    pub response_timeout: Duration,
    /// Devices assigned to workers round-robin.
    pub devices: Vec<tch::Device>,
}

/// Life stage of a worker, as describe reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerState {
    /// Loading the model and warming it up.
    Starting,
    /// Serving.
    Ready,
    /// Loading failed, or the worker crashed and is being restarted; the text says why.
    Failed(String),
    /// Stopped (scaled down or shut down).
    Stopped,
}

/// A worker as describe reports it.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    /// Worker id, unique in the process.
    pub id: usize,
    /// When it started.
    pub started: SystemTime,
    /// Its state.
    pub state: WorkerState,
    /// Its device.
    pub device: tch::Device,
}

/// The intra-op thread budget shared by every worker of the process.
///
/// The cores are split among the workers that are running a batch right now, not among all
/// workers: an idle worker uses no CPU, so a lone busy worker gets every core, and several busy
/// workers never oversubscribe the machine.
#[derive(Debug)]
pub struct ThreadBudget {
    total: usize,
    busy: AtomicUsize,
}

impl ThreadBudget {
    /// A budget of `total` threads (at least 1).
    pub fn new(total: usize) -> Arc<Self> {
        Arc::new(ThreadBudget {
            total: total.max(1),
            busy: AtomicUsize::new(0),
        })
    }

    /// Marks a worker busy for the life of the guard and returns its share of the threads.
    pub fn enter(&self) -> (usize, BusyGuard<'_>) {
        let busy = self.busy.fetch_add(1, Ordering::Relaxed) + 1;
        ((self.total / busy).max(1), BusyGuard(self))
    }
}

/// Holds a worker's place in the busy count.
#[derive(Debug)]
pub struct BusyGuard<'a>(&'a ThreadBudget);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// State shared between the pool and its worker threads.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    states: Mutex<BTreeMap<usize, WorkerState>>,
    changed: Condvar,
}

impl Shared {
    /// Records a worker's new state; a worker already scaled away stays gone, so stopped
    /// workers never pile up in the map.
    pub(crate) fn set(&self, id: usize, state: WorkerState) {
        if let Some(s) = lock(&self.states).get_mut(&id) {
            *s = state;
        }
        self.changed.notify_all();
    }

    fn insert(&self, id: usize, state: WorkerState) {
        lock(&self.states).insert(id, state);
        self.changed.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked while holding the lock left plain data behind; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug)]
struct Handle {
    id: usize,
    started: SystemTime,
    device: tch::Device,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A model version's queue and workers.
#[derive(Debug)]
pub struct Pool {
    spec: Arc<ModelSpec>,
    config: PoolConfig,
    tx: Sender<Job>,
    rx: Receiver<Job>,
    workers: Mutex<Vec<Handle>>,
    shared: Arc<Shared>,
    budget: Arc<ThreadBudget>,
    spawned: AtomicUsize,
}

static NEXT_WORKER_ID: AtomicUsize = AtomicUsize::new(9000);

impl Pool {
    /// A pool with no workers yet.
    pub fn new(spec: ModelSpec, config: PoolConfig, budget: Arc<ThreadBudget>) -> Arc<Self> {
        let (tx, rx) = bounded(config.job_queue_size.max(1));
        Arc::new(Pool {
            spec: Arc::new(spec),
            config,
            tx,
            rx,
            workers: Mutex::new(Vec::new()),
            shared: Arc::default(),
            budget,
            spawned: AtomicUsize::new(0),
        })
    }

    /// Queues a job; gives it back when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(j) | TrySendError::Disconnected(j) => j,
        })
    }

    /// Requests waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.tx.len()
    }

    /// Free places in the queue.
    pub fn remaining_capacity(&self) -> usize {
        self.config.job_queue_size.saturating_sub(self.tx.len())
    }

    /// Number of workers (any state but stopped).
    pub fn worker_count(&self) -> usize {
        lock(&self.workers).len()
    }

    /// Number of workers ready to serve.
    pub fn ready_count(&self) -> usize {
        // Lock order everywhere: `workers`, then `shared.states` (scale holds the first while
        // it sets states); the opposite order deadlocks against a concurrent scale.
        let workers = lock(&self.workers);
        let states = lock(&self.shared.states);
        workers
            .iter()
            .filter(|h| states.get(&h.id) == Some(&WorkerState::Ready))
            .count()
    }

    /// Starts or stops workers until there are `n`. Stopped workers finish their current batch.
    pub fn scale(&self, n: usize) {
        let mut workers = lock(&self.workers);
        while workers.len() < n {
            let id = NEXT_WORKER_ID.fetch_add(1, Ordering::Relaxed);
            let nth = self.spawned.fetch_add(1, Ordering::Relaxed);
            let device = self.config.devices[nth % self.config.devices.len().max(1)];
            let stop = Arc::new(AtomicBool::new(false));
            self.shared.insert(id, WorkerState::Starting);
            let ctx = worker::Context {
                id,
                device,
                spec: Arc::clone(&self.spec),
                config: self.config.clone(),
                queue: self.rx.clone(),
                stop: Arc::clone(&stop),
                shared: Arc::clone(&self.shared),
                budget: Arc::clone(&self.budget),
            };
            let name = format!("W-{id}-{}_{}", self.config.model_name, self.config.version);
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || worker::run(ctx))
                .ok();
            if thread.is_none() {
                self.shared
                    .set(id, WorkerState::Failed("cannot start a thread".into()));
            }
            workers.push(Handle {
                id,
                started: SystemTime::now(),
                device,
                stop,
                thread,
            });
        }
        // Newest first, as TorchServe scales down.
        while workers.len() > n {
            if let Some(h) = workers.pop() {
                h.stop.store(true, Ordering::Relaxed);
                lock(&self.shared.states).remove(&h.id);
            }
        }
    }

    /// Waits until no worker is starting, or `timeout` passes; returns the number ready.
    pub fn wait_started(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let ids: Vec<usize> = lock(&self.workers).iter().map(|h| h.id).collect();
        let mut states = lock(&self.shared.states);
        loop {
            let starting = ids
                .iter()
                .any(|id| states.get(id) == Some(&WorkerState::Starting));
            let now = Instant::now();
            if !starting || now >= deadline {
                break;
            }
            states = self
                .shared
                .changed
                .wait_timeout(states, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(states);
        self.ready_count()
    }

    /// Describes every worker.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let workers = lock(&self.workers);
        let states = lock(&self.shared.states);
        workers
            .iter()
            .map(|h| WorkerInfo {
                id: h.id,
                started: h.started,
                state: states.get(&h.id).cloned().unwrap_or(WorkerState::Stopped),
                device: h.device,
            })
            .collect()
    }

    /// Stops every worker once the queue is empty (or `drain` has passed) and waits for them.
    pub fn shutdown(&self, drain: Duration) {
        let handles: Vec<Handle> = std::mem::take(&mut *lock(&self.workers));
        // Let the workers drain what is queued before they see the stop flag.
        let deadline = Instant::now() + drain;
        while !self.rx.is_empty() && !handles.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for h in &handles {
            h.stop.store(true, Ordering::Relaxed);
        }
        for mut h in handles {
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for h in lock(&self.workers).iter() {
            h.stop.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_workers_share_the_cores() {
        let budget = ThreadBudget::new(4);
        let (alone, g1) = budget.enter();
        assert_eq!(alone, 4);
        let (second, g2) = budget.enter();
        assert_eq!(second, 2);
        let (third, _g3) = budget.enter();
        assert_eq!(third, 1);
        drop((g1, g2));
        assert_eq!(budget.enter().0, 2);
    }

    #[test]
    fn scaling_while_states_are_read_never_deadlocks() {
        // Workers of a model that does not exist fail to load, which is enough: the test is
        // about the pool's locks, which scale, describe and /ping take from different threads.
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::new(
            ModelSpec {
                model_dir: dir.path().to_path_buf(),
                serialized_file: "missing.pt".into(),
                handler: tchserve_mar::handler::builtin("tensor").unwrap(),
            },
            PoolConfig {
                model_name: "m".into(),
                version: "1.0".into(),
                batcher: Batcher {
                    batch_size: 1,
                    max_delay: Duration::ZERO,
                },
                job_queue_size: 1,
                response_timeout: Duration::from_secs(1),
                devices: vec![tch::Device::Cpu],
            },
            ThreadBudget::new(1),
        );
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (pool, done) = (Arc::clone(&pool), Arc::clone(&done));
                std::thread::spawn(move || {
                    while !done.load(Ordering::Relaxed) {
                        pool.ready_count();
                        pool.workers();
                    }
                })
            })
            .collect();
        let scaler = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || {
                for i in 0..3000 {
                    pool.scale(1 + i % 2);
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !scaler.is_finished() {
            assert!(
                Instant::now() < deadline,
                "scale and ready_count deadlocked"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        done.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(
            lock(&pool.shared.states).len(),
            pool.worker_count(),
            "workers scaled away leave no state behind"
        );
        pool.shutdown(Duration::ZERO);
    }
}
