"""Serving logic that does not depend on the web framework: request validation, the micro-batcher, and a server
process for tests and benchmarks.

eval/serve.py (FastAPI + uvicorn) is a thin shell around these. The micro-batcher is why a server is worth having:
texts from concurrent requests are gathered into one call of the predictor, so many clients sending one review each
cost about what one client sending a batch costs. The scorer runs in one worker thread, off the event loop, so the
server keeps accepting and answering while a forward runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
              list: "an array", dict: "an object"}
BODY_SHAPE = '{"texts": ["...", ...]}'


# ----- requests ---------------------------------------------------------------------------------------------------
class RequestError(ValueError):
    """A client mistake: the HTTP status and one line saying what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may carry. The body cap leaves room for JSON escapes (\\uXXXX: 6 bytes for a 3-byte
    character) so that any request within the text limits also fits the body limit."""

    max_texts: int = 64
    max_text_bytes: int = 4096

    def __post_init__(self) -> None:
        if self.max_texts < 1 or self.max_text_bytes < 1:
            raise ValueError(f"limits must be positive, got max_texts={self.max_texts}, "
                             f"max_text_bytes={self.max_text_bytes}")

    @property
    def max_body_bytes(self) -> int:
        return 3 * self.max_texts * self.max_text_bytes + 4096


def _json_type(value: Any) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


def check_body_size(size: int, limits: Limits) -> None:
    if size > limits.max_body_bytes:
        raise RequestError(413, f"request body exceeds the limit of {limits.max_body_bytes} bytes "
                                f"({size} received or declared)")


def parse_texts(body: bytes, limits: Limits) -> list[str]:
    """The texts of a `POST /v1/classify` body, or RequestError (400 not JSON, 413 over a limit, 422 wrong shape)."""
    check_body_size(len(body), limits)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"body is not JSON ({e}); send {BODY_SHAPE}") from None
    except RecursionError:
        raise RequestError(400, "body is not usable JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"body must be a JSON object {BODY_SHAPE}, got {_json_type(data)}")
    if set(data) != {"texts"}:
        unknown = sorted(set(data) - {"texts"})
        what = f"unknown key(s) {', '.join(map(repr, unknown))}" if unknown else 'missing key "texts"'
        raise RequestError(422, f"{what}; the body is {BODY_SHAPE}")
    texts = data["texts"]
    if not isinstance(texts, list):
        raise RequestError(422, f'"texts" must be an array of strings, got {_json_type(texts)}')
    if not texts:
        raise RequestError(422, '"texts" is empty: send at least one text')
    if len(texts) > limits.max_texts:
        raise RequestError(413, f'"texts" has {len(texts)} items; the limit is {limits.max_texts} per request')
    for i, text in enumerate(texts):
        check_text(i, text, limits)
    return texts


def check_text(i: int, text: Any, limits: Limits) -> None:
    """One item of "texts": a non-blank string of valid Unicode within the byte cap (UTF-8)."""
    if not isinstance(text, str):
        raise RequestError(422, f"texts[{i}] is {_json_type(text)}, expected a string")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise RequestError(422, f"texts[{i}] is not valid Unicode (an unpaired surrogate escape)") from None
    if not text.strip():
        raise RequestError(422, f"texts[{i}] is blank")
    if size > limits.max_text_bytes:
        raise RequestError(413, f"texts[{i}] is {size} bytes in UTF-8; the limit is {limits.max_text_bytes}")


# ----- micro-batching ---------------------------------------------------------------------------------------------
class _Item(NamedTuple):
    text: str
    future: asyncio.Future
    arrived: float  # loop time


class MicroBatcher:
    """Gathers texts submitted concurrently into calls of `score(texts) -> results` (one result per text, in order).

    A batch starts when it holds `max_batch_size` texts, or `max_wait_s` after its first text arrived or the
    previous batch ended, whichever is later: while a batch is scored the scorer thread competes with the event loop
    for the GIL, so requests sent meanwhile are often not parsed yet when it ends; the wait lets them in (without
    it, a busy server scores small batches, whose fixed costs keep it busy). A request with more texts than a batch
    holds is spread over several. `score` runs in one worker thread, so batches never overlap. `close()` scores
    what is queued, then stops."""

    def __init__(self, score: Callable[[list[str]], list], max_batch_size: int = 32, max_wait_s: float = 0.005):
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch_size >= 1 and max_wait_s >= 0, got {max_batch_size}, {max_wait_s}")
        self.score, self.max_batch_size, self.max_wait_s = score, max_batch_size, max_wait_s
        self.batches = self.texts = self.largest = 0  # what /healthz reports
        self._pending: deque[_Item] = deque()
        self._free_since = 0.0  # loop time the last batch ended
        self._closing = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the gathering loop (inside the running event loop)."""
        self._nonempty, self._full = asyncio.Event(), asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self._task = asyncio.create_task(self._run())

    async def submit(self, texts: Sequence[str]) -> list:
        """The results of `texts`, in order, once the batches holding them have been scored."""
        if self._task is None or self._closing:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        items = [_Item(text, loop.create_future(), loop.time()) for text in texts]
        self._pending.extend(items)
        self._nonempty.set()
        if len(self._pending) >= self.max_batch_size:
            self._full.set()
        return list(await asyncio.gather(*(item.future for item in items)))

    async def close(self) -> None:
        """Stop taking texts; finish the queued ones; stop the worker."""
        self._closing = True
        if self._task is not None:
            self._nonempty.set()
            await self._task
            self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._nonempty.wait()
            if not self._pending:
                if self._closing:
                    return
                self._nonempty.clear()
                continue
            wait = max(self._pending[0].arrived, self._free_since) + self.max_wait_s - loop.time()
            if len(self._pending) < self.max_batch_size and wait > 0 and not self._closing:
                try:  # an Event wait is safe to time out: nothing is taken from the queue
                    await asyncio.wait_for(self._full.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            await self._score_batch(loop, self._take())
            self._free_since = loop.time()

    def _take(self) -> list[_Item]:
        """Up to max_batch_size queued texts whose request is still waiting (a disconnected client's are dropped)."""
        batch: list[_Item] = []
        while self._pending and len(batch) < self.max_batch_size:
            item = self._pending.popleft()
            if not item.future.done():
                batch.append(item)
        if len(self._pending) < self.max_batch_size:
            self._full.clear()
        return batch

    async def _score_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        if not batch:
            return
        error: Exception | None = None
        try:
            results = await loop.run_in_executor(self._executor, self.score, [item.text for item in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"score returned {len(results)} results for {len(batch)} texts")
        except Exception as e:  # noqa: BLE001 - every waiting request gets the error; the loop keeps serving
            error = e
        self.batches, self.texts = self.batches + 1, self.texts + len(batch)
        self.largest = max(self.largest, len(batch))
        for i, item in enumerate(batch):
            if item.future.done():  # the request was cancelled (its client went away)
                continue
            if error is None:
                item.future.set_result(results[i])
            else:
                item.future.set_exception(error)

    def stats(self) -> dict[str, float]:
        return {"batches": self.batches, "texts": self.texts, "largest_batch": self.largest,
                "mean_batch": round(self.texts / self.batches, 2) if self.batches else 0.0}


# ----- a server process (tests, bench/serve_load.py) --------------------------------------------------------------
def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m eval.serve ARGS` on a free loopback port, ready (GET /healthz answered 200) on entering and
    stopped with SIGTERM on leaving. `returncode` and `output` (stdout + stderr) are set once it has exited."""

    def __init__(self, *args: str, ready_timeout: float = 180.0, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args, self.ready_timeout = [*args, "--host", "127.0.0.1", "--port", str(self.port)], ready_timeout
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.returncode: int | None = None
        self.output = ""

    def __enter__(self) -> ServerProcess:
        # a file, not a pipe (one nobody reads fills up and blocks the server); appending, so log() can read it
        self._log = tempfile.TemporaryFile(mode="a+", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, "-m", "eval.serve", *self.args], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become ready (exit code {self.returncode}):\n{self.output[-3000:]}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful: in-flight requests finish), then the exit code; SIGKILL after `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.output = self.log()
        self.returncode = self.proc.returncode
        return self.returncode

    def log(self) -> str:
        """What the server has printed so far (stdout and stderr)."""
        self._log.seek(0)
        return self._log.read()
