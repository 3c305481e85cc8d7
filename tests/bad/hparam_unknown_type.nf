layer a(x[d]; eps: f16 = 1e-5) {
    return x
}
