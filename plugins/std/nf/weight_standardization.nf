@paper "Qiao, Wang, Liu, Shen, Yuille. Micro-Batch Training with Batch-Channel Normalization and Weight Standardization. arXiv:1903.10520"
@reference "timm.layers.StdConv2d"
@version "1.0.0"
@doc "Each output row of a weight standardized to zero mean and unit variance."
reparam weight_standardization(w[o, i...]; eps: float = 1e-6 in (0, 1) "added to the variance") {
    return (w - mean(w, over i)) / sqrt(var(w, over i) + eps)
}
