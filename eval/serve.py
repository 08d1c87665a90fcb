"""Serve a trained classifier over HTTP: class probabilities from label-word scoring, micro-batched.

    python eval/serve.py --adapter outputs/cpu-smollm2-lora/final          # http://127.0.0.1:8000 (the page: /)
    curl -s 127.0.0.1:8000/v1/classify -d '{"texts": ["房间很干净，服务也很热情"]}'
    SENTIMENT_SERVE_API_KEY=... python eval/serve.py --adapter DIR --host 0.0.0.0   # exposed: bearer token

Routes: POST /v1/classify {"texts": [...]} -> {"predictions": [{"label", "label_id", "probs"}], "model"};
GET /v1/model (base, labels, template, the model card's metrics); GET /healthz (200 once the model has loaded,
503 before); GET / (a page to try it). The model loads once, in the background, so /healthz answers at once.
Texts from concurrent requests are scored together by the micro-batcher (sft/serving.py); the predictions are
SentimentPredictor's. Bad input gets a 4xx with {"error": "..."}; SIGTERM stops accepting, lets the requests in
flight finish and exits 0.
"""

import argparse
import asyncio
import dataclasses
import hmac
import ipaddress
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from sft.predictor import SentimentPredictor
from sft.serving import Limits, MicroBatcher, RequestError, check_body_size, parse_texts

try:
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException
except ImportError as e:  # the `serve` extra
    sys.exit(f"error: serving needs {e.name}: pip install -e '.[serve]' (fastapi, uvicorn)")

API_KEY_ENV = "SENTIMENT_SERVE_API_KEY"
PAGE = Path(__file__).with_name("serve_page.html")
ROUTES = "POST /v1/classify, GET /v1/model, GET /healthz, GET /"
logger = logging.getLogger("eval.serve")


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What the app needs besides the model: where it came from (for /v1/model), batching, limits and the key."""

    adapter: str | None = None
    base: str | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    limits: Limits = Limits()
    api_key: str | None = None


def model_info(options: ServeOptions, template) -> dict:
    """GET /v1/model: the run's name, base, kind, labels, prompt template and the model card's figures."""
    from sft.artifacts import RunInfo
    from sft.model_card import run_name, stored_results

    run = RunInfo.load(options.adapter) if options.adapter else None
    return {"model": run_name(options.adapter) if options.adapter else options.base,
            "base": options.base or (run.base_model if run else None),
            "kind": run.kind if run else "zero-shot", "labels": list(template.verbalizers),
            "template": dataclasses.asdict(template),
            "metrics": stored_results(options.adapter) if options.adapter else {},
            "batching": {"max_batch_size": options.max_batch_size, "max_wait_ms": options.max_wait_ms},
            "limits": {**dataclasses.asdict(options.limits), "max_body_bytes": options.limits.max_body_bytes}}


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def one_line(e: BaseException) -> str:
    return "; ".join(str(e).splitlines()) or type(e).__name__


# ----- the app ----------------------------------------------------------------------------------------------------
def build_app(load: Callable[[], SentimentPredictor], options: ServeOptions,
              on_load_error: Callable[[], None] = lambda: None) -> FastAPI:
    """The FastAPI app. `load` builds the predictor (in a thread, after startup); `on_load_error` is called if it
    raises (the command line stops the server; /healthz then reports the error)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loading = asyncio.create_task(_load(app, load, options, on_load_error))
        yield
        await asyncio.wait([app.state.loading])  # a load still running: its thread cannot be interrupted
        if app.state.batcher is not None:
            await app.state.batcher.close()

    app = FastAPI(title="Sentiment classifier", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.options, app.state.batcher, app.state.info, app.state.load_error = options, None, None, None
    _add_error_handlers(app)
    auth = [Depends(require_key)]
    app.add_api_route("/", page, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/v1/model", model, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/classify", classify, methods=["POST"], dependencies=auth)
    return app


async def _load(app: FastAPI, load: Callable[[], SentimentPredictor], options: ServeOptions,
                on_error: Callable[[], None]) -> None:
    start = time.perf_counter()
    try:
        predictor = await asyncio.to_thread(load)
        info = model_info(options, predictor.template)
    except Exception as e:  # noqa: BLE001 - any load failure is reported in one line and stops the server
        app.state.load_error = f"{options.adapter or options.base}: {one_line(e)}"
        logger.error("could not load the model %s", app.state.load_error)
        on_error()
        return
    batcher = MicroBatcher(predictor.predict_batch, options.max_batch_size, options.max_wait_ms / 1000)
    batcher.start()
    app.state.info, app.state.batcher = info, batcher
    logger.info("model %s loaded in %.1f s; ready", info["model"], time.perf_counter() - start)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is {"error": one line}: unknown routes and methods too, and never a traceback for bad input."""

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, e: RequestError) -> JSONResponse:
        return error(e.status, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}; routes: {ROUTES}",
                   405: f"{request.method} is not allowed on {request.url.path}; routes: {ROUTES}"}.get(
            e.status_code, str(e.detail))
        return error(e.status_code, message, e.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, f"internal error: {one_line(e)}")


async def require_key(request: Request) -> None:
    """Bearer-token check for /v1/* when the server has a key (constant-time comparison)."""
    key = request.app.state.options.api_key
    if not key:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise HTTPException(401, "wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def _ready(request: Request):
    """The batcher, or a 503 JSONResponse while the model loads (or after it failed to)."""
    state = request.app.state
    if state.batcher is not None:
        return state.batcher
    return error(503, f"model failed to load: {state.load_error}" if state.load_error else "model is loading")


# ----- routes -----------------------------------------------------------------------------------------------------
async def page(request: Request) -> str:
    needs_key = "true" if request.app.state.options.api_key else "false"
    return PAGE.read_text(encoding="utf-8").replace("__NEEDS_KEY__", needs_key)


async def healthz(request: Request):
    batcher = _ready(request)
    if isinstance(batcher, JSONResponse):
        status = "failed" if request.app.state.load_error else "loading"
        return JSONResponse({"status": status, "error": request.app.state.load_error}, status_code=503)
    return {"status": "ok", "model": request.app.state.info["model"], "batching": batcher.stats()}


async def model(request: Request):
    ready = _ready(request)
    return ready if isinstance(ready, JSONResponse) else request.app.state.info


async def classify(request: Request):
    texts = parse_texts(await read_body(request, request.app.state.options.limits), request.app.state.options.limits)
    batcher = _ready(request)
    if isinstance(batcher, JSONResponse):
        return batcher
    return {"predictions": await batcher.submit(texts), "model": request.app.state.info["model"]}


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused (413) as soon as it is known to be over the cap: a huge upload is never held whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        check_body_size(int(declared), limits)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        check_body_size(len(body), limits)
    return bytes(body)


# ----- command line -----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="training output directory (adapter or full model) from sft/train.py")
    p.add_argument("--base", help="base model (default: the one recorded in --adapter; alone: scored zero-shot)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", help=f"require 'Authorization: Bearer KEY' on /v1/* (or set ${API_KEY_ENV}, "
                   "which keeps the key out of the process list)")
    p.add_argument("--max_batch_size", type=int, default=32, help="texts per scorer call (default: 32)")
    p.add_argument("--max_wait_ms", type=float, default=5.0,
                   help="how long a text may wait for others to share its batch (default: 5)")
    p.add_argument("--max_texts", type=int, default=64, help="texts per request (default: 64)")
    p.add_argument("--max_text_bytes", type=int, default=4096, help="UTF-8 bytes per text (default: 4096)")
    p.add_argument("--graceful_timeout", type=float, default=60.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default: 60)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    p.add_argument("--access_log", action="store_true", help="log every request")
    p.add_argument("--verbose", action="store_true", help="library INFO logs and the warnings filtered by default")
    args = p.parse_args(argv)
    if args.adapter is None and args.base is None:
        p.error("give --adapter DIR and/or --base MODEL")
    if min(args.max_batch_size, args.max_texts, args.max_text_bytes) < 1 or args.max_wait_ms < 0:
        p.error("--max_batch_size, --max_texts and --max_text_bytes must be >= 1, --max_wait_ms >= 0")
    return args


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve_options(args: argparse.Namespace, environ) -> ServeOptions:
    """The options from the command line; the key from --api_key, else $SENTIMENT_SERVE_API_KEY (empty: none)."""
    return ServeOptions(args.adapter, args.base, args.max_batch_size, args.max_wait_ms,
                        Limits(args.max_texts, args.max_text_bytes), args.api_key or environ.get(API_KEY_ENV) or None)


def serve(args: argparse.Namespace) -> int:
    """Run uvicorn until SIGTERM (0) or a failed model load (2); Ctrl-C ends in KeyboardInterrupt (main: 130)."""
    options = serve_options(args, os.environ)
    if not is_loopback(args.host) and not options.api_key:
        logger.warning("binding %s without an API key: anyone who can reach this port can use the model (set $%s)",
                       args.host, API_KEY_ENV)

    def load() -> SentimentPredictor:
        return SentimentPredictor(args.base, args.adapter, args.device, args.dtype, args.max_batch_size)

    server: uvicorn.Server | None = None
    app = build_app(load, options, on_load_error=lambda: setattr(server, "should_exit", True))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, access_log=args.access_log,
                                           timeout_graceful_shutdown=args.graceful_timeout, log_level="info"))
    # uvicorn shuts down gracefully on SIGTERM and then re-raises the signal to the handler that was installed
    # before it; Python's default would kill the process (exit 143) after a clean shutdown. This one ends it with 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    logger.info("loading %s; serving on http://%s:%d (page: /)", args.adapter or args.base, args.host, args.port)
    server.run()
    return 2 if app.state.load_error else 0


def main(argv=None) -> int:
    from sft.artifacts import RunInfo
    from sft.quiet import setup_logging
    from sft.sources import check_hub_before_library_imports

    args = parse_args(argv)
    setup_logging(args.verbose)
    check_hub_before_library_imports()
    try:
        if args.adapter:
            RunInfo.load(args.adapter)  # a wrong directory fails now, in one line, not after the server started
        return serve(args)
    except (OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
