@papr "Ba et al. 2016"
layer a(x[d]) {
    return x
}
