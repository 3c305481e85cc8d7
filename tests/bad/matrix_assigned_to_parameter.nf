optimizer gram(p[o, i] with j = o) {
    p = sum(p * swap(p, o, j), over i)
}
