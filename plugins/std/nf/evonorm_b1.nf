@paper "Liu, Brock, Simonyan, Le. Evolving Normalization-Activation Layers. NeurIPS 2020. arXiv:2004.02967"
@reference "timm.layers.EvoNorm2dB1"
@version "1.0.0"
@doc "EvoNorm-B1 (timm's variant): divides by the larger of the batch std and (x + 1) times the instance RMS."
layer evonorm_b1(
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
        return x / max(sqrt(var(x, over n, s) + eps), (x + 1) * instance_rms) * weight + bias
    } else {
        return x / max(sqrt(running_var + eps), (x + 1) * instance_rms) * weight + bias
    }
}
