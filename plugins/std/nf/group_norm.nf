@paper "Wu, He. Group Normalization. ECCV 2018. arXiv:1803.08494"
@reference "torch.nn.functional.group_norm"
@version "1.0.0"
@doc "Normalizes over groups of consecutive channels and the spatial axes, per sample."
layer group_norm(
    x[n, c, s...];
    groups: int = 32 in [1, 1048576] "channels are split into this many groups",
    eps: float = 1e-5 in (0, 1) "added to the variance",
) {
    param weight[c] = 1
    param bias[c] = 0
    let mu = mean(x, over c / groups, s)
    let v = var(x, over c / groups, s)
    return (x - mu) * rsqrt(v + eps) * weight + bias
}
