optimizer none() {
    repeat 0 {
        g = 2 * g
    }
    p = p - g
}
