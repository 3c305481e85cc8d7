@paper "Ginsburg et al. Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of Deep Networks. arXiv:1905.11286"
@reference "pytorch_optimizer.NovoGrad"
@version "1.0.0"
@doc "NovoGrad: the gradient divided by a per-tensor moving average of its squared norm, then momentum."
optimizer novograd(
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    beta1: float = 0.95 in [0, 1) "momentum",
    beta2: float = 0.98 in [0, 1) "decay of the squared gradient norm",
    eps: float = 1e-8 in [0, 1) "added to the denominator",
    weight_decay: float = 0 in [0, 1e6] "weight decay",
    weight_decouple: bool = false "decay the weights (true) or add the decay to the update (false)",
    grad_averaging: bool = false "scale the new update by 1 - beta1 in the momentum",
) {
    state m = 0
    # One value per tensor: the layer-wise second moment.
    state v[] = 0

    let g2 = sum(g * g)
    v = select(t == 1, g2, beta2 * v + (1 - beta2) * g2)
    let scaled = g / (sqrt(v) + eps)
    let update = select(weight_decouple, scaled, scaled + weight_decay * p)
    p = select(weight_decouple, p * (1 - weight_decay * lr), p)
    m = select(t == 1, update, beta1 * m + select(grad_averaging, 1 - beta1, 1) * update)
    p = p - lr * m
}
