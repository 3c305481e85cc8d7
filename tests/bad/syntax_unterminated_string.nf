@paper "Ba et al.
layer a(x[d]) {
    return x
}
