@paper "Ba, Kiros, Hinton. Layer Normalization. 2016. arXiv:1607.06450"
@reference "torch.nn.functional.layer_norm"
@version "1.0.0"
@doc "Normalizes each row over its last axis, then scales and shifts per feature."
layer layer_norm(x[..., d]; eps: float = 1e-5 in (0, 1) "added to the variance") {
    param weight[d] = 1
    param bias[d] = 0
    let mu = mean(x, over d)
    let v = var(x, over d)
    return (x - mu) * rsqrt(v + eps) * weight + bias
}
