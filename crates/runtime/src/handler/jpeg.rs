//! JPEG decoding with libjpeg-turbo, the decoder inside PIL, called through its TurboJPEG API.
//!
//! JPEG leaves the inverse DCT and the chroma upsampling to the decoder, so two correct decoders
//! give pixels a level or two apart, which a pretrained model turns into probabilities off by
//! up to a percent. With PIL's choices (the accurate integer IDCT, smooth "fancy" upsampling,
//! both TurboJPEG's defaults) the pixels are PIL's exactly. The system library is linked
//! (Debian's `libturbojpeg0`); its API is stable from libjpeg-turbo 1.4 on.

use std::cell::RefCell;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_uchar, c_ulong, c_void};

#[link(name = "turbojpeg")]
unsafe extern "C" {
    fn tjInitDecompress() -> *mut c_void;
    fn tjDecompressHeader3(
        handle: *mut c_void,
        jpeg: *const c_uchar,
        size: c_ulong,
        width: *mut c_int,
        height: *mut c_int,
        subsampling: *mut c_int,
        colorspace: *mut c_int,
    ) -> c_int;
    fn tjDecompress2(
        handle: *mut c_void,
        jpeg: *const c_uchar,
        size: c_ulong,
        dst: *mut c_uchar,
        width: c_int,
        pitch: c_int,
        height: c_int,
        pixel_format: c_int,
        flags: c_int,
    ) -> c_int;
    fn tjGetErrorStr2(handle: *mut c_void) -> *mut c_char;
    fn tjGetErrorCode(handle: *mut c_void) -> c_int;
    fn tjDestroy(handle: *mut c_void) -> c_int;
}

const TJPF_RGB: c_int = 0;
const TJCS_CMYK: c_int = 3;
const TJCS_YCCK: c_int = 4;
const TJERR_WARNING: c_int = 0;

/// A TurboJPEG decompressor, one per thread (creating one allocates; using one is not
/// thread-safe).
struct Decompressor(*mut c_void);

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tjInitDecompress and is destroyed once.
        unsafe { tjDestroy(self.0) };
    }
}

impl Decompressor {
    fn error(&self) -> String {
        // SAFETY: the handle is live; TurboJPEG returns a NUL-terminated string it owns.
        unsafe { CStr::from_ptr(tjGetErrorStr2(self.0)) }
            .to_string_lossy()
            .into_owned()
    }
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
}

fn with_decompressor<T>(f: impl FnOnce(&Decompressor) -> Result<T, String>) -> Result<T, String> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            // SAFETY: no preconditions; a null handle is checked below.
            let handle = unsafe { tjInitDecompress() };
            if handle.is_null() {
                return Err("cannot start the JPEG decoder".into());
            }
            *slot = Some(Decompressor(handle));
        }
        f(slot.as_ref().expect("set above"))
    })
}

/// A JPEG's size, read from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// CMYK (or YCCK) data, which PIL converts with rules of its own: left to the other decoder.
    pub cmyk: bool,
}

/// Reads the header of a JPEG.
pub fn header(data: &[u8]) -> Result<Header, String> {
    with_decompressor(|d| {
        let (mut w, mut h, mut sub, mut cs) = (0, 0, 0, 0);
        // SAFETY: the buffer is valid for its length; the out-pointers are live locals.
        let rc = unsafe {
            tjDecompressHeader3(
                d.0,
                data.as_ptr(),
                data.len() as c_ulong,
                &mut w,
                &mut h,
                &mut sub,
                &mut cs,
            )
        };
        if rc != 0 || w <= 0 || h <= 0 {
            return Err(d.error());
        }
        Ok(Header {
            width: w as u32,
            height: h as u32,
            cmyk: cs == TJCS_CMYK || cs == TJCS_YCCK,
        })
    })
}

/// Decodes a JPEG whose header is `header` to 8-bit RGB, `width * height * 3` bytes. A warning
/// (extraneous bytes, a damaged but decodable scan) still gives the picture, as in PIL.
pub fn decode_rgb(data: &[u8], header: Header) -> Result<Vec<u8>, String> {
    let (w, h) = (header.width as usize, header.height as usize);
    let mut pixels = vec![0u8; w * h * 3];
    with_decompressor(|d| {
        // SAFETY: `pixels` holds pitch * height bytes for the full-size image asked for.
        let rc = unsafe {
            tjDecompress2(
                d.0,
                data.as_ptr(),
                data.len() as c_ulong,
                pixels.as_mut_ptr(),
                w as c_int,
                (w * 3) as c_int,
                h as c_int,
                TJPF_RGB,
                0,
            )
        };
        // SAFETY: the handle is live.
        if rc != 0 && unsafe { tjGetErrorCode(d.0) } != TJERR_WARNING {
            return Err(d.error());
        }
        Ok(())
    })?;
    Ok(pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_refuses() {
        let img = image::RgbImage::from_fn(33, 17, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 13) as u8, 90])
        });
        let mut jpeg = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(
                &mut std::io::Cursor::new(&mut jpeg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        let h = header(&jpeg).unwrap();
        assert_eq!((h.width, h.height, h.cmyk), (33, 17, false));
        let rgb = decode_rgb(&jpeg, h).unwrap();
        assert_eq!(rgb.len(), 33 * 17 * 3);
        // Close to what was encoded (JPEG is lossy): the blue channel was flat.
        assert!(rgb.chunks(3).all(|p| p[2].abs_diff(90) <= 8));
        assert!(header(b"not a jpeg").is_err());
        // A cut-off scan is only a warning to libjpeg, which fills the rest: the caller checks
        // for the end marker first (`jpeg_is_complete`).
        assert!(decode_rgb(&jpeg[..jpeg.len() / 2], h).is_ok());
    }
}
