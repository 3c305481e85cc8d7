layer a(x[n, d]; eps: float = 1e-5) {
    if x {
        return x
    } else {
        return -x
    }
}
