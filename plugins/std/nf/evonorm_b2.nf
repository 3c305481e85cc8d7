@paper "Liu, Brock, Simonyan, Le. Evolving Normalization-Activation Layers. NeurIPS 2020. arXiv:2004.02967"
@reference "timm.layers.EvoNorm2dB2"
@version "1.0.0"
@doc "EvoNorm-B2 (timm's variant): divides by the larger of the batch std and the instance RMS minus x."
layer evonorm_b2(
    x[n, c, s...];
    eps: float = 1e-5 in (0, 1) "added to the batch variance and to the mean square",
    momentum: float = 0.1 in [0, 1] "weight of the new batch in the running variance",
) {
    param weight[c] = 1
    param bias[c] = 0
    buffer running_var[c] = 1

    let instance_rms = sqrt(mean(x * x, over s) + eps)
    if train {
        running_var = lerp(running_var, var(x, over n, s, correction = 1), momentum)
        return x / max(sqrt(var(x, over n, s) + eps), instance_rms - x) * weight + bias
    } else {
        return x / max(sqrt(running_var + eps), instance_rms - x) * weight + bias
    }
}
