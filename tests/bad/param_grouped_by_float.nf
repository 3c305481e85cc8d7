layer a(x[n, c]; g: float = 2) {
    param w[c / g] = 1
    return x * w
}
