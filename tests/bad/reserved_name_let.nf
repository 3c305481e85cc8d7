layer a(x[n, d]; eps: float = 1e-5) {
    let train = x
    return train
}
