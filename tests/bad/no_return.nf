layer a(x[n, d]; eps: float = 1e-5) {
    let m = mean(x, over d)
}
