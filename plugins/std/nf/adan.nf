@paper "Xie, Zhou, Li, Lin, Yan. Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models. TPAMI 2024. arXiv:2208.06677"
@reference "pytorch_optimizer.Adan"
@version "1.0.0"
@doc "Nesterov-style Adam: moments of the gradient and of its change between steps."
optimizer adan(
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    beta1: float = 0.98 in [0, 1) "decay of the gradient moment",
    beta2: float = 0.92 in [0, 1) "decay of the gradient-difference moment",
    beta3: float = 0.99 in [0, 1) "decay of the second moment",
    eps: float = 1e-8 in [0, 1) "added to the denominator",
    weight_decay: float = 0 in [0, 1e6] "weight decay",
    weight_decouple: bool = false "decay before the step (true) or divide after it (false)",
) {
    state m = 0
    state n = 0
    state d = 0
    state previous_grad = 0

    # On the first step there is no previous gradient: the difference is zero.
    let diff = select(t == 1, 0, g - previous_grad)
    m = lerp(m, g, 1 - beta1)
    d = lerp(d, diff, 1 - beta2)
    let u = beta2 * diff + g
    n = beta3 * n + (1 - beta3) * u * u
    let denom = sqrt(n) / sqrt(1 - beta3^t) + eps
    p = select(weight_decouple, p * (1 - lr * weight_decay), p)
    p = p - lr / (1 - beta1^t) * m / denom
    p = p - lr * beta2 / (1 - beta2^t) * d / denom
    p = select(weight_decouple, p, p / (1 + lr * weight_decay))
    previous_grad = g
}
