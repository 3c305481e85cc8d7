@paper "Zhuang et al. AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients. NeurIPS 2020. arXiv:2010.07468"
@reference "pytorch_optimizer.AdaBelief (default options)"
@version "1.0.0"
@doc "Adam whose second moment tracks the squared deviation of the gradient from its mean (the belief)."
optimizer adabelief(
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    beta1: float = 0.9 in [0, 1) "decay of the first moment",
    beta2: float = 0.999 in [0, 1) "decay of the belief",
    eps: float = 1e-16 in [0, 1) "added to the belief and to the denominator",
    weight_decay: float = 0 in [0, 1e6] "decoupled weight decay",
) {
    state m = 0
    state s = 0

    p = p * (1 - lr * weight_decay)
    m = lerp(m, g, 1 - beta1)
    s = beta2 * s + (1 - beta2) * (g - m) * (g - m) + eps
    p = p - lr / (1 - beta1^t) * m / (sqrt(s) / sqrt(1 - beta2^t) + eps)
}
