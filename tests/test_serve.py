"""eval/serve.py and sft/serving.py: request validation, the micro-batcher, every route and error in process, then a
real server (subprocess, loopback): 64 concurrent requests equal to the predictor's answers, the page in headless
Chromium, and SIGTERM during load."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from eval.predict import SentimentPredictor
from eval.serve import API_KEY_ENV, ServeOptions, build_app, parse_args, serve_options
from sft.serving import Limits, MicroBatcher, RequestError, ServerProcess, parse_texts

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TEST = REPO / "tests" / "data" / "sample" / "test.tsv"
SMALL = Limits(max_texts=4, max_text_bytes=128)  # body cap 3 * 4 * 128 + 4096 = 5632 bytes; reviews <= 80 bytes
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    return [line.split("\t", 1)[1] for line in SAMPLE_TEST.read_text(encoding="utf-8").splitlines()[1:]]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory, lora_adapter) -> Path:
    """A training output whose model card has test figures (what GET /v1/model shows)."""
    from sft.model_card import add_eval_results

    adapter = lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "run" / "final")
    add_eval_results(adapter, "test", {"n": 60, "accuracy": 0.5, "f1": 0.4, "auc": 0.6})
    return adapter


@pytest.fixture(scope="module")
def predictor(adapter_dir) -> SentimentPredictor:
    return SentimentPredictor(lora_path=str(adapter_dir))


def assert_same(got: list[dict], expected: list[dict]) -> None:
    """The server's answer is the predictor's: same labels, probabilities equal to float noise (batch shapes differ)."""
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    assert [p["label_id"] for p in got] == [p["label_id"] for p in expected]
    for g, e in zip(got, expected, strict=True):
        assert g["probs"] == pytest.approx(e["probs"], abs=1e-6)


# ----- request validation (pure) ----------------------------------------------------------------------------------
BAD_BODIES = [  # body, status, what the error says
    (b"not json", 400, "body is not JSON"),
    (b"\xff\xfe{}", 400, "body is not JSON"),
    (b"[" * 4000, 400, "nested too deeply"),
    (b'["a"]', 422, "body must be a JSON object"),
    (b"{}", 422, 'missing key "texts"'),
    (b'{"text": "a"}', 422, "unknown key(s) 'text'"),
    (b'{"texts": "abc"}', 422, '"texts" must be an array of strings, got a string'),
    (b'{"texts": []}', 422, '"texts" is empty'),
    (b'{"texts": ["a", null]}', 422, "texts[1] is null, expected a string"),
    (b'{"texts": [{"text": "a"}]}', 422, "texts[0] is an object, expected a string"),
    (b'{"texts": ["  "]}', 422, "texts[0] is blank"),
    (b'{"texts": ["\\ud800"]}', 422, "texts[0] is not valid Unicode"),
    (json.dumps({"texts": ["a"] * 5}).encode(), 413, '"texts" has 5 items; the limit is 4'),
    (json.dumps({"texts": ["好" * 43]}).encode(), 413, "texts[0] is 129 bytes in UTF-8; the limit is 128"),
    (b" " * 6000, 413, "request body exceeds the limit of 5632 bytes"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_BODIES, ids=lambda x: repr(x)[:30])
def test_parse_texts_refuses_bad_bodies(body, status, message):
    with pytest.raises(RequestError) as info:
        parse_texts(body, SMALL)
    assert info.value.status == status and message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_parse_texts_accepts_the_limits_exactly():
    texts = ["好" * 42 + "ab", "差", "🙂" * 32, "ok"]  # 128, 3, 128 and 2 bytes; 4 texts
    assert parse_texts(json.dumps({"texts": texts}).encode(), SMALL) == texts
    escaped = json.dumps({"texts": texts}, ensure_ascii=True).encode()  # \uXXXX escapes: the body cap allows them
    assert parse_texts(escaped, SMALL) == texts


# ----- the micro-batcher (pure asyncio) ---------------------------------------------------------------------------
def run_batcher(sizes: list[int], max_batch_size: int, max_wait_s: float = 0.05, fail: bool = False):
    """Submit len(sizes) requests concurrently; return (results per request, texts per score call)."""
    calls: list[int] = []

    def score(texts: list[str]) -> list[str]:
        calls.append(len(texts))
        time.sleep(0.01)  # a forward takes time: more requests arrive meanwhile
        if fail:
            raise RuntimeError("scorer broke")
        return [t.upper() for t in texts]

    async def main():
        batcher = MicroBatcher(score, max_batch_size, max_wait_s)
        batcher.start()
        requests = [[f"r{r}t{i}" for i in range(n)] for r, n in enumerate(sizes)]
        results = await asyncio.gather(*(batcher.submit(t) for t in requests), return_exceptions=True)
        await batcher.close()
        return requests, results, batcher.stats()

    requests, results, stats = asyncio.run(main())
    return requests, results, calls, stats


def test_batcher_gathers_concurrent_requests_into_few_calls():
    sizes = [1 + (i * 5) % 7 for i in range(30)]
    requests, results, calls, stats = run_batcher(sizes, max_batch_size=16)
    assert results == [[t.upper() for t in texts] for texts in requests]  # every text, in its request's order
    assert sum(calls) == sum(sizes) == stats["texts"]
    assert max(calls) <= 16 and len(calls) <= sum(sizes) // 16 + 2, calls  # full batches, not one call per request
    assert stats["batches"] == len(calls) and stats["largest_batch"] == 16


def test_batcher_with_batch_size_one_scores_text_by_text():
    _, results, calls, _ = run_batcher([3, 1, 2], max_batch_size=1)
    assert calls == [1] * 6 and results == [["R0T0", "R0T1", "R0T2"], ["R1T0"], ["R2T0", "R2T1"]]


def test_batcher_gives_a_scorer_error_to_every_waiting_request_and_keeps_serving():
    _, results, calls, _ = run_batcher([2, 2], max_batch_size=8, fail=True)
    assert all(isinstance(r, RuntimeError) and "scorer broke" in str(r) for r in results)

    async def after_error():
        seen = []
        batcher = MicroBatcher(lambda texts: seen.append(texts) or (1 / 0 if len(seen) == 1 else texts), 4, 0.0)
        batcher.start()
        with pytest.raises(ZeroDivisionError):
            await batcher.submit(["a"])
        assert await batcher.submit(["b"]) == ["b"]
        await batcher.close()
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.submit(["c"])

    asyncio.run(after_error())


def test_batcher_drops_the_texts_of_a_cancelled_request():
    calls: list[list[str]] = []

    async def main():
        batcher = MicroBatcher(lambda texts: calls.append(list(texts)) or texts, 8, 0.05)
        batcher.start()
        gone = asyncio.create_task(batcher.submit(["gone"]))
        await asyncio.sleep(0)  # queued, waiting for companions
        gone.cancel()  # what a client that disconnects does to its request
        assert await batcher.submit(["kept"]) == ["kept"]
        await batcher.close()

    asyncio.run(main())
    assert calls == [["kept"]]


# ----- the app, in process ----------------------------------------------------------------------------------------
def wait_ready(client, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/healthz")
        if response.status_code == 200:
            return response
        time.sleep(0.05)
    raise AssertionError(f"not ready: {response.json()}")


@pytest.fixture(scope="module")
def client(predictor, adapter_dir):
    from fastapi.testclient import TestClient

    app = build_app(lambda: predictor, ServeOptions(adapter=str(adapter_dir), limits=SMALL))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def test_classify_returns_the_predictors_answers(client, predictor, reviews):
    response = client.post("/v1/classify", json={"texts": reviews[:3]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "run"  # the directory holding final/
    assert all(set(p) == {"label", "label_id", "probs"} for p in body["predictions"])
    assert_same(body["predictions"], predictor.predict_batch(reviews[:3]))


def test_model_healthz_and_page(client):
    info = client.get("/v1/model").json()
    assert info["labels"] == ["负面", "正面"] and info["kind"] == "lora" and info["base"]
    assert info["template"]["verbalizers"] == ["负面", "正面"] and info["template"]["max_length"] == 128
    assert info["metrics"]["splits"]["test"]["accuracy"] == 0.5  # the model card's figures
    assert info["limits"]["max_texts"] == 4 and info["batching"]["max_batch_size"] == 32
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["batching"]["texts"] >= 0
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="go"' in page.text and 'data-needs-key="false"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external assets: works offline


@pytest.mark.parametrize(("body", "status", "message"), BAD_BODIES, ids=lambda x: repr(x)[:30])
def test_bad_requests_get_a_4xx_and_a_one_line_json_error(client, body, status, message):
    response = client.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error and "\n" not in error


@pytest.mark.parametrize(("method", "path", "status", "message"), [
    ("GET", "/v2/classify", 404, "no route GET /v2/classify; routes: POST /v1/classify"),
    ("POST", "/healthz", 405, "POST is not allowed on /healthz"),
    ("GET", "/v1/classify", 405, "GET is not allowed on /v1/classify"),
])
def test_unknown_routes_and_methods(client, method, path, status, message):
    response = client.request(method, path)
    assert response.status_code == status and message in response.json()["error"]


def test_the_bearer_token_is_enforced_when_set(predictor, adapter_dir, reviews):
    from fastapi.testclient import TestClient

    app = build_app(lambda: predictor, ServeOptions(adapter=str(adapter_dir), api_key="s3cret"))
    with TestClient(app) as c:
        wait_ready(c)  # /healthz stays open for probes
        body = {"texts": reviews[:1]}
        for path, call in (("/v1/classify", lambda **kw: c.post("/v1/classify", json=body, **kw)),
                           ("/v1/model", lambda **kw: c.get("/v1/model", **kw))):
            missing, wrong = call(), call(headers={"Authorization": "Bearer nope"})
            assert missing.status_code == wrong.status_code == 401, path
            assert "missing bearer token" in missing.json()["error"] and wrong.json()["error"] == "wrong bearer token"
            assert missing.headers["www-authenticate"] == "Bearer"
            assert call(headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
        assert 'data-needs-key="true"' in c.get("/").text  # the page asks for the key


def test_the_key_comes_from_the_flag_or_the_environment():
    args = parse_args(["--adapter", "x"])
    assert serve_options(args, {}).api_key is None
    assert serve_options(args, {API_KEY_ENV: "from-env"}).api_key == "from-env"
    assert serve_options(parse_args(["--adapter", "x", "--api_key", "flag"]), {API_KEY_ENV: "env"}).api_key == "flag"


def test_not_ready_until_the_model_has_loaded_and_a_failed_load_is_reported(predictor, reviews):
    from fastapi.testclient import TestClient

    release = threading.Event()
    app = build_app(lambda: release.wait(30) and predictor, ServeOptions())
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 503 and c.get("/healthz").json()["status"] == "loading"
        loading = c.post("/v1/classify", json={"texts": ["好"]})
        assert loading.status_code == 503 and loading.json()["error"] == "model is loading"
        release.set()
        wait_ready(c)
        assert c.post("/v1/classify", json={"texts": ["好"]}).status_code == 200

    def broken_load():
        raise ValueError("no such base")

    stopped = []
    broken = build_app(broken_load, ServeOptions(base="BASE"), on_load_error=lambda: stopped.append(True))
    with TestClient(broken) as c:
        deadline = time.monotonic() + 10
        while not stopped and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stopped == [True]
        health = c.get("/healthz")
        assert health.status_code == 503 and health.json() == {"status": "failed", "error": "BASE: no such base"}
        assert c.get("/v1/model").json()["error"] == "model failed to load: BASE: no such base"


def test_command_line_errors_are_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "eval" / "serve.py"), "--adapter", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == f"error: {tmp_path / 'nope'}: adapter directory does not exist"
    usage = subprocess.run([sys.executable, str(REPO / "eval" / "serve.py")], capture_output=True, text=True,
                           timeout=120)
    assert usage.returncode == 2 and "give --adapter DIR and/or --base MODEL" in usage.stderr


# ----- a real server: loopback, subprocess ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(adapter_dir):
    with ServerProcess("--adapter", str(adapter_dir), "--max_batch_size", "32", "--max_wait_ms", "20",
                       env=ONE_THREAD) as s:
        yield s
    assert s.returncode == 0, s.output[-3000:]


async def post_all(url: str, bodies: list[dict], timeout: float = 120.0) -> list:
    """POST every body at once (one connection each); responses or exceptions, in order."""
    import httpx

    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        return await asyncio.gather(*(http.post(f"{url}/v1/classify", json=b) for b in bodies),
                                    return_exceptions=True)


def test_64_concurrent_requests_of_mixed_sizes_are_all_answered_correctly(server, predictor, reviews):
    import httpx

    requests = [[reviews[(r * 7 + i) % len(reviews)] for i in range(1 + (r * 5) % 12)] for r in range(64)]
    before = httpx.get(f"{server.url}/healthz").json()["batching"]
    responses = asyncio.run(post_all(server.url, [{"texts": texts} for texts in requests]))
    after = httpx.get(f"{server.url}/healthz").json()["batching"]
    assert [getattr(r, "status_code", r) for r in responses] == [200] * 64
    for texts, response in zip(requests, responses, strict=True):
        assert_same(response.json()["predictions"], predictor.predict_batch(texts))
    texts_scored, batches = after["texts"] - before["texts"], after["batches"] - before["batches"]
    assert texts_scored == sum(map(len, requests))  # none lost, none scored twice
    assert batches < len(requests) and after["largest_batch"] <= 32, after  # requests were gathered


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver; without them skip, or fail under CI (.ci/run sets CI=1). Module-scoped
    and named before `server`, so a missing browser is known before a server starts."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        browser = None
    if not (browser and driver):
        reason = ("the page test needs Debian's chromium + chromium-driver and selenium: "
                  "apt-get install -y chromium chromium-driver && pip install selenium")
        if os.environ.get("CI"):
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason)
    return browser, driver


def test_the_page_in_headless_chromium(chromium, server, predictor, reviews, tmp_path):
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,640"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    shot = Path(os.environ.get("SERVE_PAGE_SCREENSHOT") or tmp_path / "page.png")
    try:
        driver.get(f"{server.url}/")
        driver.find_element(By.ID, "text").send_keys(reviews[1])
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "label").text)
        expected = predictor.predict(reviews[1])
        assert driver.find_element(By.ID, "label").text == expected["label"]
        rows = driver.find_elements(By.CSS_SELECTOR, "#bars .row")
        assert [r.get_attribute("data-label") for r in rows] == list(expected["probs"])
        for row in rows:
            width = float(row.find_element(By.CLASS_NAME, "fill").value_of_css_property("width").removesuffix("px"))
            track = float(row.find_element(By.CLASS_NAME, "track").value_of_css_property("width").removesuffix("px"))
            assert width / track == pytest.approx(expected["probs"][row.get_attribute("data-label")], abs=0.01)
        assert driver.find_element(By.ID, "error").text == ""
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert shot.is_file() and shot.stat().st_size > 5000
    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    assert image.size[0] >= 800 and len(colors) > 50  # text and bars rendered, not a blank page
    assert any(color == (0xDD, 0x84, 0x52) for _, color in colors)  # the winning class's bar is drawn


def test_sigterm_during_load_finishes_the_requests_in_flight_and_exits_0(adapter_dir, predictor, reviews):
    requests = [[reviews[(r * 3 + i) % len(reviews)] for i in range(8)] for r in range(16)]
    server = ServerProcess("--adapter", str(adapter_dir), "--max_batch_size", "8", env=ONE_THREAD)

    async def load_then_sigterm():
        tasks = [asyncio.create_task(post_all(server.url, [{"texts": texts}])) for texts in requests]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)  # the server is busy scoring
        server.proc.send_signal(signal.SIGTERM)
        in_flight = len(tasks) - sum(t.done() for t in tasks)
        for _ in range(300):  # uvicorn closes its socket right after saying this
            if "Shutting down" in server.log():
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.2)
        refused = await post_all(server.url, [{"texts": ["好"]}], timeout=10)
        return [(await t)[0] for t in tasks], in_flight, refused[0]

    with server:
        responses, in_flight, refused = asyncio.run(load_then_sigterm())
        # wait for the exit its one SIGTERM brings: stop() would send another, and one that lands after Python has
        # put back the default handlers at exit kills the cleanly stopped server (-15)
        server.proc.wait(timeout=60)
        assert server.stop() == 0, server.output[-3000:]
    assert in_flight >= 1  # SIGTERM came while requests were waiting for the scorer
    assert [getattr(r, "status_code", r) for r in responses] == [200] * len(requests)
    for texts, response in zip(requests, responses, strict=True):
        assert_same(response.json()["predictions"], predictor.predict_batch(texts))
    assert not hasattr(refused, "status_code"), refused  # a new connection after SIGTERM is not served
    assert "Shutting down" in server.output and "Finished server process" in server.output
