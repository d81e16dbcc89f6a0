//! Device choice, and loading libtorch's CUDA half only where a GPU exists.
//!
//! The binaries do not link `libtorch_cuda.so`: on a CPU-only machine it costs most of a second
//! and hundreds of MB at start-up for nothing. Instead it is opened at run time, before the first
//! CUDA query, when an NVIDIA driver is present and the configuration allows GPUs.

use std::ffi::{CStr, CString};
use std::sync::OnceLock;

/// Which devices the process may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevicePolicy {
    /// GPUs when present, else the CPU (TorchServe's default).
    #[default]
    Auto,
    /// The CPU only; CUDA is never loaded.
    CpuOnly,
    /// At most this many GPUs, the first ones (TorchServe's `number_of_gpu`).
    AtMost(usize),
}

impl DevicePolicy {
    /// The policy `number_of_gpu` asks for: 0 is the CPU only, unset is every GPU.
    pub fn from_number_of_gpu(n: Option<usize>) -> Self {
        match n {
            None => DevicePolicy::Auto,
            Some(0) => DevicePolicy::CpuOnly,
            Some(n) => DevicePolicy::AtMost(n),
        }
    }
}

/// What the process found when it looked for GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaStatus {
    /// Number of usable CUDA devices (0 on CPU-only machines).
    pub devices: usize,
    /// Why there are none, when there are none.
    pub reason: Option<String>,
}

static CUDA: OnceLock<CudaStatus> = OnceLock::new();

/// Looks for GPUs once per process; later calls return the first answer.
pub fn cuda(policy: DevicePolicy) -> &'static CudaStatus {
    CUDA.get_or_init(|| probe(policy))
}

fn probe(policy: DevicePolicy) -> CudaStatus {
    let none = |reason: String| CudaStatus {
        devices: 0,
        reason: Some(reason),
    };
    if policy == DevicePolicy::CpuOnly {
        return none("GPUs turned off by the configuration (number_of_gpu=0)".into());
    }
    // The driver library is tiny to open; its absence means no GPU and no reason to pay for
    // libtorch_cuda.
    if let Err(e) = dlopen("libcuda.so.1", libc::RTLD_LAZY | libc::RTLD_LOCAL) {
        return none(format!("no NVIDIA driver ({e})"));
    }
    // RTLD_GLOBAL so libtorch's CUDA hooks, registered by its static initialisers, are visible.
    if let Err(e) = dlopen("libtorch_cuda.so", libc::RTLD_NOW | libc::RTLD_GLOBAL) {
        return none(format!("libtorch_cuda.so could not be loaded: {e}"));
    }
    let mut devices = if tch::Cuda::is_available() {
        usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
    } else {
        0
    };
    if let DevicePolicy::AtMost(n) = policy {
        devices = devices.min(n);
    }
    if devices == 0 {
        return none("the NVIDIA driver reports no usable device".into());
    }
    CudaStatus {
        devices,
        reason: None,
    }
}

fn dlopen(name: &str, flags: libc::c_int) -> Result<(), String> {
    let c_name = CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: c_name is a valid NUL-terminated string; the handle is deliberately kept open for
    // the life of the process, so the library's code stays mapped.
    let handle = unsafe { libc::dlopen(c_name.as_ptr(), flags) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a valid C string owned by the C library.
        let msg = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(msg);
    }
    Ok(())
}

/// Picks the device for a worker: GPU `ids[n % len]` (or GPU `n % count`) when GPUs are usable,
/// else the CPU.
pub fn device_for_worker(status: &CudaStatus, ids: Option<&[usize]>, n: usize) -> tch::Device {
    if status.devices == 0 {
        return tch::Device::Cpu;
    }
    match ids.filter(|ids| !ids.is_empty()) {
        Some(ids) => tch::Device::Cuda(ids[n % ids.len()]),
        None => tch::Device::Cuda(n % status.devices),
    }
}

unsafe extern "C" {
    fn tchserve_empty_pinned(
        like: *const libc::c_void,
        dims: *const i64,
        ndims: libc::c_int,
    ) -> *mut libc::c_void;
}

/// Concatenates host tensors along their first axis into page-locked (pinned) host memory, from
/// which a GPU copies at the bus's full rate and without holding the thread; into pageable
/// memory when no pinned memory can be had. libtorch's caching host allocator keeps a pinned
/// block until the copies queued from it are done.
pub fn pinned_cat(parts: &[&tch::Tensor]) -> Result<tch::Tensor, tch::TchError> {
    cat_batch(parts, true)
}

/// Concatenates host tensors along their first axis into a new host tensor, in pinned memory
/// when `pinned` and CUDA can give it (see [`pinned_cat`]).
///
/// Parts of one dtype and row shape, laid out contiguously on the host (a request's tensor
/// always is), are copied in one plain pass. libtorch's `cat` copies each part as a parallel
/// region of its own, and each region waits for the slowest of the worker's threads, which the
/// HTTP threads keep off the cores under load: 32 times for a batch of 32 (`bench` batch_copy).
/// Other parts go through libtorch's `cat`, with its type promotion.
pub fn cat_batch(parts: &[&tch::Tensor], pinned: bool) -> Result<tch::Tensor, tch::TchError> {
    let Some(first) = parts.first().filter(|t| t.dim() > 0) else {
        return tch::Tensor::f_cat(parts, 0);
    };
    let mut dims = first.size();
    let plain = parts.iter().all(|t| {
        t.device() == tch::Device::Cpu
            && t.kind() == first.kind()
            && t.dim() == first.dim()
            && t.size()[1..] == dims[1..]
            && t.is_contiguous()
    });
    dims[0] = parts
        .iter()
        .map(|t| t.size().first().copied().unwrap_or(1))
        .sum();
    let page_locked = pinned
        .then(|| {
            // SAFETY: `first` is a live tensor and `dims` outlives the call; a non-null result
            // is a new heap tensor whose ownership passes to the `Tensor` made from it.
            unsafe {
                let t = tchserve_empty_pinned(
                    first.as_ptr().cast(),
                    dims.as_ptr(),
                    dims.len() as libc::c_int,
                );
                (!t.is_null()).then(|| tch::Tensor::from_ptr(t.cast()))
            }
        })
        .flatten();
    let out = match (page_locked, plain) {
        (Some(out), false) => return tch::Tensor::f_cat_out(&out, parts, 0),
        (None, false) => return tch::Tensor::f_cat(parts, 0),
        (Some(out), true) => out,
        (None, true) => tch::Tensor::f_empty(&dims, (first.kind(), tch::Device::Cpu))?,
    };
    let size = out.kind().elt_size_in_bytes();
    let dst = out.data_ptr().cast::<u8>();
    let mut at = 0;
    for t in parts {
        let n = t.numel() * size;
        // SAFETY: each part is a contiguous host tensor of `out`'s dtype and row shape, so the
        // parts' bytes fill `out` (allocated for their total rows) exactly, in order; `out` is
        // new, so no part shares its memory.
        unsafe {
            std::ptr::copy_nonoverlapping(t.data_ptr().cast::<u8>(), dst.add(at), n);
        }
        at += n;
    }
    Ok(out)
}

/// Copies a host tensor to `device`; to a GPU without waiting for the copy, which is queued on
/// the device's stream before the work that reads it.
pub fn upload(t: &tch::Tensor, device: tch::Device) -> Result<tch::Tensor, tch::TchError> {
    t.f_to_device_(device, t.kind(), device.is_cuda(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_only_never_loads_cuda() {
        let status = probe(DevicePolicy::CpuOnly);
        assert_eq!(status.devices, 0);
        assert_eq!(device_for_worker(&status, Some(&[1]), 3), tch::Device::Cpu);
    }

    #[test]
    fn round_robin_over_gpus() {
        let status = CudaStatus {
            devices: 2,
            reason: None,
        };
        let picks: Vec<_> = (0..4)
            .map(|n| device_for_worker(&status, None, n))
            .collect();
        assert_eq!(
            picks,
            [
                tch::Device::Cuda(0),
                tch::Device::Cuda(1),
                tch::Device::Cuda(0),
                tch::Device::Cuda(1)
            ]
        );
        assert_eq!(
            device_for_worker(&status, Some(&[1]), 0),
            tch::Device::Cuda(1)
        );
    }

    #[test]
    fn batches_are_concatenated_as_libtorch_does() {
        let f = |n: i64, start: f64| {
            tch::Tensor::arange_start(
                start,
                start + (n * 6) as f64,
                (tch::Kind::Float, tch::Device::Cpu),
            )
            .reshape([n, 2, 3])
        };
        let (a, b, c) = (f(1, 0.0), f(3, 100.0), f(2, -50.0));
        let want = tch::Tensor::cat(&[&a, &b, &c], 0);
        // Plain parts, and parts that take libtorch's path: a transposed view, another dtype.
        let t = f(2, 7.0).transpose(1, 2).contiguous().transpose(1, 2);
        assert!(!t.is_contiguous());
        for parts in [vec![&a, &b, &c], vec![&a], vec![&t, &a]] {
            for got in [
                pinned_cat(&parts).unwrap(),
                cat_batch(&parts, false).unwrap(),
            ] {
                assert_eq!(got, tch::Tensor::cat(&parts, 0));
                assert!(got.is_contiguous());
            }
        }
        assert_eq!(pinned_cat(&[&a, &b, &c]).unwrap(), want);
        // A request whose rows differ cannot join the batch: an error, as from libtorch.
        let other = tch::Tensor::zeros([1, 3, 2], (tch::Kind::Float, tch::Device::Cpu));
        assert!(pinned_cat(&[&a, &other]).is_err());
        // Mixed dtypes: libtorch's promotion, as before.
        let double = f(1, 0.0).to_kind(tch::Kind::Double);
        let promoted = cat_batch(&[&a, &double], false).unwrap();
        assert_eq!(promoted.kind(), tch::Kind::Double);
        assert_eq!(promoted, tch::Tensor::cat(&[&a, &double], 0));
        assert!(pinned_cat(&[]).is_err());
    }

    #[test]
    fn pinned_uploads_keep_the_values() {
        let host = tch::Tensor::arange(12, (tch::Kind::Float, tch::Device::Cpu)).reshape([3, 4]);
        let status = cuda(DevicePolicy::Auto);
        let device = device_for_worker(status, None, 0);
        let there = upload(&pinned_cat(&[&host, &host]).unwrap(), device).unwrap();
        assert_eq!(there.device(), device);
        let back = there.to_device(tch::Device::Cpu);
        assert_eq!(back, tch::Tensor::cat(&[&host, &host], 0));
    }

    #[test]
    fn auto_matches_the_machine() {
        let status = cuda(DevicePolicy::Auto);
        let driver = ["/proc/driver/nvidia", "/dev/nvidiactl"]
            .iter()
            .any(|p| std::path::Path::new(p).exists());
        if driver {
            assert!(
                status.devices > 0,
                "GPU machine but CUDA not usable: {:?}",
                status.reason
            );
        } else {
            assert_eq!(status.devices, 0);
            assert!(status.reason.is_some());
        }
    }
}
