optimizer o(lr: float = 0.1) {
    param w = 1
    p = p - lr * g * w
}
