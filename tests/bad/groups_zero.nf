layer a(x[n, c]) {
    return x - mean(x, over c / 0)
}
