//! What tch cannot reach, through `cpp/shim.cpp` (C++ built with `cc` against libtorch's
//! headers): custom autograd functions, torch's current CUDA stream, copies to the device from
//! pinned memory, a variable's gradient tensor, backpropagation from a given output gradient,
//! whether autograd records, and `add`, `addcmul`, `addcdiv` with their scalar factor.
//!
//! Custom autograd functions: a forward and a backward we compute ourselves, recorded on
//! libtorch's tape as one node, so `loss.backward()` calls our backward (the DSL's derived
//! backward program, or a fused kernel) instead of differentiating every operation of the
//! forward. tch has no such functions; `cpp/shim.cpp` provides one whose two halves call
//! back into [`LayerKernels`].

use crate::Error;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use tch::Tensor;
use torch_sys::C_tensor;

/// The two halves of a fused layer. `inputs` are the input, then the parameters, then the
/// buffers (which `forward` may update in place, in training).
pub trait LayerKernels: Send + Sync {
    /// The output, and the tensors `backward` will get as `saved` (never an input that is
    /// updated in place: save a copy of it).
    fn forward(&self, inputs: &[Tensor], train: bool) -> Result<(Tensor, Vec<Tensor>), Error>;
    /// One gradient per input (`None` for those that need none), from what `forward` saved
    /// and the output's gradient.
    fn backward(&self, saved: &[Tensor], grad_y: &Tensor, train: bool) -> Result<Vec<Option<Tensor>>, Error>;
}

#[repr(C)]
struct Sink {
    _opaque: [u8; 0],
}

#[repr(C)]
struct Callbacks {
    data: *mut c_void,
    drop: unsafe extern "C" fn(*mut c_void),
    forward: unsafe extern "C" fn(*mut c_void, bool, *mut *mut C_tensor, usize, *mut Sink) -> i32,
    backward: unsafe extern "C" fn(*mut c_void, bool, *mut *mut C_tensor, usize, *mut C_tensor, *mut Sink) -> i32,
}

extern "C" {
    fn nf_sink_push(sink: *mut Sink, t: *const C_tensor);
    fn nf_sink_error(sink: *mut Sink, msg: *const c_char, len: usize);
    fn nf_function_apply(cb: Callbacks, train: bool, inputs: *const *const C_tensor, n: usize, err: *mut *mut c_char) -> *mut C_tensor;
    fn nf_free(p: *mut c_char);
    fn nf_set_grad(var: *mut C_tensor, grad: *const C_tensor) -> *mut c_char;
    fn nf_clear_grad(var: *mut C_tensor) -> *mut c_char;
    fn nf_backward_with_grad(y: *const C_tensor, gy: *const C_tensor) -> *mut c_char;
    fn nf_current_cuda_stream(device: i32, out: *mut *mut c_void) -> i32;
    fn nf_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        steps: *const *mut C_tensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    fn nf_grad_enabled() -> bool;
    fn nf_scaled_combine(op: i32, a: *const C_tensor, x: *const C_tensor, y: *const C_tensor, value: f64, out: *mut C_tensor, err: *mut *mut c_char) -> *mut C_tensor;
    fn nf_upload_pinned(bytes: *const u8, n: usize, device: i32, err: *mut *mut c_char) -> *mut C_tensor;
}

/// `y = kernels.forward(inputs)`, recorded so that backpropagating through `y` calls
/// `kernels.backward`.
pub fn custom_function(kernels: Arc<dyn LayerKernels>, inputs: &[&Tensor], train: bool) -> Result<Tensor, Error> {
    let data = Box::into_raw(Box::new(kernels)) as *mut c_void;
    let cb = Callbacks { data, drop: drop_data, forward: forward_cb, backward: backward_cb };
    let ptrs: Vec<*const C_tensor> = inputs.iter().map(|t| t.as_ptr()).collect();
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: the pointers are live tensors borrowed for the call; the shim copies them, owns
    // `data` from here on (dropping it through `drop_data` exactly once), and returns a `new`
    // tensor or sets `err`.
    let y = unsafe { nf_function_apply(cb, train, ptrs.as_ptr(), ptrs.len(), &mut err) };
    if y.is_null() {
        // SAFETY: a null result comes with a malloc'd message (or none, if malloc failed).
        let msg = unsafe { take_message(err) };
        return Err(Error(msg));
    }
    // SAFETY: a fresh `new at::Tensor`, ours to own.
    Ok(unsafe { Tensor::from_ptr(y) })
}

/// The stream libtorch launches on for CUDA device `device` (a `CUstream`; null is the
/// legacy default stream), or `None` where libtorch's CUDA support is not loaded
/// ([`crate::load_cuda`]).
pub fn current_cuda_stream(device: usize) -> Option<*mut c_void> {
    let d = i32::try_from(device).ok()?;
    let mut s = std::ptr::null_mut();
    // SAFETY: writes `s` on success only; failures are reported, not thrown.
    (unsafe { nf_current_cuda_stream(d, &mut s) } == 0).then_some(s)
}

/// `bytes` on CUDA device `device`, copied from pinned host memory on torch's current stream
/// without waiting for the work queued there (a copy from pageable memory waits); an error
/// where libtorch cannot pin memory (no CUDA support loaded).
pub fn upload_pinned(bytes: &[u8], device: usize) -> Result<Tensor, Error> {
    let d = i32::try_from(device).map_err(|_| Error(format!("no CUDA device {device}")))?;
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: `bytes` is read during the call only; the shim returns a `new` tensor or sets `err`.
    let t = unsafe { nf_upload_pinned(bytes.as_ptr(), bytes.len(), d, &mut err) };
    if t.is_null() {
        // SAFETY: a null result comes with a malloc'd message (or none, if malloc failed).
        return Err(Error(unsafe { take_message(err) }));
    }
    // SAFETY: a fresh `new at::Tensor`, ours to own.
    Ok(unsafe { Tensor::from_ptr(t) })
}

/// Whether autograd records operations on this thread now: not inside `tch::no_grad`, nor in a
/// backward pass.
pub fn grad_enabled() -> bool {
    // SAFETY: reads a thread-local flag.
    unsafe { nf_grad_enabled() }
}

/// One libtorch operation computing `a + value * f`, for the `f` of [`Combine`]; into `out`
/// where given: one of the operands, as large as the result, that nothing else reads or views
/// and nothing differentiates (an `out` variant, which autograd does not record).
pub fn scaled_combine(combine: Combine, a: &Tensor, value: f64, out: Option<&Tensor>) -> Result<Tensor, Error> {
    let (op, x, y) = match combine {
        Combine::Add(x) => (0, x, None),
        Combine::Mul(x, y) => (1, x, Some(y)),
        Combine::Div(x, y) => (2, x, Some(y)),
        Combine::Lerp(x) => (3, x, None),
    };
    let mut err: *mut c_char = std::ptr::null_mut();
    let out = out.map_or(std::ptr::null_mut(), |t| t.as_ptr() as *mut C_tensor);
    // SAFETY: live tensors (the shim reads `y` only for the ops that take it); the shim
    // returns a `new` tensor or sets `err`, catching libtorch's errors.
    let t = unsafe { nf_scaled_combine(op, a.as_ptr(), x.as_ptr(), y.map_or(x.as_ptr(), |y| y.as_ptr()), value, out, &mut err) };
    if t.is_null() {
        // SAFETY: a null result comes with a malloc'd message (or none, if malloc failed).
        return Err(Error(unsafe { take_message(err) }));
    }
    // SAFETY: a fresh `new at::Tensor`, ours to own.
    Ok(unsafe { Tensor::from_ptr(t) })
}

/// What [`scaled_combine`] adds to `a`, times its `value`.
#[derive(Clone, Copy)]
pub enum Combine<'t> {
    /// `x` (libtorch's `add` with `alpha`).
    Add(&'t Tensor),
    /// `x * y` (`addcmul`).
    Mul(&'t Tensor, &'t Tensor),
    /// `x / y` (`addcdiv`).
    Div(&'t Tensor, &'t Tensor),
    /// `x - a` (`lerp` with a scalar weight).
    Lerp(&'t Tensor),
}

/// Backpropagate from `y` with `grad_y` as its gradient (PyTorch's `y.backward(grad_y)`).
pub fn backward_with_grad(y: &Tensor, grad_y: &Tensor) -> Result<(), Error> {
    // SAFETY: two live tensors; the shim catches libtorch's errors.
    message_or_ok(unsafe { nf_backward_with_grad(y.as_ptr(), grad_y.as_ptr()) })
}

fn message_or_ok(err: *mut c_char) -> Result<(), Error> {
    if err.is_null() {
        Ok(())
    } else {
        // SAFETY: a malloc'd message from the shim.
        Err(Error(unsafe { take_message(err) }))
    }
}

/// Make `grad` the gradient tensor of `var`: backpropagation then accumulates into `grad`'s
/// memory in place (a view into one flat buffer, for a fused multi-tensor optimizer step).
pub fn set_grad(var: &mut Tensor, grad: &Tensor) -> Result<(), Error> {
    // SAFETY: two live tensors; the shim checks shape, dtype and device and catches errors.
    message_or_ok(unsafe { nf_set_grad(var.as_mut_ptr(), grad.as_ptr()) })
}

/// Leave `var` with no gradient (PyTorch's `var.grad = None`), so the next backpropagation
/// hands it a fresh one instead of adding into the old: what `zero_grad(set_to_none=True)` does,
/// and what the peers' benchmarks do before each timed run.
pub fn clear_grad(var: &mut Tensor) -> Result<(), Error> {
    // SAFETY: a live tensor; the shim catches libtorch's errors.
    message_or_ok(unsafe { nf_clear_grad(var.as_mut_ptr()) })
}

/// The hyper-parameters of torch's AdamW.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One step of torch's fused AdamW (`torch.optim.AdamW(fused=True)`'s kernel, f32 arithmetic
/// for bf16 and f16 tensors) over `params` in place, with their gradients, moments and step
/// counts (f32 scalars, already counted up to this step): the oracle for our fused kernels.
pub fn fused_adamw(params: &[Tensor], grads: &[Tensor], exp_avgs: &[Tensor], exp_avg_sqs: &[Tensor], steps: &[Tensor], h: AdamW) -> Result<(), Error> {
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()].iter().any(|&k| k != n) {
        return Err(Error(format!("fused AdamW takes one gradient, two moments and a step count per parameter ({n})")));
    }
    let ptrs = |ts: &[Tensor]| ts.iter().map(|t| t.as_ptr() as *mut C_tensor).collect::<Vec<_>>();
    let (p, g, m, v, s) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs), ptrs(steps));
    // SAFETY: `n` live tensors per list; libtorch checks their shapes, dtypes and devices and the
    // shim catches its errors.
    message_or_ok(unsafe { nf_fused_adamw(p.as_ptr(), g.as_ptr(), m.as_ptr(), v.as_ptr(), s.as_ptr(), n, h.lr, h.beta1, h.beta2, h.weight_decay, h.eps) })
}

unsafe fn take_message(err: *mut c_char) -> String {
    if err.is_null() {
        return "the custom autograd function failed".into();
    }
    let msg = CStr::from_ptr(err).to_string_lossy().into_owned();
    nf_free(err);
    msg
}

type Data = Arc<dyn LayerKernels>;

unsafe extern "C" fn drop_data(data: *mut c_void) {
    drop(Box::from_raw(data as *mut Data));
}

/// Tensors handed over by the shim (each a `new at::Tensor`).
unsafe fn take(ptrs: *mut *mut C_tensor, n: usize) -> Vec<Tensor> {
    (0..n).map(|i| Tensor::from_ptr(*ptrs.add(i))).collect()
}

/// What a caught panic said (tch panics with libtorch's error message), if it said it in text.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> Option<String> {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
}

/// Run a callback body: results into the sink, errors and panics as messages (a panic must
/// not unwind into C++).
unsafe fn report(sink: *mut Sink, body: impl FnOnce() -> Result<Vec<Option<Tensor>>, Error>) -> i32 {
    let result = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|p| Err(Error(format!("panic in a fused layer: {}", panic_message(&*p).unwrap_or_default()))));
    match result {
        Ok(out) => {
            for t in &out {
                nf_sink_push(sink, t.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()));
            }
            0
        }
        Err(e) => {
            nf_sink_error(sink, e.0.as_ptr() as *const c_char, e.0.len());
            1
        }
    }
}

unsafe extern "C" fn forward_cb(data: *mut c_void, train: bool, inputs: *mut *mut C_tensor, n: usize, sink: *mut Sink) -> i32 {
    let k = &*(data as *const Data);
    let inputs = take(inputs, n);
    report(sink, || {
        let (y, saved) = k.forward(&inputs, train)?;
        Ok(std::iter::once(Some(y)).chain(saved.into_iter().map(Some)).collect())
    })
}

unsafe extern "C" fn backward_cb(data: *mut c_void, train: bool, saved: *mut *mut C_tensor, n: usize, grad_y: *mut C_tensor, sink: *mut Sink) -> i32 {
    let k = &*(data as *const Data);
    let saved = take(saved, n);
    // The shim calls back only with a defined gradient.
    let gy = Tensor::from_ptr(grad_y);
    report(sink, || k.backward(&saved, &gy, train))
}
