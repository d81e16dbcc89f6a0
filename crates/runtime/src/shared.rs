//! What a pool shares with its worker threads, and the process-wide intra-op thread budget.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tchserve_backend::WorkerState;
use tchserve_backend::job::PredictError;

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

/// When a worker's unfinished batches began: how its pool finds a worker stuck in one batch.
///
/// A GPU worker hands each batch, its forward perhaps still queued or running, to its answer
/// thread and takes the next one, so it may have two: the one in its hands and the one its
/// answer thread lands and answers. The worker is busy while either is unfinished, for as long
/// as the older one has run.
#[derive(Debug)]
pub(crate) struct Busy {
    epoch: Instant,
    /// Milliseconds from `epoch` to the start of the batch in the worker's hands, plus one; 0
    /// while the worker waits.
    since_ms: AtomicU64,
    /// The same for the batch handed to the worker's answer thread; 0 while it has none.
    landing_ms: AtomicU64,
}

impl Busy {
    pub(crate) fn new() -> Self {
        Busy {
            epoch: Instant::now(),
            since_ms: AtomicU64::new(0),
            landing_ms: AtomicU64::new(0),
        }
    }

    /// The worker starts a batch.
    pub(crate) fn begin(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.since_ms.store(now + 1, Ordering::Relaxed);
    }

    /// The worker is done with its batch, or has handed it over (see [`Busy::hand_over`]).
    pub(crate) fn end(&self) {
        self.since_ms.store(0, Ordering::Relaxed);
    }

    /// The worker's batch has been taken by its answer thread, which finishes it: it stays
    /// counted, from when it began, until [`Busy::landed`]. The answer thread takes a batch
    /// only once it has finished the one before, so the slot is free.
    pub(crate) fn hand_over(&self) {
        // Set before the worker's slot is cleared: the batch is never uncounted in between.
        let since = self.since_ms.load(Ordering::Relaxed);
        self.landing_ms.store(since, Ordering::Relaxed);
        self.since_ms.store(0, Ordering::Relaxed);
    }

    /// The answer thread has answered the batch handed to it.
    pub(crate) fn landed(&self) {
        self.landing_ms.store(0, Ordering::Relaxed);
    }

    /// How long the older of the worker's unfinished batches has run; `None` when it has none.
    pub(crate) fn running_for(&self) -> Option<Duration> {
        let started = [&self.since_ms, &self.landing_ms]
            .into_iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .filter(|&s| s != 0)
            .min()?;
        Some(
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(started - 1)),
        )
    }
}

/// Worker states, shared between a pool and its worker threads.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) states: Mutex<BTreeMap<usize, WorkerState>>,
    pub(crate) changed: Condvar,
    /// The output tensors' element type and per-example shape, as the workers saw them: what
    /// the typed protocols' metadata reports, since the model alone knows its output type.
    /// One entry per output, for a handler that answers several.
    pub(crate) output: Mutex<Vec<Option<tchserve_backend::OutputSignature>>>,
    /// Workers that can take jobs (starting or ready, not failed), kept with `states` so that
    /// a submit reads it without the lock.
    pub(crate) serving: AtomicUsize,
    /// Milliseconds each worker's last model load took.
    pub(crate) load_ms: Mutex<BTreeMap<usize, u64>>,
    /// The element type and per-example shape of each input of the last request the model ran
    /// on: a request of another shape that fails inside the model failed for its shape.
    pub(crate) ran_on: Mutex<Vec<Seen>>,
}

impl Shared {
    /// Records a worker's new state; a worker already scaled away stays gone, so stopped
    /// workers never pile up in the map.
    pub(crate) fn set(&self, id: usize, state: WorkerState) {
        let mut states = lock(&self.states);
        if let Some(s) = states.get_mut(&id) {
            *s = state;
        }
        self.recount(&states);
        drop(states);
        self.changed.notify_all();
    }

    /// Records an output of `[examples, ...]`; a dimension that differs from earlier outputs
    /// becomes -1. Outputs of a type the protocols have no name for are not recorded.
    pub(crate) fn saw_output(&self, index: usize, t: &tch::Tensor) {
        let Some(dtype) = crate::handler::tensor_input::dtype_of(t.kind()) else {
            return;
        };
        let dims = t.size().split_off(1.min(t.dim()));
        let mut outputs = lock(&self.output);
        if outputs.len() <= index {
            outputs.resize(index + 1, None);
        }
        match &mut outputs[index] {
            Some((d, known)) if *d == dtype && known.len() == dims.len() => {
                for (k, n) in known.iter_mut().zip(dims) {
                    if *k != n {
                        *k = -1;
                    }
                }
            }
            other => *other = Some((dtype, dims)),
        }
    }

    /// Records that the model ran on `inputs` (`[examples, ...]` each, in the handler's order).
    pub(crate) fn ran_on(&self, inputs: &[&tch::Tensor]) {
        let seen: Vec<Seen> = inputs.iter().map(|t| seen(t)).collect();
        let mut known = lock(&self.ran_on);
        if *known != seen {
            *known = seen;
        }
    }

    /// A model failure on `input`: the client's when libtorch says the shapes or element types
    /// do not fit and the model has run on another shape or element type (a vector of 5 numbers
    /// to a model of 784 fails inside libtorch, and is the request's mistake), else the
    /// model's. A failure of the model's own (an assertion on the values, say) stays the
    /// model's whatever ran before, so one request gets one answer.
    /// For a model of several inputs, the first input that differs from what the model ran
    /// on is named, by its name in `names` where given.
    pub(crate) fn blame(
        &self,
        e: PredictError,
        inputs: &[&tch::Tensor],
        names: &[&str],
    ) -> PredictError {
        let PredictError::ModelFailed(why) = e else {
            return e;
        };
        if !misfit(&why) {
            return PredictError::ModelFailed(why);
        }
        let known = lock(&self.ran_on);
        let differs = inputs
            .iter()
            .map(|t| seen(t))
            .zip(known.iter())
            .enumerate()
            .find(|(_, (mine, good))| mine != *good);
        match differs {
            Some((i, (mine, good))) => {
                let which = match names.get(i) {
                    Some(name) => format!(" (input '{name}')"),
                    None if inputs.len() > 1 => format!(" (input {i})"),
                    None => String::new(),
                };
                PredictError::BadInput(format!(
                    "the model cannot take this input{which}, {}; it last ran on {} ({why})",
                    describe(&mine),
                    describe(good)
                ))
            }
            None => PredictError::ModelFailed(why),
        }
    }

    pub(crate) fn insert(&self, id: usize, state: WorkerState) {
        let mut states = lock(&self.states);
        states.insert(id, state);
        self.recount(&states);
        drop(states);
        self.changed.notify_all();
    }

    /// Forgets a worker that was scaled away.
    pub(crate) fn remove(&self, id: usize) {
        let mut states = lock(&self.states);
        states.remove(&id);
        self.recount(&states);
        drop(states);
        lock(&self.load_ms).remove(&id);
        // A synchronous scale waiting for this worker to start waits no more.
        self.changed.notify_all();
    }

    /// Records how long a worker took to load its model.
    pub(crate) fn loaded(&self, id: usize, took: std::time::Duration) {
        lock(&self.load_ms).insert(id, took.as_millis() as u64);
    }

    fn recount(&self, states: &BTreeMap<usize, WorkerState>) {
        let serving = states
            .values()
            .filter(|s| !matches!(s, WorkerState::Failed(_)))
            .count();
        self.serving.store(serving, Ordering::SeqCst);
    }

    /// Whether any worker can take a job, read from `states` (held by the caller).
    pub(crate) fn serving_of(states: &BTreeMap<usize, WorkerState>) -> Serving {
        let mut why = None;
        for s in states.values() {
            match s {
                WorkerState::Failed(w) => why = Some(w.clone()),
                _ => return Serving::Yes,
            }
        }
        why.map_or(Serving::NoWorker, Serving::AllFailed)
    }
}

/// `examples of shape [784] (float32)`.
/// Whether libtorch's message says an input does not fit an operation: shapes that do not
/// match, or an element type it does not take.
pub(crate) fn misfit(message: &str) -> bool {
    const SAYINGS: [&str; 15] = [
        // An element type the model cannot take: a float to an embedding, int64 to a linear
        // layer.
        "must have the same dtype",
        "to have one of the following scalar types",
        "should be the same",
        "is invalid for input of size",
        "shapes cannot be multiplied",
        "size mismatch",
        "must match the size of tensor",
        "Sizes of tensors must match",
        "Dimension out of range",
        "Expected 2D",
        "Expected 3D",
        "Expected 4D",
        "expected input",
        "to have the same dtype",
        "expected scalar type",
    ];
    SAYINGS.iter().any(|s| message.contains(s))
}

/// An input's element type and per-example shape.
type Seen = (tch::Kind, Vec<i64>);

fn seen(input: &tch::Tensor) -> Seen {
    (input.kind(), input.size().split_off(1.min(input.dim())))
}

fn describe((kind, dims): &Seen) -> String {
    let dtype = crate::handler::tensor_input::dtype_of(*kind)
        .and_then(|d| serde_json::to_value(d).ok())
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{kind:?}"));
    format!("examples of shape {dims:?} ({dtype})")
}

/// Whether a pool's queue has a worker to take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Serving {
    /// A worker is starting or ready.
    Yes,
    /// The pool was scaled to no worker.
    NoWorker,
    /// Every worker failed to load its model; one of their reasons.
    AllFailed(String),
}

/// Locks `m`, even after a panic elsewhere: a worker that panicked while holding the lock left
/// plain data behind, and serving goes on.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tchserve_mar::handler::DType;

    #[test]
    fn busy_says_how_long_the_batch_in_hand_has_run() {
        let busy = Busy::new();
        assert_eq!(busy.running_for(), None);
        // A batch that begins at the very start of the epoch still reads as busy.
        busy.begin();
        std::thread::sleep(Duration::from_millis(30));
        let ran = busy.running_for().unwrap();
        assert!(ran >= Duration::from_millis(29), "{ran:?}");
        busy.end();
        assert_eq!(busy.running_for(), None);
    }

    #[test]
    fn a_batch_handed_to_the_answer_thread_keeps_the_worker_busy_until_it_lands() {
        let busy = Busy::new();
        busy.begin();
        std::thread::sleep(Duration::from_millis(30));
        // The answer thread takes the batch, its forward perhaps still running.
        busy.hand_over();
        busy.end();
        let ran = busy.running_for().expect("the handed batch still counts");
        assert!(ran >= Duration::from_millis(29), "{ran:?}");
        // The worker's next batch, begun later, does not hide how long the older one has run.
        busy.begin();
        assert!(busy.running_for().unwrap() >= ran);
        busy.end();
        assert!(busy.running_for().is_some());
        busy.landed();
        assert_eq!(busy.running_for(), None);
        // The next batch in the worker's hands alone.
        busy.begin();
        busy.landed();
        assert!(busy.running_for().unwrap() < ran);
    }

    #[test]
    fn only_a_misfit_on_another_shape_is_the_clients() {
        let shared = Shared::default();
        let floats = |n: i64| tch::Tensor::zeros([1, n], (tch::Kind::Float, tch::Device::Cpu));
        shared.ran_on(&[&floats(784)]);
        let failed = |why: &str| PredictError::ModelFailed(why.into());
        let misfit = "mat1 and mat2 shapes cannot be multiplied (1x5 and 784x128)";
        assert!(matches!(
            shared.blame(failed(misfit), &[&floats(5)], &[]),
            PredictError::BadInput(m) if m.contains("shape [784]")
        ));
        // On the shape it runs on, the model's failure.
        assert!(matches!(
            shared.blame(failed(misfit), &[&floats(784)], &[]),
            PredictError::ModelFailed(_)
        ));
        // The model's own refusal (an assertion on the values) is the model's whatever shape
        // ran before: the same request always gets the same answer.
        assert!(matches!(
            shared.blame(
                failed("Exception: values must not be negative"),
                &[&floats(5)],
                &[]
            ),
            PredictError::ModelFailed(_)
        ));
        // Element types the model cannot take misfit as shapes do.
        for said in [
            "mat1 and mat2 must have the same dtype, but got Long and Float",
            "Expected tensor for argument #1 'indices' to have one of the following scalar \
             types: Long, Int; but got torch.FloatTensor instead",
            "Input type (double) and bias type (float) should be the same",
        ] {
            assert!(super::misfit(said), "{said}");
        }
    }

    #[test]
    fn a_misfit_names_which_of_several_inputs_differs() {
        let shared = Shared::default();
        let ids = tch::Tensor::zeros([1, 3], (tch::Kind::Int64, tch::Device::Cpu));
        let dense = |n: i64| tch::Tensor::zeros([1, n], (tch::Kind::Float, tch::Device::Cpu));
        shared.ran_on(&[&ids, &dense(2)]);
        let misfit =
            || PredictError::ModelFailed("mat1 and mat2 shapes cannot be multiplied".into());
        match shared.blame(misfit(), &[&ids, &dense(5)], &["ids", "dense"]) {
            PredictError::BadInput(m) => {
                assert!(m.contains("(input 'dense'), examples of shape [5]"), "{m}");
                assert!(m.contains("last ran on examples of shape [2]"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            shared.blame(misfit(), &[&ids, &dense(2)], &["ids", "dense"]),
            PredictError::ModelFailed(_)
        ));
    }

    #[test]
    fn outputs_seen_keep_their_type_and_the_dimensions_that_never_varied() {
        let shared = Shared::default();
        let seen = || lock(&shared.output).first().cloned().flatten();
        assert_eq!(seen(), None);
        shared.saw_output(
            0,
            &tch::Tensor::zeros([2, 3, 7], (tch::Kind::Float, tch::Device::Cpu)),
        );
        assert_eq!(seen(), Some((DType::Float32, vec![3, 7])));
        shared.saw_output(
            0,
            &tch::Tensor::zeros([5, 4, 7], (tch::Kind::Float, tch::Device::Cpu)),
        );
        assert_eq!(seen(), Some((DType::Float32, vec![-1, 7])));
        // Another type or rank starts afresh.
        shared.saw_output(
            0,
            &tch::Tensor::zeros([5], (tch::Kind::Int64, tch::Device::Cpu)),
        );
        assert_eq!(seen(), Some((DType::Int64, vec![])));
        // A type the protocols cannot name leaves what was seen.
        shared.saw_output(
            0,
            &tch::Tensor::zeros([5], (tch::Kind::ComplexFloat, tch::Device::Cpu)),
        );
        assert_eq!(seen(), Some((DType::Int64, vec![])));
        // Each output of several is its own.
        shared.saw_output(
            2,
            &tch::Tensor::zeros([5, 2], (tch::Kind::Int, tch::Device::Cpu)),
        );
        assert_eq!(
            lock(&shared.output).clone(),
            [
                Some((DType::Int64, vec![])),
                None,
                Some((DType::Int32, vec![2]))
            ]
        );
    }

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
}

/// One loaded module per device, shared by all the workers of a model version on it.
///
/// A TorchScript module in eval mode runs from several threads at once (its forward takes
/// `&self`), so a worker beyond the first costs a thread and its activations, not another copy
/// of the weights. The map holds weak references: when the last worker on a device stops, the
/// module goes with it, and the next worker loads it afresh.
pub(crate) struct SharedModules<M = crate::model::Model> {
    by_device: Mutex<BTreeMap<String, std::sync::Weak<M>>>,
}

impl<M> Default for SharedModules<M> {
    fn default() -> Self {
        SharedModules {
            by_device: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<M> std::fmt::Debug for SharedModules<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedModules")
            .field("devices", &lock(&self.by_device).keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<M> SharedModules<M> {
    /// The module on `device`, loaded by `load` only when no worker holds it. The lock is held
    /// while loading, so workers starting together load once and share.
    pub(crate) fn get_or_load<E>(
        &self,
        device: tch::Device,
        load: impl FnOnce() -> Result<M, E>,
    ) -> Result<Arc<M>, E> {
        let key = format!("{device:?}");
        let mut map = lock(&self.by_device);
        if let Some(module) = map.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(module);
        }
        let module = Arc::new(load()?);
        map.insert(key, Arc::downgrade(&module));
        Ok(module)
    }
}

#[cfg(test)]
mod shared_modules_tests {
    use super::*;

    #[test]
    fn workers_on_one_device_share_one_load_until_the_last_one_goes() {
        let modules: SharedModules<String> = SharedModules::default();
        let loads = std::cell::Cell::new(0);
        let load = || -> Result<String, ()> {
            loads.set(loads.get() + 1);
            Ok(format!("weights #{}", loads.get()))
        };
        let a = modules.get_or_load(tch::Device::Cpu, load).unwrap();
        let b = modules.get_or_load(tch::Device::Cpu, load).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(loads.get(), 1);
        // Another device has its own copy.
        let gpu = modules.get_or_load(tch::Device::Cuda(0), load).unwrap();
        assert_eq!(*gpu, "weights #2");
        // A failed load leaves nothing behind, and the next worker tries again.
        assert!(
            modules
                .get_or_load(tch::Device::Cuda(1), || Err::<String, _>(()))
                .is_err()
        );
        assert_eq!(
            *modules.get_or_load(tch::Device::Cuda(1), load).unwrap(),
            "weights #3"
        );
        // Once every holder is gone, the weights are freed and a new worker loads them again.
        drop((a, b));
        let c = modules.get_or_load(tch::Device::Cpu, load).unwrap();
        assert_eq!(*c, "weights #4");
    }
}
