optimizer o(w[n]; lr = 0.1) {
    w = w - lr * g
}
