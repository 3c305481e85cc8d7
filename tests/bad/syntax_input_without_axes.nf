layer a(x) {
    return x
}
