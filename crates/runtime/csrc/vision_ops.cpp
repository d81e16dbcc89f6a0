// Operators that torchvision's TorchScript models call but libtorch lacks: nms and roi_align,
// as torchvision's detectors use them.
//
// torchvision ships them in a Python extension; tchserve registers its own implementation under
// the same names so that scripted detection models load without Python. Only inference is
// supported (no autograd formulas).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Greedy non-maximum suppression: boxes in (x1, y1, x2, y2), visited by descending score (a
// stable sort, so equal scores keep their input order); a box is dropped when its IoU with an
// already kept box exceeds the threshold. Returns the indices kept, best first.
template <typename scalar_t>
at::Tensor nms_kernel(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold) {
  const int64_t n = dets.size(0);
  auto order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  auto order_a = order.accessor<int64_t, 1>();
  auto d = dets.accessor<scalar_t, 2>();
  std::vector<scalar_t> area(n);
  for (int64_t i = 0; i < n; ++i) {
    area[i] = (d[i][2] - d[i][0]) * (d[i][3] - d[i][1]);
  }
  std::vector<char> suppressed(n, 0);
  std::vector<int64_t> keep;
  keep.reserve(n);
  for (int64_t a = 0; a < n; ++a) {
    const int64_t i = order_a[a];
    if (suppressed[i]) continue;
    keep.push_back(i);
    for (int64_t b = a + 1; b < n; ++b) {
      const int64_t j = order_a[b];
      if (suppressed[j]) continue;
      const scalar_t w = std::max(static_cast<scalar_t>(0), std::min(d[i][2], d[j][2]) - std::max(d[i][0], d[j][0]));
      const scalar_t h = std::max(static_cast<scalar_t>(0), std::min(d[i][3], d[j][3]) - std::max(d[i][1], d[j][1]));
      const scalar_t inter = w * h;
      const scalar_t iou = inter / (area[i] + area[j] - inter);
      if (iou > iou_threshold) suppressed[j] = 1;
    }
  }
  auto out = at::empty({static_cast<int64_t>(keep.size())}, dets.options().dtype(at::kLong).device(at::kCPU));
  std::copy(keep.begin(), keep.end(), out.data_ptr<int64_t>());
  return out;
}

at::Tensor nms(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold) {
  TORCH_CHECK(dets.dim() == 2 && dets.size(1) == 4, "nms: boxes must have shape [N, 4], got ", dets.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == dets.size(0), "nms: expected one score per box");
  const auto device = dets.device();
  if (dets.size(0) == 0) {
    return at::empty({0}, dets.options().dtype(at::kLong));
  }
  // Runs on the CPU wherever the tensors live; the kept indices are few.
  auto cpu_dets = dets.to(at::kCPU).contiguous();
  auto cpu_scores = scores.to(at::kCPU).contiguous();
  at::Tensor keep;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cpu_dets.scalar_type(), "nms", [&] {
    keep = nms_kernel<scalar_t>(cpu_dets, cpu_scores, iou_threshold);
  });
  return keep.to(device);
}

// Bilinear sample of one channel plane at (y, x); zero outside [-1, size].
template <typename scalar_t>
scalar_t bilinear(const scalar_t* plane, int64_t height, int64_t width, scalar_t y, scalar_t x) {
  if (y < -1.0 || y > height || x < -1.0 || x > width) return 0;
  if (y <= 0) y = 0;
  if (x <= 0) x = 0;
  int64_t y0 = static_cast<int64_t>(y);
  int64_t x0 = static_cast<int64_t>(x);
  int64_t y1, x1;
  if (y0 >= height - 1) {
    y1 = y0 = height - 1;
    y = static_cast<scalar_t>(y0);
  } else {
    y1 = y0 + 1;
  }
  if (x0 >= width - 1) {
    x1 = x0 = width - 1;
    x = static_cast<scalar_t>(x0);
  } else {
    x1 = x0 + 1;
  }
  const scalar_t ly = y - y0, lx = x - x0, hy = 1 - ly, hx = 1 - lx;
  return hy * hx * plane[y0 * width + x0] + hy * lx * plane[y0 * width + x1] +
         ly * hx * plane[y1 * width + x0] + ly * lx * plane[y1 * width + x1];
}

// RoIAlign: each region (batch index, x1, y1, x2, y2) in input coordinates is scaled by
// `spatial_scale`, split into pooled_h x pooled_w bins, and each bin is the mean of a regular
// grid of bilinear samples (sampling_ratio per side, or ceil(bin size) when it is <= 0). With
// `aligned`, coordinates are shifted by half a pixel.
template <typename scalar_t>
void roi_align_kernel(const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t pooled_h,
                      int64_t pooled_w, int64_t sampling_ratio, bool aligned, at::Tensor& out) {
  const int64_t channels = input.size(1), height = input.size(2), width = input.size(3);
  const scalar_t* in = input.data_ptr<scalar_t>();
  auto r = rois.accessor<scalar_t, 2>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const scalar_t offset = aligned ? static_cast<scalar_t>(0.5) : static_cast<scalar_t>(0);
  at::parallel_for(0, rois.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = static_cast<int64_t>(r[n][0]);
      const scalar_t start_w = r[n][1] * spatial_scale - offset;
      const scalar_t start_h = r[n][2] * spatial_scale - offset;
      scalar_t roi_w = r[n][3] * spatial_scale - offset - start_w;
      scalar_t roi_h = r[n][4] * spatial_scale - offset - start_h;
      if (!aligned) {
        roi_w = std::max(roi_w, static_cast<scalar_t>(1));
        roi_h = std::max(roi_h, static_cast<scalar_t>(1));
      }
      const scalar_t bin_h = roi_h / pooled_h, bin_w = roi_w / pooled_w;
      const int64_t grid_h = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(std::ceil(roi_h / pooled_h));
      const int64_t grid_w = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(std::ceil(roi_w / pooled_w));
      const scalar_t count = std::max<int64_t>(grid_h * grid_w, 1);
      for (int64_t c = 0; c < channels; ++c) {
        const scalar_t* plane = in + (b * channels + c) * height * width;
        for (int64_t ph = 0; ph < pooled_h; ++ph) {
          for (int64_t pw = 0; pw < pooled_w; ++pw) {
            scalar_t sum = 0;
            for (int64_t iy = 0; iy < grid_h; ++iy) {
              const scalar_t y = start_h + ph * bin_h + (iy + static_cast<scalar_t>(0.5)) * bin_h / grid_h;
              for (int64_t ix = 0; ix < grid_w; ++ix) {
                const scalar_t x = start_w + pw * bin_w + (ix + static_cast<scalar_t>(0.5)) * bin_w / grid_w;
                sum += bilinear(plane, height, width, y, x);
              }
            }
            o[((n * channels + c) * pooled_h + ph) * pooled_w + pw] = sum / count;
          }
        }
      }
    }
  });
}

at::Tensor roi_align(const at::Tensor& input, const at::Tensor& rois, double spatial_scale, c10::SymInt pooled_height,
                     c10::SymInt pooled_width, int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(input.dim() == 4, "roi_align: input must be [N, C, H, W]");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, "roi_align: rois must be [K, 5]");
  const int64_t ph = pooled_height.guard_int(__FILE__, __LINE__);
  const int64_t pw = pooled_width.guard_int(__FILE__, __LINE__);
  const auto device = input.device();
  auto x = input.to(at::kCPU).contiguous();
  auto boxes = rois.to(at::kCPU).to(x.scalar_type()).contiguous();
  auto out = at::zeros({boxes.size(0), x.size(1), ph, pw}, x.options());
  if (boxes.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "roi_align", [&] {
      roi_align_kernel<scalar_t>(x, boxes, spatial_scale, ph, pw, sampling_ratio, aligned, out);
    });
  }
  return out.to(device);
}

at::Tensor box_iou_rotated(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "torchvision::box_iou_rotated (rotated boxes) is not supported by tchserve");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchvision, m) {
  m.def("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor");
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
      "int sampling_ratio, bool aligned) -> Tensor");
  // Referenced by scripted box utilities on a path axis-aligned detectors never take.
  m.def("box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchvision, CPU, m) {
  m.impl("nms", TORCH_FN(nms));
  m.impl("roi_align", TORCH_FN(roi_align));
  m.impl("box_iou_rotated", TORCH_FN(box_iou_rotated));
}

TORCH_LIBRARY_IMPL(torchvision, CUDA, m) {
  m.impl("nms", TORCH_FN(nms));
  m.impl("roi_align", TORCH_FN(roi_align));
  m.impl("box_iou_rotated", TORCH_FN(box_iou_rotated));
}

// Referenced from Rust so the linker keeps this object, and with it the registrations above.
extern "C" int tchserve_vision_ops_version() { return 1; }
