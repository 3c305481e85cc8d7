@paper "Liu, Brock, Simonyan, Le. Evolving Normalization-Activation Layers. NeurIPS 2020. arXiv:2004.02967"
@reference "timm.layers.EvoNorm2dS2"
@version "1.0.0"
@doc "EvoNorm-S2 (timm's variant): SiLU divided by the group RMS; no batch statistics."
layer evonorm_s2(
    x[n, c, s...];
    groups: int = 32 in [1, 1048576] "channels are split into this many groups",
    eps: float = 1e-5 in (0, 1) "added to the group statistic",
) {
    param weight[c] = 1
    param bias[c] = 0

    let group_rms = sqrt(mean(x * x, over c / groups, s) + eps)
    return x * sigmoid(x) / group_rms * weight + bias
}
