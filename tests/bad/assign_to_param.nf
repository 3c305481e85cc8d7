layer a(x[n, d]; eps: float = 1e-5) {
    param w[d] = 1
    w = w * 2
    return x * w
}
