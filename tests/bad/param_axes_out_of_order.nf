layer a(x[n, c, d]) {
    param w[d, c] = 1
    return x * w
}
