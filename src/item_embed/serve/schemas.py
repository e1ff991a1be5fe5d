"""Response bodies of the HTTP API (pydantic models; they make ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    label: str
    probability: float


class ProductOut(BaseModel):
    id: str
    title: str | None = None
    image_url: str | None = Field(None, description="thumbnail URL, null when the product has no catalog image")
    metadata: dict[str, Any] = Field(default_factory=dict, description="carried catalog columns")


class HitOut(ProductOut):
    score: float = Field(description="cosine similarity to the query (raw; its range depends on the query mode)")
    rank: int = Field(1, description="1-based rank among all results of the query (offset included)")
    relevance: float | None = Field(
        None, ge=0, le=1,
        description="the share of the catalog this hit is closer to the query than: the hit's cosine as a "
                    "percentile of the query's cosines to a fixed random sample of indexed products (up to "
                    "1,000, drawn when the index is loaded). Comparable across query modes, unlike score; "
                    "null when the index gives no sample")
    predicted_category: Prediction | None = Field(None, description="top label when a classifier is loaded")


class QueryOut(BaseModel):
    modalities: list[str] = Field(description="what the query embedding was made from: image, title")
    product: ProductOut | None = Field(None, description="the indexed product searched from (/similar)")
    predicted_category: Prediction | None = None


class SearchOut(BaseModel):
    query: QueryOut
    k: int
    mode: str = Field("joint", description="joint (photo + title), title, photo (photo only) or product (/similar)")
    note: str | None = Field(None, description="what to know about this query's scores (photo-only queries)")
    filter: str | None = Field(None, description="the metadata filter applied (index.filters language)")
    offset: int = Field(0, description="results skipped before these (paging)")
    total: int | None = Field(None, description="products the query could return: those passing the filter "
                                                "(the query product excluded for /similar); null if unknown")
    has_more: bool = Field(False, description="whether a request with offset + k finds more results")
    hits: list[HitOut]
    label_column: str | None = Field(None, description="what the classifier predicts (e.g. category)")
    took_ms: float


class EmbedOut(BaseModel):
    embedding: list[float]
    dim: int
    model_id: str
    modalities: list[str]


class ClassifyOut(BaseModel):
    labels: list[Prediction]
    label_column: str | None
    model_id: str
    modalities: list[str]


class HealthOut(BaseModel):
    status: str
    model_id: str
    precision: str  # what the encoder computes in: fp32 or bf16
    index_size: int
    dim: int
    index_kind: str | None
    classifier: str | None = Field(description="the classifier's label column, null when none is loaded")
    images: bool = Field(description="whether product images can be served")
    max_upload_bytes: int
    max_upload_pixels: int | None = Field(None, description="largest image upload in pixels (read from its header)")
    decode_memory_mb: float | None = Field(None, description="memory image decodes may hold at once, MiB")
    max_k: int
    index_generation: int = Field(0, description="index swaps since start (each reload that was accepted)")
    index_loaded: str | None = Field(None, description="when the index in service was loaded (UTC)")
    last_reload: str | None = Field(None, description="ok or refused: the outcome of the latest reload, "
                                                      "null before any")


class FacetValue(BaseModel):
    value: str | int | float | bool
    count: int


class FacetColumn(BaseModel):
    name: str
    kind: str = Field(description="string, int, float, bool or other (other cannot be filtered)")
    distinct: int = Field(description="distinct non-missing values")
    filterable: bool = Field(description="whether the filter language can name this column")
    values: list[FacetValue] = Field(default_factory=list,
                                     description="each value with its product count, most frequent first; "
                                                 "empty when the column has more than max_values values")


class FacetsOut(BaseModel):
    columns: list[FacetColumn]
    max_values: int
    index_size: int
