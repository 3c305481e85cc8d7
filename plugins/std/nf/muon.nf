@paper "Jordan et al. Muon: An optimizer for hidden layers in neural networks. 2024. kellerjordan.github.io/posts/muon; Liu et al. Muon is Scalable for LLM Training. 2025. arXiv:2502.16982"
@reference "torch.optim.Muon"
@version "1.0.0"
@doc "Momentum orthogonalized by five Newton-Schulz steps, for 2-D weights; group the other parameters under another rule."
optimizer muon(
    p[o, i] with j = o, k = o, l = i, m = i;
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    weight_decay: float = 0.1 in [0, 1e6] "decoupled weight decay",
    momentum: float = 0.95 in [0, 1) "momentum factor",
    nesterov: bool = true "orthogonalize the Nesterov look-ahead instead of the momentum",
    ns_a: float = 3.4445 "Newton-Schulz coefficient of X",
    ns_b: float = -4.775 "Newton-Schulz coefficient of (X X^T) X",
    ns_c: float = 2.0315 "Newton-Schulz coefficient of (X X^T)^2 X",
    eps: float = 1e-7 in (0, 1) "lower bound of the norm the update is divided by",
    match_rms_adamw: bool = false "scale lr by 0.2 sqrt(max(o, i)) (Moonshot) instead of sqrt(max(1, o / i))",
) {
    state buf = 0

    buf = lerp(buf, g, 1 - momentum)
    let update = select(nesterov, lerp(g, buf, momentum), buf)
    # g becomes the Newton-Schulz iterate X, scaled so that its spectral norm is at most 1.
    g = update / max(norm(update), eps)
    # X <- a X + (b G + c G^2) X, with G the Gram matrix of the shorter side: X X^T (j = o)
    # for a wide X, else X^T X (l = i) on the right. tch computes only the branch taken.
    let tall = size(o) > size(i)
    repeat 5 {
        if tall {
            let gram = sum(g * swap(g, i, l), over o)
            let gram2 = sum(swap(gram, l, m) * swap(gram, i, m), over m)
            let poly = ns_b * gram + ns_c * gram2
            g = ns_a * g + sum(swap(g, i, l) * swap(poly, i, l), over l)
        } else {
            let gram = sum(g * swap(g, o, j), over i)
            let gram2 = sum(swap(gram, j, k) * swap(gram, o, k), over k)
            let poly = ns_b * gram + ns_c * gram2
            g = ns_a * g + sum(poly * swap(g, o, j), over j)
        }
    }
    let scale = select(
        match_rms_adamw,
        0.2 * sqrt(max(size(o), size(i))),
        sqrt(max(1, size(o) / size(i))),
    )
    p = p * (1 - lr * weight_decay)
    p = p - lr * scale * g
}
