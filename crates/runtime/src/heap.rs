//! Handing the memory an idle worker freed back to the system, with glibc's allocator.
//!
//! glibc keeps what a thread frees in that thread's arena for its next use: per worker, the
//! activations of its largest forward and its decoded images. `malloc_trim` returns the free
//! pages inside every arena, but not the free space at the top of a thread's arena, which is
//! where a forward's buffers end up once they are all freed; glibc gives that back only when a
//! free in that thread finds it above the trim threshold, which glibc itself raises to twice
//! the largest buffer it has seen mapped (model weights of tens of MB), so an idle worker kept
//! about 10 MB for good. [`release_free`] lowers the threshold for one free of its own, then
//! puts it back.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::sync::OnceLock;

    /// Buffers up to this size come from the arenas, where they are reused from one forward to
    /// the next; larger ones get their own mapping. glibc's own ceiling for the value it would
    /// otherwise reach on its own as large buffers come and go.
    const MMAP_THRESHOLD: i32 = 32 << 20;
    /// Free space at the top of an arena kept while serving: twice the mapping threshold, as
    /// glibc would set it, so that a forward never returns and faults in its own buffers again.
    const TRIM_THRESHOLD: i32 = 2 * MMAP_THRESHOLD;
    /// glibc's trim threshold when it is not adjusting it (`DEFAULT_TRIM_THRESHOLD`).
    const GLIBC_TRIM_THRESHOLD: i32 = 128 << 10;
    /// A free of at least this size (glibc's FASTBIN_CONSOLIDATION_THRESHOLD) makes glibc look
    /// at the top of the freeing thread's arena.
    const PROBE: usize = 256 << 10;

    /// The trim threshold kept while serving, once [`fix_thresholds`] has run.
    static SERVING_TRIM: OnceLock<i32> = OnceLock::new();

    /// A threshold the operator set for the process: `MALLOC_<NAME>_` or `glibc.malloc.<name>`
    /// in `GLIBC_TUNABLES`, which glibc read at start-up. `Some(None)` when set to something
    /// this side does not read as a number.
    fn operator_set(env: &str, tunable: &str) -> Option<Option<i32>> {
        setting(
            std::env::var(env).ok(),
            std::env::var("GLIBC_TUNABLES").ok(),
            tunable,
        )
    }

    /// [`operator_set`] on the two variables' values.
    pub(super) fn setting(
        variable: Option<String>,
        tunables: Option<String>,
        tunable: &str,
    ) -> Option<Option<i32>> {
        if let Some(value) = variable {
            return Some(value.trim().parse().ok());
        }
        tunables?.split(':').find_map(|t| {
            Some(
                t.strip_prefix(tunable)?
                    .strip_prefix('=')?
                    .trim()
                    .parse()
                    .ok(),
            )
        })
    }

    /// Sets the thresholds once, unless the operator set them. glibc stops moving them on its
    /// own as soon as one is set (the environment variables do the same), so both are fixed,
    /// at the values it would reach itself, before [`release_free`] sets one.
    pub fn fix_thresholds() -> i32 {
        *SERVING_TRIM.get_or_init(|| {
            let mmap = operator_set("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold");
            let trim = operator_set("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold");
            // SAFETY: mallopt only sets the allocator's tunables, under its lock.
            unsafe {
                if mmap.is_none() {
                    libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
                }
                // What glibc holds now, restated: the operator's, or its default once they
                // fixed the other one, or this side's.
                let serving = match (trim, mmap) {
                    (Some(Some(t)), _) => t,
                    (Some(None), _) | (None, Some(_)) => GLIBC_TRIM_THRESHOLD,
                    (None, None) => TRIM_THRESHOLD,
                };
                libc::mallopt(libc::M_TRIM_THRESHOLD, serving);
                serving
            }
        })
    }

    /// See the module's documentation. Other threads freeing in the same microseconds may trim
    /// their arenas too, which costs them page faults, never memory or correctness.
    pub fn release_free() {
        let serving = fix_thresholds();
        // SAFETY: mallopt sets tunables under the allocator's lock; the probe is allocated and
        // freed here and never read or written; malloc_trim walks the allocator's own lists.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 0);
            // black_box: the compiler may otherwise drop a malloc whose memory is never used.
            let probe = std::hint::black_box(libc::malloc(PROBE));
            libc::free(probe);
            libc::mallopt(libc::M_TRIM_THRESHOLD, serving);
            libc::malloc_trim(0);
        }
    }
}

/// Fixes the allocator's thresholds before any worker allocates, where the operator has not
/// (glibc only).
pub fn fix_thresholds() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::fix_thresholds();
}

/// Returns the free memory of the calling thread's arena and the free pages of every arena to
/// the system (glibc only; elsewhere nothing).
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::release_free();
}

#[cfg(test)]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod tests {
    /// The resident kB of the mapping holding `addr`, from /proc/self/smaps.
    fn resident_kb(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(kb) = line.strip_prefix("Rss:") {
                return kb.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn the_operators_malloc_settings_are_found() {
        use super::glibc::setting;
        let some = |s: &str| Some(s.to_string());
        let mmap = "glibc.malloc.mmap_threshold";
        assert_eq!(setting(some("1048576"), None, mmap), Some(Some(1048576)));
        assert_eq!(setting(some("lots"), None, mmap), Some(None));
        let tunables = some("glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536");
        assert_eq!(setting(None, tunables.clone(), mmap), Some(Some(65536)));
        assert_eq!(setting(None, tunables, "glibc.malloc.trim_threshold"), None);
        // A longer name that starts with the one asked for is another tunable.
        assert_eq!(
            setting(None, some("glibc.malloc.mmap_threshold_x=1"), mmap),
            None
        );
        assert_eq!(setting(None, None, mmap), None);
    }

    #[test]
    fn an_idle_threads_freed_memory_goes_back() {
        std::thread::spawn(|| {
            super::fix_thresholds();
            // 8 MB in blocks a forward's buffers are like, all written, then all freed: they
            // stay in this thread's arena, at its top.
            let blocks: Vec<Vec<u8>> = (0..80).map(|_| vec![1u8; 100_000]).collect();
            let addr = blocks[40].as_ptr() as usize;
            drop(blocks);
            let before = resident_kb(addr);
            super::release_free();
            let after = resident_kb(addr);
            assert!(
                before >= after + 6_000,
                "{before} kB resident before, {after} kB after"
            );
        })
        .join()
        .unwrap();
    }
}
