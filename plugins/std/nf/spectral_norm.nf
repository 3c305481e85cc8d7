@paper "Miyato, Kataoka, Koyama, Yoshida. Spectral Normalization for Generative Adversarial Networks. ICLR 2018. arXiv:1802.05957"
@reference "torch.nn.utils.spectral_norm (dim 0, one power iteration per training forward)"
@version "1.0.0"
@doc "A weight over its largest singular value, estimated by one power-iteration step per training forward; u and v persist as buffers."
reparam spectral_norm(
    w[o, i...];
    eps: float = 1e-12 in (0, 1) "lower bound of the norms in the power iteration",
) {
    # torch starts from random unit vectors; uniform ones serve as well for the iteration.
    buffer u[o] = rsqrt(size(o))
    buffer v[i] = rsqrt(size(i))

    if train {
        # The power iteration is not differentiated, as in torch (which runs it under no_grad).
        let wu = sum(w * u, over o)
        let v_next = stop_gradient(wu / max(norm(wu, over i), eps))
        let wv = sum(w * v_next, over i)
        let u_next = stop_gradient(wv / max(norm(wv, over o), eps))
        u = u_next
        v = v_next
        # sigma = u' W v, differentiated through W only.
        return w / sum(u_next * wv, over o)
    } else {
        return w / sum(u * sum(w * v, over i), over o)
    }
}
