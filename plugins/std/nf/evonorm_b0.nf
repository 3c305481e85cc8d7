@paper "Liu, Brock, Simonyan, Le. Evolving Normalization-Activation Layers. NeurIPS 2020. arXiv:2004.02967"
@reference "timm.layers.EvoNorm2dB0"
@version "1.0.0"
@doc "EvoNorm-B0: divides by the larger of the batch std and v * x + the instance std."
layer evonorm_b0(
    x[n, c, s...];
    eps: float = 1e-3 in (0, 1) "added to both variances",
    momentum: float = 0.1 in [0, 1] "weight of the new batch in the running variance",
) {
    param weight[c] = 1
    param bias[c] = 0
    param v[c] = 1
    buffer running_var[c] = 1

    let instance_std = sqrt(var(x, over s) + eps)
    if train {
        let batch_var = var(x, over n, s)
        running_var = lerp(running_var, var(x, over n, s, correction = 1), momentum)
        return x / max(sqrt(batch_var + eps), v * x + instance_std) * weight + bias
    } else {
        return x / max(sqrt(running_var + eps), v * x + instance_std) * weight + bias
    }
}
