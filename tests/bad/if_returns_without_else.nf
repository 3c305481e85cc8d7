layer a(x[n, d]; eps: float = 1e-5) {
    if train {
        return x
    }
    return -x
}
