//! How answers write numbers as JSON, whichever protocol carries them, so a float reads the
//! same from every endpoint.

/// Writes `v` in the shortest text that reads back as the same `f32`, or `null` (JSON has no
/// NaN or infinity). Integral values keep a `.0`, as PyTorch's `tolist()` gives them; very
/// large and very small ones take an exponent (`1e+20`), as Python writes them.
pub fn write_f32(out: &mut String, v: f32) {
    write_float(out, v, v.is_finite());
}

/// Writes `v` as [`write_f32`] does, to `f64` precision.
pub fn write_f64(out: &mut String, v: f64) {
    write_float(out, v, v.is_finite());
}

/// Writes an integer.
pub fn write_int<I: itoa::Integer>(out: &mut String, v: I) {
    out.push_str(itoa::Buffer::new().format(v));
}

// Not `fmt`: a batch can answer tens of thousands of floats on the worker's thread, and zmij
// and itoa take well under half the time (`worker_cost` with bench's wide.pt, docs/benchmarks.md).
fn write_float<F: zmij::Float>(out: &mut String, v: F, finite: bool) {
    if finite {
        out.push_str(zmij::Buffer::new().format_finite(v));
    } else {
        out.push_str("null");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(write: impl FnOnce(&mut String)) -> String {
        let mut s = String::new();
        write(&mut s);
        s
    }

    #[test]
    fn numbers_are_written_as_python_writes_them() {
        let f32s = [
            0.1,
            3.0,
            -2.5,
            -0.0,
            1e20,
            1.5e-5,
            1e-7,
            f32::NAN,
            f32::NEG_INFINITY,
        ];
        let written: Vec<String> = f32s.iter().map(|v| text(|s| write_f32(s, *v))).collect();
        assert_eq!(
            written,
            [
                "0.1", "3.0", "-2.5", "-0.0", "1e+20", "0.000015", "1e-7", "null", "null"
            ]
        );
        let f64s = [0.1, 2.0, 1e-300, f64::INFINITY];
        let written: Vec<String> = f64s.iter().map(|v| text(|s| write_f64(s, *v))).collect();
        assert_eq!(written, ["0.1", "2.0", "1e-300", "null"]);
        assert_eq!(text(|s| write_int(s, -7i64)), "-7");
        assert_eq!(text(|s| write_int(s, u64::MAX)), "18446744073709551615");
    }

    #[test]
    fn every_float_reads_back_exactly() {
        // A spread of bit patterns: every exponent, many mantissas, both signs.
        for i in 0..200_000u32 {
            let f = f32::from_bits(i.wrapping_mul(2_654_435_761));
            if !f.is_finite() {
                continue;
            }
            let t = text(|s| write_f32(s, f));
            // As a client reads it: a double, then the model's float32 (the double rounding is
            // harmless for a float's shortest text).
            let back = t.parse::<f64>().unwrap() as f32;
            assert_eq!(back.to_bits(), f.to_bits(), "{f:?} was written {t}");
            assert!(is_json_number(&t), "{t}");
        }
        for i in 0..200_000u64 {
            let f = f64::from_bits(i.wrapping_mul(11_400_714_819_323_198_485));
            if !f.is_finite() {
                continue;
            }
            let t = text(|s| write_f64(s, f));
            assert_eq!(
                t.parse::<f64>().unwrap().to_bits(),
                f.to_bits(),
                "{f:?} was written {t}"
            );
            assert!(is_json_number(&t), "{t}");
        }
    }

    /// JSON's number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn is_json_number(t: &str) -> bool {
        let b = t.strip_prefix('-').unwrap_or(t).as_bytes();
        let digits = |b: &[u8]| b.iter().take_while(|c| c.is_ascii_digit()).count();
        let int = digits(b);
        if int == 0 || (int > 1 && b[0] == b'0') {
            return false;
        }
        let mut rest = &b[int..];
        if let Some(r) = rest.strip_prefix(b".") {
            let n = digits(r);
            if n == 0 {
                return false;
            }
            rest = &r[n..];
        }
        if let Some(r) = rest.strip_prefix(b"e").or_else(|| rest.strip_prefix(b"E")) {
            let r = r
                .strip_prefix(b"+")
                .or_else(|| r.strip_prefix(b"-"))
                .unwrap_or(r);
            let n = digits(r);
            if n == 0 {
                return false;
            }
            rest = &r[n..];
        }
        rest.is_empty()
    }
}
