// Gate gradient for the unfused path, as a CUDA C++ torch extension (optional; see kernels/gate_grad_cuda.py).
//
//   out[b, h] = sum_t sum_d (o[b, t, h, d] - base[h, d]) * dy[b, t, h, d]       (float32 accumulation)
//
// o, dy: [B, T, H, D] with arbitrary strides (the layout just before o_proj), float16 / bfloat16 / float32 /
// float64. base: optional [H, D] (converted to float32). One read of o and dy.
//
// Grid: (B*H, splits). Each block of 256 threads (8 warps) owns one (b, h) and a contiguous range of rows t;
// warp w takes rows t0 + w, t0 + w + 8, ...; the lanes of a warp stride over d, so a warp reads a row's D
// contiguous elements together. Per-thread float partials are reduced with warp shuffles, then across
// warps in shared memory, and thread 0 adds the block's total to out[b, h] with atomicAdd (out is zeroed
// first). The order of the atomics between splits is not fixed, so the last bits may vary run to run.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t>
__global__ void gate_grad_kernel(const scalar_t* __restrict__ o, const scalar_t* __restrict__ dy,
                                 const float* __restrict__ base, float* __restrict__ out, int64_t T, int64_t H,
                                 int64_t D, int64_t o_sb, int64_t o_st, int64_t o_sh, int64_t o_sd, int64_t y_sb,
                                 int64_t y_st, int64_t y_sh, int64_t y_sd, int64_t rows_per_block) {
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / H;
  const int64_t h = bh - b * H;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t t1 = min(T, t0 + rows_per_block);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  const scalar_t* o_bh = o + b * o_sb + h * o_sh;
  const scalar_t* y_bh = dy + b * y_sb + h * y_sh;
  const float* base_h = base == nullptr ? nullptr : base + h * D;

  float acc = 0.f;
  for (int64_t t = t0 + warp; t < t1; t += kWarps) {
    const scalar_t* o_row = o_bh + t * o_st;
    const scalar_t* y_row = y_bh + t * y_st;
    for (int64_t d = lane; d < D; d += 32) {
      float ov = static_cast<float>(o_row[d * o_sd]);
      if (base_h != nullptr) ov -= base_h[d];
      acc += ov * static_cast<float>(y_row[d * y_sd]);
    }
  }

  // warp reduce
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  __shared__ float warp_sums[kWarps];
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    float v = lane < kWarps ? warp_sums[lane] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) atomicAdd(out + bh, v);
  }
}

torch::Tensor gate_grad(torch::Tensor o, torch::Tensor dy, c10::optional<torch::Tensor> baseline) {
  TORCH_CHECK(o.is_cuda() && dy.is_cuda(), "gate_grad (CUDA extension): o and dy must be CUDA tensors");
  TORCH_CHECK(o.dim() == 4, "gate_grad: o must be [B, T, H, D], got ", o.sizes());
  TORCH_CHECK(dy.sizes() == o.sizes(), "gate_grad: dy must have the shape of o");
  TORCH_CHECK(dy.scalar_type() == o.scalar_type(), "gate_grad: o and dy must share a dtype");
  TORCH_CHECK(dy.device() == o.device(), "gate_grad: o and dy must be on the same device");
  const int64_t B = o.size(0), T = o.size(1), H = o.size(2), D = o.size(3);

  const c10::cuda::OptionalCUDAGuard guard(o.device());
  auto out = torch::zeros({B, H}, o.options().dtype(torch::kFloat32));
  if (B * H == 0 || T == 0 || D == 0) return out;

  torch::Tensor base_f;
  const float* base_ptr = nullptr;
  if (baseline.has_value() && baseline->defined()) {
    TORCH_CHECK(baseline->dim() == 2 && baseline->size(0) == H && baseline->size(1) == D,
                "gate_grad: baseline must be [H, D]");
    base_f = baseline->to(o.device(), torch::kFloat32).contiguous();
    base_ptr = base_f.data_ptr<float>();
  }

  // Enough blocks to fill the GPU (about 4 per SM), each with at least kWarps rows.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, o.get_device()));
  sms = std::max(sms, 1);
  int64_t splits = std::max<int64_t>(1, (4 * sms + B * H - 1) / (B * H));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (T + kWarps - 1) / kWarps));
  splits = std::min<int64_t>(splits, 65535);
  const int64_t rows_per_block = (T + splits - 1) / splits;
  splits = (T + rows_per_block - 1) / rows_per_block;

  TORCH_CHECK(B * H <= 2147483647LL, "gate_grad: B * H too large");
  const dim3 grid(static_cast<unsigned int>(B * H), static_cast<unsigned int>(splits));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(o.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, o.scalar_type(), "gate_grad", [&] {
    gate_grad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        o.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), base_ptr, out.data_ptr<float>(), T, H, D, o.stride(0),
        o.stride(1), o.stride(2), o.stride(3), dy.stride(0), dy.stride(1), dy.stride(2), dy.stride(3),
        rows_per_block);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gate_grad", &gate_grad, "sum_t <o - baseline, dy> per (batch, head), float32 [B, H]", pybind11::arg("o"),
        pybind11::arg("dy"), pybind11::arg("baseline") = pybind11::none());
}
