layer a(x[n, d]; eps: float = 1e-5) {
    param w[d] = 1
    param w[d] = 0
    return x * w
}
