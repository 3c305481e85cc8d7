@paper "Salimans, Kingma. Weight Normalization: A Simple Reparameterization to Accelerate Training of Deep Neural Networks. NeurIPS 2016. arXiv:1602.07868"
@reference "torch._weight_norm (the kernel of nn.utils.weight_norm, dim = 0)"
@version "1.0.0"
@doc "A weight as a direction and a length per output row: scale * v / |v|."
reparam weight_norm(v[o, i...]) {
    param scale[o] = 1
    return scale * v / norm(v, over i)
}
