@paper "Zhu, Chen, He, LeCun, Liu. Transformers without Normalization. CVPR 2025. arXiv:2503.10622"
@reference "x_transformers.DynamicTanh (the paper's formula; its own code is not on PyPI)"
@version "1.0.0"
@doc "Dynamic Tanh: a learned-scale tanh in place of a normalization layer."
layer dyt(x[..., d]; alpha0: float = 0.5 "initial value of the learned scale alpha") {
    param alpha = alpha0
    param weight[d] = 1
    param bias[d] = 0
    return tanh(alpha * x) * weight + bias
}
