@paper "Ioffe, Szegedy. Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift. ICML 2015. arXiv:1502.03167"
@reference "torch.nn.functional.batch_norm"
@version "1.0.0"
@doc "Normalizes each channel over the batch and spatial axes; running statistics serve in eval mode."
layer batch_norm(
    x[n, c, s...];
    eps: float = 1e-5 in (0, 1) "added to the variance",
    momentum: float = 0.1 in [0, 1] "weight of the new batch in the running statistics",
) {
    param weight[c] = 1
    param bias[c] = 0
    buffer running_mean[c] = 0
    buffer running_var[c] = 1

    if train {
        let mu = mean(x, over n, s)
        let v = var(x, over n, s)
        running_mean = lerp(running_mean, mu, momentum)
        # The running variance tracks the unbiased batch variance.
        running_var = lerp(running_var, var(x, over n, s, correction = 1), momentum)
        return (x - mu) * rsqrt(v + eps) * weight + bias
    } else {
        return (x - running_mean) * rsqrt(running_var + eps) * weight + bias
    }
}
