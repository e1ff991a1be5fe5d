"""Fuzzing the service in process (ASGI): no request, however malformed, may be answered with a 5xx.

1. Schemathesis against the app's own OpenAPI schema: every operation gets a bounded number of
   generated requests in schemathesis' positive mode (valid by the schema: titles, k in range,
   random bytes as the image, random and indexed product ids) and, where a request can be invalid,
   its negative mode (wrong types, out-of-range k, missing or extra fields).
2. Image decoders: real PNG/JPEG/GIF/WebP/BMP/TIFF files with Hypothesis-chosen byte flips,
   truncations and splices, uploaded to /embed. Random bytes (what schemathesis sends) never get
   past the format sniffing; these reach the decoders' inner code.

Derandomized, so a failure reproduces; the module stays well under a minute on two cores.
(schemathesis' pytest plugin, ``from_fixture(...).parametrize()``, does not run under pytest 9, so
the cases are drawn with Hypothesis from ``operation.as_strategy``.)
"""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from item_embed.cli import main  # noqa: E402
from item_embed.index.product_index import ProductIndex  # noqa: E402
from item_embed.serve.app import load_service  # noqa: E402

# ITEM_EMBED_FUZZ_EXAMPLES=2000 for a deeper run (minutes).
MAX_EXAMPLES = int(os.environ.get("ITEM_EMBED_FUZZ_EXAMPLES", "100"))
# Operations with something a request can get wrong (k, the form). A product id is any string and
# /health takes nothing: they have no negative cases.
WITH_INVALID = ["POST /search", "GET /similar/{product_id}", "POST /embed", "POST /classify"]
OPERATIONS = WITH_INVALID + ["GET /products/{product_id}/image", "GET /products/{product_id}", "GET /health",
                               "GET /facets"]
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
CASES = [(label, POSITIVE) for label in OPERATIONS] + [(label, NEGATIVE) for label in WITH_INVALID]
FUZZ_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=MAX_EXAMPLES <= 100, database=None,
                         suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_app(tiny_catalog, tiny_run, tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("fuzz")
    emb = root / "emb.parquet"
    assert main(["embed", str(tiny_catalog), "--model", str(tiny_run), "--out", str(emb), "--no-progress"]) == 0
    ProductIndex.from_embedding_file(emb).save(root / "index")
    # A small upload cap, so that generated bodies both under and over it are exercised.
    return load_service(tiny_run, root / "index", max_upload_bytes=200_000)


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


def test_the_fuzzer_sees_every_operation(api_schema):
    """The operations fuzzed below are all that the app serves (a new route cannot go unfuzzed)."""
    assert sorted(op.ok().label for op in api_schema.get_all_operations()) == sorted(OPERATIONS)


@pytest.mark.parametrize("label, mode", CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_no_operation_answers_5xx(api_schema, fuzz_app, label, mode):
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label
    strategy = operation.as_strategy(generation_mode=mode)
    if "{product_id}" in label:
        # Random ids are all 404s: half the cases use indexed ids, to reach the 200 paths too.
        ids = st.sampled_from(fuzz_app.state.service.index.ids[:20])
        strategy = st.one_of(strategy, ids.flatmap(
            lambda pid: operation.as_strategy(generation_mode=mode, path_parameters={"product_id": pid})))
    statuses: list[int] = []

    @given(case=strategy)
    @FUZZ_SETTINGS
    def fuzz(case):
        response = case.call()
        statuses.append(response.status_code)
        assert response.status_code < 500, (
            f"{label} -> {response.status_code}: {response.text[:500]}\nreproduce: {case.as_curl_command()[:2000]}")

    fuzz()
    print(label, mode.value, dict(Counter(statuses)))
    assert statuses, "no request was generated"
    # (No "negative cases are 4xx" check: in a multipart form a "wrong type" title such as True
    # arrives as the string "true", which is a valid title.)
    if mode is POSITIVE and label != "POST /classify":  # no classifier is loaded: /classify is a 404
        assert 200 in statuses, f"no generated request got through: {Counter(statuses)}"


# --------------------------------------------------------------------------------------------
# Damaged images of every format Pillow sniffs, into the decoders
# --------------------------------------------------------------------------------------------


def _seed_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    out = {}
    for fmt, mode, kwargs in [("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "P", {"transparency": 0}),
                              ("JPEG", "RGB", {"quality": 80}), ("JPEG", "CMYK", {}),
                              ("JPEG", "RGB", {"progressive": True}), ("GIF", "P", {}), ("WEBP", "RGB", {}),
                              ("BMP", "RGB", {}), ("TIFF", "RGB", {"compression": "tiff_lzw"}),
                              ("PNG", "I;16", {})]:
        src = im.convert("L").convert("I;16") if mode == "I;16" else im.convert(mode)
        buf = io.BytesIO()
        src.save(buf, format=fmt, **kwargs)
        out[f"{fmt}-{mode}-{len(out)}"] = buf.getvalue()
    return out


SEEDS = _seed_images()


@st.composite
def damaged_images(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "splice", "repeat"]))
        if not data:
            break
        # Headers are where decoders trust numbers: bias positions towards the first bytes.
        pos = draw(st.one_of(st.integers(0, min(64, len(data) - 1)), st.integers(0, len(data) - 1)))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 32))] * draw(st.integers(2, 8))
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Corrupt EXIF data" and the like
def test_damaged_images_are_4xx_never_5xx(fuzz_app):
    statuses: list[int] = []
    with TestClient(fuzz_app, raise_server_exceptions=False) as client:

        @given(data=damaged_images(), with_title=st.booleans())
        @settings(FUZZ_SETTINGS, max_examples=3 * MAX_EXAMPLES)
        def fuzz(data, with_title):
            r = client.post("/embed", files={"image": ("x.img", data, "application/octet-stream")},
                            data={"title": "red mug"} if with_title else {})
            statuses.append(r.status_code)
            assert r.status_code < 500, f"{r.status_code}: {r.text[:300]} for {data[:80]!r}..."

        fuzz()
    print("damaged images", dict(Counter(statuses)))
    # The damage must leave some images decodable and break others, or the decoders were not reached.
    assert 200 in statuses and 422 in statuses, Counter(statuses)
