@paper "You, Gitman, Ginsburg. Large Batch Training of Convolutional Networks. 2017. arXiv:1708.03888"
@reference "pytorch_optimizer.LARS"
@version "1.0.0"
@doc "Momentum SGD whose step on each multi-dimensional tensor is scaled by a layer-wise trust ratio."
optimizer lars(
    p[d...];
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    weight_decay: float = 0 in [0, 1e6] "L2 penalty on multi-dimensional tensors",
    momentum: float = 0.9 in [0, 1] "momentum factor",
    dampening: float = 0 in [0, 1] "dampening of the gradient added to the momentum",
    trust_coefficient: float = 1e-3 in [0, 1e6] "scale of the trust ratio",
    nesterov: bool = false "use Nesterov momentum",
) {
    state buf = 0

    # Layer-wise adaptation: only tensors of two or more dims (not biases or norm scales).
    let p_norm = norm(p)
    let denom = norm(g) + weight_decay * p_norm
    let trust = select(p_norm > 0 && denom > 0, trust_coefficient * p_norm / denom, 1)
    g = select(rank(d) > 1, (g + weight_decay * p) * trust, g)
    buf = momentum * buf + (1 - dampening) * g
    g = select(momentum > 0, select(nesterov, g + momentum * buf, buf), g)
    p = p - lr * g
}
