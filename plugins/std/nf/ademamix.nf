@paper "Pagliardini, Ablin, Grangier. The AdEMAMix Optimizer: Better, Faster, Older. 2024. arXiv:2409.03137"
@reference "pytorch_optimizer.AdEMAMix"
@version "1.0.0"
@doc "Adam plus a slow second momentum mixed in with weight alpha; both may warm up over t_alpha_beta3 steps."
optimizer ademamix(
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    beta1: float = 0.9 in [0, 1) "decay of the fast first moment",
    beta2: float = 0.999 in [0, 1) "decay of the second moment",
    beta3: float = 0.9999 in [0, 1) "decay of the slow first moment",
    alpha: float = 5 in [0, 1e6] "weight of the slow momentum",
    t_alpha_beta3: float = 0 in [0, 1e12] "warm-up steps for alpha and beta3 (0: none)",
    eps: float = 1e-8 in [0, 1) "added to the denominator",
    weight_decay: float = 0 in [0, 1e6] "L2 penalty, added to the gradient",
) {
    state m = 0
    state v = 0
    state m_slow = 0

    # The paper's schedulers: alpha rises linearly, beta3 in log space, over t_alpha_beta3 steps.
    let warm = t_alpha_beta3 > 0
    let frac = t / t_alpha_beta3
    let alpha_t = select(warm, min(frac * alpha, alpha), alpha)
    let beta3_t = select(
        warm,
        min(exp(log(beta1) * log(beta3) / ((1 - frac) * log(beta3) + frac * log(beta1))), beta3),
        beta3,
    )

    g = g + weight_decay * p
    m = lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    m_slow = lerp(m_slow, g, 1 - beta3_t)
    p = p - lr * (m / (1 - beta1^t) + alpha_t * m_slow) / (sqrt(v) / sqrt(1 - beta2^t) + eps)
}
