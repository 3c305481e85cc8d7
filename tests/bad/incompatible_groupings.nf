layer a(x[n, c]) {
    return mean(x, over c / 2) + mean(x, over c / 3)
}
