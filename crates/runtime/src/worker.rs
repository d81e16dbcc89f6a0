//! The worker thread: load, warm up, then serve batches until stopped; reload after a crash.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::model::Model;

use tchserve_backend::{ModelSpec, WorkerState};

use crate::batch::{Batcher, Next, Taker};
use crate::handler::{Decoded, InFlight, Launched, Pipeline};
use crate::job::{Job, Payload, PredictError, Prediction, Timings};
use crate::model::load_module;
use crate::openmp::Team;
use crate::shared::{Busy, Shared, SharedModules, ThreadBudget};

/// How often an idle worker looks at its stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// How long a worker that has just served a batch polls for its next request before it sleeps.
/// Waking a sleeping thread costs tens of microseconds, about half of a small model's whole
/// request; the poll yields the core at each turn, so under load it takes no time from threads
/// with work, and a worker that went idle does not poll again until it has served something.
const POLL_AFTER_BATCH: Duration = Duration::from_micros(250);
/// After this long without work a worker hands the heap memory freed since back to the system
/// (see [`crate::heap`]): megabytes per worker that an idle one would otherwise hold for good.
const TRIM_AFTER_IDLE: Duration = Duration::from_secs(1);
/// Forwards run on a fixed-shape model before it counts as ready.
const WARMUP_FORWARDS: usize = 3;
/// Seconds to wait before reloading after the n-th consecutive failure (TorchServe's schedule).
const BACKOFF_S: [u64; 8] = [0, 1, 1, 2, 3, 5, 8, 13];

pub(crate) struct Context {
    pub id: usize,
    pub device: tch::Device,
    pub spec: Arc<ModelSpec>,
    pub batcher: Batcher,
    pub queue: Taker<Job>,
    pub stop: Arc<AtomicBool>,
    pub shared: Arc<Shared>,
    pub budget: Arc<ThreadBudget>,
    pub modules: Arc<SharedModules>,
    /// Threads that run the model's forwards on a GPU (see `crate::forward_thread`).
    pub forward_threads: usize,
    /// Whether the batches' answers are read and written on a thread of their own (see
    /// [`Finisher`]): for GPU workers.
    pub answers_apart: bool,
    /// When the batch in hand began, read by the pool to replace a worker stuck in one.
    pub busy: Arc<Busy>,
}

enum Ended {
    Stopped,
    Crashed(String),
}

/// Worker threads of the process that have not returned, whichever pool they served.
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Worker threads still running: a stopped worker still inside a forward (scaled away, or
/// replaced when stuck) counts until it returns. Exiting the process normally under one runs
/// libtorch's static destructors beneath its forward.
pub fn worker_threads_running() -> usize {
    RUNNING.load(Ordering::SeqCst)
}

/// Counts a worker thread in [`RUNNING`] for as long as it lives.
struct Running;

impl Running {
    fn start() -> Self {
        RUNNING.fetch_add(1, Ordering::SeqCst);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The thread's body.
pub(crate) fn run(ctx: Context) {
    let _running = Running::start();
    let name = format!("{}:{}", ctx.spec.name, ctx.spec.version);
    let mut failures = 0usize;
    // Whether libtorch's whole message for a failed load was logged since the last good one.
    let mut said_whole = false;
    while !ctx.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let loaded = catch_unwind(AssertUnwindSafe(|| load(&ctx)));
        if ctx.stop.load(Ordering::Relaxed) {
            // Scaled away or refused while it loaded: whatever the load gave is moot.
            tracing::info!(worker = ctx.id, model = %name, load_ms = started.elapsed().as_millis() as u64, "worker stopped while loading");
            return;
        }
        let model = match loaded {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                // Said once until a load succeeds: a worker retrying for hours would otherwise
                // write the same C++ backtrace at every retry.
                if let crate::RuntimeError::Torch { error, .. } = &e
                    && !said_whole
                {
                    said_whole = true;
                    let error = crate::error::one_line(&error.to_string());
                    tracing::error!(worker = ctx.id, model = %name, "libtorch's whole message: {error}");
                }
                fail(
                    &ctx,
                    &name,
                    &mut failures,
                    Down::LoadFailed(format!("loading failed: {e}")),
                );
                continue;
            }
            Err(_) => {
                fail(
                    &ctx,
                    &name,
                    &mut failures,
                    Down::LoadFailed("loading panicked".into()),
                );
                continue;
            }
        };
        said_whole = false;
        ctx.shared.loaded(ctx.id, started.elapsed());
        tracing::info!(worker = ctx.id, model = %name, device = ?ctx.device, load_ms = started.elapsed().as_millis() as u64, "worker ready");
        failures = 0;
        match serve(&ctx, &model) {
            Ended::Stopped => break,
            Ended::Crashed(why) => fail(&ctx, &name, &mut failures, Down::Crashed(why)),
        }
    }
    tracing::info!(worker = ctx.id, model = %name, "worker stopped");
}

/// How a worker went down, and so what its queue can expect.
enum Down {
    /// The model did not load: until a retry succeeds the worker serves nothing, and when no
    /// worker serves, what is queued is answered 503 at once (see `answer_unserved`).
    LoadFailed(String),
    /// A bug crashed the worker while serving: it reloads at once, and what is queued waits
    /// for it, as TorchServe keeps a restarted worker's queue.
    Crashed(String),
}

fn fail(ctx: &Context, name: &str, failures: &mut usize, down: Down) {
    match down {
        Down::LoadFailed(why) => {
            tracing::error!(worker = ctx.id, model = %name, "{why}; retrying");
            ctx.shared.set(ctx.id, WorkerState::Failed(why));
            crate::pool::answer_unserved(&ctx.queue, &ctx.shared, &ctx.spec);
        }
        Down::Crashed(why) => {
            tracing::error!(worker = ctx.id, model = %name, "{why}; restarting");
            ctx.shared.set(ctx.id, WorkerState::Starting);
        }
    }
    let wait = Duration::from_secs(BACKOFF_S[(*failures).min(BACKOFF_S.len() - 1)]);
    *failures += 1;
    let until = Instant::now() + wait;
    while Instant::now() < until && !ctx.stop.load(Ordering::Relaxed) {
        std::thread::sleep(IDLE_POLL);
    }
}

/// A forward shorter than this at the largest batch gains nothing from more intra-op threads:
/// waking them costs more than they save, so such a worker keeps to one thread.
const SMALL_FORWARD: Duration = Duration::from_millis(1);

/// A loaded model, its handler, how its requests are batched, and the most intra-op threads
/// worth giving it.
struct Loaded {
    module: Arc<Model>,
    pipeline: Pipeline,
    batcher: Batcher,
    max_threads: usize,
}

fn load(ctx: &Context) -> Result<Loaded, crate::RuntimeError> {
    // Warm-up runs on this thread alone. libtorch's OpenMP gives every thread that runs a
    // parallel region a team of its own, and once the process holds more team threads than
    // cores, GNU OpenMP stops spinning at its barriers and sleeps instead, which slows every
    // model's forward (ResNet-18 lost a quarter of its throughput to an MLP beside it). So a
    // worker starts a team only once it is known to need one: small models (see SMALL_FORWARD)
    // never do, and the others end theirs when they wait while others need the cores (see
    // crate::openmp).
    tch::set_num_threads(1);
    let module = ctx.modules.get_or_load(ctx.device, || {
        load_module(
            &ctx.spec.model_dir,
            &ctx.spec.serialized_file,
            ctx.device,
            ctx.forward_threads,
        )
    })?;
    let (loaded, output, _) = prepare(ctx.id, &ctx.spec, ctx.device, ctx.batcher, module)?;
    // The typed protocols' metadata can name the outputs' types before the first request.
    for (i, t) in output.iter().enumerate() {
        ctx.shared.saw_output(i, t);
    }
    Ok(loaded)
}

/// Loads the model of `spec` and runs on it what a worker runs before serving: the handler is
/// fitted to the model, the model warmed up and one request answered. What `tchserve --check`
/// runs, so that an archive it passes registers. True when a request was answered: one is made
/// up for every handler but those of tensors of free shape and of images fed as a list (see
/// [`Pipeline::probe_request`]); for those the model is loaded and no more.
pub fn check(spec: &ModelSpec, device: tch::Device) -> Result<Tried, crate::RuntimeError> {
    let module = Arc::new(load_module(
        &spec.model_dir,
        &spec.serialized_file,
        device,
        1,
    )?);
    let batcher = Batcher {
        batch_size: spec.batch_size.max(1),
        max_delay: spec.max_batch_delay,
    };
    let (loaded, _, refused) = prepare(0, spec, device, batcher, module)?;
    Ok(match refused {
        Some(why) => Tried::Refused(why),
        None if loaded.pipeline.probe_request().is_some() => Tried::Answered,
        None => Tried::Nothing,
    })
}

/// What [`check`] could try of a model besides loading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tried {
    /// A made-up request was answered.
    Answered,
    /// The model failed on made-up input of its own accord (a check on the values): it serves
    /// real requests still, without a warm-up; why.
    Refused(String),
    /// No request could be made up for the handler's input.
    Nothing,
}

/// Fits the handler and batching to a loaded model, warms it up and answers one request; also
/// gives the warm-up's outputs, when they name the types of the model's answers.
fn prepare(
    id: usize,
    spec: &ModelSpec,
    device: tch::Device,
    batcher: Batcher,
    module: Arc<Model>,
) -> Result<(Loaded, Vec<tch::Tensor>, Option<String>), crate::RuntimeError> {
    let batcher = fit_batcher(id, spec, batcher, &module)?;
    let mut pipeline = Pipeline::new(&spec.handler, &spec.model_dir)?;
    pipeline.finish_images_on(device);
    if module.is_package() && pipeline.feeds_list() != module.list_len().is_some() {
        let message = if pipeline.feeds_list() {
            "the handler feeds the model a list of images (\"feed\": \"list\"), and this \
             package takes tensors: export forward(images: list[Tensor]) for it"
        } else {
            "the package takes a list of tensors, as a detector does, and this handler feeds \
             the model tensors: use a handler with \"feed\": \"list\", such as object_detector"
        };
        return Err(crate::RuntimeError::Package {
            file: spec.serialized_file.clone(),
            message: message.into(),
        });
    }
    // Each request would otherwise fail inside the package, where the inputs' shapes vary.
    if let (Some(takes), Some(given)) = (module.input_count(), pipeline.argument_tensors())
        && takes != given
    {
        let advice = if pipeline.feeds_tokens() {
            "a text handler gives token ids and an attention mask"
        } else {
            "name one input per tensor in a `tensors` input, in forward's order"
        };
        return Err(crate::RuntimeError::Package {
            file: spec.serialized_file.clone(),
            message: format!(
                "the package's forward takes {takes} tensors and the handler gives it {given}: \
                 {advice}"
            ),
        });
    }
    if let Some(length) = module.length() {
        pipeline
            .fit_token_length(length)
            .map_err(|message| crate::RuntimeError::Package {
                file: spec.serialized_file.clone(),
                message,
            })?;
    }
    let _guard = tch::no_grad_guard();
    // Text inputs have no fixed shape to warm up with, but a package checks the dtypes it was
    // exported for: one short forward finds a mismatch now rather than at every request. Its
    // time is not a warm-up's and does not count towards SMALL_FORWARD.
    if module.is_package()
        && let Some(args) = pipeline.probe_tokens(device)
    {
        match module.forward_is(&args) {
            // Lengths and batch sizes are checked, and answered, per request.
            Ok(_) | Err(tch::TchError::Shape(_)) => {}
            Err(e) => {
                return Err(crate::RuntimeError::Package {
                    file: spec.serialized_file.clone(),
                    message: format!(
                        "the package does not take the text handler's int64 token ids and \
                         attention mask ([batch, length] each): {e}"
                    ),
                });
            }
        }
    }
    // TorchScript specialises its graph over the first calls; pay that before serving.
    let mut last_forward = None;
    let mut last_output = None;
    // The warm-up and the probe feed the model made-up input: zeros, a grey photo, a short
    // sentence. A model that refuses it of its own accord (an assertion on the values) serves
    // real input still, as TorchServe, which warms nothing up, serves it: only input that does
    // not fit the model (shapes, element types, channels) fails the load.
    let refused = std::cell::RefCell::new(None);
    let refuses_zeros = |why: &str| {
        if refused.borrow().is_none() {
            tracing::warn!(
                model = %spec.serialized_file,
                "the model fails on a made-up input ({why}); serving it without a warm-up"
            );
            *refused.borrow_mut() = Some(why.to_string());
        }
    };
    'warm: for batch in [1, batcher.batch_size] {
        // A package that takes a list takes at most its length per forward.
        let batch = module.list_len().map_or(batch, |n| batch.min(n));
        if let Some(input) = pipeline.warmup_input(batch, device) {
            for _ in 0..WARMUP_FORWARDS {
                let t = Instant::now();
                let out = match module.forward_is(&input) {
                    Ok(out) => out,
                    Err(source) if !crate::shared::misfit(&source.to_string()) => {
                        refuses_zeros(&crate::error::concise(&source.to_string()));
                        break 'warm;
                    }
                    Err(error) => {
                        return Err(crate::RuntimeError::Torch {
                            file: format!("{} (warm-up forward)", spec.serialized_file),
                            error,
                        });
                    }
                };
                last_forward = Some(t.elapsed());
                last_output = Some(out);
            }
        }
    }
    // Answer one request before serving, so that a handler whose output stages do not fit the
    // model fails its registration rather than every request.
    if let Some(probe) = pipeline.probe_request() {
        match pipeline.run_batch(&module, device, &[&probe]) {
            Ok(_) => {}
            Err(PredictError::ModelFailed(why))
                if why.starts_with(crate::handler::MODEL_FAILED)
                    && !crate::shared::misfit(&why) =>
            {
                refuses_zeros(&why);
            }
            Err(e) => {
                return Err(crate::RuntimeError::Handler {
                    file: spec.serialized_file.clone(),
                    message: e.to_string(),
                });
            }
        }
    }
    let output = last_output.map_or_else(Vec::new, |o| pipeline.warmup_output(o));
    let small = device == tch::Device::Cpu && last_forward.is_some_and(|t| t < SMALL_FORWARD);
    let loaded = Loaded {
        module,
        pipeline,
        batcher,
        max_threads: if small { 1 } else { usize::MAX },
    };
    Ok((loaded, output, refused.into_inner()))
}

/// The registration's batching, held to what a `.pt2` package was exported for: a package with
/// a fixed batch of 1 is run one request at a time, and one whose dynamic batch range ends below
/// the registration's `batch_size` is refused, since a full batch of one-example requests could
/// not run.
fn fit_batcher(
    id: usize,
    spec: &ModelSpec,
    mut batcher: Batcher,
    module: &Model,
) -> Result<Batcher, crate::RuntimeError> {
    let Some(range) = module.batch_range() else {
        return Ok(batcher);
    };
    tracing::info!(
        worker = id,
        model = %spec.name,
        min = range.min,
        max = ?range.max,
        "package batch range"
    );
    if range.fixed() == Some(1) {
        if batcher.batch_size > 1 {
            tracing::info!(
                worker = id,
                model = %spec.name,
                batch_size = batcher.batch_size,
                "the package was exported for a fixed batch of 1: requests run one at a time"
            );
        }
        batcher.batch_size = 1;
    } else if range.fixed().is_none() && range.min > 1 {
        tracing::warn!(
            worker = id,
            model = %spec.name,
            min = range.min,
            "the package takes at least {} examples per forward, so smaller batches are padded \
             up to it; export under backed_size_oblivious=True to run single examples as they are",
            range.min
        );
    }
    // A fixed size other than 1 takes any batch, cut into forwards of that size.
    let upper = range.max.filter(|_| range.fixed().is_none());
    if let Some(max) = upper.filter(|&max| (batcher.batch_size as i64) > max) {
        return Err(crate::RuntimeError::Package {
            file: spec.serialized_file.clone(),
            message: tchserve_mar::package::batch_size_too_large(batcher.batch_size, max),
        });
    }
    Ok(batcher)
}

/// Takes a worker that stops serving off its queue's list of waiting threads.
struct StopWaiting<'a>(&'a Taker<Job>);

impl Drop for StopWaiting<'_> {
    fn drop(&mut self) {
        self.0.stop_waiting();
    }
}

fn serve(ctx: &Context, model: &Loaded) -> Ended {
    if !ctx.answers_apart {
        return serve_batches(ctx, model, None);
    }
    // The scope passes on a panic of the answer thread (outside the guarded stages, so a bug)
    // once the worker's loop has ended: that is a crash, and the worker reloads.
    let scoped = catch_unwind(AssertUnwindSafe(|| serve_apart(ctx, model)));
    scoped.unwrap_or_else(|_| Ended::Crashed("the answer thread panicked".into()))
}

/// [`serve`] with an answer thread beside the worker.
fn serve_apart(ctx: &Context, model: &Loaded) -> Ended {
    std::thread::scope(|s| {
        let (finisher, batches) = mpsc::sync_channel(FINISHING_AHEAD);
        // Named as the worker's thread is, A for answers: "W-9000-resnet_1.0", "A-9000-resnet_1.0".
        let name = format!("A-{}-{}_{}", ctx.id, ctx.spec.name, ctx.spec.version);
        let stage = Lander::of(ctx, model);
        let busy = &*ctx.busy;
        let spawned = std::thread::Builder::new()
            .name(name)
            .spawn_scoped(s, move || finish_batches(&stage, busy, batches));
        // Without that thread the worker answers its batches itself, as a CPU worker does.
        let finisher = spawned.is_ok().then(|| Finisher(finisher));
        // Returning drops the sender, which ends the thread once it has answered what it holds;
        // the scope waits for that.
        serve_batches(ctx, model, finisher.as_ref())
    })
}

/// Batches handed to a worker's answer thread and not yet taken by it: none. The worker submits
/// a batch while the thread answers the one before, then waits to hand it over, so a worker has
/// two batches on the device at most: on a slow device, queued clients do not wait an extra
/// batch and the device holds one batch's output less.
const FINISHING_AHEAD: usize = 0;

/// The sending end of a worker's answer thread.
///
/// On a GPU, the launching of a batch's forward (which takes as long as the GPU's work at small
/// batches), the wait for the device, the copy of the output back and the writing of the answers
/// follow the batch's upload. Done on the worker's thread, they stall its next batch, and the
/// GPU idles while the next batch is gathered, decoded and copied. Handed to a thread of their
/// own, they overlap with that, so one worker keeps a GPU busy. A CPU worker has no device to
/// wait for: the answer thread would only take cores from its forward.
struct Finisher(mpsc::SyncSender<Finishing>);

/// A submitted batch on its way to its answers.
struct Finishing {
    live: Vec<(Job, Decoded)>,
    flight: InFlight,
    clock: BatchClock,
}

/// What landing and answering a batch needs, borrowed from the worker by its answer thread.
#[derive(Clone, Copy)]
struct Lander<'a> {
    pipeline: &'a Pipeline,
    module: &'a Model,
    device: tch::Device,
    shared: &'a Shared,
}

impl<'a> Lander<'a> {
    fn of(ctx: &'a Context, model: &'a Loaded) -> Self {
        Lander {
            pipeline: &model.pipeline,
            module: &model.module,
            device: ctx.device,
            shared: &ctx.shared,
        }
    }
}

/// The answer thread's body: answers each batch handed to it, until the worker closes the
/// channel. Each batch counts the worker busy until it is answered (see [`Busy::hand_over`]):
/// a forward that never returns leaves the worker stuck, and its pool replaces it.
fn finish_batches(stage: &Lander, busy: &Busy, batches: mpsc::Receiver<Finishing>) {
    // Grad mode is per thread, and the postprocessing runs here.
    let _no_grad = tch::no_grad_guard();
    // Reading an output may run host operations (a dtype conversion): one thread, not a team
    // of its own that no worker counts (see crate::openmp).
    crate::openmp::run_alone_here();
    for batch in batches {
        #[cfg(test)]
        tests::ANSWERED_APART.fetch_add(batch.live.len(), Ordering::Relaxed);
        // Dropped even if answering panics: the worker, restarted, must not look stuck.
        let _landed = Landed(busy);
        finish(stage, batch);
    }
}

/// Tells the worker's [`Busy`] that the batch its answer thread held is done, when dropped.
struct Landed<'a>(&'a Busy);

impl Drop for Landed<'_> {
    fn drop(&mut self) {
        self.0.landed();
    }
}

/// Waits for a submitted batch's forward, reads its output and answers each of its requests.
/// A batch the model fails is retried one request at a time, so that one request the model
/// cannot take does not fail the others.
fn finish(stage: &Lander, batch: Finishing) {
    let Finishing {
        live,
        flight,
        clock,
    } = batch;
    let Lander {
        pipeline,
        module,
        device,
        shared,
    } = *stage;
    let launched = guarded(CRASHED_RUNNING, || pipeline.land(flight));
    let launched = match launched {
        Ok(launched) => launched,
        Err(_) if live.len() > 1 => {
            for (job, d) in live {
                let result = match guarded(CRASHED_RUNNING, || {
                    pipeline.run_batch(module, device, &[&d])
                }) {
                    Ok(mut b) => {
                        shared.ran_on(&d.tensors());
                        Ok(b.remove(0))
                    }
                    Err(e) => Err(blame(shared, pipeline, e, &d)),
                };
                clock.answer(job, result, Some(Instant::now()));
            }
            return;
        }
        Err(e) => {
            let ran = Some(Instant::now());
            for (job, d) in live {
                clock.answer(job, Err(blame(shared, pipeline, e.clone(), &d)), ran);
            }
            return;
        }
    };
    match &launched {
        Launched::Output(t) if pipeline.answers_tensor() => shared.saw_output(0, t),
        Launched::Outputs(ts) => {
            for (i, t) in ts.iter().enumerate() {
                shared.saw_output(i, t);
            }
        }
        _ => {}
    }
    shared.ran_on(&live[0].1.tensors());
    let inputs: Vec<&Decoded> = live.iter().map(|(_, d)| d).collect();
    let result = guarded(CRASHED_ANSWERING, || pipeline.answer(launched, &inputs));
    drop(inputs);
    let ran = Some(Instant::now());
    match result {
        Ok(bodies) => {
            for ((job, _), body) in live.into_iter().zip(bodies) {
                clock.answer(job, Ok(body), ran);
            }
        }
        Err(e) => {
            for (job, _) in live {
                clock.answer(job, Err(e.clone()), ran);
            }
        }
    }
}

/// The worker's loop: takes batches and serves them until stopped, handing their answers to
/// `finisher` where there is one.
fn serve_batches(ctx: &Context, model: &Loaded, finisher: Option<&Finisher>) -> Ended {
    // Ready only now that the answer thread, where there is one, runs: a registration that
    // waits for its workers then finds every thread of theirs.
    ctx.shared.set(ctx.id, WorkerState::Ready);
    let _listed = StopWaiting(&ctx.queue);
    let mut threads = 0;
    let mut cost = DecodeCost::default();
    let mut poll = Duration::ZERO;
    // When the worker last served a batch, until it has trimmed the heap after it.
    let mut untrimmed_since: Option<Instant> = None;
    let mut team = Team::default();
    loop {
        if ctx.stop.load(Ordering::Relaxed) {
            return Ended::Stopped;
        }
        // Right after a batch, only the short poll: what the worker does before it sleeps
        // happens in between.
        let wait = if poll.is_zero() {
            IDLE_POLL
        } else {
            Duration::ZERO
        };
        let jobs = match model.batcher.next_batch(&ctx.queue, wait, poll) {
            Next::Batch(jobs) => {
                poll = POLL_AFTER_BATCH;
                untrimmed_since = Some(Instant::now());
                jobs
            }
            Next::Idle => {
                poll = Duration::ZERO;
                // Another worker at work may need the cores this one's team holds (see
                // crate::openmp); checked as the worker goes to sleep and at each idle poll.
                team.waiting();
                if untrimmed_since.is_some_and(|t| t.elapsed() >= TRIM_AFTER_IDLE) {
                    crate::heap::release_free();
                    untrimmed_since = None;
                }
                continue;
            }
            Next::Closed => return Ended::Stopped,
        };
        let (share, _busy) = ctx.budget.enter();
        let share = share.min(model.max_threads);
        if share != threads {
            threads = share;
            tch::set_num_threads(threads as i32);
        }
        team.before_forward(share);
        ctx.busy.begin();
        // A panic drops the batch's reply channels, so each waiting client learns the worker died.
        let crashed = catch_unwind(AssertUnwindSafe(|| {
            process(ctx, model, jobs, share, &mut cost, finisher)
        }))
        .is_err();
        ctx.busy.end();
        if crashed {
            return Ended::Crashed("the handler panicked".into());
        }
    }
}

/// Running mean of one request's decoding time, which decides whether a batch's decoding is
/// worth spreading over threads: images take milliseconds each, JSON tensors microseconds.
#[derive(Debug, Default)]
struct DecodeCost {
    mean_us: Option<f64>,
}

impl DecodeCost {
    /// Below this much decoding per thread, starting a thread costs more than it saves.
    const PER_THREAD_US: f64 = 500.0;

    fn record(&mut self, took: Duration) {
        let us = took.as_secs_f64() * 1e6;
        self.mean_us = Some(match self.mean_us {
            Some(m) => 0.8 * m + 0.2 * us,
            None => us,
        });
    }

    /// How many threads should decode a batch of `jobs` when the worker holds `threads`.
    fn width(&self, jobs: usize, threads: usize) -> usize {
        let Some(mean) = self.mean_us else {
            return 1;
        };
        let worth = (mean * jobs as f64 / Self::PER_THREAD_US) as usize;
        worth.clamp(1, threads.clamp(1, jobs.max(1)))
    }
}

/// Decodes each payload, on `width` threads (the caller's among them), in order.
fn decode_all(
    pipeline: &Pipeline,
    payloads: &[&Payload],
    width: usize,
    cost: &mut DecodeCost,
) -> Vec<Result<Decoded, PredictError>> {
    // A decoder that panics on some input fails that request alone, not its batch or the worker.
    let one = |p: &Payload| {
        catch_unwind(AssertUnwindSafe(|| pipeline.decode(p))).unwrap_or_else(|_| {
            Err(PredictError::ModelFailed(
                "decoding this input crashed the decoder".into(),
            ))
        })
    };
    let timed = |chunk: &[&Payload]| -> Vec<(Result<Decoded, PredictError>, Duration)> {
        chunk
            .iter()
            .map(|p| {
                let t = Instant::now();
                (one(p), t.elapsed())
            })
            .collect()
    };
    let width = width.min(payloads.len());
    let results = if width <= 1 {
        timed(payloads)
    } else {
        // The forward has not started yet, so the worker's intra-op cores are free for this.
        let chunk = payloads.len().div_ceil(width);
        std::thread::scope(|s| {
            let mut parts = payloads.chunks(chunk);
            let mine = parts.next().unwrap_or(&[]);
            // A part whose thread cannot start is decoded here instead.
            let helpers: Vec<_> = parts
                .map(|c| {
                    std::thread::Builder::new()
                        .spawn_scoped(s, move || timed(c))
                        .map_err(|_| c)
                })
                .collect();
            let mut all = timed(mine);
            for h in helpers {
                match h {
                    Ok(h) => match h.join() {
                        Ok(part) => all.extend(part),
                        Err(panic) => std::panic::resume_unwind(panic),
                    },
                    Err(c) => all.extend(timed(c)),
                }
            }
            all
        })
    };
    results
        .into_iter()
        .map(|(r, took)| {
            cost.record(took);
            r
        })
        .collect()
}

/// Serves one batch: decode each request (bad ones fail alone, on up to `threads` threads), run
/// the model once for all, and answer each request on its own channel.
fn process(
    ctx: &Context,
    model: &Loaded,
    jobs: Vec<Job>,
    threads: usize,
    cost: &mut DecodeCost,
    finisher: Option<&Finisher>,
) {
    let (module, pipeline) = (&model.module, &model.pipeline);
    let started = Instant::now();
    let gathered = jobs.len();
    let timeout = ctx.spec.response_timeout;
    let mut fresh = Vec::with_capacity(jobs.len());
    for job in jobs {
        let waited = job.enqueued.elapsed();
        let expired = if waited > timeout {
            Some(PredictError::Timeout(timeout.as_secs()))
        } else {
            ctx.spec
                .client_timeout
                .filter(|limit| waited > *limit)
                .map(|limit| PredictError::Expired(limit.as_millis() as u64))
        };
        match expired {
            Some(e) => {
                let _ = job.reply.send((Err(e), Timings::default()));
            }
            None => fresh.push(job),
        }
    }
    let payloads: Vec<&Payload> = fresh.iter().map(|j| &j.payload).collect();
    let width = cost.width(payloads.len(), threads);
    let decoded = decode_all(pipeline, &payloads, width, cost);
    drop(payloads);
    let clock = BatchClock {
        started,
        decoded: Instant::now(),
        gathered,
    };
    let mut live: Vec<(Job, Decoded)> = Vec::with_capacity(fresh.len());
    for (job, d) in fresh.into_iter().zip(decoded) {
        match d {
            Ok(d) => live.push((job, d)),
            Err(e) => clock.answer(job, Err(e), None),
        }
    }
    if live.is_empty() {
        return;
    }
    let inputs: Vec<&Decoded> = live.iter().map(|(_, d)| d).collect();
    let submitted = guarded(CRASHED_RUNNING, || {
        pipeline.submit(module, ctx.device, &inputs)
    });
    drop(inputs);
    let flight = match submitted {
        Ok(flight) => flight,
        Err(e) => {
            // Nothing was queued for the device: land the failure here, where a batch of
            // several is retried one request at a time.
            let failed = Finishing {
                live,
                flight: InFlight::failed(e),
                clock,
            };
            finish(&Lander::of(ctx, model), failed);
            return;
        }
    };
    let batch = Finishing {
        live,
        flight,
        clock,
    };
    match finisher {
        // The thread is gone only if it panicked outside `finish`: answer here then.
        Some(f) => match f.0.send(batch) {
            Ok(()) => ctx.busy.hand_over(),
            Err(mpsc::SendError(batch)) => finish(&Lander::of(ctx, model), batch),
        },
        None => finish(&Lander::of(ctx, model), batch),
    }
}

/// A failed request's error, as [`Shared::blame`] judges it; a crash stays the handler's.
fn blame(shared: &Shared, pipeline: &Pipeline, e: PredictError, d: &Decoded) -> PredictError {
    match &e {
        PredictError::ModelFailed(m) if m == CRASHED_RUNNING => e,
        _ => shared.blame(e, &d.tensors(), &pipeline.input_names()),
    }
}

/// Runs a stage of a batch's handling. A panic in it (a bug, or a model whose outputs disagree in
/// a way no check foresaw) fails that batch, not the worker or its answer thread: the module
/// itself is untouched.
fn guarded<T>(
    crashed: &str,
    stage: impl FnOnce() -> Result<T, PredictError>,
) -> Result<T, PredictError> {
    catch_unwind(AssertUnwindSafe(stage))
        .unwrap_or_else(|_| Err(PredictError::ModelFailed(crashed.into())))
}

/// What a request is told when the handler panicked while running its batch.
const CRASHED_RUNNING: &str = "the handler crashed while running the batch";
/// What a request is told when the handler panicked while writing the answers.
const CRASHED_ANSWERING: &str = "the handler crashed on the model's output";

/// When a batch's stages ended, for each request's timings.
struct BatchClock {
    started: Instant,
    decoded: Instant,
    /// Requests in the batch as gathered: metrics report it even when a failure makes it run
    /// request by request.
    gathered: usize,
}

impl BatchClock {
    /// Sends a job its answer with its timings; `ran` is when the model run that answered it
    /// ended, if one did.
    fn answer(&self, job: Job, result: Result<Prediction, PredictError>, ran: Option<Instant>) {
        let us = |d: Duration| d.as_micros() as u64;
        let t = Timings {
            queue_us: us(self.started.saturating_duration_since(job.enqueued)),
            handler_us: us(self.started.elapsed()),
            batch_size: self.gathered,
            decode_us: us(self.decoded.saturating_duration_since(self.started)),
            run_us: ran.map_or(0, |r| us(r.saturating_duration_since(self.decoded))),
        };
        let _ = job.reply.send((result, t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_spreads_only_when_it_pays() {
        let mut c = DecodeCost::default();
        assert_eq!(c.width(8, 2), 1, "nothing measured yet");
        c.record(Duration::from_micros(20));
        assert_eq!(
            c.width(8, 2),
            1,
            "JSON tensors: 8 x 20 us is not worth a thread"
        );
        let mut c = DecodeCost::default();
        c.record(Duration::from_millis(2));
        assert_eq!(
            c.width(8, 2),
            2,
            "images: as many threads as the worker holds"
        );
        assert_eq!(c.width(8, 16), 8, "never more threads than requests");
        assert_eq!(c.width(1, 16), 1);
        assert_eq!(c.width(8, 1), 1);
        assert_eq!(c.width(8, 0), 1);
    }

    /// A request whose body is `body`, sent as JSON.
    fn json_payload(body: &str) -> Payload {
        Payload {
            parts: vec![crate::job::Part {
                name: "body".into(),
                content_type: Some("application/json".into()),
                data: body.as_bytes().to_vec().into(),
                shape: None,
            }],
            ..Payload::default()
        }
    }

    #[test]
    fn decode_all_keeps_order_and_copes_with_empty_batches() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = tchserve_mar::handler::builtin("tensor").unwrap();
        let pipeline = Pipeline::new(&manifest, dir.path()).unwrap();
        let mut cost = DecodeCost::default();
        assert!(decode_all(&pipeline, &[], 2, &mut cost).is_empty());
        let bodies: Vec<Payload> = ["[1]", "not json", "[3]", "[4]", "[5]"]
            .iter()
            .map(|b| json_payload(b))
            .collect();
        let refs: Vec<&Payload> = bodies.iter().collect();
        for width in [1, 2, 3, 8] {
            let out = decode_all(&pipeline, &refs, width, &mut cost);
            let firsts: Vec<Option<f64>> = out
                .iter()
                .map(|r| r.as_ref().ok().map(|d| d.tensor.double_value(&[0])))
                .collect();
            assert_eq!(
                firsts,
                [Some(1.0), None, Some(3.0), Some(4.0), Some(5.0)],
                "width {width}"
            );
        }
    }

    /// How a test worker runs its batches.
    #[derive(Debug, Clone, Copy)]
    struct Mode {
        /// Answers written on an answer thread, as a GPU worker's are.
        answers_apart: bool,
        /// The model's forwards on a thread of their own, as a GPU model's are: the worker
        /// submits a batch and goes on, and its answer thread waits for the forward.
        forward_thread: bool,
    }

    const MODES: [Mode; 3] = [
        Mode {
            answers_apart: false,
            forward_thread: false,
        },
        Mode {
            answers_apart: true,
            forward_thread: false,
        },
        Mode {
            answers_apart: true,
            forward_thread: true,
        },
    ];

    /// A running test worker.
    struct TestWorker {
        submit: crate::batch::Submitter<Job>,
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<()>,
        /// The model placed where the worker finds it, when it runs on a forward thread.
        _model: Option<Arc<Model>>,
    }

    impl TestWorker {
        fn end(self) {
            self.stop.store(true, Ordering::Relaxed);
            drop(self.submit);
            self.thread.join().unwrap();
        }
    }

    /// Serves `module`, saved into `dir`, with the tensor handler (three float32 numbers per
    /// example, so that a request may hold several) on a worker thread run as `mode` says.
    fn test_worker(dir: &std::path::Path, module: tch::CModule, mode: Mode) -> TestWorker {
        module.save(dir.join("model.pt")).unwrap();
        let batcher = Batcher {
            batch_size: 8,
            max_delay: Duration::from_millis(300),
        };
        let (submit, queue) = crate::batch::queue(64);
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        shared.insert(1, WorkerState::Starting);
        let modules: Arc<SharedModules> = Arc::default();
        // Loaded before the worker starts, which then shares it rather than loading its own.
        let model = mode.forward_thread.then(|| {
            modules
                .get_or_load(tch::Device::Cpu, || {
                    crate::model::tests::on_own_thread(&dir.join("model.pt"))
                })
                .unwrap()
        });
        let ctx = Context {
            id: 1,
            device: tch::Device::Cpu,
            spec: Arc::new(ModelSpec {
                name: "affine".into(),
                version: "1.0".into(),
                model_dir: dir.to_path_buf(),
                serialized_file: "model.pt".into(),
                handler: tchserve_mar::HandlerManifest::parse(
                    "affine.json",
                    br#"{"schema": 1, "name": "affine",
                         "input": {"tensor": {"dtype": "float32", "shape": [3]}},
                         "model": {"feed": "stacked"}, "output": {"tensor": {}}}"#,
                )
                .unwrap(),
                batch_size: batcher.batch_size,
                max_batch_delay: batcher.max_delay,
                job_queue_size: 64,
                response_timeout: Duration::from_secs(60),
                placement: tchserve_backend::Placement::Cpu,
                client_timeout: None,
                use_job_ticket: false,
            }),
            batcher,
            queue,
            stop: Arc::clone(&stop),
            shared,
            budget: ThreadBudget::new(1),
            modules,
            forward_threads: 1,
            answers_apart: mode.answers_apart,
            busy: Arc::new(Busy::new()),
        };
        let thread = std::thread::spawn(move || run(ctx));
        TestWorker {
            submit,
            stop,
            thread,
            _model: model,
        }
    }

    /// Sends each body as a request, all queued at once so that they are served as one batch,
    /// and returns each answer (None for an error) and the largest batch they were served in.
    fn round(
        submit: &crate::batch::Submitter<Job>,
        rows: &[&str],
    ) -> (Vec<Option<serde_json::Value>>, usize) {
        let replies: Vec<_> = rows
            .iter()
            .map(|body| {
                let (job, reply) = Job::new(json_payload(body));
                submit.try_send(job).unwrap();
                reply
            })
            .collect();
        let mut largest_batch = 0;
        let answers = replies
            .into_iter()
            .map(|r| {
                let (result, timings) = r.blocking_recv().expect("an answer");
                largest_batch = largest_batch.max(timings.batch_size);
                match result {
                    Ok(Prediction::Json(body)) => Some(serde_json::from_slice(&body).unwrap()),
                    Ok(other) => panic!("{other:?}"),
                    Err(_) => None,
                }
            })
            .collect();
        (answers, largest_batch)
    }

    /// Requests answered on a worker's answer thread, over the whole test binary (only the tests
    /// below start workers with one, one at a time: see ANSWERING_APART).
    pub(super) static ANSWERED_APART: std::sync::atomic::AtomicUsize =
        std::sync::atomic::AtomicUsize::new(0);
    /// Held by each test that starts workers, so that their counts and threads do not mix.
    static ANSWERING_APART: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn answers_written_apart_are_the_answers_written_by_the_worker() {
        let _alone = ANSWERING_APART.lock().unwrap_or_else(|e| e.into_inner());
        let good: [&str; 4] = [
            "[0.5, 1.0, -1.5]",
            "[2.0, 0.0, 1.0]",
            "[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]",
            "[-1.0, 0.25, 4.0]",
        ];
        let want = [
            Some(serde_json::json!([-4.0, 4.5])),
            Some(serde_json::json!([7.0, -4.0])),
            Some(serde_json::json!([[6.5, 1.0], [1.0, 1.0]])),
            Some(serde_json::json!([16.125, -0.25])),
        ];
        // The good requests again, with one of the wrong size, which cannot join the batch and
        // fails alone once the batch has failed, and one that is not JSON, which fails alone
        // when decoded.
        let mixed: Vec<&str> = [&good[..2], &["[1.0, 2.0]"], &good[2..], &["not json"]].concat();
        let mut want_mixed = want.to_vec();
        want_mixed.insert(2, None);
        want_mixed.push(None);
        for mode in MODES {
            let before = ANSWERED_APART.load(Ordering::Relaxed);
            let dir = tempfile::tempdir().unwrap();
            let worker = test_worker(dir.path(), crate::model::tests::traced(), mode);
            let mut largest_batch = 0;
            for _ in 0..2 {
                let (answers, largest) = round(&worker.submit, &good);
                assert_eq!(answers, want, "{mode:?}");
                largest_batch = largest_batch.max(largest);
            }
            let (answers, _) = round(&worker.submit, &mixed);
            assert_eq!(answers, want_mixed, "{mode:?}");
            assert!(largest_batch > 1, "no batch was gathered");
            let answering = crate::openmp::tests::threads_named("A-1-affine_1.0");
            assert_eq!(answering, usize::from(mode.answers_apart));
            let forwarding = crate::openmp::tests::threads_named("forward-worker");
            assert_eq!(forwarding, usize::from(mode.forward_thread), "{mode:?}");
            worker.end();
            // The two rounds of good requests at least were answered there.
            let there = ANSWERED_APART.load(Ordering::Relaxed) - before;
            if mode.answers_apart {
                assert!(there >= 2 * good.len(), "{there} answered apart");
            } else {
                assert_eq!(there, 0);
            }
        }
    }

    #[test]
    fn a_forward_that_fails_for_one_request_fails_that_request_alone() {
        let _alone = ANSWERING_APART.lock().unwrap_or_else(|e| e.into_inner());
        // Each example's three numbers pick rows of a 3x2 table: a number past 2 makes the
        // forward fail, for the whole batch it is in. The batch then runs again one request at
        // a time (where the forward thread's answers are read: on the answer thread).
        let lookup = || {
            let table = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([3, 2]);
            let x = tch::Tensor::zeros([1, 3], (tch::Kind::Float, tch::Device::Cpu));
            tch::CModule::create_by_tracing("Lookup", "forward", &[x], &mut |xs| {
                let picks = xs[0].to_kind(tch::Kind::Int64).flatten(0, -1);
                vec![table.index_select(0, &picks).view([-1, 6])]
            })
            .unwrap()
        };
        let rows = ["[0, 1, 2]", "[2, 2, 9]", "[1, 0, 0]"];
        let want = [
            Some(serde_json::json!([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
            None,
            Some(serde_json::json!([3.0, 4.0, 1.0, 2.0, 1.0, 2.0])),
        ];
        for mode in MODES {
            let dir = tempfile::tempdir().unwrap();
            let worker = test_worker(dir.path(), lookup(), mode);
            let (answers, largest) = round(&worker.submit, &rows);
            assert_eq!(answers, want, "{mode:?}");
            assert!(largest > 1, "{mode:?}: no batch was gathered");
            // And the worker serves on.
            assert_eq!(round(&worker.submit, &rows[..1]).0, want[..1], "{mode:?}");
            worker.end();
        }
    }

    #[test]
    fn the_mean_follows_recent_requests() {
        let mut c = DecodeCost::default();
        c.record(Duration::from_millis(2));
        for _ in 0..40 {
            c.record(Duration::from_micros(10));
        }
        assert_eq!(c.width(8, 2), 1);
    }
}
