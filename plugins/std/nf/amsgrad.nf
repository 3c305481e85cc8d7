@paper "Reddi, Kale, Kumar. On the Convergence of Adam and Beyond. ICLR 2018. arXiv:1904.09237"
@reference "torch.optim.Adam(amsgrad=True)"
@version "1.0.0"
@doc "Adam that divides by the running maximum of the second moment, so steps never grow from it."
optimizer amsgrad(
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    beta1: float = 0.9 in [0, 1) "decay of the first moment",
    beta2: float = 0.999 in [0, 1) "decay of the second moment",
    eps: float = 1e-8 in [0, 1) "added to the denominator",
    weight_decay: float = 0 in [0, 1e6] "L2 penalty, added to the gradient",
) {
    state m = 0
    state v = 0
    state v_max = 0

    g = g + weight_decay * p
    m = lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    v_max = max(v_max, v)
    p = p - lr / (1 - beta1^t) * m / (sqrt(v_max) / sqrt(1 - beta2^t) + eps)
}
