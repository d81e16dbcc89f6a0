//! The `image` input decoder and the image preprocess stages, run on worker threads.
//!
//! Stages follow torchvision's transforms on PIL images: `Resize` sets the shorter side (the
//! longer one truncated), resampling is PIL's convolution with an antialiasing support when
//! shrinking, `CenterCrop` rounds its offsets half to even and pads with zeros when the crop is
//! larger than the image, `ToTensor` scales to [0, 1] in CHW order.

use std::io::Cursor;

use base64::Engine as _;
use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageReader};
use tch::{Kind, Tensor};
use tchserve_mar::handler::{Interpolation, Preprocess, Size};

use crate::job::{Part, Payload, PredictError};

fn bad(msg: impl Into<String>) -> PredictError {
    PredictError::BadInput(msg.into())
}

/// An 8-bit RGB image, row-major HWC.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes.
    pub data: Vec<u8>,
}

/// The encoded image bytes of a request: raw, or base64 (alone, or as a JSON string, or under
/// `data` / `b64` in a JSON object).
fn image_bytes(part: &Part) -> Result<std::borrow::Cow<'_, [u8]>, PredictError> {
    let data: &[u8] = &part.data;
    let ct = part.content_type.as_deref().unwrap_or("");
    let first = data.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let b64 = |text: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(
                text.trim()
                    .trim_start_matches("data:")
                    .split(";base64,")
                    .last()
                    .unwrap_or("")
                    .trim(),
            )
            .map(std::borrow::Cow::Owned)
            .map_err(|e| {
                bad(format!(
                    "the image is neither an encoded image nor valid base64: {e}"
                ))
            })
    };
    if ct.contains("json") || matches!(first, Some(b'{' | b'"')) {
        let v: serde_json::Value = serde_json::from_slice(data)
            .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
        let text = match &v {
            serde_json::Value::String(s) => Some(s.as_str()),
            serde_json::Value::Object(o) => {
                ["data", "b64", "body"]
                    .iter()
                    .find_map(|k| match o.get(*k) {
                        Some(serde_json::Value::String(s)) => Some(s.as_str()),
                        Some(serde_json::Value::Object(inner)) => {
                            inner.get("b64").and_then(|b| b.as_str())
                        }
                        _ => None,
                    })
            }
            _ => None,
        };
        return match text {
            Some(t) => b64(t),
            None => Err(bad(
                "expected a base64 image as a JSON string or under \"data\" or \"b64\"",
            )),
        };
    }
    let known = image::guess_format(data).is_ok();
    if !known
        && (ct.starts_with("text/")
            || data
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=\r\n ".contains(b)))
    {
        let text =
            std::str::from_utf8(data).map_err(|_| bad("the image is not valid base64 text"))?;
        return b64(text);
    }
    Ok(std::borrow::Cow::Borrowed(data))
}

/// Decodes the request's image to RGB, refusing images over `max_pixels` before decoding.
pub fn decode(payload: &Payload, max_pixels: u64) -> Result<Rgb, PredictError> {
    let part = payload
        .main_part()
        .ok_or_else(|| bad("the request has no body"))?;
    let bytes = image_bytes(part)?;
    let reader = ImageReader::new(Cursor::new(&bytes[..]))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read the image: {e}")))?;
    if reader.format().is_none() {
        return Err(bad(
            "the body is not an image tchserve can decode (JPEG, PNG, WebP, BMP or GIF)",
        ));
    }
    // The format's decoder reads only the header until asked for pixels.
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| bad(format!("cannot decode the image: {e}")))?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(bad(format!(
            "the image is {w}x{h} = {pixels} pixels, more than the {max_pixels} allowed (decompression bomb protection)"
        )));
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(pixels.saturating_mul(16).max(1 << 20));
    decoder
        .set_limits(limits)
        .map_err(|e| bad(format!("cannot decode the image: {e}")))?;
    let img = DynamicImage::from_decoder(decoder)
        .map_err(|e| bad(format!("cannot decode the image: {e}")))?;
    let rgb = img.to_rgb8();
    Ok(Rgb {
        width: rgb.width(),
        height: rgb.height(),
        data: rgb.into_raw(),
    })
}

/// An example between stages: pixels until `to_tensor`, then floats.
enum Stage {
    Pixels(Rgb),
    /// CHW floats with their height and width.
    Floats(Vec<f32>, u32, u32),
}

/// Python's `round()`: halves go to the even neighbour.
fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - x.signum()) as i64
    } else {
        r as i64
    }
}

/// torchvision's output size for `Resize(size)`.
pub fn resized_size(w: u32, h: u32, size: Size) -> (u32, u32) {
    match size {
        Size::Pair([th, tw]) => (tw, th),
        Size::Scalar(s) => {
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            let new_long = (f64::from(s) * f64::from(long) / f64::from(short)) as u32;
            if w <= h { (s, new_long) } else { (new_long, s) }
        }
    }
}

fn resize(
    img: &Rgb,
    size: Size,
    interpolation: Interpolation,
    antialias: bool,
) -> Result<Rgb, PredictError> {
    let (w, h) = resized_size(img.width, img.height, size);
    if (w, h) == (img.width, img.height) {
        return Ok(img.clone());
    }
    let failed = |e: &dyn std::fmt::Display| PredictError::ModelFailed(format!("resizing: {e}"));
    let src = Image::from_vec_u8(img.width, img.height, img.data.clone(), PixelType::U8x3)
        .map_err(|e| failed(&e))?;
    let mut dst = Image::new(w.max(1), h.max(1), PixelType::U8x3);
    let filter = match interpolation {
        Interpolation::Nearest => None,
        Interpolation::Bilinear => Some(FilterType::Bilinear),
        Interpolation::Bicubic => Some(FilterType::CatmullRom),
    };
    let alg = match filter {
        None => ResizeAlg::Nearest,
        Some(f) if antialias => ResizeAlg::Convolution(f),
        Some(f) => ResizeAlg::Interpolation(f),
    };
    Resizer::new()
        .resize(&src, &mut dst, &ResizeOptions::new().resize_alg(alg))
        .map_err(|e| failed(&e))?;
    Ok(Rgb {
        width: w.max(1),
        height: h.max(1),
        data: dst.into_vec(),
    })
}

fn center_crop(img: &Rgb, size: Size) -> Rgb {
    let (ch, cw) = match size {
        Size::Scalar(s) => (s, s),
        Size::Pair([h, w]) => (h, w),
    };
    let (w, h) = (img.width as i64, img.height as i64);
    let (cw, ch) = (i64::from(cw), i64::from(ch));
    // Offsets into the source; negative when the crop is larger (then zero padding shows).
    let top = if ch > h {
        -((ch - h) / 2)
    } else {
        round_half_even((h - ch) as f64 / 2.0)
    };
    let left = if cw > w {
        -((cw - w) / 2)
    } else {
        round_half_even((w - cw) as f64 / 2.0)
    };
    let mut data = vec![0u8; (cw * ch * 3) as usize];
    for y in 0..ch {
        let sy = y + top;
        if sy < 0 || sy >= h {
            continue;
        }
        for x in 0..cw {
            let sx = x + left;
            if sx < 0 || sx >= w {
                continue;
            }
            let s = ((sy * w + sx) * 3) as usize;
            let d = ((y * cw + x) * 3) as usize;
            data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    Rgb {
        width: cw as u32,
        height: ch as u32,
        data,
    }
}

fn to_floats(img: &Rgb) -> Vec<f32> {
    let plane = (img.width * img.height) as usize;
    let mut out = vec![0f32; plane * 3];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = f32::from(px[c]) / 255.0;
        }
    }
    out
}

/// Runs the preprocess stages on one decoded image and returns a `[1, C, H, W]` tensor.
pub fn preprocess(img: Rgb, stages: &[Preprocess]) -> Result<Tensor, PredictError> {
    let mut stage = Stage::Pixels(img);
    for op in stages {
        stage = match (stage, op) {
            (
                Stage::Pixels(img),
                Preprocess::Resize {
                    size,
                    interpolation,
                    antialias,
                },
            ) => Stage::Pixels(resize(&img, *size, *interpolation, *antialias)?),
            (Stage::Pixels(img), Preprocess::CenterCrop { size }) => {
                Stage::Pixels(center_crop(&img, *size))
            }
            (Stage::Pixels(img), Preprocess::ToTensor {}) => {
                Stage::Floats(to_floats(&img), img.height, img.width)
            }
            (Stage::Floats(mut v, h, w), Preprocess::Normalize { mean, std }) => {
                let plane = (h * w) as usize;
                for (c, chunk) in v.chunks_mut(plane).enumerate() {
                    let (m, s) = (mean[c % mean.len()] as f32, std[c % std.len()] as f32);
                    chunk.iter_mut().for_each(|x| *x = (*x - m) / s);
                }
                Stage::Floats(v, h, w)
            }
            _ => {
                return Err(PredictError::ModelFailed(
                    "preprocess stages out of order".into(),
                ));
            }
        };
    }
    match stage {
        Stage::Floats(v, h, w) => Tensor::from_slice(&v)
            .f_reshape([1, 3, i64::from(h), i64::from(w)])
            .map_err(|e| PredictError::ModelFailed(e.to_string())),
        Stage::Pixels(img) => Tensor::from_slice(&img.data)
            .f_reshape([1, i64::from(img.height), i64::from(img.width), 3])
            .and_then(|t| t.f_permute([0, 3, 1, 2]))
            .and_then(|t| t.f_to_kind(Kind::Float))
            .map_err(|e| PredictError::ModelFailed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_sizes_follow_torchvision() {
        assert_eq!(resized_size(640, 480, Size::Scalar(256)), (341, 256));
        assert_eq!(resized_size(480, 640, Size::Scalar(256)), (256, 341));
        assert_eq!(resized_size(300, 300, Size::Scalar(256)), (256, 256));
        assert_eq!(resized_size(640, 480, Size::Pair([100, 200])), (200, 100));
    }

    #[test]
    fn python_rounding() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(58.5), 58);
        assert_eq!(round_half_even(1.2), 1);
    }

    #[test]
    fn crop_centres_and_pads() {
        let img = Rgb {
            width: 4,
            height: 3,
            data: (0..36).collect(),
        };
        let c = center_crop(&img, Size::Pair([1, 2]));
        // top = round(1.0) = 1, left = round(1.0) = 1 -> pixels (1,1) and (2,1).
        assert_eq!(c.data, [15, 16, 17, 18, 19, 20]);
        let p = center_crop(&img, Size::Scalar(5));
        assert_eq!((p.width, p.height), (5, 5));
        assert_eq!(&p.data[0..3], [0, 0, 0]);
    }
}
