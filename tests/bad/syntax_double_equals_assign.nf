optimizer o(lr: float = 0.1) {
    p == p - lr * g
}
