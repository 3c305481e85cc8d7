optimizer o(lr = 0.1, nesterov: bool = 1) {
    p = p - lr * g
}
