"""Acting on embeddings: the vector index behind search and the service (``product_index``) and
duplicate grouping (``dedup``)."""
