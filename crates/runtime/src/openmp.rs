//! Ending the OpenMP team of a worker that has gone idle, so that only workers with work hold one.
//!
//! libtorch's CPU kernels run their parallel regions on GNU OpenMP, which gives each thread that
//! starts a region a team of its own; the team's threads outlive the region and wait for the next
//! one. Once the process holds more of them than it has cores, GNU OpenMP cuts the spinning at
//! its barriers to almost nothing, so every parallel region of every forward puts its threads to
//! sleep and wakes them again. A second ResNet-18 that had answered one request and then sat idle
//! cost the first 30% of its throughput at batch size 1 (53 against 38 req/s on two cores), for
//! as long as the process lived.
//!
//! OpenMP 5's `omp_pause_resource_all` ends the calling thread's team in GNU OpenMP (its threads
//! exit and stop counting), and the next parallel region starts a new one, which costs a thread
//! start, tens of microseconds against a forward of a millisecond or more. The call is looked up
//! at run time because the OpenMP runtime is whichever one libtorch was built with: LLVM's and
//! Intel's runtimes pause the whole process's threads rather than the caller's, so with them
//! nothing is done.

/// Ends the calling thread's OpenMP team, if it has one and the runtime is GNU OpenMP. Returns
/// whether the runtime did it. Must not be called from inside a parallel region.
pub fn release_team() -> bool {
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

    pub(super) fn release_team() -> bool {
        // SAFETY: called on a worker thread between forwards, outside any parallel region; GNU
        // OpenMP then touches only this thread's team and a process-wide atomic count.
        pause_all().is_some_and(|pause| unsafe { pause(OMP_PAUSE_SOFT) } == 0)
    }
}

#[cfg(test)]
mod tests {
    /// Threads of this process whose name is `name`.
    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_threads_team_ends_and_starts_again() {
        // Team threads take the name of the thread that started them.
        std::thread::Builder::new()
            .name("omp-team-test".into())
            .spawn(|| {
                // Setting the thread count may start libtorch's own pool for its mobile
                // kernels, which is not OpenMP's: it is counted before any parallel region runs.
                tch::set_num_threads(2);
                let before = threads_named("omp-team-test");
                let x = tch::Tensor::ones([1 << 20], (tch::Kind::Float, tch::Device::Cpu));
                let sum = || f64::try_from((&x * 2.0).sum(tch::Kind::Double)).unwrap();
                assert_eq!(sum(), 2.0 * (1 << 20) as f64);
                assert_eq!(
                    threads_named("omp-team-test"),
                    before + 1,
                    "no team started"
                );
                assert!(super::release_team(), "the OpenMP runtime is not GNU's");
                assert_eq!(
                    threads_named("omp-team-test"),
                    before,
                    "the team is still there"
                );
                assert_eq!(sum(), 2.0 * (1 << 20) as f64);
                assert_eq!(
                    threads_named("omp-team-test"),
                    before + 1,
                    "no new team started"
                );
                assert!(super::release_team());
                assert_eq!(threads_named("omp-team-test"), before);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
