//! Keeping the OpenMP teams that workers hold within the process's cores.
//!
//! libtorch's CPU kernels run their parallel regions on GNU OpenMP, which gives each thread that
//! starts a region a team of its own; the team's threads outlive the region and wait for the next
//! one. Once the process holds more of them than it has cores, GNU OpenMP cuts the spinning at
//! its barriers to almost nothing, so every parallel region of every forward puts its threads to
//! sleep and wakes them again. On two cores, a second ResNet-18 that had answered one request and
//! then sat idle cost the first 30% of its throughput at batch size 1 (53 against 38 req/s), and
//! two workers of one ResNet-18 taking turns at concurrency 1 cost as much.
//!
//! So each worker keeps a [`Team`] in step with a process-wide count of the team threads held,
//! and ends its team when it has no work and the teams held no longer fit the cores. OpenMP 5's
//! `omp_pause_resource_all` ends the calling thread's team in GNU OpenMP (its threads exit and
//! stop counting), and the next parallel region starts a new one, which costs a thread start per
//! thread, tens of microseconds against a forward of a millisecond or more. The call is looked up
//! at run time because the OpenMP runtime is whichever one libtorch was built with: LLVM's and
//! Intel's runtimes pause the whole process's threads rather than the caller's, so with them
//! nothing is done.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Team threads held by all workers, beyond the workers' own threads.
static EXTRA_THREADS: AtomicUsize = AtomicUsize::new(0);

/// The cores GNU OpenMP counts: those the process may run on.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: sched_getaffinity fills the zeroed set it is given, of the size given.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0
                {
                    return (libc::CPU_COUNT(&set) as usize).max(1);
                }
            }
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    })
}

/// Whether the teams held, with the process's first thread (which GNU OpenMP counts too),
/// exceed the cores.
fn crowded() -> bool {
    1 + EXTRA_THREADS.load(Ordering::Relaxed) > cores()
}

/// The OpenMP team of one worker thread, if it holds one. Lives on that thread: the team can
/// only be ended from it.
#[derive(Debug, Default)]
pub struct Team {
    /// The team's size, the worker's own thread included; 0 when it holds none.
    threads: usize,
}

impl Team {
    /// Before a forward on `threads` intra-op threads. A team takes the size of each parallel
    /// region, and one thread runs no region at all, so a team held then is only in the way.
    pub fn before_forward(&mut self, threads: usize) {
        if threads <= 1 {
            self.end();
            return;
        }
        let (held, wanted) = (self.threads.saturating_sub(1), threads - 1);
        if wanted > held {
            EXTRA_THREADS.fetch_add(wanted - held, Ordering::Relaxed);
        } else {
            EXTRA_THREADS.fetch_sub(held - wanted, Ordering::Relaxed);
        }
        self.threads = threads;
    }

    /// The worker has no work: its team goes if the teams held do not fit the cores, since a
    /// worker at work then sleeps at every barrier. The first to start waiting gives way.
    pub fn waiting(&mut self) {
        if self.threads > 0 && crowded() {
            self.end();
        }
    }

    /// Ends the team now.
    pub fn end(&mut self) {
        if self.threads > 0 {
            release_team();
            EXTRA_THREADS.fetch_sub(self.threads - 1, Ordering::Relaxed);
            self.threads = 0;
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.end();
    }
}

/// Makes the calling thread run its parallel regions alone, so that it never starts a team: for
/// a thread whose work is not on the CPU, such as a GPU model's forward thread, which no
/// [`Team`] counts.
pub fn run_alone_here() {
    // libtorch sets a thread's OpenMP thread count at its first parallel region, to the count
    // last set by any thread: have that happen now, then lower it for this thread alone.
    let _ = tch::get_num_threads();
    #[cfg(target_os = "linux")]
    gnu::set_num_threads_here(1);
}

/// Ends the calling thread's OpenMP team, if it has one and the runtime is GNU OpenMP. Returns
/// whether the runtime did it. Must not be called from inside a parallel region.
fn release_team() -> bool {
    #[cfg(target_os = "linux")]
    {
        gnu::release_team()
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

#[cfg(target_os = "linux")]
mod gnu {
    use std::ffi::{CStr, c_int, c_void};
    use std::sync::OnceLock;

    /// `omp_pause_soft` in omp.h: resources are released, settings kept.
    const OMP_PAUSE_SOFT: c_int = 1;

    type PauseAll = unsafe extern "C" fn(c_int) -> c_int;

    fn symbol(name: &CStr) -> *mut c_void {
        // SAFETY: dlsym with RTLD_DEFAULT reads the loaded objects' symbol tables only.
        unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
    }

    /// GNU OpenMP's `omp_pause_resource_all`, when GNU OpenMP is the runtime loaded.
    fn pause_all() -> Option<PauseAll> {
        static PAUSE: OnceLock<Option<PauseAll>> = OnceLock::new();
        *PAUSE.get_or_init(|| {
            // LLVM's and Intel's runtimes also export the GOMP_ entry points, for code built by
            // GCC; only they have the __kmpc_ ones.
            let gnu = !symbol(c"GOMP_parallel").is_null() && symbol(c"__kmpc_fork_call").is_null();
            let pause = symbol(c"omp_pause_resource_all");
            // SAFETY: the symbol is OpenMP 5's `int omp_pause_resource_all(omp_pause_resource_t)`,
            // whose argument is a C enum, passed as an int.
            (gnu && !pause.is_null())
                .then(|| unsafe { std::mem::transmute::<*mut c_void, PauseAll>(pause) })
        })
    }

    type SetNumThreads = unsafe extern "C" fn(c_int);

    /// `omp_set_num_threads`, which every OpenMP runtime applies to the calling thread alone.
    pub(super) fn set_num_threads_here(n: c_int) {
        let set = symbol(c"omp_set_num_threads");
        if !set.is_null() {
            // SAFETY: the symbol is OpenMP's `void omp_set_num_threads(int)`, called outside
            // any parallel region.
            unsafe { std::mem::transmute::<*mut c_void, SetNumThreads>(set)(n) }
        }
    }

    pub(super) fn release_team() -> bool {
        // SAFETY: called on a worker thread between forwards, outside any parallel region; GNU
        // OpenMP then touches only this thread's team and a process-wide atomic count.
        pause_all().is_some_and(|pause| unsafe { pause(OMP_PAUSE_SOFT) } == 0)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// Runs `test` on a thread named `name`, one such test at a time: they count threads and
    /// change libtorch's thread counts, which are process-wide (libtorch's pool for its mobile
    /// kernels is made again by whichever thread changes the count, and takes its name).
    fn on_thread_named(name: &str, test: impl FnOnce() + Send + 'static) {
        static LOCK: Mutex<()> = Mutex::new(());
        let _serial = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        std::thread::Builder::new()
            .name(name.into())
            .spawn(test)
            .unwrap()
            .join()
            .unwrap();
    }

    /// Threads of this process whose name is `name`.
    pub(crate) fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    }

    /// Threads named `name` once the count is `want`, or after two seconds: the threads of an
    /// ended team leave its barrier before the call returns, and exit just after.
    fn threads_named_settled(name: &str, want: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let n = threads_named(name);
            if n == want || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_threads_team_ends_and_starts_again() {
        // Team threads take the name of the thread that started them.
        on_thread_named("omp-team-test", || {
            // Setting the thread count may start libtorch's own pool for its mobile
            // kernels, which is not OpenMP's: it is counted before any parallel region runs.
            // Asking for the count settles it for this thread now: libtorch otherwise sets
            // it again at the first parallel region, to whatever another test set last.
            tch::set_num_threads(2);
            let _ = tch::get_num_threads();
            let before = threads_named("omp-team-test");
            let x = tch::Tensor::ones([1 << 20], (tch::Kind::Float, tch::Device::Cpu));
            let sum = || f64::try_from((&x * 2.0).sum(tch::Kind::Double)).unwrap();
            let mut team = super::Team::default();
            team.before_forward(2);
            assert_eq!(sum(), 2.0 * (1 << 20) as f64);
            assert_eq!(
                threads_named("omp-team-test"),
                before + 1,
                "no team started"
            );
            team.end();
            assert_eq!(
                threads_named_settled("omp-team-test", before),
                before,
                "the team is still there"
            );
            team.before_forward(2);
            assert_eq!(sum(), 2.0 * (1 << 20) as f64);
            assert_eq!(
                threads_named("omp-team-test"),
                before + 1,
                "no new team started"
            );
            // One thread runs no parallel region: a team held then is ended.
            team.before_forward(1);
            assert_eq!(threads_named_settled("omp-team-test", before), before);
            assert!(super::release_team(), "the OpenMP runtime is not GNU's");
        });
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_thread_run_alone_starts_no_team() {
        on_thread_named("omp-alone-test", || {
            tch::set_num_threads(2);
            super::run_alone_here();
            let before = threads_named("omp-alone-test");
            let x = tch::Tensor::ones([1 << 20], (tch::Kind::Float, tch::Device::Cpu));
            let sum = f64::try_from((&x * 2.0).sum(tch::Kind::Double)).unwrap();
            assert_eq!(sum, 2.0 * (1 << 20) as f64);
            assert_eq!(threads_named("omp-alone-test"), before, "a team started");
        });
    }
}
