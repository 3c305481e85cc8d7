optimizer o(lr: float = 0.1) {
    return p - lr * g
}
