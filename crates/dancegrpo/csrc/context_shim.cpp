// Process-wide switches of ATen's global context that the C API tch wraps does
// not expose: the TF32 policy of CUDA float32 matmuls and convolutions.
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
