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
use tchserve_backend::{Lingering, ModelSpec, QueueFull, WorkerInfo, WorkerState, Workers};

use crate::batch::{Batcher, Submitter, Taker, queue};
use crate::job::Job;
use crate::shared::{Busy, Serving, Shared, SharedModules, ThreadBudget, lock};
use crate::worker;

#[derive(Debug)]
struct Handle {
    id: usize,
    started: SystemTime,
    device: tch::Device,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    busy: Arc<Busy>,
    /// Whether the log has said this worker is stuck and cannot be replaced yet.
    said_stuck: bool,
}

impl Handle {
    /// The worker's state as reported: one inside a batch for longer than the response timeout
    /// `limit` serves nothing, whatever its thread last said, so probes and describe say so.
    fn reported(&self, state: Option<&WorkerState>, limit: Duration) -> WorkerState {
        let state = state.cloned().unwrap_or(WorkerState::Stopped);
        match self.busy.running_for() {
            Some(ran) if ran > limit && state == WorkerState::Ready => {
                WorkerState::Failed(format!(
                    "inside one batch for {} s, past the response timeout of {} s",
                    ran.as_secs(),
                    limit.as_secs()
                ))
            }
            _ => state,
        }
    }
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
    /// Threads that run the forwards of the model on each GPU (see `crate::forward_thread`).
    forward_threads: usize,
    spawned: AtomicUsize,
    /// Set when the pool is shut down or discarded: it starts no worker after that, and a
    /// synchronous scale waiting on it waits no more.
    closed: AtomicBool,
}

static NEXT_WORKER_ID: AtomicUsize = AtomicUsize::new(9000);

/// Worker threads taken out of their pool while inside a batch (replaced when stuck, scaled
/// away, or stopped with their version) or while loading for a refused registration, until they
/// return. Kept for the whole process, by model version, so that unregistering and registering a
/// version again, or scaling it to none and back, does not reset its cap on stuck threads (see
/// [`Pool::replace_stuck`]).
static LINGERING: Mutex<Vec<Out>> = Mutex::new(Vec::new());

/// A worker thread out of its pool that had not returned when it was taken out.
#[derive(Debug)]
struct Out {
    /// `name:version`.
    version: String,
    id: usize,
    busy: Arc<Busy>,
    /// Taken out while loading (a refused registration's), not inside a batch.
    loading: bool,
    thread: JoinHandle<()>,
}

/// Keeps `h`'s thread in [`LINGERING`] when it is inside a batch, or always with `loading`;
/// else it is on its way out.
fn linger(version: &str, mut h: Handle, loading: bool) {
    if !loading && h.busy.running_for().is_none() {
        return;
    }
    if let Some(thread) = h.thread.take() {
        let mut all = lock(&LINGERING);
        all.retain(|o| !o.thread.is_finished());
        all.push(Out {
            version: version.to_owned(),
            id: h.id,
            busy: Arc::clone(&h.busy),
            loading,
            thread,
        });
    }
}

/// Worker threads of `version` (`name:version`; every version when `None`) out of their pool
/// that have not returned.
pub fn lingering(version: Option<&str>) -> Vec<Lingering> {
    let mut all = lock(&LINGERING);
    all.retain(|o| !o.thread.is_finished());
    all.iter()
        .filter(|o| version.is_none_or(|v| v == o.version))
        .map(|o| Lingering {
            version: o.version.clone(),
            id: o.id,
            // A batch that has just ended reads as 0 until its thread is gone.
            busy: (!o.loading).then(|| o.busy.running_for().unwrap_or_default()),
        })
        .collect()
}

impl Pool {
    /// A pool with no workers yet, whose workers take `devices` in turn; on a GPU the model's
    /// forwards run on `forward_threads` threads.
    pub fn new(
        spec: ModelSpec,
        devices: Vec<tch::Device>,
        budget: Arc<ThreadBudget>,
        forward_threads: usize,
    ) -> Arc<Self> {
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
            forward_threads,
            spawned: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        })
    }

    /// Queues a job; refuses it when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), QueueFull> {
        if self.spec.use_job_ticket {
            self.tx.try_send_to_waiting(job).map_err(|_| QueueFull)?;
        } else {
            self.tx.try_send(job).map_err(|_| QueueFull)?;
        }
        // The last worker that could serve may have gone (scaled away, or failed) just before
        // this job arrived, after its own check of the queue: see answer_unserved.
        answer_unserved(&self.rx, &self.shared, &self.spec);
        Ok(())
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
        let limit = self.spec.response_timeout;
        workers
            .iter()
            .filter(|h| h.reported(states.get(&h.id), limit) == WorkerState::Ready)
            .count()
    }

    /// Starts or stops workers until there are `n`. Stopped workers finish their current batch.
    pub fn scale(&self, n: usize) {
        let mut workers = lock(&self.workers);
        // A scale that lost the race with an unregistration starts nothing in the pool it left.
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        while workers.len() < n {
            let h = self.spawn();
            workers.push(h);
        }
        // Newest first, as TorchServe scales down.
        while workers.len() > n {
            if let Some(h) = workers.pop() {
                self.retire(h);
            }
        }
        // Under the lock, so that a scale up cannot start a worker for jobs this is answering.
        // A stopping worker still answers the batch it holds.
        answer_unserved(&self.rx, &self.shared, &self.spec);
    }

    /// Starts a worker thread, listed as starting. The caller adds it to `workers`, whose lock
    /// it holds.
    fn spawn(&self) -> Handle {
        let id = NEXT_WORKER_ID.fetch_add(1, Ordering::Relaxed);
        let nth = self.spawned.fetch_add(1, Ordering::Relaxed);
        let device = self
            .devices
            .get(nth % self.devices.len().max(1))
            .copied()
            .unwrap_or(tch::Device::Cpu);
        let stop = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(Busy::new());
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
            forward_threads: self.forward_threads,
            answers_apart: device.is_cuda(),
            busy: Arc::clone(&busy),
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
        Handle {
            id,
            started: SystemTime::now(),
            device,
            stop,
            thread,
            busy,
            said_stuck: false,
        }
    }

    /// Replaces each worker that has been running one batch for longer than the response
    /// timeout, as TorchServe restarts a worker that does not answer in time: every request of
    /// that batch has been answered 504 already, and the queue would otherwise wait behind it
    /// for good. A thread cannot be killed, so the old one runs on until its forward returns,
    /// then ends; at most as many such threads as the pool has workers are left running, so a
    /// request that hangs the model each time cannot take every core. Returns how many were
    /// replaced.
    pub fn replace_stuck(&self) -> usize {
        let limit = self.spec.response_timeout;
        let name = self.version_name();
        let mut workers = lock(&self.workers);
        let mut replaced = 0;
        for i in 0..workers.len() {
            let Some(ran) = workers[i].busy.running_for().filter(|ran| *ran > limit) else {
                continue;
            };
            let still_running = lingering(Some(&name)).len();
            if still_running >= workers.len() {
                if !std::mem::replace(&mut workers[i].said_stuck, true) {
                    tracing::error!(
                        worker = workers[i].id,
                        model = %name,
                        ran_s = ran.as_secs(),
                        still_running,
                        "a batch has run past the response timeout of {} s, and as many workers \
                         taken out of this model version are still inside theirs: this one is \
                         not replaced until one of them returns, and counts as not ready",
                        limit.as_secs()
                    );
                }
                continue;
            }
            // The new worker is listed before the old one goes, so the model never looks
            // unserved and its queue is not answered 503 in between.
            let fresh = self.spawn();
            let old = std::mem::replace(&mut workers[i], fresh);
            tracing::warn!(
                worker = old.id,
                model = %name,
                ran_s = ran.as_secs(),
                replacement = workers[i].id,
                "a batch has run past the response timeout of {} s: a new worker takes this \
                 one's place, and this one ends when its forward returns",
                limit.as_secs()
            );
            self.retire(old);
            replaced += 1;
        }
        if replaced > 0 {
            // A replacement whose thread could not start serves nothing: see answer_unserved.
            answer_unserved(&self.rx, &self.shared, &self.spec);
        }
        replaced
    }

    /// Stops a worker taken out of `workers`; one inside a batch lingers until it returns.
    fn retire(&self, h: Handle) {
        h.stop.store(true, Ordering::Relaxed);
        self.shared.remove(h.id);
        linger(&self.version_name(), h, false);
    }

    /// `name:version`.
    fn version_name(&self) -> String {
        format!("{}:{}", self.spec.name, self.spec.version)
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
            if !starting || now >= deadline || self.closed.load(Ordering::SeqCst) {
                break;
            }
            states = self
                .shared
                .changed
                .wait_timeout(states, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        // Counted by what each thread says: a scale that started its workers is done, even
        // while another worker is stuck in a batch (which probes and describe report).
        // (A worker scaled away meanwhile has no state left.)
        ids.iter()
            .filter(|id| states.get(id) == Some(&WorkerState::Ready))
            .count()
    }

    /// Describes every worker.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let workers = lock(&self.workers);
        let states = lock(&self.shared.states);
        let load_ms = lock(&self.shared.load_ms);
        let limit = self.spec.response_timeout;
        workers
            .iter()
            .map(|h| WorkerInfo {
                id: h.id,
                started: h.started,
                state: h.reported(states.get(&h.id), limit),
                device: device_label(h.device),
                load_ms: load_ms.get(&h.id).copied(),
                busy: h.busy.running_for(),
            })
            .collect()
    }

    /// Says that no more requests will come: batches stop waiting to fill.
    pub fn close_batches(&self) {
        self.tx.close_batches();
    }

    /// Marks the pool closed and takes its workers out of it, so that no scale starts one
    /// after; a synchronous scale waiting for workers to start is woken to see it.
    fn close(&self) -> Vec<Handle> {
        let mut workers = lock(&self.workers);
        self.closed.store(true, Ordering::SeqCst);
        let handles = std::mem::take(&mut *workers);
        drop(workers);
        // Under the states' lock, so that a waiter between its check and its wait hears it.
        drop(lock(&self.shared.states));
        self.shared.changed.notify_all();
        handles
    }

    /// Stops every worker once the queue is empty (or `drain` has passed) and waits for those
    /// between batches; one inside a batch ends when the batch returns.
    pub fn shutdown(&self, drain: Duration) {
        // Nothing more comes: what is queued runs now, not at the end of a batch delay.
        self.close_batches();
        let handles: Vec<Handle> = self.close();
        // Let the workers drain what is queued before they see the stop flag.
        let deadline = Instant::now() + drain;
        while !self.rx.is_empty() && !handles.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for h in &handles {
            h.stop.store(true, Ordering::Relaxed);
        }
        let name = self.version_name();
        for mut h in handles {
            // A batch still running has its clients, who get their answers when it returns; a
            // stuck one must not hold the unregistration or the stop. One just answered is
            // given a moment to leave rather than counted as running on.
            let moment = Instant::now() + Duration::from_millis(200);
            while h.busy.running_for().is_some()
                && h.thread.as_ref().is_some_and(|t| !t.is_finished())
                && Instant::now() < moment
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.busy.running_for().is_some() {
                linger(&name, h, false);
            } else if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// Stops every worker at once and waits for none: a worker still loading goes on to the
    /// end of its load, counted in [`lingering`] until then.
    pub fn discard(&self) {
        let handles: Vec<Handle> = self.close();
        let name = self.version_name();
        for h in handles {
            h.stop.store(true, Ordering::Relaxed);
            // Only a load under way takes long to end: a failed or ready worker sees its stop
            // flag within moments.
            let loading = lock(&self.shared.states).get(&h.id) == Some(&WorkerState::Starting);
            self.shared.remove(h.id);
            if loading {
                linger(&name, h, true);
            }
        }
    }
}

/// Answers every queued job 503 when no worker can take it: the pool was scaled to none, or
/// every worker failed and waits to retry. Waiting out each request's response_timeout for a
/// model that cannot load helps nobody; a 503 tells clients and load balancers to go elsewhere.
///
/// Called after every change that can leave no worker serving, and after every submit. The
/// SeqCst fence pairs those two: either the submit sees no worker serving, or the change's
/// call sees the job in the queue.
pub(crate) fn answer_unserved(queue: &Taker<Job>, shared: &Shared, spec: &ModelSpec) {
    fence(Ordering::SeqCst);
    if shared.serving.load(Ordering::SeqCst) > 0 || queue.is_empty() {
        return;
    }
    // Held while draining: a worker added or recovering meanwhile must change its state under
    // this lock, so no job it could take is answered here.
    let states = lock(&shared.states);
    let message = match Shared::serving_of(&states) {
        Serving::Yes => return,
        Serving::AllFailed(why) => format!(
            "Model \"{}\" version {} has no worker that can serve it: {}. Its workers \
             retry; fix the model or unregister it.",
            spec.name,
            spec.version,
            why.trim_end_matches('.')
        ),
        Serving::NoWorker => format!(
            "Model \"{}\" was scaled to no worker while this request waited. \
             Please use scale workers API to add workers.",
            spec.name
        ),
    };
    while let Some(job) = queue.try_take() {
        let _ = job.reply.send((
            Err(PredictError::Unavailable(message.clone())),
            Default::default(),
        ));
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
    fn output_signature(&self, index: usize) -> Option<tchserve_backend::OutputSignature> {
        lock(&self.shared.output).get(index).cloned().flatten()
    }
    fn replace_stuck(&self) -> usize {
        Pool::replace_stuck(self)
    }
    fn discard(&self) {
        Pool::discard(self)
    }
    fn close_batches(&self) {
        Pool::close_batches(self)
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

    /// A pool of a model file that does not exist, with no worker yet.
    fn missing_model(dir: &std::path::Path) -> Arc<Pool> {
        Pool::new(
            ModelSpec {
                name: "m".into(),
                version: "1.0".into(),
                model_dir: dir.to_path_buf(),
                serialized_file: "missing.pt".into(),
                handler: tchserve_mar::handler::builtin("tensor").unwrap(),
                batch_size: 1,
                max_batch_delay: Duration::ZERO,
                job_queue_size: 4,
                response_timeout: Duration::from_secs(1),
                placement: tchserve_backend::Placement::Cpu,
                client_timeout: None,
                use_job_ticket: false,
            },
            vec![tch::Device::Cpu],
            ThreadBudget::new(1),
            1,
        )
    }

    #[test]
    fn jobs_no_worker_can_serve_are_answered_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let pool = missing_model(dir.path());
        let submit = || {
            let (job, reply) = Job::new(Default::default());
            pool.submit(job).unwrap();
            reply
        };
        let unavailable = |mut reply: tokio::sync::oneshot::Receiver<_>| match reply.try_recv() {
            Ok((Err(PredictError::Unavailable(why)), _)) => why,
            other => panic!("want a 503 now, got {other:?}"),
        };
        // States stand in for worker threads, so that the test decides when each one fails.
        pool.shared.insert(1, WorkerState::Starting);
        pool.shared.insert(2, WorkerState::Ready);
        let mut queued = submit();
        pool.shared
            .set(1, WorkerState::Failed("loading failed: first".into()));
        answer_unserved(&pool.rx, &pool.shared, &pool.spec);
        assert!(queued.try_recv().is_err(), "worker 2 still serves");
        assert_eq!(pool.queue_len(), 1);

        // The last one fails: what waits is answered with the reason, and so is what comes.
        pool.shared
            .set(2, WorkerState::Failed("loading failed: second".into()));
        answer_unserved(&pool.rx, &pool.shared, &pool.spec);
        let why = unavailable(queued);
        assert!(
            why.contains("\"m\" version 1.0") && why.contains("failed: second"),
            "{why}"
        );
        assert_eq!(pool.queue_len(), 0);
        unavailable(submit());

        // A worker whose retry loaded the model takes jobs.
        pool.shared.set(1, WorkerState::Ready);
        let mut waiting = submit();
        assert!(waiting.try_recv().is_err());
        assert_eq!(pool.queue_len(), 1);
        // Scaled away (as `scale` does it), nobody is left, and the answer says so.
        pool.shared.remove(1);
        pool.shared.remove(2);
        answer_unserved(&pool.rx, &pool.shared, &pool.spec);
        assert!(unavailable(waiting).contains("scaled to no worker"));
    }

    /// A pool with a worker still loading, as a synchronous scale-up leaves it (a state stands
    /// in for its thread, which ends without a word when it sees its stop flag after the load),
    /// and a thread inside `wait_started` for it, giving what it counted and how long it waited.
    fn waiting_for_a_worker_loading(
        dir: &std::path::Path,
    ) -> (Arc<Pool>, std::thread::JoinHandle<(usize, Duration)>) {
        let pool = missing_model(dir);
        pool.shared.insert(7, WorkerState::Starting);
        lock(&pool.workers).push(Handle {
            id: 7,
            started: SystemTime::now(),
            device: tch::Device::Cpu,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
            busy: Arc::new(Busy::new()),
            said_stuck: false,
        });
        let waiter = {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || {
                let t = Instant::now();
                (pool.wait_started(Duration::from_secs(30)), t.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        (pool, waiter)
    }

    #[test]
    fn a_wait_for_workers_scaled_away_meanwhile_ends_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, waiter) = waiting_for_a_worker_loading(dir.path());
        // A scale-down overtakes it: nothing is left to wait for.
        pool.scale(0);
        let (ready, waited) = waiter.join().unwrap();
        assert_eq!(ready, 0);
        assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    }

    #[test]
    fn a_wait_for_workers_of_a_pool_shut_down_meanwhile_ends_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, waiter) = waiting_for_a_worker_loading(dir.path());
        // The version is unregistered: its pool shuts down while the scale waits.
        pool.shutdown(Duration::ZERO);
        let (ready, waited) = waiter.join().unwrap();
        assert_eq!(ready, 0);
        assert!(waited < Duration::from_secs(5), "waited {waited:?}");
        // A scale that comes after starts nothing in the pool it lost.
        pool.scale(3);
        assert_eq!(pool.worker_count(), 0);
    }

    #[test]
    fn scaling_while_states_are_read_never_deadlocks() {
        // Workers of a model that does not exist fail to load, which is enough: the test is
        // about the pool's locks, which scale, describe and /ping take from different threads.
        let dir = tempfile::tempdir().unwrap();
        let pool = missing_model(dir.path());
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
