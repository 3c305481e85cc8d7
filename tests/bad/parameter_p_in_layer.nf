layer a(x[n, d]; eps: float = 1e-5) {
    return x * p
}
