"""Modality diagnostics of a joint model: how the last layer's [CLS] attention splits between the
photo's patches and the title's tokens."""

from __future__ import annotations

def cls_attention_shares(self_attn, hidden, attention_mask, text_len: int):
    """[CLS] attention mass on text and on image tokens in one BERT layer, averaged over heads.

    self_attn: the layer's ``BertSelfAttention`` (its ``query``/``key`` projections); hidden:
    (B, L, H) the layer's input; attention_mask: (B, L), 1 for real tokens; positions
    [0, text_len) are text ([CLS] and [SEP] included), the rest image patches.
    Returns float32 (B, 2): (text share, image share), each row summing to 1.
    """
    import torch

    # fp32 scores even when the encoder runs under bf16 autocast (a bf16 softmax sums to 1 only roughly).
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        b, length, _ = hidden.shape
        nh, hs = self_attn.num_attention_heads, self_attn.attention_head_size
        q = self_attn.query(hidden[:, :1]).float().view(b, 1, nh, hs).transpose(1, 2)  # (B, nh, 1, hs)
        k = self_attn.key(hidden).float().view(b, length, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
        scores = (q @ k.transpose(-1, -2)).squeeze(2) * hs**-0.5  # (B, nh, L)
        scores = scores.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
        p = scores.softmax(-1).mean(1)  # (B, L), averaged over heads
        return torch.stack([p[:, :text_len].sum(1), p[:, text_len:].sum(1)], dim=1).cpu()  # (B, 2)


class ClsAttentionMeter:
    """While active, each forward pass of an ``ItemModel`` adds up how the last layer's [CLS]
    attention splits between image and text tokens (mean over heads; products with both an image
    and a title only).

    The encoder runs SDPA, which returns no weights: they are recomputed for the last layer alone
    from its own query/key projections applied to its input (captured by a forward pre-hook),
    with the model's own attention mask (``EncoderOutput.attention_mask``).
    """

    def __init__(self, model) -> None:
        self.model = model
        self.layer = model.bert.encoder.layer[-1]
        self.image_sum = self.text_sum = 0.0
        self.count = 0
        self._hidden = None
        self._handles: list = []

    def __enter__(self) -> "ClsAttentionMeter":
        self._handles = [self.layer.register_forward_pre_hook(self._grab, with_kwargs=True),
                         self.model.register_forward_hook(self._measure)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._hidden = [], None

    def _grab(self, module, args, kwargs) -> None:
        self._hidden = args[0] if args else kwargs["hidden_states"]

    def _measure(self, module, args, out) -> None:
        shares = cls_attention_shares(self.layer.attention.self, self._hidden, out.attention_mask, out.text_len)
        mask = out.attention_mask.bool().cpu()
        # An image, and a title beyond [CLS] [SEP].
        both = mask[:, out.text_len:].any(1) & (mask[:, : out.text_len].sum(1) > 2)
        self.text_sum += float(shares[both, 0].sum())
        self.image_sum += float(shares[both, 1].sum())
        self.count += int(both.sum())
        self._hidden = None

    def result(self) -> dict[str, float]:
        n = self.count or float("nan")
        return {"cls_attention_image": self.image_sum / n, "cls_attention_text": self.text_sum / n}
