@paper "Heo et al. AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights. ICLR 2021. arXiv:2006.08217"
@reference "adamp.SGDP"
@version "1.0.0"
@doc "SGD with momentum whose update loses its radial component on scale-invariant weights (as AdamP)."
optimizer sgdp(
    p[o, r...];
    lr: float = 0.1 in [0, 1e6] "learning rate",
    momentum: float = 0 in [0, 1) "momentum factor",
    dampening: float = 0 in [0, 1] "dampening of the gradient added to the momentum",
    weight_decay: float = 0 in [0, 1e6] "decoupled weight decay, divided by 1 - momentum",
    nesterov: bool = false "use Nesterov momentum",
    eps: float = 1e-8 in [0, 1) "added to norms",
    delta: float = 0.1 in [0, 1] "cosine threshold for scale invariance",
    wd_ratio: float = 0.1 in [0, 1] "weight decay factor on projected weights",
) {
    state buf = 0

    buf = momentum * buf + (1 - dampening) * g
    let d = select(nesterov, g + momentum * buf, buf)

    # The projection of AdamP (see adamp.nf), applied to the momentum update.
    let cos_channel = abs(sum(g * p, over r)) / (max(norm(g, over r), eps) * max(norm(p, over r), eps))
    let cos_layer = abs(sum(g * p)) / (max(norm(g), eps) * max(norm(p), eps))
    let multi_dim = rank(r) > 0
    let by_channel = multi_dim && max(cos_channel) < delta / sqrt(size(r))
    let by_layer = multi_dim && !by_channel && cos_layer < delta / sqrt(size(o, r))
    # pn = p / (norm + eps); sum(pn * d) is written sum(p * d) / (norm + eps), the same
    # value, so that it needs no norm first and a kernel folds it beside the norms.
    let n_channel = norm(p, over r) + eps
    let n_layer = norm(p) + eps
    let projected = select(
        by_channel,
        d - p / n_channel * (sum(p * d, over r) / n_channel),
        select(by_layer, d - p / n_layer * (sum(p * d) / n_layer), d),
    )
    let wd = select(by_channel || by_layer, wd_ratio, 1)
    p = p * (1 - lr * weight_decay * wd / (1 - momentum))
    p = p - lr * projected
}
