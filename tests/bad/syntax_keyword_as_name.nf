layer let(x[d]) {
    return x
}
