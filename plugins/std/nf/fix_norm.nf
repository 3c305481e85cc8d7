@paper "Nguyen, Chiang. Improving Lexical Choice in Neural Machine Translation. NAACL 2018. arXiv:1710.01329; used with ScaleNorm in Nguyen, Salazar, arXiv:1910.05895"
@reference "torch.nn.functional.normalize over each row, times the fixed length"
@version "1.0.0"
@doc "FixNorm: every row of a weight (a word embedding) rescaled to one fixed length; nothing learned but the directions."
reparam fix_norm(
    w[o, i...];
    length: float = 1 in (0, 1e6) "the length every row gets",
    eps: float = 1e-12 in (0, 1) "lower bound of the norm",
) {
    return length * w / max(norm(w, over i), eps)
}
