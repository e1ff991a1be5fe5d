"""Serving: the search service (``service``), its HTTP app (``app``), response schemas (``schemas``),
product thumbnails (``product_images``) and the search page (``static/``)."""
