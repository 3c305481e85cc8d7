@paper "Ulyanov, Vedaldi, Lempitsky. Instance Normalization: The Missing Ingredient for Fast Stylization. 2016. arXiv:1607.08022"
@reference "torch.nn.functional.instance_norm"
@version "1.0.0"
@doc "Normalizes each sample's channel over its spatial axes, with a per-channel affine."
layer instance_norm(x[n, c, s...]; eps: float = 1e-5 in (0, 1) "added to the variance") {
    param weight[c] = 1
    param bias[c] = 0
    let mu = mean(x, over s)
    let v = var(x, over s)
    return (x - mu) * rsqrt(v + eps) * weight + bias
}
