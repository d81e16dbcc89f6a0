// Page-locked host memory for uploads to a GPU. tch's binding of `pin_memory` passes a device,
// an argument libtorch deprecates with a warning on every call; this asks for pinned memory
// without one.

#include <ATen/ATen.h>

#include <cstdint>

extern "C" {

// A new, uninitialised host tensor of `like`'s dtype and the sizes `dims`, in pinned memory;
// null when none can be had (no CUDA, or the host allocator refuses).
void* tchserve_empty_pinned(const void* like, const int64_t* dims, int ndims) {
  try {
    const auto& t = *static_cast<const at::Tensor*>(like);
    auto options = t.options().device(at::kCPU).pinned_memory(true);
    return new at::Tensor(at::empty(c10::IntArrayRef(dims, ndims), options));
  } catch (...) {
    return nullptr;
  }
}

}  // extern "C"
