layer a(x[n, d]; eps: float = 1e-5) {
    if train {
        param w[d] = 1
    }
    return x
}
