layer a(x[d, d]) {
    return x
}
