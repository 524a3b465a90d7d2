"""A small causal (decoder-only) transformer language model with a choice of normalisation.

GPT-style stack (Radford et al., "Language Models are Unsupervised Multitask Learners", 2019):
token + learned absolute position embeddings, `n_layers` pre-norm blocks, a final norm and a
linear head tied to the token embedding (Press & Wolf, EACL 2017). Each block is

    x = x + Attn(Norm(x)),   x = x + MLP(Norm(x))

the pre-LN placement of Xiong et al., "On Layer Normalization in the Transformer Architecture",
ICML 2020, which trains without the careful warmup post-LN needs. `norm` picks the normalisation:

- `layernorm`: `nn.LayerNorm` (Ba et al., 2016): centre by the mean, scale by the std, gain, bias;
- `rmsnorm`: `nn.RMSNorm` (Zhang & Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019):
  scale by the root mean square only, gain and no bias, no mean-centring.

Everything else (biases of the linear layers included) is the same in both, so a table row differs
only in the norm. Attention is `torch.nn.functional.scaled_dot_product_attention` with
`is_causal=True`: position t attends to positions <= t only.

Built by the method from the task's sizes: `configs/model/tiny_lm.yaml` is a `_partial_: true`
factory, called with `vocab_size` and `seq_len` from the data module's `TokenInfo`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


def make_norm(norm: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """`nn.LayerNorm(dim)` or `nn.RMSNorm(dim)` (both with a learned gain, `eps` alike)."""
    if norm not in NORMS:
        from reprolab.utils.naming import unknown_name

        raise ValueError(unknown_name("norm", norm, NORMS))
    return NORMS[norm](dim, eps=eps)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over the past (and present) positions only."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (B, H, T, D / H)
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """One pre-norm transformer block: x + Attn(Norm(x)), then + MLP(Norm(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, norm: str) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.norm2 = make_norm(norm, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TinyCausalLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size).

    Args:
        vocab_size: size of the (compacted) vocabulary.
        seq_len: the longest input (positions have learned embeddings up to it).
        d_model: width of the residual stream.
        n_layers: transformer blocks.
        n_heads: attention heads (must divide `d_model`).
        d_ff: hidden width of the MLP.
        dropout: dropout on embeddings, attention weights and block outputs.
        norm: `layernorm` or `rmsnorm` (every norm of the network, the final one included).
        tie_weights: share the token embedding with the output head.
        name: model config name (lands in the run record).
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int = 512,
        dropout: float = 0.1,
        norm: str = "layernorm",
        tie_weights: bool = True,
        name: str = "tiny_lm",
    ) -> None:
        super().__init__()
        if vocab_size < 2 or seq_len < 1 or n_layers < 1 or n_heads < 1 or d_model % n_heads:
            raise ValueError(
                f"{name}: needs vocab_size >= 2, seq_len >= 1, n_layers >= 1 and n_heads dividing "
                f"d_model (got {vocab_size}, {seq_len}, {n_layers}, {n_heads} / {d_model})."
            )
        self.name = name
        self.vocab_size, self.seq_len, self.norm = int(vocab_size), int(seq_len), norm
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_ff, dropout, norm) for _ in range(n_layers)
        )
        self.norm_f = make_norm(norm, d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init(module: nn.Module) -> None:
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases; PyTorch's default uniform init of
        # nn.Embedding (std 1) would make the tied head's first logits far too large.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[-1]
        if t > self.seq_len:
            raise ValueError(
                f"{self.name}: input of {t} tokens, longer than seq_len={self.seq_len}."
            )
        pos = torch.arange(t, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_f(x))
