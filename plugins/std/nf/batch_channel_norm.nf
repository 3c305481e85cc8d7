@paper "Qiao, Wang, Liu, Shen, Yuille. Micro-Batch Training with Batch-Channel Normalization and Weight Standardization. arXiv:1903.10520"
@reference "the paper's BCNorm (joe-siyuan-qiao/Batch-Channel-Normalization), restated with torch's batch_norm: BatchNorm2d, then group statistics per sample, then a per-group affine"
@version "1.0.0"
@doc "Batch normalization per channel, then channel normalization over groups of channels per sample, with one scale and shift per group."
layer batch_channel_norm(
    x[n, c, s...];
    groups: int = 32 in [1, 1e6] "channel groups of the channel normalization",
    eps: float = 1e-5 in (0, 1) "added to the group variance",
    bn_eps: float = 1e-5 in (0, 1) "added to the batch variance",
    momentum: float = 0.1 in [0, 1] "weight of the new batch in the running statistics",
) {
    param bn_weight[c] = 1
    param bn_bias[c] = 0
    param weight[c / groups] = 1
    param bias[c / groups] = 0
    buffer running_mean[c] = 0
    buffer running_var[c] = 1

    let mu = select(train, mean(x, over n, s), running_mean)
    let v = select(train, var(x, over n, s), running_var)
    if train {
        running_mean = lerp(running_mean, mu, momentum)
        running_var = lerp(running_var, var(x, over n, s, correction = 1), momentum)
    }
    let xb = (x - mu) * rsqrt(v + bn_eps) * bn_weight + bn_bias
    # The channel part always uses the sample's own statistics, in training and in eval.
    let z = (xb - mean(xb, over c / groups, s)) * rsqrt(var(xb, over c / groups, s) + eps)
    return z * weight + bias
}
