// What tch cannot reach: a libtorch custom autograd function whose forward and backward are
// Rust callbacks, torch's current CUDA stream, setting a variable's gradient tensor, whether
// autograd records, operations with a scalar factor that tch's generated API leaves out, and
// torch's fused AdamW kernel (an oracle). Built by build.rs with `cc` against the
// headers of the libtorch tch links. No C++ exception crosses into Rust: every entry point
// catches and reports through an error string.

#include <torch/csrc/autograd/custom_function.h>
#include <ATen/core/ivalue.h>
#include <cstring>
#include <string>
#include <vector>

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <ATen/ops/_fused_adamw.h>

extern "C" {

// What the Rust side produces: tensors (copied in; a null pointer is an undefined tensor, i.e.
// no gradient) or an error message.
struct nf_sink {
    std::vector<at::Tensor> out;
    std::string err;
    bool failed = false;
};

// The Rust callbacks. `inputs` are owned by the callee (`new`-allocated, freed by tch's
// at_free); results go to the sink. A non-zero return is an error, its message in the sink.
struct nf_callbacks {
    void* data;
    void (*drop)(void* data);
    int (*forward)(void* data, bool train, at::Tensor** inputs, size_t n, nf_sink* sink);
    int (*backward)(void* data, bool train, at::Tensor** saved, size_t n, at::Tensor* grad_y, nf_sink* sink);
};

void nf_sink_push(nf_sink* sink, const at::Tensor* t) {
    sink->out.push_back(t ? *t : at::Tensor());
}

void nf_sink_error(nf_sink* sink, const char* msg, size_t len) {
    sink->failed = true;
    sink->err.assign(msg, len);
}

}  // extern "C"

namespace {

// Owns the Rust callbacks' data for as long as the autograd graph may call backward.
struct Holder : torch::CustomClassHolder {
    nf_callbacks cb;
    explicit Holder(nf_callbacks c) : cb(c) {}
    ~Holder() override { cb.drop(cb.data); }
};

std::vector<at::Tensor*> owned(const std::vector<at::Tensor>& ts) {
    std::vector<at::Tensor*> out;
    out.reserve(ts.size());
    for (const auto& t : ts) out.push_back(new at::Tensor(t));
    return out;
}

struct Fn : torch::autograd::Function<Fn> {
    // Outputs: y. The callback returns y followed by what backward needs.
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                  c10::intrusive_ptr<Holder> holder, bool train,
                                                  at::TensorList inputs) {
        nf_sink sink;
        auto args = owned(inputs.vec());
        int rc = holder->cb.forward(holder->cb.data, train, args.data(), args.size(), &sink);
        if (rc != 0 || sink.failed || sink.out.empty() || !sink.out[0].defined()) {
            throw std::runtime_error(sink.failed ? sink.err : std::string("the forward callback returned no output"));
        }
        at::Tensor y = sink.out[0];
        ctx->save_for_backward(std::vector<at::Tensor>(sink.out.begin() + 1, sink.out.end()));
        ctx->saved_data["nf"] = at::IValue::make_capsule(holder);
        ctx->saved_data["train"] = train;
        ctx->saved_data["inputs"] = static_cast<int64_t>(inputs.size());
        return {y};
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grad_outputs) {
        auto holder = c10::static_intrusive_pointer_cast<Holder>(ctx->saved_data["nf"].toCapsule());
        bool train = ctx->saved_data["train"].toBool();
        auto n = static_cast<size_t>(ctx->saved_data["inputs"].toInt());
        // One gradient per forward argument: none for the holder and the flag.
        torch::autograd::variable_list grads{at::Tensor(), at::Tensor()};
        const at::Tensor& gy = grad_outputs.at(0);
        if (!gy.defined()) {
            grads.resize(2 + n);
            return grads;
        }
        auto saved = owned(ctx->get_saved_variables());
        nf_sink sink;
        int rc = holder->cb.backward(holder->cb.data, train, saved.data(), saved.size(), new at::Tensor(gy), &sink);
        if (rc != 0 || sink.failed) {
            throw std::runtime_error(sink.failed ? sink.err : std::string("the backward callback failed"));
        }
        if (sink.out.size() != n) {
            throw std::runtime_error("the backward callback returned " + std::to_string(sink.out.size()) +
                                     " gradients for " + std::to_string(n) + " inputs");
        }
        grads.insert(grads.end(), sink.out.begin(), sink.out.end());
        return grads;
    }
};

char* copy_message(const std::string& s) {
    char* out = static_cast<char*>(std::malloc(s.size() + 1));
    if (out) std::memcpy(out, s.c_str(), s.size() + 1);
    return out;
}

}  // namespace

extern "C" {

// y = Fn(inputs), recorded on the autograd tape when an input requires a gradient. Returns a
// `new` tensor (for tch's `Tensor::from_ptr`), or null with `*err` set (free with nf_free).
// `cb.drop` runs exactly once, whatever happens.
at::Tensor* nf_function_apply(nf_callbacks cb, bool train, const at::Tensor* const* inputs, size_t n, char** err) {
    *err = nullptr;
    c10::intrusive_ptr<Holder> holder;
    try {
        holder = c10::make_intrusive<Holder>(cb);
    } catch (const std::exception& e) {
        cb.drop(cb.data);
        *err = copy_message(e.what());
        return nullptr;
    }
    try {
        std::vector<at::Tensor> args;
        args.reserve(n);
        for (size_t i = 0; i < n; ++i) args.push_back(*inputs[i]);
        auto out = Fn::apply(holder, train, at::TensorList(args));
        return new at::Tensor(out.at(0));
    } catch (const c10::Error& e) {
        *err = copy_message(e.what_without_backtrace());
    } catch (const std::exception& e) {
        *err = copy_message(e.what());
    }
    return nullptr;
}

void nf_free(char* p) { std::free(p); }

// Backpropagate from `y` with `gy` as its gradient (PyTorch's `y.backward(gy)`, which tch lacks).
// Returns null, or an error message (free with nf_free).
char* nf_backward_with_grad(const at::Tensor* y, const at::Tensor* gy) {
    try {
        y->backward(*gy);
        return nullptr;
    } catch (const c10::Error& e) {
        return copy_message(e.what_without_backtrace());
    } catch (const std::exception& e) {
        return copy_message(e.what());
    }
}

// var.grad = grad (same shape, dtype and device), so autograd accumulates into `grad`'s memory.
// Returns null, or an error message (free with nf_free).
char* nf_clear_grad(at::Tensor* var) {
    try {
        var->mutable_grad().reset();
        return nullptr;
    } catch (const c10::Error& e) {
        return copy_message(e.what_without_backtrace());
    } catch (const std::exception& e) {
        return copy_message(e.what());
    }
}

char* nf_set_grad(at::Tensor* var, const at::Tensor* grad) {
    try {
        TORCH_CHECK(var->sizes() == grad->sizes() && var->dtype() == grad->dtype() && var->device() == grad->device(),
                    "a gradient must have its variable's shape, dtype and device");
        var->mutable_grad() = *grad;
        return nullptr;
    } catch (const c10::Error& e) {
        return copy_message(e.what_without_backtrace());
    } catch (const std::exception& e) {
        return copy_message(e.what());
    }
}

// The stream torch launches on for CUDA device `device` (a `cudaStream_t`; null is the legacy
// default stream) into `*out`. Non-zero where libtorch's CUDA support is not loaded. Goes
// through c10's device-generic interface, so this builds without CUDA headers.
int nf_current_cuda_stream(int device, void** out) {
    try {
        const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
        *out = impl->getStream(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device))).native_handle();
        return 0;
    } catch (...) {
        return 1;
    }
}

// `n` bytes copied to CUDA device `device` from pinned host memory, queued on torch's current
// stream without waiting for it (torch's host allocator keeps the pinned block until the copy
// has run). Null with an error message (free with nf_free) where memory cannot be pinned.
at::Tensor* nf_upload_pinned(const uint8_t* bytes, size_t n, int device, char** err) {
    try {
        auto host = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
        std::memcpy(host.data_ptr(), bytes, n);
        auto dev = c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
        return new at::Tensor(host.to(at::TensorOptions().device(dev), /*non_blocking=*/true));
    } catch (const c10::Error& e) {
        *err = copy_message(e.what_without_backtrace());
    } catch (const std::exception& e) {
        *err = copy_message(e.what());
    }
    return nullptr;
}

// Whether autograd records operations on this thread now (not inside `no_grad`, nor inside a
// backward pass).
bool nf_grad_enabled() {
    return at::GradMode::is_enabled();
}

// `a + value * x` (op 0), `a + value * x * y` (1), `a + value * x / y` (2) or `a + value * (x - a)`
// (3, torch's lerp with a scalar weight) as one libtorch operation, the scale a host number:
// one pass where the same in separate operations takes two or three. Into `out` where it is
// not null: one of the operands, of the result's shape, that nothing else reads (the kernels
// are elementwise, so writing over an operand they read is safe, as in-place operations do);
// `out` variants record nothing for autograd, so the caller passes one only where nothing
// requires a gradient.
at::Tensor* nf_scaled_combine(int op, const at::Tensor* a, const at::Tensor* x, const at::Tensor* y, double value, at::Tensor* out, char** err) {
    try {
        at::Tensor r;
        switch (op) {
        case 0: r = out ? at::add_out(*out, *a, *x, value) : at::add(*a, *x, value); break;
        case 1: r = out ? at::addcmul_out(*out, *a, *x, *y, value) : at::addcmul(*a, *x, *y, value); break;
        case 2: r = out ? at::addcdiv_out(*out, *a, *x, *y, value) : at::addcdiv(*a, *x, *y, value); break;
        case 3: r = out ? at::lerp_out(*out, *a, *x, value) : at::lerp(*a, *x, value); break;
        default: TORCH_CHECK(false, "unknown combination ", op);
        }
        return new at::Tensor(std::move(r));
    } catch (const c10::Error& e) {
        *err = copy_message(e.what_without_backtrace());
    } catch (const std::exception& e) {
        *err = copy_message(e.what());
    }
    return nullptr;
}

// torch's fused AdamW — the kernel of `torch.optim.AdamW(fused=True)`, on the CPU or CUDA, for
// f32, bf16 or f16 tensors computed in f32 — one step over `n` parameters with their gradients,
// moments and step counts (f32 scalars, each already counted up to this step, as torch.optim
// does before it calls the kernel): an oracle for our fused kernels, bf16 parameters included.
char* nf_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs, at::Tensor** steps, size_t n,
                     double lr, double beta1, double beta2, double weight_decay, double eps) {
    try {
        auto list = [n](at::Tensor** ts) {
            std::vector<at::Tensor> out;
            for (size_t i = 0; i < n; ++i) out.push_back(*ts[i]);
            return out;
        };
        at::_fused_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), {}, list(steps), lr, beta1, beta2, weight_decay, eps,
                          /*amsgrad=*/false, /*maximize=*/false, std::nullopt, std::nullopt);
        return nullptr;
    } catch (const c10::Error& e) {
        return copy_message(e.what_without_backtrace());
    } catch (const std::exception& e) {
        return copy_message(e.what());
    }
}

}  // extern "C"
