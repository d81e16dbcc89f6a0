//! Reads the numbers of a JSON tensor body straight from its bytes.
//!
//! Building a `serde_json::Value` tree for 784 floats and walking it costs more than the forward
//! of a small model. This reader fills the flat buffer in one pass over the text, and reads only
//! the common shapes: a nested list, or an object whose only keys are `instances` and `data`,
//! holding numbers with at most 19 significant digits and an exponent within 10^±22. Everything
//! it reads, it reads exactly as serde_json does (the same value, bit for bit, by the same
//! arithmetic); on anything else it returns `None`, and the general decoder, which also writes
//! the error messages, reads the body again.

/// The numbers of a body: its nested lists' sizes, the values in row-major order, and whether
/// they came as `{"instances": ...}`.
#[derive(Debug, Default, PartialEq)]
pub struct Numbers {
    /// Size of each nesting level, outermost first.
    pub dims: Vec<i64>,
    /// The values, booleans as 0 and 1.
    pub flat: Vec<f64>,
    /// True for `{"instances": ...}`.
    pub instances: bool,
}

impl Numbers {
    /// Room for the numbers of a body of `len` bytes, which seldom take under 8 bytes each
    /// (`0.123456, `): growing the buffer number by number cost more than reading them.
    fn for_body(len: usize) -> Self {
        Numbers {
            flat: Vec::with_capacity(len / 8),
            ..Numbers::default()
        }
    }
}

/// The numbers of `body`, or `None` when it is not in a shape this reader takes.
pub fn read(body: &[u8]) -> Option<Numbers> {
    let mut r = Reader { s: body, i: 0 };
    r.ws();
    let numbers = match r.peek()? {
        b'[' => {
            let mut n = Numbers::for_body(body.len());
            r.nest(0, &mut n.dims, &mut n.flat)?;
            n
        }
        b'{' => r.object()?,
        _ => return None,
    };
    r.ws();
    (r.i == body.len()).then_some(numbers)
}

/// Deeper bodies go to the general decoder, which has its own limit.
const MAX_DEPTH: usize = 64;

/// 10^0 to 10^22: every power of ten an `f64` holds exactly.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Appends the run of ASCII digits at `s[*i..]` to `acc` (wrapping on overflow, which the
/// caller rules out by counting) and returns its length.
#[inline(always)]
fn digits(s: &[u8], i: &mut usize, acc: &mut u64) -> usize {
    let start = *i;
    while let Some(d) = s.get(*i).map(|b| b.wrapping_sub(b'0')).filter(|d| *d < 10) {
        *acc = acc.wrapping_mul(10).wrapping_add(u64::from(d));
        *i += 1;
    }
    *i - start
}

/// The usual number, `-?(0|[1-9][0-9]*)(\.[0-9]+)?` with 18 digits at most, as serde_json
/// reads it; `None`, leaving `i` alone, for anything else (the general `number` reads it).
#[inline(always)]
fn plain_number(s: &[u8], i: &mut usize) -> Option<f64> {
    let mut j = *i;
    let negative = s.get(j) == Some(&b'-');
    j += usize::from(negative);
    let int_start = j;
    let mut m: u64 = 0;
    let int_len = digits(s, &mut j, &mut m);
    let mut frac_len = 0;
    if s.get(j) == Some(&b'.') {
        j += 1;
        frac_len = digits(s, &mut j, &mut m);
        if frac_len == 0 {
            return None;
        }
    }
    let odd = int_len == 0
        || (int_len > 1 && s[int_start] == b'0')
        || int_len + frac_len > 18
        || matches!(s.get(j), Some(b'e' | b'E'));
    if odd {
        return None;
    }
    *i = j;
    let f = m as i64 as f64;
    let magnitude = if frac_len > 0 { f / POW10[frac_len] } else { f };
    Some(if negative { -magnitude } else { magnitude })
}

/// Moves `i` past JSON whitespace.
#[inline(always)]
fn skip_ws(s: &[u8], i: &mut usize) {
    while let Some(b' ' | b'\n' | b'\t' | b'\r') = s.get(*i) {
        *i += 1;
    }
}

struct Reader<'a> {
    s: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        skip_ws(self.s, &mut self.i);
    }

    fn eat(&mut self, lit: &[u8]) -> Option<()> {
        let end = self.i.checked_add(lit.len())?;
        (self.s.get(self.i..end)? == lit).then(|| self.i = end)
    }

    /// After an item of a list or object: `Some(true)` past a comma, `Some(false)` past `close`,
    /// `None` on anything else.
    fn more(&mut self, close: u8) -> Option<bool> {
        self.ws();
        let c = self.peek()?;
        self.i += 1;
        match c {
            b',' => Some(true),
            c if c == close => Some(false),
            _ => None,
        }
    }

    /// `{"instances": ..., "data": ...}` with either or both keys, each once.
    fn object(&mut self) -> Option<Numbers> {
        self.eat(b"{")?;
        let (mut instances, mut data): (Option<Numbers>, Option<Numbers>) = (None, None);
        loop {
            self.ws();
            let slot = if self.eat(b"\"instances\"").is_some() {
                &mut instances
            } else {
                self.eat(b"\"data\"")?;
                &mut data
            };
            if slot.is_some() {
                return None;
            }
            self.ws();
            self.eat(b":")?;
            self.ws();
            let mut n = Numbers::for_body(self.s.len());
            self.nest(0, &mut n.dims, &mut n.flat)?;
            *slot = Some(n);
            if !self.more(b'}')? {
                break;
            }
        }
        // As the general decoder: `instances` wins over `data`.
        match (instances, data) {
            (Some(mut n), _) => {
                n.instances = true;
                Some(n)
            }
            (None, n) => n,
        }
    }

    /// A value `depth` lists deep, with the general decoder's rules: the first list met at a
    /// depth sets that level's size, every later one must match it, numbers only innermost.
    fn nest(&mut self, depth: usize, dims: &mut Vec<i64>, flat: &mut Vec<f64>) -> Option<()> {
        if self.peek()? == b'[' {
            return self.list(depth, dims, flat);
        }
        if dims.len() != depth {
            return None;
        }
        flat.push(self.scalar()?);
        Some(())
    }

    /// A number, or a boolean as 0 or 1.
    #[inline(always)]
    fn scalar(&mut self) -> Option<f64> {
        match self.peek()? {
            b't' => self.eat(b"true").map(|()| 1.0),
            b'f' => self.eat(b"false").map(|()| 0.0),
            _ => self.number(),
        }
    }

    fn list(&mut self, depth: usize, dims: &mut Vec<i64>, flat: &mut Vec<f64>) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.eat(b"[")?;
        let first = dims.len() == depth;
        if first {
            if !flat.is_empty() {
                return None;
            }
            dims.push(-1);
        }
        let mut count: i64 = 0;
        self.ws();
        match self.peek()? {
            b']' => self.i += 1,
            b'[' => loop {
                self.ws();
                self.list(depth + 1, dims, flat)?;
                count += 1;
                if !self.more(b']')? {
                    break;
                }
            },
            // The innermost level: the loop that reads almost every byte of a tensor body, kept
            // free of the recursion above and of `self` (its fields in registers).
            _ => {
                if dims.len() != depth + 1 {
                    return None;
                }
                let s = self.s;
                let mut i = self.i;
                loop {
                    skip_ws(s, &mut i);
                    let x = match plain_number(s, &mut i) {
                        Some(x) => x,
                        None => {
                            self.i = i;
                            let x = self.scalar()?;
                            i = self.i;
                            x
                        }
                    };
                    flat.push(x);
                    count += 1;
                    skip_ws(s, &mut i);
                    match s.get(i) {
                        Some(b',') => i += 1,
                        Some(b']') => {
                            i += 1;
                            break;
                        }
                        _ => return None,
                    }
                }
                self.i = i;
            }
        }
        if first {
            dims[depth] = count;
        } else if dims[depth] != count {
            return None;
        }
        Some(())
    }

    /// A JSON number, as serde_json computes it: an integer as `u64` or `i64` converted to
    /// `f64`, anything else as the significand's `f64` multiplied or divided by a power of ten.
    #[inline(always)]
    fn number(&mut self) -> Option<f64> {
        // Locals rather than `self.i`: the loops below are the hot path of a JSON request.
        let s = self.s;
        let mut i = self.i;
        let negative = s.get(i) == Some(&b'-');
        i += usize::from(negative);
        let mut significand: u64 = 0;
        let int_start = i;
        let int_len = digits(s, &mut i, &mut significand);
        // One `0`, or digits not starting with `0`.
        if int_len == 0 || (int_len > 1 && s[int_start] == b'0') {
            return None;
        }
        let mut exponent: i32 = 0;
        let mut float = false;
        let mut total = int_len;
        if s.get(i) == Some(&b'.') {
            float = true;
            i += 1;
            let frac_len = digits(s, &mut i, &mut significand);
            if frac_len == 0 {
                return None;
            }
            total += frac_len;
            exponent = -(frac_len as i32);
        }
        // Up to 19 digits cannot overflow a u64; serde_json reads longer ones another way.
        if total > 19 {
            return None;
        }
        if let Some(b'e' | b'E') = s.get(i) {
            float = true;
            i += 1;
            let sign = s.get(i).copied();
            i += usize::from(matches!(sign, Some(b'-' | b'+')));
            let mut exp: u64 = 0;
            // Any exponent this long is outside the table below.
            match digits(s, &mut i, &mut exp) {
                1..=3 => {}
                _ => return None,
            }
            let exp = exp as i32;
            exponent += if sign == Some(b'-') { -exp } else { exp };
        }
        self.i = i;
        // Below 10^18 the significand is also an `i64`, the same value, converted in one
        // instruction where a `u64` takes several.
        let f = if total <= 18 {
            significand as i64 as f64
        } else {
            significand as f64
        };
        let magnitude = if float {
            let pow = *POW10.get(exponent.unsigned_abs() as usize)?;
            if exponent >= 0 { f * pow } else { f / pow }
        } else {
            f
        };
        Some(if negative { -magnitude } else { magnitude })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nums(dims: &[i64], flat: &[f64], instances: bool) -> Option<Numbers> {
        Some(Numbers {
            dims: dims.to_vec(),
            flat: flat.to_vec(),
            instances,
        })
    }

    #[test]
    fn reads_lists_and_wrappers() {
        assert_eq!(read(b"[1, 2.5, -3]"), nums(&[3], &[1.0, 2.5, -3.0], false));
        assert_eq!(
            read(b" {\"data\": [[1, 2], [3, 4]]} "),
            nums(&[2, 2], &[1.0, 2.0, 3.0, 4.0], false)
        );
        assert_eq!(
            read(b"{\"instances\": [[true, false]], \"data\": [9]}"),
            nums(&[1, 2], &[1.0, 0.0], true)
        );
        assert_eq!(read(b"[[], []]"), nums(&[2, 0], &[], false));
        assert_eq!(read(b"{\"data\": 7}"), nums(&[], &[7.0], false));
        assert_eq!(
            read(b"[0.1, 1E2, 2e-3, -0, -0.0, 12.5e+1]"),
            nums(&[6], &[0.1, 100.0, 0.002, -0.0, -0.0, 125.0], false)
        );
    }

    #[test]
    fn leaves_everything_else_to_the_general_decoder() {
        for body in [
            &b"[[1, 2], [3]]"[..],
            b"[[1], 2]",
            b"[1, [2]]",
            b"[[[]], [1]]",
            b"[1, \"2\"]",
            b"[null]",
            b"[01]",
            b"[1.]",
            b"[.5]",
            b"[1e]",
            b"[+1]",
            b"[1,]",
            b"[1 2]",
            b"[1e23]",
            b"[12345678901234567890123]",
            b"{\"data\": [1], \"data\": [2]}",
            b"{\"id\": \"x\", \"data\": [1]}",
            b"{\"inputs\": [1]}",
            b"{}",
            b"{\"data\": [1],}",
            b"[1, 2",
            b"[1] x",
            b"5",
        ] {
            assert_eq!(read(body), None, "{}", String::from_utf8_lossy(body));
        }
    }
}
