layer a(x[n, d]; eps: float = 1e-5) {
    x = x * 2
    return x
}
