//! Tensor data of the Open Inference Protocol: datatype names, JSON `data` to little-endian
//! bytes and back, and BYTES elements. Shared by the REST and gRPC frontends.

use serde_json::Value;
use tchserve_backend::json;
use tchserve_mar::handler::DType;

/// A datatype of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datatype {
    /// 1 byte, 0 or 1.
    Bool,
    /// Unsigned integers.
    Uint8,
    /// 2 bytes.
    Uint16,
    /// 4 bytes.
    Uint32,
    /// 8 bytes.
    Uint64,
    /// Signed integers.
    Int8,
    /// 2 bytes.
    Int16,
    /// 4 bytes.
    Int32,
    /// 8 bytes.
    Int64,
    /// IEEE half.
    Fp16,
    /// bfloat16.
    Bf16,
    /// IEEE single.
    Fp32,
    /// IEEE double.
    Fp64,
    /// Length-prefixed byte strings.
    Bytes,
}

impl Datatype {
    /// Every datatype, for messages and tests.
    pub const ALL: [Datatype; 14] = [
        Datatype::Bool,
        Datatype::Uint8,
        Datatype::Uint16,
        Datatype::Uint32,
        Datatype::Uint64,
        Datatype::Int8,
        Datatype::Int16,
        Datatype::Int32,
        Datatype::Int64,
        Datatype::Fp16,
        Datatype::Bf16,
        Datatype::Fp32,
        Datatype::Fp64,
        Datatype::Bytes,
    ];

    /// The protocol's name.
    pub fn name(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::Uint8 => "UINT8",
            Datatype::Uint16 => "UINT16",
            Datatype::Uint32 => "UINT32",
            Datatype::Uint64 => "UINT64",
            Datatype::Int8 => "INT8",
            Datatype::Int16 => "INT16",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Fp16 => "FP16",
            Datatype::Bf16 => "BF16",
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
            Datatype::Bytes => "BYTES",
        }
    }

    /// The datatype of a name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element; `None` for BYTES.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            Datatype::Bool | Datatype::Uint8 | Datatype::Int8 => 1,
            Datatype::Uint16 | Datatype::Int16 | Datatype::Fp16 | Datatype::Bf16 => 2,
            Datatype::Uint32 | Datatype::Int32 | Datatype::Fp32 => 4,
            Datatype::Uint64 | Datatype::Int64 | Datatype::Fp64 => 8,
            Datatype::Bytes => return None,
        })
    }

    /// The datatype of a model's tensor element type.
    pub fn of(d: DType) -> Self {
        match d {
            DType::Float32 => Datatype::Fp32,
            DType::Float64 => Datatype::Fp64,
            DType::Float16 => Datatype::Fp16,
            DType::Bfloat16 => Datatype::Bf16,
            DType::Int64 => Datatype::Int64,
            DType::Int32 => Datatype::Int32,
            DType::Int16 => Datatype::Int16,
            DType::Int8 => Datatype::Int8,
            DType::Uint8 => Datatype::Uint8,
            DType::Bool => Datatype::Bool,
        }
    }
}

/// Flattens `data` (flat or nested, row-major) into its JSON scalars, in order.
pub fn flatten<'a>(data: &'a Value, out: &mut Vec<&'a Value>) {
    match data {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// The protocol's name of a core datatype.
pub fn datatype_name(d: crate::core::DataType) -> &'static str {
    match d {
        crate::core::DataType::Tensor(d) => Datatype::of(d).name(),
        crate::core::DataType::Bytes => "BYTES",
    }
}

/// Writes JSON elements as little-endian bytes of `datatype` (not BYTES); the error says which
/// element is wrong and why.
pub fn encode_json(datatype: Datatype, elements: &[&Value]) -> Result<Vec<u8>, String> {
    let size = datatype.size().ok_or("BYTES data is not numeric")?;
    let mut out = Vec::with_capacity(elements.len() * size);
    for (i, &v) in elements.iter().enumerate() {
        let bad = || {
            format!(
                "element {i} ({}) is not a {} value",
                short(v),
                datatype.name()
            )
        };
        let int = |lo: i128, hi: i128| -> Result<i128, String> {
            let n = match v {
                Value::Number(n) => n
                    .as_i64()
                    .map(i128::from)
                    .or_else(|| n.as_u64().map(i128::from)),
                Value::Bool(b) => Some(i128::from(*b)),
                _ => None,
            }
            .ok_or_else(bad)?;
            if n < lo || n > hi {
                return Err(format!(
                    "element {i} ({n}) is out of range for {}",
                    datatype.name()
                ));
            }
            Ok(n)
        };
        let float = || -> Result<f64, String> {
            match v {
                Value::Number(n) => n.as_f64().ok_or_else(bad),
                _ => Err(bad()),
            }
        };
        match datatype {
            Datatype::Bool => match v {
                Value::Bool(b) => out.push(u8::from(*b)),
                Value::Number(_) => out.push(u8::from(int(0, 1)? == 1)),
                _ => return Err(bad()),
            },
            Datatype::Uint8 => out.push(int(0, u8::MAX.into())? as u8),
            Datatype::Uint16 => out.extend((int(0, u16::MAX.into())? as u16).to_le_bytes()),
            Datatype::Uint32 => out.extend((int(0, u32::MAX.into())? as u32).to_le_bytes()),
            Datatype::Uint64 => out.extend((int(0, u64::MAX.into())? as u64).to_le_bytes()),
            Datatype::Int8 => {
                out.extend((int(i8::MIN.into(), i8::MAX.into())? as i8).to_le_bytes())
            }
            Datatype::Int16 => {
                out.extend((int(i16::MIN.into(), i16::MAX.into())? as i16).to_le_bytes())
            }
            Datatype::Int32 => {
                out.extend((int(i32::MIN.into(), i32::MAX.into())? as i32).to_le_bytes())
            }
            Datatype::Int64 => {
                out.extend((int(i64::MIN.into(), i64::MAX.into())? as i64).to_le_bytes())
            }
            Datatype::Fp16 => out.extend(f32_to_f16(float()? as f32).to_le_bytes()),
            Datatype::Bf16 => out.extend(f32_to_bf16(float()? as f32).to_le_bytes()),
            Datatype::Fp32 => out.extend((float()? as f32).to_le_bytes()),
            Datatype::Fp64 => out.extend(float()?.to_le_bytes()),
            Datatype::Bytes => unreachable!("refused above"),
        }
    }
    Ok(out)
}

/// Writes little-endian elements of `datatype` (not BYTES) as a flat JSON list.
pub fn decode_json(datatype: Datatype, bytes: &[u8]) -> String {
    let size = datatype.size().unwrap_or(1);
    let mut out = String::with_capacity(bytes.len() * 3 + 2);
    out.push('[');
    for (i, c) in bytes.chunks_exact(size).enumerate() {
        if i > 0 {
            out.push(',');
        }
        match datatype {
            Datatype::Bool => out.push_str(if c[0] != 0 { "true" } else { "false" }),
            Datatype::Uint8 => json::write_int(&mut out, c[0]),
            Datatype::Int8 => json::write_int(&mut out, c[0] as i8),
            Datatype::Uint16 => json::write_int(&mut out, u16::from_le_bytes([c[0], c[1]])),
            Datatype::Int16 => json::write_int(&mut out, i16::from_le_bytes([c[0], c[1]])),
            Datatype::Uint32 => json::write_int(&mut out, u32::from_le_bytes(arr(c))),
            Datatype::Int32 => json::write_int(&mut out, i32::from_le_bytes(arr(c))),
            Datatype::Uint64 => json::write_int(&mut out, u64::from_le_bytes(arr(c))),
            Datatype::Int64 => json::write_int(&mut out, i64::from_le_bytes(arr(c))),
            Datatype::Fp16 => {
                json::write_f32(&mut out, f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            }
            Datatype::Bf16 => json::write_f32(
                &mut out,
                f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16),
            ),
            Datatype::Fp32 => json::write_f32(&mut out, f32::from_le_bytes(arr(c))),
            Datatype::Fp64 => json::write_f64(&mut out, f64::from_le_bytes(arr(c))),
            Datatype::Bytes => {}
        }
    }
    out.push(']');
    out
}

fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&c[..N]);
    a
}

/// Splits the binary form of BYTES (each element a 4-byte little-endian length, then its bytes).
pub fn split_bytes(mut data: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.len() < 4 {
            return Err("a BYTES element's 4-byte length is cut short".into());
        }
        let n = u32::from_le_bytes(arr(data)) as usize;
        data = &data[4..];
        if data.len() < n {
            return Err(format!(
                "a BYTES element says {n} bytes but only {} remain",
                data.len()
            ));
        }
        out.push(&data[..n]);
        data = &data[n..];
    }
    Ok(out)
}

/// Joins elements into the binary form of BYTES.
pub fn join_bytes<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        out.extend((item.len() as u32).to_le_bytes());
        out.extend_from_slice(item);
    }
    out
}

/// IEEE half from single, rounding to nearest even.
pub fn f32_to_f16(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32;
    let man = x & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rem = m & ((1 << shift) - 1);
        let mut r = m >> shift;
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && r & 1 == 1) {
        r += 1;
    }
    sign | r as u16
}

/// Single from IEEE half.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m * 2^-24, exactly representable in f32.
            let v = (m as f32) * 2f32.powi(-24);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// bfloat16 from single, rounding to nearest even.
pub fn f32_to_bf16(v: f32) -> u16 {
    let x = v.to_bits();
    if v.is_nan() {
        return ((x >> 16) as u16) | 0x40;
    }
    let round = 0x7fff + ((x >> 16) & 1);
    (x.wrapping_add(round) >> 16) as u16
}

/// The start of a value's JSON text, for error messages.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(30) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_datatype_round_trips_through_bytes() {
        let cases: [(Datatype, Value); 13] = [
            (Datatype::Bool, json!([true, false, 1])),
            (Datatype::Uint8, json!([0, 255])),
            (Datatype::Uint16, json!([0, 65535])),
            (Datatype::Uint32, json!([0, 4294967295u64])),
            (Datatype::Uint64, json!([0, u64::MAX])),
            (Datatype::Int8, json!([-128, 127])),
            (Datatype::Int16, json!([-32768, 32767])),
            (Datatype::Int32, json!([-2147483648i64, 2147483647])),
            (Datatype::Int64, json!([i64::MIN, i64::MAX])),
            (Datatype::Fp16, json!([1.5, -2.0, 0.0])),
            (Datatype::Bf16, json!([1.5, -2.0, 0.0])),
            (Datatype::Fp32, json!([0.1, -3.5, 1e30])),
            (Datatype::Fp64, json!([0.1, -3.5, 1e300])),
        ];
        for (dt, data) in cases {
            let mut flat = Vec::new();
            flatten(&data, &mut flat);
            let bytes = encode_json(dt, &flat).unwrap();
            assert_eq!(bytes.len(), flat.len() * dt.size().unwrap(), "{dt:?}");
            let back: Value = serde_json::from_str(&decode_json(dt, &bytes)).unwrap();
            let expected = if dt == Datatype::Bool {
                json!([true, false, true])
            } else {
                data.clone()
            };
            assert_eq!(back, expected, "{dt:?}");
        }
    }

    #[test]
    fn nested_and_flat_data_give_the_same_bytes() {
        let (nested, flat) = (json!([[1, 2], [3, 4]]), json!([1, 2, 3, 4]));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        flatten(&nested, &mut a);
        flatten(&flat, &mut b);
        assert_eq!(
            encode_json(Datatype::Int32, &a).unwrap(),
            encode_json(Datatype::Int32, &b).unwrap()
        );
    }

    #[test]
    fn wrong_elements_are_named() {
        let e = encode_json(Datatype::Uint8, &[&json!(1), &json!(300)]).unwrap_err();
        assert!(e.contains("element 1") && e.contains("out of range"), "{e}");
        let e = encode_json(Datatype::Int64, &[&json!(1.5)]).unwrap_err();
        assert!(e.contains("element 0") && e.contains("INT64"), "{e}");
        let e = encode_json(Datatype::Fp32, &[&json!("x")]).unwrap_err();
        assert!(e.contains("FP32"), "{e}");
    }

    #[test]
    fn halves_round_to_nearest_even() {
        for (v, bits) in [
            (1.0f32, 0x3c00u16),
            (-2.0, 0xc000),
            (65504.0, 0x7bff),
            (1e6, 0x7c00),
            (5.960_464_5e-8, 0x0001),
            (0.0, 0),
        ] {
            assert_eq!(f32_to_f16(v), bits, "{v}");
            if bits != 0x7c00 {
                assert_eq!(f16_to_f32(bits), v, "{bits:#x}");
            }
        }
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(f32_to_bf16(-2.0), 0xc000);
    }

    #[test]
    fn bytes_elements_are_length_prefixed() {
        let joined = join_bytes([b"ab".as_slice(), b"".as_slice(), b"xyz".as_slice()]);
        assert_eq!(&joined[..4], &2u32.to_le_bytes());
        let parts = split_bytes(&joined).unwrap();
        assert_eq!(parts, [b"ab".as_slice(), b"", b"xyz"]);
        assert!(split_bytes(&joined[..joined.len() - 1]).is_err());
        assert!(split_bytes(&[1, 0]).is_err());
    }
}
