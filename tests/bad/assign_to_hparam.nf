layer a(x[n, d]; eps: float = 1e-5) {
    eps = 1
    return x
}
