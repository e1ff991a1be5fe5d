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
    score: float = Field(description="cosine similarity to the query")
    predicted_category: Prediction | None = Field(None, description="top label when a classifier is loaded")


class QueryOut(BaseModel):
    modalities: list[str] = Field(description="what the query embedding was made from: image, title")
    product: ProductOut | None = Field(None, description="the indexed product searched from (/similar)")
    predicted_category: Prediction | None = None


class SearchOut(BaseModel):
    query: QueryOut
    k: int
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
