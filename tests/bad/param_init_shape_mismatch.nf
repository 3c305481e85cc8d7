optimizer o(lr = 0.1) {
    state v[] = p
    p = p - lr * g
}
