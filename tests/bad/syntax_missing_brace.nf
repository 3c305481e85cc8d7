layer a(x[d]) {
    return x
