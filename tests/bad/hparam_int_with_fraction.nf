layer a(x[n, c]; groups: int = 2.5) {
    return x
}
