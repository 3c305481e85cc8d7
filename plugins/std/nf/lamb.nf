@paper "You et al. Large Batch Optimization for Deep Learning: Training BERT in 76 minutes. ICLR 2020. arXiv:1904.00962"
@reference "pytorch_optimizer.Lamb"
@version "1.0.0"
@doc "LAMB: an Adam direction plus weight decay, scaled per tensor by the trust ratio |p| / |update|."
optimizer lamb(
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    beta1: float = 0.9 in [0, 1) "decay of the first moment",
    beta2: float = 0.999 in [0, 1) "decay of the second moment",
    eps: float = 1e-6 in [0, 1) "added to the denominator",
    weight_decay: float = 0 in [0, 1e6] "weight decay, added to the update",
) {
    state m = 0
    state v = 0

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    let update = m / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * p
    # Per-tensor trust ratio; 1 where either norm is zero.
    let w_norm = norm(p)
    let u_norm = norm(update)
    let trust = select(w_norm > 0 && u_norm > 0, w_norm / u_norm, 1)
    p = p - lr * trust * update
}
