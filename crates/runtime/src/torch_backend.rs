//! The libtorch backend: model versions served by [`Pool`]s of worker threads.

use std::sync::Arc;

use tchserve_backend::{Backend, LoadError, ModelSpec, Placement, Workers};

use crate::device::{self, CudaStatus, DevicePolicy};
use crate::handler::Pipeline;
use crate::pool::Pool;
use crate::shared::ThreadBudget;

/// Serves model versions with libtorch, on the CPU or CUDA.
#[derive(Debug)]
pub struct TorchBackend {
    cuda: &'static CudaStatus,
    budget: Arc<ThreadBudget>,
    gpu_forward_threads: usize,
}

impl TorchBackend {
    /// A backend whose workers share `cpu_threads` intra-op threads. Looks for GPUs (blocking,
    /// once per process) unless `policy` rules them out.
    pub fn new(policy: DevicePolicy, cpu_threads: usize) -> Self {
        TorchBackend {
            cuda: device::cuda(policy),
            budget: ThreadBudget::new(cpu_threads),
            gpu_forward_threads: 1,
        }
    }

    /// Runs each model's forwards on `threads` threads per GPU instead of one: more forwards
    /// launched at once, for models whose small batches take as long to launch as to run, at
    /// the cost of each thread's own cuBLAS and cuDNN handles and workspaces.
    pub fn with_gpu_forward_threads(mut self, threads: usize) -> Self {
        self.gpu_forward_threads = threads;
        self
    }

    /// What the GPU probe found.
    pub fn cuda(&self) -> &'static CudaStatus {
        self.cuda
    }

    fn devices(&self, placement: &Placement) -> Vec<tch::Device> {
        match placement {
            Placement::Gpu { ids } if self.cuda.devices > 0 => {
                let n = ids.as_ref().map_or(self.cuda.devices, Vec::len);
                (0..n.max(1))
                    .map(|k| device::device_for_worker(self.cuda, ids.as_deref(), k))
                    .collect()
            }
            _ => vec![tch::Device::Cpu],
        }
    }
}

impl Backend for TorchBackend {
    fn gpu_count(&self) -> usize {
        self.cuda.devices
    }

    fn lingering(&self) -> Vec<tchserve_backend::Lingering> {
        crate::pool::lingering(None)
    }

    fn load(&self, spec: ModelSpec) -> Result<Arc<dyn Workers>, LoadError> {
        // Fail fast on handlers this build cannot run, rather than in every worker.
        Pipeline::new(&spec.handler, &spec.model_dir).map_err(|e| LoadError(e.to_string()))?;
        if let Placement::Gpu { ids: Some(ids) } = &spec.placement
            && let Some(bad) = ids.iter().find(|i| **i >= self.cuda.devices)
        {
            return Err(LoadError(format!(
                "GPU {bad} does not exist: {} GPU(s) are in use (this machine's usable GPUs, or number_of_gpu)",
                self.cuda.devices
            )));
        }
        let devices = self.devices(&spec.placement);
        Ok(Pool::new(
            spec,
            devices,
            Arc::clone(&self.budget),
            self.gpu_forward_threads,
        ))
    }
}
