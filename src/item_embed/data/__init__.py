"""Data in: catalogs (``catalog``), photos (``images``), model-ready arrays (``arrays``), the
preprocessing cache (``cache``) and the built-in synthetic catalog (``synthetic``)."""
