@paper "Liu et al. On the Variance of the Adaptive Learning Rate and Beyond. ICLR 2020. arXiv:1908.03265"
@reference "torch.optim.RAdam"
@version "1.0.0"
@doc "Rectified Adam: plain momentum SGD until the variance estimate is reliable, then a rectified Adam step."
optimizer radam(
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    beta1: float = 0.9 in [0, 1) "decay of the first moment",
    beta2: float = 0.999 in [0, 1) "decay of the second moment",
    eps: float = 1e-8 in [0, 1) "added to the denominator",
    weight_decay: float = 0 in [0, 1e6] "L2 penalty, added to the gradient",
) {
    state m = 0
    state v = 0

    g = g + weight_decay * p
    m = lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    let bc2 = 1 - beta2^t
    let m_hat = m / (1 - beta1^t)
    # Length of the approximated simple moving average, and its limit.
    let rho_inf = 2 / (1 - beta2) - 1
    let rho_t = rho_inf - 2 * t * beta2^t / bc2
    let rect = sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    let adaptive = sqrt(bc2) / (sqrt(v) + eps)
    p = p - select(rho_t > 5, m_hat * lr * adaptive * rect, m_hat * lr)
}
