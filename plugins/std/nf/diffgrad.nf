@paper "Dubey et al. diffGrad: An Optimization Method for Convolutional Neural Networks. IEEE TNNLS 2019. arXiv:1909.11015"
@reference "pytorch_optimizer.DiffGrad (rectify and ams_bound off)"
@version "1.0.0"
@doc "Adam whose step is damped per coordinate by the friction sigmoid(|previous gradient - gradient|)."
optimizer diffgrad(
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    beta1: float = 0.9 in [0, 1) "decay of the first moment",
    beta2: float = 0.999 in [0, 1) "decay of the second moment",
    eps: float = 1e-8 in [0, 1) "added to the denominator",
    weight_decay: float = 0 in [0, 1e6] "weight decay",
    weight_decouple: bool = true "decay the weights (true) or add the decay to the gradient (false)",
    fixed_decay: bool = false "decoupled decay not scaled by the learning rate",
) {
    state m = 0
    state v = 0
    state previous_grad = 0

    g = select(weight_decouple, g, g + weight_decay * p)
    p = select(weight_decouple, p * (1 - weight_decay * select(fixed_decay, 1, lr)), p)
    m = lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    let friction = sigmoid(abs(previous_grad - g))
    previous_grad = g
    p = p - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * friction * m / (sqrt(v) + eps)
}
