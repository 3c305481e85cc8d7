optimizer gram(p[o, i] with j = o) {
    state s[o, j] = 0
    p = p - g
}
