layer a(x[n, d]; eps: float = 1e-5) {
    param w[d] = mean(x, over n)
    return x * w
}
