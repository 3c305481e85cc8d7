optimizer transpose(p[o, i] with j = o) {
    p = p - swap(g, i, j)
}
