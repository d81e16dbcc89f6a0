//! Documented bounds on serving settings.
//!
//! Every setting a client or an archive can choose is held to a range, whatever its source
//! (registration parameters, `model-config.yaml`, the `models` key, a snapshot): an unbounded
//! batch size reserves memory for millions of requests, an unbounded worker count starts
//! thousands of threads, an unbounded timeout overflows the clock. A value outside its range is
//! refused with the range named.

use std::ops::RangeInclusive;

/// A setting and the values it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The setting's name as the management API spells it.
    pub name: &'static str,
    /// The values it may take.
    pub range: RangeInclusive<i64>,
    /// The unit, for messages (empty when none).
    pub unit: &'static str,
}

/// Largest batch a model version may gather.
pub const BATCH_SIZE: Bound = Bound {
    name: "batch_size",
    range: 1..=1024,
    unit: "",
};
/// Longest wait for a batch to fill, in milliseconds.
pub const MAX_BATCH_DELAY: Bound = Bound {
    name: "max_batch_delay",
    range: 0..=60_000,
    unit: " ms",
};
/// Longest a prediction may take, queueing included, in seconds.
pub const RESPONSE_TIMEOUT: Bound = Bound {
    name: "response_timeout",
    range: 1..=86_400,
    unit: " s",
};
/// Longest a synchronous registration or scale waits for its workers, in seconds.
pub const STARTUP_TIMEOUT: Bound = Bound {
    name: "startup_timeout",
    range: 0..=86_400,
    unit: " s",
};
/// Places in a model version's job queue (reserved when the model registers).
pub const JOB_QUEUE_SIZE: Bound = Bound {
    name: "job_queue_size",
    range: 1..=100_000,
    unit: "",
};
/// The default of the `max_workers_per_model` setting.
pub const DEFAULT_MAX_WORKERS: usize = 128;
/// The most that `max_workers_per_model` may allow.
pub const MAX_WORKERS_CEILING: i64 = 4096;

/// The worker-count bound for a named parameter under the configured maximum.
pub fn workers(name: &'static str, max: usize) -> Bound {
    Bound {
        name,
        range: 0..=max as i64,
        unit: "",
    }
}

impl Bound {
    /// `value` when it lies in the range; otherwise a message naming the range.
    pub fn check(&self, value: i64) -> Result<i64, String> {
        if self.range.contains(&value) {
            Ok(value)
        } else {
            Err(format!(
                "{} {value}{} is out of range: it must be from {} to {}{}",
                self.name,
                self.unit,
                self.range.start(),
                self.range.end(),
                self.unit
            ))
        }
    }
}

/// Parses an integer parameter: absent or empty is `None`; anything but an integer is refused
/// with the parameter named.
pub fn parse_int(name: &str, raw: Option<&str>) -> Result<Option<i64>, String> {
    match raw.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}: expected an integer, got {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_inclusive_and_named() {
        assert_eq!(BATCH_SIZE.check(1), Ok(1));
        assert_eq!(BATCH_SIZE.check(1024), Ok(1024));
        assert_eq!(
            BATCH_SIZE.check(4_000_000).unwrap_err(),
            "batch_size 4000000 is out of range: it must be from 1 to 1024"
        );
        assert_eq!(
            MAX_BATCH_DELAY.check(-1).unwrap_err(),
            "max_batch_delay -1 ms is out of range: it must be from 0 to 60000 ms"
        );
        assert!(workers("min_worker", 128).check(10_000).is_err());
        assert_eq!(workers("min_worker", 128).check(0), Ok(0));
    }

    #[test]
    fn integers_only() {
        assert_eq!(parse_int("batch_size", None), Ok(None));
        assert_eq!(parse_int("batch_size", Some(" ")), Ok(None));
        assert_eq!(parse_int("batch_size", Some(" 8 ")), Ok(Some(8)));
        assert_eq!(
            parse_int("batch_size", Some("1e8")).unwrap_err(),
            "batch_size: expected an integer, got \"1e8\""
        );
        assert!(parse_int("batch_size", Some("99999999999999999999")).is_err());
    }
}
