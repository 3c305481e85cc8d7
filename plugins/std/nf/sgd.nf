@paper "Sutskever, Martens, Dahl, Hinton. On the importance of initialization and momentum in deep learning. ICML 2013"
@reference "torch.optim.SGD"
@version "1.0.0"
@doc "Stochastic gradient descent with optional momentum (heavy ball or Nesterov), dampening and L2 weight decay."
optimizer sgd(
    lr: float = 1e-3 in [0, 1e6] "learning rate",
    momentum: float = 0 in [0, 1] "momentum factor",
    dampening: float = 0 in [0, 1] "dampening of the gradient added to the momentum",
    weight_decay: float = 0 in [0, 1e6] "L2 penalty, added to the gradient",
    nesterov: bool = false "use Nesterov momentum",
) {
    state buf = 0

    # As torch.optim.SGD, each term only where its factor is not zero: a backend skips a branch
    # on a hyper-parameter, so plain SGD reads p and g alone and keeps its buffer as it was.
    if weight_decay != 0 {
        g = g + weight_decay * p
    }
    if momentum != 0 {
        # The first step starts the momentum buffer at the gradient itself.
        buf = select(t == 1, g, momentum * buf + (1 - dampening) * g)
        if nesterov {
            g = g + momentum * buf
        } else {
            g = buf
        }
    }
    p = p - lr * g
}
