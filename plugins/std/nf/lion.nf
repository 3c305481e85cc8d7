@paper "Chen et al. Symbolic Discovery of Optimization Algorithms. NeurIPS 2023. arXiv:2302.06675"
@reference "lion_pytorch.Lion"
@version "1.0.0"
@doc "Lion: the sign of an interpolation of momentum and gradient; one state tensor."
optimizer lion(
    lr: float = 1e-4 in [0, 1e6] "learning rate",
    beta1: float = 0.9 in [0, 1] "interpolation for the update direction",
    beta2: float = 0.99 in [0, 1] "decay of the momentum",
    weight_decay: float = 0 in [0, 1e6] "decoupled weight decay",
) {
    state m = 0

    let update = sign(beta1 * m + (1 - beta1) * g)
    p = p * (1 - lr * weight_decay) - lr * update
    m = beta2 * m + (1 - beta2) * g
}
