//! The threads that run a GPU model's forwards for all the workers that share it.
//!
//! cuBLAS and cuDNN give every thread that calls them a handle of its own, and libtorch a
//! workspace per handle (cuBLAS alone takes 32 MiB on Hopper GPUs). When each worker ran its own
//! forwards, every extra worker of a GPU model paid that, and several forwards in flight each
//! held their activations at once. Queued to one thread per model and GPU, the handles exist
//! once. A forward on a GPU mostly queues kernels and returns, so one thread keeps up with
//! several workers, each of which gathers its batch into pinned host memory and copies its
//! answers out on its own thread, until the launching itself is the limit: a small batch of a
//! model of many small kernels (ResNet-18 at batch 8 or 16 on an H200) takes as long to launch
//! as to run. More threads per model and GPU (`gpu_forward_threads`) then launch several
//! forwards at once, each thread paying its own handles. The thread also queues the copy of
//! each batch to the device, just before its forward: the batches waiting for a thread wait in
//! host memory, so the device holds the inputs of the forwards running and no more, whatever
//! the number of workers.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use tch::{IValue, TchError};

/// Threads that run forwards, each one at a time, for any thread that asks.
#[derive(Debug)]
pub(crate) struct ForwardThread {
    calls: Option<mpsc::Sender<Call>>,
    threads: Vec<JoinHandle<()>>,
}

/// A forward asked of the thread.
struct Call {
    args: Args,
    reply: mpsc::SyncSender<Answer>,
}

/// A call's arguments.
enum Args {
    /// Borrowed from the asking thread, which waits for the answer.
    Borrowed(*const [IValue]),
    /// Handed over by a thread that goes on meanwhile (see [`ForwardThread::submit`]), with the
    /// device its tensors are moved to first.
    Owned(Vec<IValue>, tch::Device),
}

// SAFETY: borrowed `args` point into the asking thread's arguments, which that thread neither
// touches nor drops until it has the answer, or knows the call was dropped unanswered (see
// `forward`); owned ones are used by the forward thread alone. The values are libtorch's,
// reference-counted atomically, as tch assumes for `Tensor`.
unsafe impl Send for Call {}

/// A forward's result, made on the forward thread and handed to the thread that asked.
#[derive(Debug)]
struct Answer(Result<IValue, TchError>);

// SAFETY: the result is used by one thread at a time: made here, then moved to the asking
// thread, as tch moves tensors between threads.
unsafe impl Send for Answer {}

impl ForwardThread {
    /// Starts `threads` threads (at least one) named after `name` that answer each call with
    /// `forward(args)`, with autograd off, as the workers run it. A call goes to whichever
    /// thread is free first.
    pub(crate) fn spawn<F>(name: String, threads: usize, forward: F) -> std::io::Result<Self>
    where
        F: Fn(&[IValue]) -> Result<IValue, TchError> + Send + Sync + 'static,
    {
        let (calls, queue) = mpsc::channel::<Call>();
        let queue = Arc::new(Mutex::new(queue));
        let forward = Arc::new(forward);
        let count = threads.max(1);
        let mut started = ForwardThread {
            calls: Some(calls),
            threads: Vec::with_capacity(count),
        };
        for k in 0..count {
            let name = if count == 1 {
                name.clone()
            } else {
                format!("{name}-{k}")
            };
            let (queue, forward) = (Arc::clone(&queue), Arc::clone(&forward));
            // On an error the threads started so far end with `started`, dropped here.
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || serve(&queue, &*forward))?;
            started.threads.push(thread);
        }
        Ok(started)
    }

    /// Runs `forward(args)` on the thread and waits for its result.
    pub(crate) fn forward(&self, args: &[IValue]) -> Result<IValue, TchError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.call(Args::Borrowed(std::ptr::from_ref(args)), reply)?;
        // Returns only once the call has been answered or dropped, so `args` outlives its use.
        answer.recv().map(|a| a.0).map_err(|_| gone())?
    }

    /// Queues `forward(args)` and returns at once: the caller goes on (a worker prepares its
    /// next batch) while the forward waits for a thread and runs, and reads the result from
    /// the [`Pending`] when it needs it.
    ///
    /// The thread first moves to `device` each tensor of `args` that is elsewhere (a batch in
    /// pinned host memory). A batch waiting for its forward then waits on the host: the device
    /// holds only the inputs of the forwards running, however many workers queue theirs.
    pub(crate) fn submit(&self, args: Vec<IValue>, device: tch::Device) -> Pending {
        let (reply, answer) = mpsc::sync_channel(1);
        match self.call(Args::Owned(args, device), reply) {
            Ok(()) => Pending(Waiting::Queued(answer)),
            Err(e) => Pending::ready(Err(e)),
        }
    }

    fn call(&self, args: Args, reply: mpsc::SyncSender<Answer>) -> Result<(), TchError> {
        let call = Call { args, reply };
        self.calls
            .as_ref()
            .ok_or_else(gone)?
            .send(call)
            .map_err(|_| gone())
    }
}

fn gone() -> TchError {
    TchError::Torch("the model's forward thread has stopped".into())
}

/// The result of a forward that may still be queued or running (see [`ForwardThread::submit`]).
#[derive(Debug)]
pub(crate) struct Pending(Waiting);

#[derive(Debug)]
enum Waiting {
    /// Known already: run in place, or failed before it was queued.
    Ready(Answer),
    Queued(mpsc::Receiver<Answer>),
}

impl Pending {
    /// A forward that has already run.
    pub(crate) fn ready(result: Result<IValue, TchError>) -> Self {
        Pending(Waiting::Ready(Answer(result)))
    }

    /// Waits for the forward's result.
    pub(crate) fn wait(self) -> Result<IValue, TchError> {
        match self.0 {
            Waiting::Ready(answer) => answer.0,
            Waiting::Queued(answer) => answer.recv().map(|a| a.0).map_err(|_| gone())?,
        }
    }
}

/// One forward thread's loop: takes the next call, runs it, answers, until the queue closes.
fn serve<F>(queue: &Mutex<mpsc::Receiver<Call>>, forward: &F)
where
    F: Fn(&[IValue]) -> Result<IValue, TchError>,
{
    // Grad mode is per thread: the workers' guards do not reach this one.
    let _no_grad = tch::no_grad_guard();
    // A forward on a GPU has no host work worth a team of threads, and a team here, which no
    // worker counts, could crowd the CPU models' teams (see crate::openmp).
    crate::openmp::run_alone_here();
    loop {
        // The lock is held only while waiting for a call, never during a forward.
        let next = match queue.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        let Ok(Call { mut args, reply }) = next else {
            return;
        };
        let result = {
            let args = match &mut args {
                // SAFETY: see `Call`: the asking thread waits while this borrow lives, and it
                // ends here, before the answer lets that thread go on.
                Args::Borrowed(args) => Ok(unsafe { &**args }),
                Args::Owned(args, device) => move_to(args, *device).map(|()| args.as_slice()),
            };
            match args {
                Ok(args) => catch_unwind(AssertUnwindSafe(|| forward(args))).unwrap_or_else(|_| {
                    Err(TchError::Torch("the model's forward panicked".into()))
                }),
                Err(e) => Err(e),
            }
        };
        // Owned inputs (a batch on the device) are freed before the answer goes back.
        drop(args);
        let _ = reply.send(Answer(result));
    }
}

/// Moves each tensor of `args` that is not on `device` there, without waiting for the copy: it
/// is queued on the device's stream before the forward that reads it.
fn move_to(args: &mut [IValue], device: tch::Device) -> Result<(), TchError> {
    for arg in args {
        if let IValue::Tensor(t) = arg
            && t.device() != device
        {
            *t = crate::device::upload(t, device)
                .map_err(|e| TchError::Torch(format!("moving input to the device: {e}")))?;
        }
    }
    Ok(())
}

impl Drop for ForwardThread {
    fn drop(&mut self) {
        // Closing the queue ends the thread; waiting for it frees the model's memory on the
        // device before whoever dropped the last reference goes on (perhaps to load it again).
        drop(self.calls.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn echo_thread(seen: Arc<Mutex<Vec<std::thread::ThreadId>>>) -> ForwardThread {
        ForwardThread::spawn("forward-test".into(), 1, move |args| {
            seen.lock().unwrap().push(std::thread::current().id());
            match args {
                [IValue::Int(n)] if *n < 0 => Err(TchError::Shape(format!("bad input {n}"))),
                [IValue::Int(0)] => panic!("a model that panics"),
                [IValue::Int(n)] => Ok(IValue::Int(n * 10)),
                [IValue::Tensor(t)] => Ok(IValue::Tensor(t * 2)),
                _ => Err(TchError::Kind("unexpected arguments".into())),
            }
        })
        .unwrap()
    }

    #[test]
    fn forwards_run_on_the_thread_and_answer_each_caller() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = echo_thread(Arc::clone(&seen));
        let callers: Vec<i64> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..=8i64)
                .map(|n| {
                    let thread = &thread;
                    s.spawn(move || {
                        (0..50)
                            .map(|_| match thread.forward(&[IValue::Int(n)]) {
                                Ok(IValue::Int(v)) => v,
                                other => panic!("{other:?}"),
                            })
                            .sum::<i64>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(callers, (1..=8).map(|n| n * 10 * 50).collect::<Vec<_>>());
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 8 * 50);
        assert!(seen.iter().all(|id| *id == seen[0]));
        assert_ne!(seen[0], std::thread::current().id());
    }

    #[test]
    fn tensors_go_there_and_back() {
        let thread = echo_thread(Arc::default());
        // Autograd is off there, as on the workers: a forward records no graph.
        let t = tch::Tensor::from_slice(&[1.0f32, 2.5, -3.0]).set_requires_grad(true);
        match thread.forward(&[IValue::Tensor(t)]).unwrap() {
            IValue::Tensor(out) => {
                assert_eq!(Vec::<f32>::try_from(&out).unwrap(), [2.0, 5.0, -6.0]);
                assert!(!out.requires_grad());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_error_or_a_panic_fails_that_call_alone() {
        let thread = echo_thread(Arc::default());
        assert!(matches!(
            thread.forward(&[IValue::Int(-1)]),
            Err(TchError::Shape(m)) if m == "bad input -1"
        ));
        assert!(matches!(
            thread.forward(&[IValue::Int(0)]),
            Err(TchError::Torch(m)) if m.contains("panicked")
        ));
        assert!(matches!(
            thread.forward(&[IValue::Int(3)]),
            Ok(IValue::Int(30))
        ));
    }

    #[test]
    fn a_submitted_forward_runs_while_the_caller_goes_on() {
        // Each forward waits for a release that the caller sends only after submitting both:
        // had `submit` waited for its forward, the test would hang there.
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let thread = ForwardThread::spawn("forward-test".into(), 1, move |args| {
            gate.lock().unwrap().recv().unwrap();
            match args {
                [IValue::Int(n)] if *n < 0 => Err(TchError::Shape(format!("bad input {n}"))),
                [IValue::Int(n)] => Ok(IValue::Int(n + 1)),
                _ => Err(TchError::Kind("unexpected arguments".into())),
            }
        })
        .unwrap();
        let first = thread.submit(vec![IValue::Int(1)], tch::Device::Cpu);
        let bad = thread.submit(vec![IValue::Int(-1)], tch::Device::Cpu);
        let third = thread.submit(vec![IValue::Int(3)], tch::Device::Cpu);
        for _ in 0..3 {
            release.send(()).unwrap();
        }
        // Read in any order; each has its own result.
        assert!(matches!(third.wait(), Ok(IValue::Int(4))));
        assert!(matches!(bad.wait(), Err(TchError::Shape(m)) if m == "bad input -1"));
        assert!(matches!(first.wait(), Ok(IValue::Int(2))));
    }

    #[test]
    fn several_threads_run_forwards_at_once() {
        use std::sync::Condvar;
        use std::time::Duration;
        // Each forward waits (up to a while) until another one is running beside it, and
        // answers how many it saw at once: one thread alone would answer 1 after the wait.
        let running = Arc::new((Mutex::new(0i64), Condvar::new()));
        let inside = Arc::clone(&running);
        let thread = ForwardThread::spawn("forward-test".into(), 2, move |_| {
            let (count, changed) = &*inside;
            let mut n = count.lock().unwrap();
            *n += 1;
            changed.notify_all();
            let (n, _) = changed
                .wait_timeout_while(n, Duration::from_secs(10), |n| *n < 2)
                .unwrap();
            Ok(IValue::Int(*n))
        })
        .unwrap();
        let seen: Vec<i64> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| match thread.forward(&[]) {
                        Ok(IValue::Int(n)) => n,
                        other => panic!("{other:?}"),
                    })
                })
                .collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        assert_eq!(seen, [2, 2], "each forward saw the other running beside it");
        assert_eq!(thread.threads.len(), 2);
        drop(thread);
        assert_eq!(Arc::strong_count(&running), 1, "both threads ended");
    }

    #[test]
    fn dropping_it_ends_the_thread_and_what_it_held() {
        let held = Arc::new(());
        let inside = Arc::clone(&held);
        let thread = ForwardThread::spawn("forward-test".into(), 1, move |_| {
            let _ = &inside;
            Ok(IValue::None)
        })
        .unwrap();
        assert!(matches!(thread.forward(&[]), Ok(IValue::None)));
        assert_eq!(Arc::strong_count(&held), 2);
        drop(thread);
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "joined, and the closure dropped"
        );
    }
}
