//! Resizing exactly as PIL does it, which is what torchvision's `Resize` runs on a PIL image and
//! so what TorchServe's image handlers feed their models.
//!
//! PIL resamples in two passes (horizontal, then vertical), each a convolution whose filter is
//! widened by the scale when shrinking (antialiasing). The weights are normalised in floating
//! point, then turned into 22-bit fixed point; each pass rounds its sums back to 8 bits. A
//! floating-point resize of the same filter differs from it by up to a few levels per pixel,
//! which a pretrained model turns into probabilities off by a percent, so this follows PIL's
//! arithmetic step for step (`src/libImaging/Resample.c`).

/// Bits after the point in PIL's fixed-point weights: 32 bits, less 8 for the pixel and 2 of
/// headroom for weights above 1 and the sum.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A resampling filter: its kernel and its support (half-width) at scale 1.
#[derive(Debug, Clone, Copy)]
pub struct Filter {
    kernel: fn(f64) -> f64,
    support: f64,
}

/// PIL's BILINEAR: a triangle of half-width 1.
pub const BILINEAR: Filter = Filter {
    kernel: |x| {
        let x = x.abs();
        if x < 1.0 { 1.0 - x } else { 0.0 }
    },
    support: 1.0,
};

/// PIL's BICUBIC: Keys' cubic with a = -0.5, half-width 2.
pub const BICUBIC: Filter = Filter {
    kernel: |x| {
        const A: f64 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    },
    support: 2.0,
};

/// The fixed-point weights of one pass: for each output position, the first input position it
/// reads and its weights.
#[derive(Debug)]
struct Coefficients {
    /// Weights per output position (`ksize` of them, unused ones zero).
    ksize: usize,
    /// `(first input, count)` per output position.
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` and `normalize_coeffs_8bpc` for resizing `in_size` to `out_size`.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // PIL's (int)(x + 0.5): truncation toward zero, then clamped.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin);
        let mut total = 0.0;
        for (x, w) in k.iter_mut().enumerate().take(count) {
            *w = (filter.kernel)((x as f64 + xmin as f64 - center + 0.5) * ss);
            total += *w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for (x, w) in k.iter().enumerate().take(count) {
            let w = if total != 0.0 { w / total } else { *w };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            row[x] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, count));
    }
    Coefficients {
        ksize,
        bounds,
        weights,
    }
}

/// A fixed-point sum back to a byte, as PIL's `clip8`.
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image (`width * height * 3` bytes, row-major) to `out_w` x `out_h` as PIL's
/// `Image.resize(size, filter)` does.
pub fn resize_rgb(
    data: &[u8],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Vec<u8> {
    let horizontal = coefficients(width, out_w, filter);
    let vertical = coefficients(height, out_h, filter);
    // The rows the vertical pass will read; the horizontal pass makes only those.
    let first_row = vertical.bounds.first().map_or(0, |b| b.0);
    let last_row = vertical.bounds.last().map_or(0, |b| b.0 + b.1);

    let (tmp, tmp_w, tmp_first) = if out_w != width {
        let rows = last_row - first_row;
        let mut tmp = vec![0u8; out_w * rows * 3];
        let src_rows = data[first_row * width * 3..last_row * width * 3].chunks_exact(width * 3);
        for (src, dst) in src_rows.zip(tmp.chunks_exact_mut(out_w * 3)) {
            horizontal_row(src, dst, &horizontal);
        }
        (std::borrow::Cow::Owned(tmp), out_w, first_row)
    } else {
        (std::borrow::Cow::Borrowed(data), width, 0)
    };
    if out_h == height {
        // PIL skips the vertical pass; only the rows it would read were resampled.
        return tmp[..tmp_w * out_h * 3].to_vec();
    }
    let row_len = tmp_w * 3;
    let mut out = vec![0u8; row_len * out_h];
    let mut sums = vec![0i32; row_len];
    for (yy, (&(ymin, count), dst)) in vertical
        .bounds
        .iter()
        .zip(out.chunks_exact_mut(row_len))
        .enumerate()
    {
        let k = &vertical.weights[yy * vertical.ksize..yy * vertical.ksize + count];
        let first = (ymin - tmp_first) * row_len;
        let src = &tmp[first..first + count * row_len];
        vertical_row(src.chunks_exact(row_len), k, &mut sums, dst);
    }
    out
}

// PIL sums in 32-bit ints (`int ss0` in Resample.c), whose 2 bits of headroom keep every sum in
// range; the passes here do the same, with wrapping operations so that no input can panic.
// Thirty-two bits, unlike sixty-four, let one register hold eight sums.

/// One row of the horizontal pass: each output pixel a weighted sum of neighbouring pixels.
fn horizontal_row(src: &[u8], dst: &mut [u8], c: &Coefficients) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("sse4.1") {
        // SAFETY: the CPU has SSE4.1, checked just above.
        unsafe { horizontal_row_sse41(src, dst, c) };
        return;
    }
    horizontal_row_plain(src, dst, c);
}

/// The horizontal pass, one channel's sum at a time.
fn horizontal_row_plain(src: &[u8], dst: &mut [u8], c: &Coefficients) {
    let half = 1i32 << (PRECISION_BITS - 1);
    for ((&(xmin, count), k), out) in c
        .bounds
        .iter()
        .zip(c.weights.chunks_exact(c.ksize))
        .zip(dst.chunks_exact_mut(3))
    {
        let (mut r, mut g, mut b) = (half, half, half);
        for (p, &w) in src[xmin * 3..(xmin + count) * 3]
            .chunks_exact(3)
            .zip(&k[..count])
        {
            r = r.wrapping_add(i32::from(p[0]).wrapping_mul(w));
            g = g.wrapping_add(i32::from(p[1]).wrapping_mul(w));
            b = b.wrapping_add(i32::from(p[2]).wrapping_mul(w));
        }
        out[0] = clip8(r);
        out[1] = clip8(g);
        out[2] = clip8(b);
    }
}

/// The horizontal pass with a pixel's three sums in one register: the same arithmetic and the
/// same bytes out, with one multiply and one add per tap instead of three of each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.1")]
fn horizontal_row_sse41(src: &[u8], dst: &mut [u8], c: &Coefficients) {
    use std::arch::x86_64::*;
    let half = _mm_set1_epi32(1i32 << (PRECISION_BITS - 1));
    for ((&(xmin, count), k), out) in c
        .bounds
        .iter()
        .zip(c.weights.chunks_exact(c.ksize))
        .zip(dst.chunks_exact_mut(3))
    {
        let mut sum = half;
        for (t, &w) in k[..count].iter().enumerate() {
            let j = (xmin + t) * 3;
            // Four bytes, the fourth (the next pixel's) landing in a lane that is never read;
            // the row's last pixel has no fourth byte after it.
            let px = match src.get(j..j + 4) {
                Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                None => u32::from_le_bytes([src[j], src[j + 1], src[j + 2], 0]),
            };
            let lanes = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(px as i32));
            sum = _mm_add_epi32(sum, _mm_mullo_epi32(lanes, _mm_set1_epi32(w)));
        }
        // clip8 on each lane: shift, then saturate to 0..=255 through i16.
        let shifted = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(sum);
        let bytes = _mm_packus_epi16(_mm_packs_epi32(shifted, shifted), _mm_setzero_si128());
        let rgb = (_mm_cvtsi128_si32(bytes) as u32).to_le_bytes();
        out.copy_from_slice(&rgb[..3]);
    }
}

/// One row of the vertical pass: each output byte a weighted sum of the bytes above and below.
fn vertical_row<'a>(
    rows: impl Iterator<Item = &'a [u8]>,
    k: &[i32],
    sums: &mut [i32],
    dst: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { vertical_row_avx2(rows, k, sums, dst) };
        return;
    }
    vertical_row_plain(rows, k, sums, dst);
}

/// [`vertical_row_plain`] compiled for AVX2, where a 32-bit multiply takes eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn vertical_row_avx2<'a>(
    rows: impl Iterator<Item = &'a [u8]>,
    k: &[i32],
    sums: &mut [i32],
    dst: &mut [u8],
) {
    vertical_row_plain(rows, k, sums, dst);
}

#[inline(always)]
fn vertical_row_plain<'a>(
    rows: impl Iterator<Item = &'a [u8]>,
    k: &[i32],
    sums: &mut [i32],
    dst: &mut [u8],
) {
    sums.fill(1i32 << (PRECISION_BITS - 1));
    for (row, &w) in rows.zip(k) {
        for (s, &p) in sums.iter_mut().zip(row) {
            *s = s.wrapping_add(i32::from(p).wrapping_mul(w));
        }
    }
    for (d, &s) in dst.iter_mut().zip(sums.iter()) {
        *d = clip8(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip8_64(sum: i64) -> u8 {
        (sum >> PRECISION_BITS).clamp(0, 255) as u8
    }

    /// The straightforward form, in 64-bit sums: what the fast one must match byte for byte.
    fn resize_rgb_i64(
        data: &[u8],
        width: usize,
        height: usize,
        out_w: usize,
        out_h: usize,
        filter: Filter,
    ) -> Vec<u8> {
        let horizontal = coefficients(width, out_w, filter);
        let vertical = coefficients(height, out_h, filter);
        // The rows the vertical pass will read; the horizontal pass makes only those.
        let first_row = vertical.bounds.first().map_or(0, |b| b.0);
        let last_row = vertical.bounds.last().map_or(0, |b| b.0 + b.1);
        let half = 1i64 << (PRECISION_BITS - 1);

        let (tmp, tmp_w, tmp_first) = if out_w != width {
            let rows = last_row - first_row;
            let mut tmp = vec![0u8; out_w * rows * 3];
            for y in 0..rows {
                let src = &data[(y + first_row) * width * 3..(y + first_row + 1) * width * 3];
                let dst = &mut tmp[y * out_w * 3..(y + 1) * out_w * 3];
                for (xx, &(xmin, count)) in horizontal.bounds.iter().enumerate() {
                    let k = &horizontal.weights[xx * horizontal.ksize..];
                    let mut ss = [half; 3];
                    for (x, &w) in k[..count].iter().enumerate() {
                        let p = &src[(xmin + x) * 3..(xmin + x) * 3 + 3];
                        for c in 0..3 {
                            ss[c] += i64::from(p[c]) * i64::from(w);
                        }
                    }
                    for c in 0..3 {
                        dst[xx * 3 + c] = clip8_64(ss[c]);
                    }
                }
            }
            (std::borrow::Cow::Owned(tmp), out_w, first_row)
        } else {
            (std::borrow::Cow::Borrowed(data), width, 0)
        };
        if out_h == height {
            // PIL skips the vertical pass; only the rows it would read were resampled.
            return tmp[..tmp_w * out_h * 3].to_vec();
        }
        let mut out = vec![0u8; out_w * out_h * 3];
        let row_len = tmp_w * 3;
        for (yy, &(ymin, count)) in vertical.bounds.iter().enumerate() {
            let k = &vertical.weights[yy * vertical.ksize..];
            let dst = &mut out[yy * row_len..(yy + 1) * row_len];
            let mut ss = vec![half; row_len];
            for (y, &w) in k[..count].iter().enumerate() {
                let src =
                    &tmp[(ymin + y - tmp_first) * row_len..(ymin + y - tmp_first + 1) * row_len];
                for (s, &p) in ss.iter_mut().zip(src) {
                    *s += i64::from(p) * i64::from(w);
                }
            }
            for (d, s) in dst.iter_mut().zip(ss) {
                *d = clip8_64(s);
            }
        }
        out
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (inp, out) in [(640, 341), (300, 256), (256, 640), (7, 3)] {
            let c = coefficients(inp, out, BILINEAR);
            for (xx, &(_, count)) in c.bounds.iter().enumerate() {
                let sum: i64 = c.weights[xx * c.ksize..xx * c.ksize + count]
                    .iter()
                    .map(|&w| i64::from(w))
                    .sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= count as i64,
                    "{inp}->{out}"
                );
            }
        }
    }

    #[test]
    fn flat_images_stay_flat_and_sizes_follow() {
        let img = vec![77u8; 40 * 30 * 3];
        for filter in [BILINEAR, BICUBIC] {
            for (w, h) in [(17, 13), (40, 7), (9, 30), (80, 60)] {
                let out = resize_rgb(&img, 40, 30, w, h, filter);
                assert_eq!(out.len(), w * h * 3);
                assert!(out.iter().all(|&v| v == 77), "{w}x{h}");
            }
        }
    }

    #[test]
    fn the_fast_passes_match_the_plain_ones_byte_for_byte() {
        // Noise and hard edges, the inputs where rounding and clipping differ most.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut byte = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        };
        for (w, h) in [(640, 480), (37, 23), (3, 200), (1, 9), (256, 256)] {
            let img: Vec<u8> = (0..w * h * 3)
                .map(|i| {
                    if i % 7 == 0 {
                        255 * (i / 7 % 2) as u8
                    } else {
                        byte()
                    }
                })
                .collect();
            for filter in [BILINEAR, BICUBIC] {
                for (ow, oh) in [
                    (341, 256),
                    (224, 224),
                    (w, 64),
                    (19, h),
                    (w * 2, h + 5),
                    (1, 1),
                ] {
                    assert_eq!(
                        resize_rgb(&img, w, h, ow, oh, filter),
                        resize_rgb_i64(&img, w, h, ow, oh, filter),
                        "{w}x{h} -> {ow}x{oh}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_horizontal_pass_writes_the_same_bytes() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let row: Vec<u8> = (0..641 * 3)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                (state >> 56) as u8
            })
            .collect();
        for filter in [BILINEAR, BICUBIC] {
            for out in [1, 2, 224, 341, 640, 641, 1500] {
                let c = coefficients(641, out, filter);
                let (mut plain, mut chosen) = (vec![0u8; out * 3], vec![0u8; out * 3]);
                horizontal_row_plain(&row, &mut plain, &c);
                horizontal_row(&row, &mut chosen, &c);
                assert_eq!(plain, chosen, "641 -> {out}");
            }
        }
    }
}
