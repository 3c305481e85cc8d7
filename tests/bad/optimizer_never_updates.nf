optimizer o(lr: float = 0.1) {
    state m = 0
    m = g
}
