// A C interface over libtorch's AOTIModelPackageLoader, for `.pt2` packages made by
// torch._inductor.aoti_compile_and_package. Tensors cross as `at::Tensor*`, the representation
// the tch crate uses; every error comes back as a message the caller frees.

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

char* copy_message(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

void set_error(char** err, const char* what) {
  if (err != nullptr) {
    *err = copy_message(what);
  }
}

// A compiled package checks each input's dtype, sizes, strides and device only when this
// variable is set, and reads it once, at its first run. Unchecked, an input of the wrong shape
// makes the generated kernels read and write past its end, so the server always turns the
// checks on. Set while the process starts, before any thread could read the environment.
[[maybe_unused]] const int checks_on = setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", 1);

// libtorch reads a package's JSON files (its metadata, compile flags) into one static object
// shared by every caller, so two packages read at once corrupt each other's: a server
// registering two .pt2 models together (a restart restoring its snapshot) saw
// `basic_string::_M_create` from one load. Reading and loading take turns.
std::mutex& package_reading() {
  static std::mutex m;
  return m;
}

// Runs `body`, turning any exception into a message in *err and `failed` as the result: no
// exception may cross the C interface.
template <typename T, typename F>
T guarded(char** err, T failed, F body) {
  try {
    return body();
  } catch (const std::exception& e) {
    set_error(err, e.what());
  } catch (...) {
    set_error(err, "an unknown C++ exception");
  }
  return failed;
}

}  // namespace

extern "C" {

// The package's metadata, one `key\tvalue\n` line per entry, or null with err set when the
// package cannot be read. Reads the metadata file only: no model code is loaded.
char* tchserve_aoti_metadata(const char* path, char** err) {
  return guarded<char*>(err, nullptr, [&] {
    std::lock_guard<std::mutex> one_at_a_time(package_reading());
    std::string lines;
    for (const auto& [key, value] :
         torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model")) {
      lines += key + "\t" + value + "\n";
    }
    return copy_message(lines);
  });
}

// Loads the package for device index `device_index` (-1 for a CPU package) with `num_runners`
// model instances, so that many threads can run it at once; null on failure.
void* tchserve_aoti_load(const char* path, int device_index, int num_runners, char** err) {
  return guarded<void*>(err, nullptr, [&] {
    std::lock_guard<std::mutex> one_at_a_time(package_reading());
    return new torch::inductor::AOTIModelPackageLoader(
        path, "model", false, static_cast<size_t>(num_runners),
        static_cast<c10::DeviceIndex>(device_index));
  });
}

// Runs the model on `n_inputs` tensors. On success returns the number of outputs and stores a
// malloc'd array of new tensors in *outputs; on failure returns -1 with err set.
int tchserve_aoti_run(void* handle, at::Tensor** inputs, int n_inputs, at::Tensor*** outputs,
                      char** err) {
  return guarded<int>(err, -1, [&] {
    auto* loader = static_cast<torch::inductor::AOTIModelPackageLoader*>(handle);
    std::vector<at::Tensor> in;
    in.reserve(n_inputs);
    for (int i = 0; i < n_inputs; ++i) {
      in.push_back(*inputs[i]);
    }
    std::vector<at::Tensor> out = loader->run(in);
    auto** array = static_cast<at::Tensor**>(std::malloc(sizeof(at::Tensor*) * (out.size() + 1)));
    if (array == nullptr) {
      throw std::runtime_error("out of memory");
    }
    size_t made = 0;
    try {
      for (; made < out.size(); ++made) {
        array[made] = new at::Tensor(std::move(out[made]));
      }
    } catch (...) {
      for (size_t i = 0; i < made; ++i) {
        delete array[i];
      }
      std::free(array);
      throw;
    }
    *outputs = array;
    return static_cast<int>(out.size());
  });
}

// One of the package's serialized pytree specs: 0 for its inputs (`forward`'s arguments, as
// `(args, kwargs)`), 1 for its outputs (what `forward` returned: a tensor, a tuple, a dict...);
// null with err set when the package has none.
char* tchserve_aoti_call_spec(void* handle, int which, char** err) {
  return guarded<char*>(err, nullptr, [&] {
    auto spec = static_cast<torch::inductor::AOTIModelPackageLoader*>(handle)->get_call_spec();
    if (which < 0 || static_cast<size_t>(which) >= spec.size()) {
      throw std::runtime_error("the package has no such call spec");
    }
    return copy_message(spec[which]);
  });
}

void tchserve_aoti_free(void* handle) {
  delete static_cast<torch::inductor::AOTIModelPackageLoader*>(handle);
}

void tchserve_aoti_free_outputs(at::Tensor** outputs) { std::free(outputs); }

void tchserve_aoti_free_message(char* message) { std::free(message); }

}  // extern "C"
