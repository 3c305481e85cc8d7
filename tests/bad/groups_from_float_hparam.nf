layer a(x[n, c]; g: float = 2) {
    return x - mean(x, over c / g)
}
