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
    use std::sync::Once;

    /// Buffers up to this size come from the arenas, where they are reused from one forward to
    /// the next; larger ones get their own mapping. glibc's own ceiling for the value it would
    /// otherwise reach on its own as large buffers come and go.
    const MMAP_THRESHOLD: i32 = 32 << 20;
    /// Free space at the top of an arena kept while serving: twice the mapping threshold, as
    /// glibc would set it, so that a forward never returns and faults in its own buffers again.
    const TRIM_THRESHOLD: i32 = 2 * MMAP_THRESHOLD;
    /// A free of at least this size (glibc's FASTBIN_CONSOLIDATION_THRESHOLD) makes glibc look
    /// at the top of the freeing thread's arena.
    const PROBE: usize = 256 << 10;

    static FIXED: Once = Once::new();

    /// Sets the thresholds once. glibc stops moving them on its own as soon as one is set, so
    /// both are fixed, at the values it would reach itself, before [`release_free`] sets one.
    pub fn fix_thresholds() {
        FIXED.call_once(|| {
            // SAFETY: mallopt only sets the allocator's tunables, under its lock.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            }
        });
    }

    /// See the module's documentation. Other threads freeing in the same microseconds may trim
    /// their arenas too, which costs them page faults, never memory or correctness.
    pub fn release_free() {
        fix_thresholds();
        // SAFETY: mallopt sets tunables under the allocator's lock; the probe is allocated and
        // freed here and never read or written; malloc_trim walks the allocator's own lists.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 0);
            // black_box: the compiler may otherwise drop a malloc whose memory is never used.
            let probe = std::hint::black_box(libc::malloc(PROBE));
            libc::free(probe);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            libc::malloc_trim(0);
        }
    }
}

/// Fixes the allocator's thresholds before any worker allocates (glibc only).
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
