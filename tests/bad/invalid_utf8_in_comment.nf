# café
layer a(x[d]) {
    return x
}
