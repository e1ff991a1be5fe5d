"""The FastAPI app over a loaded search service: ``create_app`` from loaded objects (what the tests
use), ``load_service`` from folders (what ``item-embed serve`` runs)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Callable, Iterable

from fastapi import FastAPI, File, Form, HTTPException, Path as PathParam, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers

from ..data import remote
from ..data.catalog import Catalog, Columns
from ..data.images import DEFAULT_MAX_PIXELS, ImageLimits
from ..encode import ItemEncoder
from ..index.milvus_index import MilvusSource, load_index
from ..index.product_index import ProductIndex
from .product_images import ProductImages, clean_id
from .memory import DEFAULT_DECODE_MEMORY_MB, DEFAULT_UPLOAD_MAX_PIXELS, MIB
from .schemas import ClassifyOut, EmbedOut, FacetsOut, HealthOut, ProductOut, SearchOut
from .security import ApiKeyCheck, ApiKeys, KEY_HEADER, RateLimit, RateLimiter, check_origin
from .server import HostPolicy
from .service import DEFAULT_MAX_UPLOAD_BYTES, MAX_K, MAX_OFFSET, SearchQuery, SearchService, ServiceLoadError
from ..index.filters import MAX_FILTER_CHARS

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, headers, the title and k on top of the file
MAX_TITLE_BYTES = 16 * 1024
CATALOG_PROBE = 200  # catalog ids looked up in a Milvus index to check that the catalog is its


class _BodyLimit:
    """413 with a JSON message for request bodies over ``limit`` bytes.

    A Content-Length over the limit is refused before any byte is read; a body without one
    (chunked) is counted as it arrives and refused as soon as it passes the limit, so at most
    ``limit`` bytes plus one ASGI message are read.
    """

    def __init__(self, app, limit: int, message: str) -> None:
        self.app, self.limit, self.message = app, limit, message

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.limit):
            bad = not length.strip().isdigit()
            response = JSONResponse({"detail": "invalid Content-Length" if bad else self.message},
                                    status_code=400 if bad else 413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # raised inside form parsing: FastAPI passes HTTPExceptions on
                    raise HTTPException(413, self.message, headers={"Connection": "close"})
            return message

        await self.app(scope, counted, send)


class _HostCheck:
    """400 for a request whose Host header is not one of the service's names (DNS rebinding: a page
    of another site whose name was re-pointed at this address would otherwise be answered)."""

    def __init__(self, app, policy: HostPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = Headers(scope=scope).get("host")
        if self.policy.allows(host):
            return await self.app(scope, receive, send)
        shown = (host or "")[:100]
        response = JSONResponse({"detail": f"Host {shown!r} is not served here: start item-embed serve with "
                                           "--allowed-host NAME for each name clients use"},
                                status_code=400, headers={"Connection": "close"})
        await response(scope, receive, send)


ImageField = Annotated[UploadFile | None, File(description="query image (JPEG, PNG, WebP, ...)")]
TitleField = Annotated[str | None, Form(description="query title")]
KForm = Annotated[int, Form(ge=1, le=MAX_K, description="number of results")]
KQuery = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
_FILTER_HELP = 'metadata filter, exact: e.g. category == "bag" and colour in ["red", "blue"] (see GET /facets)'
FilterForm = Annotated[str | None, Form(max_length=MAX_FILTER_CHARS, description=_FILTER_HELP)]
FilterQuery = Annotated[str | None, Query(max_length=MAX_FILTER_CHARS, description=_FILTER_HELP)]
OffsetForm = Annotated[int, Form(ge=0, le=MAX_OFFSET, description="results to skip (paging: the next page is offset + k)")]
OffsetQuery = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="results to skip (paging: the next page is offset + k)")]
IdPath = Annotated[str, PathParam(description="product id")]


def _first_error(errors: list[dict]) -> str:
    if not errors:
        return "invalid request"
    e = errors[0]
    where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path"))
    return f"{where}: {e.get('msg', 'invalid value')}" if where else str(e.get("msg", "invalid request"))


def create_app(encoder: ItemEncoder, index: ProductIndex, classifier=None, catalog: Catalog | ProductImages | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS, *,
               threads: int = 2, title_column: str = "title", index_dir: str | Path | None = None,
               images_loader: Callable[[ProductIndex], ProductImages | None] | None = None,
               max_upload_pixels: int = DEFAULT_UPLOAD_MAX_PIXELS, decode_memory_mb: float = DEFAULT_DECODE_MEMORY_MB,
               allowed_hosts: HostPolicy | Iterable[str] | None = None, api_keys: ApiKeys | Iterable[str] | None = None,
               cors_origins: Iterable[str] = (), rate_limit: float = 0, rate_burst: int | None = None) -> FastAPI:
    """The search app over loaded objects.

    encoder: the model that built ``index`` (checked by model id); classifier: a
    ``classify.Classifier`` (linear on this encoder, or fine-tuned with its own); catalog: where
    product images come from (a ``Catalog`` or ``ProductImages``; None: no images);
    max_upload_bytes: largest accepted image upload (the whole request body gets a little more
    for the multipart framing and the title); max_pixels: pixel cap checked on the image header
    before decoding (catalog images and uploads); max_upload_pixels: a lower cap for uploads;
    decode_memory_mb: what image decodes may hold at once (an upload that would need more alone is
    refused); threads: image decodes + forward passes allowed to run at once; allowed_hosts: the
    Host names answered (a HostPolicy or names; None: any, as for a library or test client); index_dir:
    where ``app.state.service.reload_index()`` reads a rebuilt index from; images_loader: catalog
    images for a reloaded index (default: re-read from ``catalog`` when it is a Catalog, else kept).

    Access (``serve.security``): api_keys: the keys every route but /health, / and /static needs (an
    ``ApiKeys`` or the keys; None: open); cors_origins: origins whose pages may call the API from a
    browser (none: no CORS headers); rate_limit: requests a minute per client address, ``rate_burst``
    at once (0: no limit).
    """
    images = catalog
    if isinstance(catalog, Catalog):
        # Catalog files are the operator's: the upload byte cap does not apply, the pixel cap does.
        limits = ImageLimits(max_pixels=int(max_pixels))
        images = ProductImages.from_catalog(catalog, _listed_ids(index), limits)
        if images_loader is None:
            images_loader = lambda new: ProductImages.from_catalog(catalog, _listed_ids(new), limits)  # noqa: E731
    svc = SearchService(encoder, index, classifier, images, max_upload_bytes, max_pixels, threads, title_column,
                        index_dir=index_dir, images_loader=images_loader, max_upload_pixels=max_upload_pixels,
                        decode_memory_bytes=int(decode_memory_mb * MIB))
    body_limit = int(max_upload_bytes) + FORM_OVERHEAD_BYTES

    app = FastAPI(
        title="item-embed search",
        version="1",
        summary="Nearest products to an image and/or a title, from ITEm product embeddings.",
        form_limits={"max_files": 1, "max_fields": 8, "max_part_size": MAX_TITLE_BYTES},
    )
    app.state.service = svc

    app.add_middleware(_BodyLimit, limit=body_limit,
                       message=f"request too large: image uploads are limited to {svc.max_upload_bytes:,} bytes")
    # Starlette runs the middleware added last first: Host check, CORS, rate limit, API key, body limit.
    if api_keys is not None:
        app.add_middleware(ApiKeyCheck, keys=api_keys if isinstance(api_keys, ApiKeys) else ApiKeys(api_keys))
    if rate_limit:  # before the key check: guessing keys is limited too
        app.add_middleware(RateLimit, limiter=RateLimiter(rate_limit, rate_burst))
    origins = [check_origin(o) for o in cors_origins]
    if origins:  # outside the key check: a preflight (OPTIONS) carries no key, and 401s/429s get the headers
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", KEY_HEADER, "Content-Type"], expose_headers=["Retry-After"],
                           max_age=600)
    if allowed_hosts is not None:  # added last: the outermost check, before anything reads the body
        policy = allowed_hosts if isinstance(allowed_hosts, HostPolicy) else HostPolicy(frozenset(
            h.strip().lower() for h in allowed_hosts))
        app.add_middleware(_HostCheck, policy=policy)
    _add_error_handlers(app)
    _add_routes(app, svc)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _listed_ids(index) -> list[str] | None:
    """The ids to keep catalog images for: a FAISS index's; None (every catalog row) for a Milvus
    index, whose ids are not read through."""
    return index.ids if isinstance(index, ProductIndex) else None


def _add_error_handlers(app: FastAPI) -> None:
    """Every client error is a 4xx with ``{"detail": message}``; anything unexpected a logged, generic 500."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={Exception: str, bytes: lambda b: f"<{len(b)} bytes>"})
        return JSONResponse({"detail": _first_error(errors), "errors": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error (logged on the server)"}, status_code=500)


async def _read_query(svc: SearchService, image: UploadFile | None, title: str | None) -> SearchQuery:
    """The request's image bytes (never more than the cap + 1 read) and/or its title."""
    data = None
    if image is not None:
        data = await image.read(svc.max_upload_bytes + 1)
        if len(data) > svc.max_upload_bytes:
            raise HTTPException(413, f"image upload is over the {svc.max_upload_bytes:,}-byte limit")
        if not data:
            if image.filename:
                raise HTTPException(422, f"uploaded image {image.filename!r} is empty")
            data = None  # a form's empty file field: no image chosen
    text = " ".join(title.split()) if title else None
    query = SearchQuery(data, text or None)
    if query.image is None and query.title is None:
        raise HTTPException(422, "give an image, a title, or both")
    return query


def _add_routes(app: FastAPI, svc: SearchService) -> None:
    """The endpoints: thin async wrappers that run the service's CPU-bound work in worker threads."""

    @app.post("/search", response_model=SearchOut, summary="Nearest products to an image and/or a title")
    async def search(image: ImageField = None, title: TitleField = None, k: KForm = 10, filter: FilterForm = None,
                     offset: OffsetForm = 0) -> SearchOut:
        query = await _read_query(svc, image, title)
        return await run_in_threadpool(svc.search, query, k, filter, offset)

    @app.get("/similar/{product_id:path}", response_model=SearchOut, summary="Nearest products to an indexed product")
    def similar(product_id: IdPath, k: KQuery = 10, filter: FilterQuery = None, offset: OffsetQuery = 0) -> SearchOut:
        return svc.similar(product_id, k, filter, offset)

    @app.get("/facets", response_model=FacetsOut, summary="Metadata columns and their values (for filters)")
    def facets() -> FacetsOut:
        return svc.facets()

    @app.post("/embed", response_model=EmbedOut, summary="Embedding of an image and/or a title")
    async def embed(image: ImageField = None, title: TitleField = None) -> EmbedOut:
        query = await _read_query(svc, image, title)
        vector = await run_in_threadpool(svc.embed, query)
        return EmbedOut(embedding=vector.astype(float).tolist(), dim=int(vector.shape[0]),
                        model_id=svc.encoder.model_id, modalities=query.modalities)

    @app.post("/classify", response_model=ClassifyOut, summary="Top-k labels of an image and/or a title",
              responses={404: {"description": "no classifier loaded"}})
    async def classify(image: ImageField = None, title: TitleField = None, k: KForm = 5) -> ClassifyOut:
        if svc.classifier is None:  # before decoding the upload: nothing to do with it
            raise HTTPException(404, "no classifier is loaded: start the service with --classifier CLF_DIR")
        query = await _read_query(svc, image, title)
        return await run_in_threadpool(svc.classify, query, k)

    # The image route comes first: "{id:path}" would otherwise swallow "/image".
    @app.get("/products/{product_id:path}/image", summary="The product's catalog image (JPEG thumbnail)",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def product_image(product_id: IdPath) -> Response:
        return Response(svc.thumbnail(product_id), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/products/{product_id:path}", response_model=ProductOut, summary="Metadata of an indexed product")
    def product(product_id: IdPath) -> ProductOut:
        return svc.product(product_id)

    @app.get("/health", response_model=HealthOut, summary="Model, index and limits")
    def health() -> HealthOut:
        return svc.health()

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def load_service(model_dir: str | Path, index_dir: str | Path | MilvusSource, classifier_dir: str | Path | None = None,
                 catalog: str | Path | None = None, image_root: str | Path | None = None, *,
                 columns: Columns | None = None, device: str | None = None, precision: str = "auto",
                 **app_options) -> FastAPI:
    """Load the model, its index (refused when built by another model), the classifier and the
    catalog images, and build the app. ``catalog`` / ``image_root`` default to the ones the
    embeddings were made from (recorded in the index); ``precision`` is the encoder's (auto, bf16 or
    fp32); ``app_options`` go to :func:`create_app`.
    """
    from ..classify import Classifier

    encoder = ItemEncoder.from_pretrained(model_dir, device=device, precision=precision)
    index = load_index(index_dir, expected_model_id=encoder.model_id)  # a folder, or a MilvusSource
    classifier = Classifier.load(classifier_dir, device=device, precision=precision) if classifier_dir is not None else None
    columns = columns or Columns()
    max_pixels = app_options.get("max_pixels", DEFAULT_MAX_PIXELS)

    def images_for(ix: ProductIndex) -> ProductImages | None:
        """Catalog images of ``ix``'s products; re-read for a reloaded index (its catalog may be new)."""
        source = catalog if catalog is not None else ix.catalog
        if source is None:
            return None
        root = image_root if image_root is not None else (ix.image_root if catalog is None else None)
        if catalog is None and not remote.is_uri(source) and not Path(source).is_file():
            logger.warning("catalog %s recorded in the index is gone: product images will not be shown "
                           "(pass --catalog)", source)
            return None
        cat = Catalog.open(source, columns, root, read_columns=[columns.id, columns.image])
        if columns.image not in cat.column_names:
            raise ServiceLoadError(f"catalog {source} has no image column {columns.image!r}: map it with --image-column")
        images = ProductImages.from_catalog(cat, _listed_ids(ix), ImageLimits(max_pixels=max_pixels))
        # A Milvus index is asked about the first ids only (one lookup each).
        ids = cat.frame[columns.id] if isinstance(ix, ProductIndex) else cat.frame[columns.id].head(CATALOG_PROBE)
        if len(cat) and not any(clean_id(i) in ix for i in ids if clean_id(i) is not None):
            raise ServiceLoadError(f"catalog {source} shares no product id with the index: wrong catalog?")
        if len(images) < len(ix):
            logger.info("%d of %d indexed products have a catalog image", len(images), len(ix))
        return images

    return create_app(encoder, index, classifier, images_for(index), index_dir=index_dir, images_loader=images_for,
                      **app_options)
