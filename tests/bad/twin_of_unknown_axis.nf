optimizer gram(p[o, i] with j = q) {
    p = p - g
}
