@paper "Heo et al. AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights. ICLR 2021. arXiv:2006.08217"
@reference "adamp.AdamP"
@version "1.0.0"
@doc "Adam whose update loses its radial component on scale-invariant weights (per channel, else per tensor)."
optimizer adamp(
    p[o, r...];
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    beta1: float = 0.9 in [0, 1) "decay of the first moment",
    beta2: float = 0.999 in [0, 1) "decay of the second moment",
    eps: float = 1e-8 in [0, 1) "added to denominators",
    weight_decay: float = 0 in [0, 1e6] "decoupled weight decay",
    delta: float = 0.1 in [0, 1] "cosine threshold for scale invariance",
    wd_ratio: float = 0.1 in [0, 1] "weight decay factor on projected weights",
    nesterov: bool = false "use Nesterov momentum",
) {
    state m = 0
    state v = 0

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    let denom = sqrt(v) / sqrt(1 - beta2^t) + eps
    let perturb = select(nesterov, (beta1 * m + (1 - beta1) * g) / denom, m / denom)

    # Cosine similarity of gradient and weight, per output channel, then over the whole tensor.
    let cos_channel = abs(sum(g * p, over r)) / (max(norm(g, over r), eps) * max(norm(p, over r), eps))
    let cos_layer = abs(sum(g * p)) / (max(norm(g), eps) * max(norm(p), eps))
    let multi_dim = rank(r) > 0
    let by_channel = multi_dim && max(cos_channel) < delta / sqrt(size(r))
    let by_layer = multi_dim && !by_channel && cos_layer < delta / sqrt(size(o, r))

    # pn = p / (norm + eps); sum(pn * perturb) is written sum(p * perturb) / (norm + eps), the same
    # value, so that it needs no norm first and a kernel folds it beside the norms.
    let n_channel = norm(p, over r) + eps
    let n_layer = norm(p) + eps
    let projected = select(
        by_channel,
        perturb - p / n_channel * (sum(p * perturb, over r) / n_channel),
        select(by_layer, perturb - p / n_layer * (sum(p * perturb) / n_layer), perturb),
    )
    let wd = select(by_channel || by_layer, wd_ratio, 1)
    p = p * (1 - lr * weight_decay * wd)
    p = p - lr / (1 - beta1^t) * projected
}
