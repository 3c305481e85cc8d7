layer a(x[n, d]; eps: float = 1e-5) {
    let m = x
    m = x * 2
    return m
}
