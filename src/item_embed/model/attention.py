"""The encoder's dropout and attention: the same maths as PyTorch's, cheaper on the CPU.

On the CPU, ``F.dropout`` draws one 32-bit Mersenne Twister number per element through
``bernoulli_``: 42% of a bf16 training forward (benchmarks/RESULTS.md). :func:`dropout` fills a
64-bit buffer in one bulk ``random_`` and reads it as four 16-bit numbers, so an element is dropped
with probability round(p * 65536) / 65536 (p within 8e-6) at about a quarter of the cost.

Attention on the CPU is written out (scores, softmax, this dropout, weighted sum): with dropout,
SDPA falls back to its math kernel and ``bernoulli_``; without it, its bf16 flash backward is slower
than the written-out one (bench_train.py). Elsewhere (CUDA) both are PyTorch's own kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

ATTENTION = "item_embed"  # the attention implementation name the encoder's BertConfig carries
_LEVELS = 1 << 16


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout: zero each element with probability ~p, scale the rest by the exact keep rate."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    cut = round(p * _LEVELS)
    if not 0 < cut < _LEVELS:
        return F.dropout(x, p, True)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # every bit uniform
    keep = bits.view(torch.int16)[:n].view(x.shape) >= cut - (1 << 15)
    return x.mul(keep).mul_(_LEVELS / (_LEVELS - cut))


class Dropout(nn.Module):
    """``nn.Dropout`` through :func:`dropout`; ``p`` is read by the attention layers as theirs is."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (B, heads, S, d) inputs -> (B, S, heads, d), no weights.
    ``attention_mask`` is SDPA's boolean mask (True = attend) or None."""
    if query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)).mul_(scale)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = _dropout(scores.softmax(-1), dropout, module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


_dropout = dropout  # ``attention``'s keyword argument of that name is the probability


def use_cheap_dropout(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Dropout`` inside ``model`` with :class:`Dropout` of the same ``p`` (no weights move)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p))
    return model


def attention_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers' SDPA mask. Its skip when nothing is padded asks the device ``padding_mask.all()``,
    which would stall a GPU training step's host: so with gradients on (training) the mask is always
    made; without (encoding, serving) an unpadded batch still runs maskless (SDPA's flash kernel on a GPU)."""
    skip = kwargs.get("allow_is_bidirectional_skip", True) and not torch.is_grad_enabled()
    return sdpa_mask(*args, **{**kwargs, "allow_is_bidirectional_skip": skip})


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, attention_mask)
