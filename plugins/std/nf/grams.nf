@paper "Cao, Li, Song. Grams: Gradient Descent with Adaptive Momentum Scaling. 2024. arXiv:2412.17107"
@reference "pytorch_optimizer.Grams"
@version "1.0.0"
@doc "The magnitude of Adam's update with the sign of the current gradient."
optimizer grams(
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    beta1: float = 0.9 in [0, 1) "decay of the first moment",
    beta2: float = 0.999 in [0, 1) "decay of the second moment",
    eps: float = 1e-6 in [0, 1) "added to the denominator",
    weight_decay: float = 0 in [0, 1e6] "decoupled weight decay",
) {
    state m = 0
    state v = 0

    m = lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    let update = abs(m / (1 - beta1^t) / (sqrt(v) / sqrt(1 - beta2^t) + eps)) * sign(g)
    p = p * (1 - lr * weight_decay)
    p = p - lr * update
}
