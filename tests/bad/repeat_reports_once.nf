optimizer loop() {
    repeat 3 {
        g = g + undefined_name
    }
    p = p - g
}
