@paper "Nguyen, Salazar. Transformers without Tears: Improving the Normalization of Self-Attention. IWSLT 2019. arXiv:1910.05895"
@reference "torch.nn.functional.normalize (x / max(|x|, eps), as the paper's ScaleNorm computes it) times the learned scale"
@version "1.0.0"
@doc "ScaleNorm: one learned scale g times x over its L2 norm; g starts at sqrt(d)."
layer scale_norm(x[..., d]; eps: float = 1e-5 in (0, 1) "lower bound of the norm") {
    param g = sqrt(size(d))
    return g * x / max(norm(x, over d), eps)
}
