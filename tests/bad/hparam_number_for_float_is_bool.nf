optimizer o(lr: float = true) {
    p = p - lr * g
}
