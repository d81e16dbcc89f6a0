//! A model version's worker pool: a bounded job queue served by worker threads.
//!
//! Each worker is a dedicated OS thread that owns a loaded TorchScript module on its device.
//! Workers share one queue, so scaling down never drops a queued request: a stopped worker
//! finishes its batch and leaves the rest to the others.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tchserve_backend::job::PredictError;
use tchserve_backend::{ModelSpec, QueueFull, WorkerInfo, WorkerState, Workers};

use crate::batch::{Batcher, Submitter, Taker, queue};
use crate::job::Job;
use crate::shared::{Shared, SharedModules, ThreadBudget, lock};
use crate::worker;

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
    devices: Vec<tch::Device>,
    tx: Submitter<Job>,
    rx: Taker<Job>,
    workers: Mutex<Vec<Handle>>,
    shared: Arc<Shared>,
    budget: Arc<ThreadBudget>,
    modules: Arc<SharedModules>,
    spawned: AtomicUsize,
    /// Workers that will take jobs: `workers.len()`, readable without the lock by `submit`.
    live: AtomicUsize,
}

static NEXT_WORKER_ID: AtomicUsize = AtomicUsize::new(9000);

impl Pool {
    /// A pool with no workers yet, whose workers take `devices` in turn.
    pub fn new(spec: ModelSpec, devices: Vec<tch::Device>, budget: Arc<ThreadBudget>) -> Arc<Self> {
        let (tx, rx) = queue(spec.job_queue_size.max(1));
        Arc::new(Pool {
            spec: Arc::new(spec),
            devices,
            tx,
            rx,
            workers: Mutex::new(Vec::new()),
            shared: Arc::default(),
            budget,
            modules: Arc::default(),
            spawned: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
        })
    }

    /// Queues a job; refuses it when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), QueueFull> {
        self.tx.try_send(job).map_err(|_| QueueFull)?;
        // A scale to no worker that drained the queue just before this job arrived leaves it
        // to nobody: answer it (and anything else queued) now. The fences pair with the one in
        // `scale`: either this sees no worker left, or the scale's drain sees this job.
        fence(Ordering::SeqCst);
        if self.live.load(Ordering::SeqCst) == 0 {
            self.fail_queued();
        }
        Ok(())
    }

    /// Answers every queued job 503: no worker is left to take it.
    fn fail_queued(&self) {
        while let Some(job) = self.rx.try_take() {
            let _ = job.reply.send((
                Err(PredictError::Unavailable(format!(
                    "Model \"{}\" was scaled to no worker while this request waited. \
                     Please use scale workers API to add workers.",
                    self.spec.name
                ))),
                Default::default(),
            ));
        }
    }

    /// Requests waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.tx.len()
    }

    /// Free places in the queue.
    pub fn remaining_capacity(&self) -> usize {
        self.spec.job_queue_size.saturating_sub(self.tx.len())
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
            let device = self
                .devices
                .get(nth % self.devices.len().max(1))
                .copied()
                .unwrap_or(tch::Device::Cpu);
            let stop = Arc::new(AtomicBool::new(false));
            self.shared.insert(id, WorkerState::Starting);
            let ctx = worker::Context {
                id,
                device,
                spec: Arc::clone(&self.spec),
                batcher: Batcher {
                    batch_size: self.spec.batch_size,
                    max_delay: self.spec.max_batch_delay,
                },
                queue: self.rx.clone(),
                stop: Arc::clone(&stop),
                shared: Arc::clone(&self.shared),
                budget: Arc::clone(&self.budget),
                modules: Arc::clone(&self.modules),
                answers_apart: device.is_cuda(),
            };
            // Before the first worker allocates, so that every buffer follows the same rules.
            crate::heap::fix_thresholds();
            let name = format!("W-{id}-{}_{}", self.spec.name, self.spec.version);
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
        self.live.store(workers.len(), Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if n == 0 {
            // No worker will take what is queued: answer it now, as a request arriving now is
            // answered, rather than when each one's response_timeout runs out. A stopping worker
            // still answers the batch it holds. Under the lock, so that a scale up cannot start
            // a worker for jobs this is failing.
            self.fail_queued();
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
                device: device_label(h.device),
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

/// `cpu`, or `cuda:N`.
pub fn device_label(d: tch::Device) -> String {
    match d {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        tch::Device::Mps => "mps".into(),
        tch::Device::Vulkan => "vulkan".into(),
        tch::Device::Cpu => "cpu".into(),
    }
}

impl Workers for Pool {
    fn submit(&self, job: Job) -> Result<(), QueueFull> {
        Pool::submit(self, job)
    }
    fn scale(&self, n: usize) {
        Pool::scale(self, n)
    }
    fn wait_started(&self, timeout: Duration) -> usize {
        Pool::wait_started(self, timeout)
    }
    fn worker_count(&self) -> usize {
        Pool::worker_count(self)
    }
    fn ready_count(&self) -> usize {
        Pool::ready_count(self)
    }
    fn workers(&self) -> Vec<WorkerInfo> {
        Pool::workers(self)
    }
    fn queue_len(&self) -> usize {
        Pool::queue_len(self)
    }
    fn remaining_capacity(&self) -> usize {
        Pool::remaining_capacity(self)
    }
    fn on_gpu(&self) -> bool {
        self.devices.iter().any(|d| *d != tch::Device::Cpu)
    }
    fn output_signature(&self) -> Option<(tchserve_mar::handler::DType, Vec<i64>)> {
        lock(&self.shared.output).clone()
    }
    fn shutdown(&self, drain: Duration) {
        Pool::shutdown(self, drain)
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
    fn scaling_while_states_are_read_never_deadlocks() {
        // Workers of a model that does not exist fail to load, which is enough: the test is
        // about the pool's locks, which scale, describe and /ping take from different threads.
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::new(
            ModelSpec {
                name: "m".into(),
                version: "1.0".into(),
                model_dir: dir.path().to_path_buf(),
                serialized_file: "missing.pt".into(),
                handler: tchserve_mar::handler::builtin("tensor").unwrap(),
                batch_size: 1,
                max_batch_delay: Duration::ZERO,
                job_queue_size: 1,
                response_timeout: Duration::from_secs(1),
                placement: tchserve_backend::Placement::Cpu,
            },
            vec![tch::Device::Cpu],
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
