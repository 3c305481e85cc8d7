@paper "Loshchilov, Hutter. Decoupled Weight Decay Regularization. ICLR 2019. arXiv:1711.05101"
@reference "torch.optim.AdamW"
@version "1.0.0"
@doc "Adam with weight decay decoupled from the gradient: the parameter shrinks before the update."
optimizer adamw(
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    beta1: float = 0.9 in [0, 1) "decay of the first moment",
    beta2: float = 0.999 in [0, 1) "decay of the second moment",
    eps: float = 1e-8 in [0, 1) "added to the denominator",
    weight_decay: float = 1e-2 in [0, 1e6] "decoupled weight decay",
) {
    state m = 0
    state v = 0

    p = p * (1 - lr * weight_decay)
    m = lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    let denom = sqrt(v) / sqrt(1 - beta2^t) + eps
    p = p - lr / (1 - beta1^t) * m / denom
}
