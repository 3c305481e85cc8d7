layer a(x[d]) {
    return x
}

layer a(x[d]) {
    return -x
}
