"""Training: one engine (``engine``) shared by ITEm pre-training (``pretrain``), the dual encoder
(``dual``) and classifier fine-tuning (``classify.fit_finetune``)."""

from .pretrain import train  # noqa: F401  (the verb most callers want)
