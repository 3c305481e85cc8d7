optimizer o(lr: float = 0.1 in [1, 0]) {
    p = p - lr * g
}
