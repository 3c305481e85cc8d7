layer whiten(x[n, d] with e = d) {
    return x
}
