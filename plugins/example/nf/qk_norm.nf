@paper "Henry, Dachapally, Pawar, Chen. Query-Key Normalization for Transformers. Findings of EMNLP 2020. arXiv:2010.04245"
@reference "the paper's QKNorm: rows L2-normalized, one learned scale initialized from the sequence length"
@version "1.0.0"
@doc "QKNorm: each row over its L2 norm, times one learned scale g that starts at log2(L^2 - L) for sequences of length L."
layer qk_norm(
    x[..., d];
    length: float = 64 in [2, 1e9] "sequence length L, which sets the initial scale",
    eps: float = 1e-6 in (0, 1) "lower bound of the norm",
) {
    param g = log(length * length - length) / log(2)
    return g * x / max(norm(x, over d), eps)
}
