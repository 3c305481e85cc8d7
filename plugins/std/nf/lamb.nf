@paper "You et al. Large Batch Optimization for Deep Learning: Training BERT in 76 minutes. ICLR 2020. arXiv:1904.00962"
@reference "pytorch_optimizer.Lamb (default options)"
@version "1.0.0"
@doc "LAMB: an Adam direction scaled per tensor by the trust ratio min(|p|, clamp) / |update|."
optimizer lamb(
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    beta1: float = 0.9 in [0, 1) "decay of the first moment",
    beta2: float = 0.999 in [0, 1) "decay of the second moment",
    eps: float = 1e-6 in [0, 1) "added to the denominator and to the update norm",
    weight_decay: float = 0 in [0, 1e6] "decoupled weight decay",
    clamp: float = 10 in (0, 1e6] "upper bound on the weight norm in the trust ratio",
) {
    state m = 0
    state v = 0

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p * (1 - lr * weight_decay)
    # As in the reference: only the first moment is bias-corrected, through the step size.
    let update = m / (sqrt(v) + eps)
    # Per-tensor trust ratio; 1 where either norm is zero.
    let w_norm = min(norm(p), clamp)
    let u_norm = norm(update)
    let trust = select(w_norm == 0 || u_norm == 0, 1, w_norm / (u_norm + eps))
    p = p - lr / (1 - beta1^t) * trust * update
}
