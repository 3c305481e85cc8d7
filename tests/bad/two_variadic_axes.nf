layer a(x[a..., b...]) {
    return x
}
