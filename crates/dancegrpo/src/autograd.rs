//! Autograd controls tch does not expose (through `csrc/context_shim.cpp`).

use tch::Tensor;

extern "C" {
    fn dg_grad_enabled() -> std::os::raw::c_int;
    fn dg_reset_grad(t: *const torch_sys::C_tensor);
    fn dg_accumulate_grad(t: *const torch_sys::C_tensor, g: *const torch_sys::C_tensor);
}

/// Whether autograd records operations now (false under `no_grad`).
pub fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag of libtorch
    unsafe { dg_grad_enabled() != 0 }
}

/// Drops `t`'s gradient (`t.grad = None`): its memory is freed and the next
/// backward pass starts it afresh.
pub fn reset_grad(t: &Tensor) {
    // SAFETY: `t` is a live tensor; the call only resets its gradient slot
    unsafe { dg_reset_grad(t.as_ptr()) }
}

/// Adds `g` to `t`'s gradient (a copy of `g` when `t` has none), as a
/// backward pass into `t` would.
pub fn accumulate_grad(t: &Tensor, g: &Tensor) {
    // SAFETY: both are live tensors; shapes are the caller's contract, checked by ATen
    unsafe { dg_accumulate_grad(t.as_ptr(), g.as_ptr()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn grad_mode_and_gradient_reset() {
        assert!(grad_enabled());
        tch::no_grad(|| assert!(!grad_enabled()));
        let w = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        (&w * 2.0).sum(Kind::Float).backward();
        assert!(w.grad().defined());
        reset_grad(&w);
        assert!(!w.grad().defined());
        // a new backward starts afresh, even at another shape
        let mut w2 = w.shallow_clone();
        tch::no_grad(|| w2.set_data(&Tensor::ones([2], (Kind::Float, tch::Device::Cpu))));
        (&w * 3.0).sum(Kind::Float).backward();
        assert_eq!(Vec::<f32>::try_from(&w.grad()).unwrap(), vec![3.0, 3.0]);
        accumulate_grad(&w, &Tensor::from_slice(&[1.0f32, -1.0]));
        assert_eq!(Vec::<f32>::try_from(&w.grad()).unwrap(), vec![4.0, 2.0]);
        reset_grad(&w);
        accumulate_grad(&w, &Tensor::from_slice(&[0.5f32, 0.5]));
        assert_eq!(Vec::<f32>::try_from(&w.grad()).unwrap(), vec![0.5, 0.5]);
    }
}
