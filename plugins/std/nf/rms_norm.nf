@paper "Zhang, Sennrich. Root Mean Square Layer Normalization. NeurIPS 2019. arXiv:1910.07467"
@reference "torch.nn.functional.rms_norm"
@version "1.0.0"
@doc "Scales each row by the inverse of its root mean square over the last axis; no centring."
layer rms_norm(x[..., d]; eps: float = 1e-8 in (0, 1) "added to the mean square") {
    param weight[d] = 1
    return x * rsqrt(mean(x * x, over d) + eps) * weight
}
