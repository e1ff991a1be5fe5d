"""The models: ITEm's single-stream encoder (``encoder``, ``stems``, ``shape``), its objectives, and
the CLIP-style dual encoder it is measured against (``dual``)."""
