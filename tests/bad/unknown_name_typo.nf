layer a(x[n, d]; eps: float = 1e-5) {
    param weight[d] = 1
    return x * wieght
}
