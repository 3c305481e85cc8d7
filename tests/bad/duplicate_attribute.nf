@paper "one"
@paper "two"
layer a(x[d]) {
    return x
}
