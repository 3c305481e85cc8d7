@paper "Dubey et al. diffGrad: An Optimization Method for Convolutional Neural Networks. IEEE TNNLS 2019. arXiv:1909.11015"
@reference "diffGrad of the paper's code (shivram1987/diffGrad)"
@version "1.0.0"
@doc "Adam whose step is damped by a friction sigmoid(|previous gradient - gradient|)."
optimizer diffgrad(
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    beta1: float = 0.9 in [0, 1) "decay of the first moment",
    beta2: float = 0.999 in [0, 1) "decay of the second moment",
    eps: float = 1e-8 in [0, 1) "added to the denominator",
    weight_decay: float = 0 in [0, 1e6] "L2 penalty, added to the gradient",
) {
    state m = 0
    state v = 0
    state previous_grad = 0

    g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    let friction = sigmoid(abs(previous_grad - g))
    previous_grad = g
    p = p - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * friction * m / (sqrt(v) + eps)
}
