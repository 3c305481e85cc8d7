optimizer o(lr = 0.1, beta: float = 1.5 in [0, 1)) {
    p = p - lr * g
}
