@paper "Jiang, Gu, Zhu, Pan. Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN Transformers. NeurIPS 2023. arXiv:2305.14858"
@reference "torch.nn.functional.rms_norm of the decompressed vector [x, -sum(x)], first d - 1 outputs"
@version "1.0.0"
@doc "Compressed RMSNorm: x holds d - 1 coordinates of a zero-mean d-vector whose last one is -sum(x); RMSNorm of that vector, without building it."
layer crms_norm(x[..., d]; eps: float = 1e-8 in (0, 1) "added to the mean square") {
    param weight[d] = 1
    let s = sum(x, over d)
    return x * rsqrt((sum(x * x, over d) + s * s) / (size(d) + 1) + eps) * weight
}
