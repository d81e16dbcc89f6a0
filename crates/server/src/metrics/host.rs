//! TorchServe's host metrics (CPU, memory, root disk), read from `/proc` and `statvfs` with the
//! definitions of psutil, which TorchServe's system metrics use, so dashboards keep their
//! meaning.

use std::sync::Mutex;

use prometheus::GaugeVec;

/// The host gauges and what CPU utilization is measured against. Each series appears at the
/// first sample, so a server told not to sample shows none.
#[derive(Debug)]
pub(super) struct HostGauges {
    cpu_percent: GaugeVec,
    memory_used_mb: GaugeVec,
    memory_available_mb: GaugeVec,
    memory_percent: GaugeVec,
    disk_used_gb: GaugeVec,
    disk_percent: GaugeVec,
    disk_available_gb: GaugeVec,
    /// The `Level` and `Hostname` label values.
    labels: [String; 2],
    /// The CPU counters at the last sample: utilization is over the time since.
    last_cpu: Mutex<Option<CpuTimes>>,
}

impl HostGauges {
    /// Registers the gauges through `gauge(name, help)`, labelled `Level`, `Hostname`.
    pub(super) fn new(gauge: &dyn Fn(&str, &str) -> GaugeVec, hostname: &str) -> Self {
        HostGauges {
            cpu_percent: gauge(
                "CPUUtilization",
                "Percent of the host's CPU time busy since the previous scrape.",
            ),
            memory_used_mb: gauge("MemoryUsed", "Host memory in use, in megabytes."),
            memory_available_mb: gauge(
                "MemoryAvailable",
                "Host memory available to new work, in megabytes.",
            ),
            memory_percent: gauge("MemoryUtilization", "Percent of host memory not available."),
            disk_used_gb: gauge("DiskUsage", "Space used on /, in gigabytes."),
            disk_percent: gauge("DiskUtilization", "Percent of / used."),
            disk_available_gb: gauge(
                "DiskAvailable",
                "Space on / available to this user, in gigabytes.",
            ),
            labels: ["Host".into(), hostname.into()],
            // The first scrape then measures from the server's start, not from boot.
            last_cpu: Mutex::new(read_cpu_times()),
        }
    }

    fn set(&self, gauge: &GaugeVec, value: f64) {
        gauge
            .with_label_values(&[&self.labels[0], &self.labels[1]])
            .set(value);
    }

    /// Reads the host's state into the gauges; what cannot be read keeps its last value.
    pub(super) fn sample(&self) {
        if let Some(now) = read_cpu_times() {
            let mut last = self.last_cpu.lock().unwrap_or_else(|e| e.into_inner());
            let since = last.unwrap_or_default();
            if let Some(p) = now.busy_percent_since(&since) {
                self.set(&self.cpu_percent, p);
            }
            *last = Some(now);
        }
        if let Some(m) = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| Memory::parse(&t))
        {
            const MB: f64 = 1024.0 * 1024.0;
            self.set(&self.memory_used_mb, m.used as f64 / MB);
            self.set(&self.memory_available_mb, m.available as f64 / MB);
            self.set(&self.memory_percent, m.percent());
        }
        if let Some(d) = Disk::of_root() {
            const GB: f64 = 1024.0 * 1024.0 * 1024.0;
            self.set(&self.disk_used_gb, d.used as f64 / GB);
            self.set(&self.disk_available_gb, d.available as f64 / GB);
            self.set(&self.disk_percent, d.percent());
        }
    }
}

fn read_cpu_times() -> Option<CpuTimes> {
    CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The host's CPU time counters, in clock ticks.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    /// The `cpu` line of `/proc/stat`. Guest time is already inside user time, and idle
    /// includes waiting for I/O, as psutil counts them.
    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some(CpuTimes {
            busy: total.saturating_sub(idle),
            total,
        })
    }

    /// Percent of the ticks since `earlier` that were busy; None when no tick passed.
    fn busy_percent_since(&self, earlier: &CpuTimes) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.saturating_sub(earlier.busy);
        (total > 0).then(|| (busy as f64 / total as f64 * 100.0).min(100.0))
    }
}

/// Host memory in bytes, as psutil's `virtual_memory()` reports it.
#[derive(Debug, PartialEq)]
struct Memory {
    total: u64,
    used: u64,
    available: u64,
}

impl Memory {
    fn parse(meminfo: &str) -> Option<Self> {
        let field = |name: &str| -> Option<u64> {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
                .map(|kb| kb * 1024)
        };
        let total = field("MemTotal")?;
        let free = field("MemFree")?;
        let cached = field("Cached").unwrap_or(0) + field("SReclaimable").unwrap_or(0);
        let buffers = field("Buffers").unwrap_or(0);
        // Kernels before 3.14 have no MemAvailable; psutil then estimates, free is close.
        let available = field("MemAvailable").unwrap_or(free);
        let used = match total.checked_sub(free + cached + buffers) {
            Some(u) => u,
            None => total.saturating_sub(free),
        };
        Some(Memory {
            total,
            used,
            available,
        })
    }

    fn percent(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.total.saturating_sub(self.available) as f64 / self.total as f64 * 100.0
    }
}

/// The root file system in bytes, as psutil's `disk_usage("/")` reports it.
#[derive(Debug, PartialEq)]
struct Disk {
    used: u64,
    /// Free to an unprivileged user (not the blocks kept for root).
    available: u64,
}

impl Disk {
    fn of_root() -> Option<Self> {
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: the path is a valid C string and `st` is written by statvfs before it is read.
        let st = unsafe {
            if libc::statvfs(c"/".as_ptr(), st.as_mut_ptr()) != 0 {
                return None;
            }
            st.assume_init()
        };
        let frsize = st.f_frsize as u64;
        Some(Disk {
            used: (st.f_blocks as u64).saturating_sub(st.f_bfree as u64) * frsize,
            available: st.f_bavail as u64 * frsize,
        })
    }

    /// Used over what an unprivileged user could use at most, as psutil computes it.
    fn percent(&self) -> f64 {
        let reachable = self.used + self.available;
        if reachable == 0 {
            return 0.0;
        }
        self.used as f64 / reachable as f64 * 100.0
    }
}

/// This process's CPU time in seconds (user and system), from `/proc/self/stat`.
pub(super) fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let mut after = stat[stat.rfind(')')? + 1..].split_whitespace();
    // utime and stime are fields 14 and 15, the 12th and 13th after the name.
    let utime: u64 = after.nth(11)?.parse().ok()?;
    let stime: u64 = after.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_utilization_is_busy_ticks_over_ticks_since_the_last_sample() {
        let before = CpuTimes::parse("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(
            before,
            CpuTimes {
                busy: 150,
                total: 1000
            }
        );
        // 100 more ticks, 30 of them busy (user 20, system 10), 10 waiting on I/O.
        let after = CpuTimes::parse("cpu  120 0 60 860 60 0 0 0 0 0\n").unwrap();
        assert_eq!(after.busy_percent_since(&before), Some(30.0));
        assert_eq!(after.busy_percent_since(&after), None, "no tick passed");
        assert_eq!(CpuTimes::parse("intr 1 2\n"), None);
    }

    #[test]
    fn memory_is_read_as_psutil_reads_it() {
        let meminfo = "MemTotal:       16000000 kB\nMemFree:         2000000 kB\n\
                       MemAvailable:    9000000 kB\nBuffers:          500000 kB\n\
                       Cached:          5000000 kB\nSwapCached:            0 kB\n\
                       SReclaimable:     500000 kB\n";
        let m = Memory::parse(meminfo).unwrap();
        let kb = 1024;
        assert_eq!(m.total, 16_000_000 * kb);
        // used = total - free - (cached + reclaimable) - buffers
        assert_eq!(m.used, 8_000_000 * kb);
        assert_eq!(m.available, 9_000_000 * kb);
        assert!((m.percent() - 43.75).abs() < 1e-9);
    }

    #[test]
    fn disk_percent_leaves_out_the_blocks_kept_for_root() {
        let d = Disk {
            used: 60,
            available: 20,
        };
        assert!((d.percent() - 75.0).abs() < 1e-9);
        assert!(Disk::of_root().is_some_and(|d| d.used > 0));
    }

    #[test]
    fn process_cpu_time_is_read_to_the_tick() {
        let before = process_cpu_seconds().unwrap();
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < std::time::Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = process_cpu_seconds().unwrap();
        // Ticks are 10 ms: 200 ms of spinning shows as a fraction of a second, where whole
        // seconds would read 0 or 1.
        let spent = after - before;
        assert!((0.02..0.9).contains(&spent), "{before} -> {after}");
    }
}
