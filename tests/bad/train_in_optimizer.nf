optimizer o(lr: float = 0.1) {
    p = select(train, p - lr * g, p)
}
