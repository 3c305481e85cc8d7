layer a(x[d]; eps: float) {
    return x
}
