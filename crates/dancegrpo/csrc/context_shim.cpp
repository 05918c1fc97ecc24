// What the C API tch wraps does not expose: the TF32 policy of CUDA float32
// matmuls and convolutions (ATen's global context), the autograd mode, and
// dropping a tensor's gradient.
#include <ATen/Context.h>

extern "C" {

// Lets (1) or forbids (0) cuBLAS and cuDNN use TF32 for float32 work.
void dg_set_tf32(int allow) {
  at::globalContext().setAllowTF32CuBLAS(allow != 0);
  at::globalContext().setAllowTF32CuDNN(allow != 0);
}

// Whether cuBLAS may use TF32 for float32 matmuls.
int dg_tf32() { return at::globalContext().allowTF32CuBLAS() ? 1 : 0; }

}  // extern "C"

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/grad_mode.h>
#ifdef DANCEGRPO_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

extern "C" {

// Whether autograd records operations (the C API tch wraps can only set it).
int dg_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

// Drops `t`'s accumulated gradient (`t.grad = None`): the memory goes and the
// next backward starts the gradient afresh, whatever `t`'s shape is then.
void dg_reset_grad(const at::Tensor* t) { t->mutable_grad().reset(); }

// Adds `g` to `t`'s gradient (`t.grad = g.clone()` when it has none), as a
// backward pass would.
void dg_accumulate_grad(const at::Tensor* t, const at::Tensor* g) {
  at::Tensor& grad = t->mutable_grad();
  if (grad.defined()) {
    grad.add_(*g);
  } else {
    grad = g->clone();
  }
}

}  // extern "C"

extern "C" {

// The most bytes the CUDA caching allocator has held allocated on `device`
// since the process started (or the last reset); -1 in a build without CUDA.
int64_t dg_cuda_peak_allocated(int device) {
#ifdef DANCEGRPO_CUDA
  // an exception must not cross the C boundary: -1 (unknown) instead
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    auto aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    return stats.allocated_bytes[aggregate].peak;
  } catch (...) {
    return -1;
  }
#else
  (void)device;
  return -1;
#endif
}

}  // extern "C"

#ifdef DANCEGRPO_CUDA
#include <ATen/cuda/CUDAContextLight.h>
#endif

extern "C" {

// Bytes of memory of CUDA device `device`; -1 in a build without CUDA.
int64_t dg_cuda_total_memory(int device) {
#ifdef DANCEGRPO_CUDA
  try {
    return static_cast<int64_t>(
        at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device))->totalGlobalMem);
  } catch (...) {
    return -1;
  }
#else
  (void)device;
  return -1;
#endif
}

}  // extern "C"
