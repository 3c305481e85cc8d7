@paper "Bernstein, Wang, Azizzadenesheli, Anandkumar. signSGD: Compressed Optimisation for Non-Convex Problems. ICML 2018. arXiv:1802.04434"
@reference "Signum, the paper's Algorithm 1 with momentum"
@version "1.0.0"
@doc "Signum: steps by the sign of a momentum of the gradient, the same length on every coordinate."
optimizer signum(
    lr: float = 1e-4 in [0, 1e6] "learning rate",
    momentum: float = 0.9 in [0, 1) "decay of the momentum",
    weight_decay: float = 0 in [0, 1e6] "decoupled weight decay",
) {
    state m = 0

    m = momentum * m + (1 - momentum) * g
    p = p * (1 - lr * weight_decay) - lr * sign(m)
}
