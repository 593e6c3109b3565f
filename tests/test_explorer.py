"""The explorer: served from a real indexed lake, driven in headless Chromium (Debian's chromium and
chromedriver, installed by `make install`) through Selenium."""

import argparse
import html
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
import uvicorn
from fastapi.testclient import TestClient

from infra.lake import Lake
from evaluation import evaluate
from evaluation.baselines import bm25_top_k, write_text_proponents
from evaluation.rankings import evaluated_checkpoint
from evaluation.tail_patching import tail_patch, tail_patch_step, write_tail_patches
from explorer import explore
from explorer.data import Explorer
from jobs import extract, fit_hessian, register_queries, score, tokenize
from schemas.tables import TABLES
from tests.fixtures import copy_lake

REPORTS = Path(__file__).resolve().parent.parent / "reports"


@pytest.fixture(scope="module")
def explored_lake(adam_run, tmp_path_factory):
    source, _ = adam_run
    root = str(copy_lake(source, tmp_path_factory.mktemp("explore") / "lake"))
    tokenize.run(tokenize.TokenizeConfig(lake=root))
    register_queries.run(root)
    extraction = extract.run(extract.ExtractConfig(lake=root, projection_k=4))
    fit_hessian.run(fit_hessian.FitHessianConfig(lake=root))
    # float32 index: the stored scores equal the heat maps' exact sums (int8 ones are within its error bound)
    score.run(score.ScoreConfig(lake=root, methods=["trackstar", "trackstar-no-hessian"], top_k=5, index="float32"))
    lake = Lake(root)
    documents = lake.read("documents", columns=["doc_id", "text"])
    queries = sorted(lake.read("queries").to_pylist(), key=lambda q: q["query_id"])
    indices, values = bm25_top_k(documents["text"].to_pylist(), [q["prompt0"] + q["target"] for q in queries], 5)
    write_text_proponents(
        lake,
        "bm25",
        indices,
        values,
        documents["doc_id"].to_pylist(),
        [q["query_id"] for q in queries],
        "fact-world",
        extraction["checkpoint_id"],
        "test",
    )
    # real tail-patch steps for every query's TrackStar proponents, as the evaluation stores them
    ranked = {"trackstar": {}}
    for row in sorted(
        lake.read("proponents", filters=[("method", "=", "trackstar")]).to_pylist(), key=lambda r: r["rank"]
    ):
        ranked["trackstar"].setdefault(row["query_id"], []).append(row["doc_id"])
    checkpoint = evaluated_checkpoint(lake, evaluate.EvaluateConfig(lake=root))
    rule, learning_rate, _ = tail_patch_step(Path(checkpoint), {}, 1e-3)
    _, changes = tail_patch(
        lake,
        checkpoint,
        rule,
        learning_rate,
        ranked,
        {q["query_id"]: q for q in queries},
        [q["query_id"] for q in queries],
    )
    write_tail_patches(lake, "fact-world", extraction["checkpoint_id"], changes, "test")
    return root, queries


def _serve(app):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(explored_lake):
    root, _ = explored_lake
    running, url = _serve(explore.create_app(root))
    yield url
    running.should_exit = True


def test_bad_parameters_get_4xx_with_a_message(server, explored_lake):
    _, queries = explored_lake
    cases = {
        "/?bucket=many": (400, "bucket must be a whole number"),
        "/?prediction=maybe": (400, "prediction must be"),
        "/?checkpoint=nope": (400, "unknown checkpoint"),
        "/query/Q99999": (404, "no query"),
        f"/query/{queries[0]['query_id']}?methods=astrology": (400, "unknown method"),
        f"/query/{queries[0]['query_id']}?k=0": (400, "k must be"),
        "/query/..%2F..%2F..%2Fetc%2Fpasswd": (404, "no query '../../../etc/passwd'"),  # an id, never a file
        "/?relation=<script>alert(1)</script>": (400, "unknown relation"),
    }
    for path, (status, message) in cases.items():
        response = httpx.get(server + path)
        assert response.status_code == status and message in response.text, path
        assert response.headers["content-type"].startswith("text/plain"), path  # input echoed as text, never HTML
    assert "root:" not in httpx.get(server + "/query/..%2F..%2F..%2Fetc%2Fpasswd").text


def test_a_token_is_required_when_asked_for(explored_lake):
    root, _ = explored_lake
    running, url = _serve(explore.create_app(root, token="s3cret"))
    try:
        assert httpx.get(url + "/").status_code == 401
        with httpx.Client() as client:
            assert client.get(url + "/?token=s3cret").status_code == 200
            assert client.get(url + "/").status_code == 200  # kept in a cookie
    finally:
        running.should_exit = True
    assert (
        explore.needs_token("0.0.0.0") and explore.needs_token("192.168.1.5") and not explore.needs_token("127.0.0.1")
    )


def test_a_foreign_host_is_refused_and_every_reply_is_marked(server, explored_lake):
    port = server.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.", ""):
        refused = httpx.get(server + "/", headers={"Host": host})  # DNS rebinding sends its own name
        assert refused.status_code == 400 and refused.text.startswith("unknown Host header"), host
        assert "evil" not in refused.text and refused.headers["content-type"].startswith("text/plain"), host
    for host in ("localhost", f"LocalHost:{port}", "127.0.0.1", f"[::1]:{port}"):
        assert httpx.get(server + "/", headers={"Host": host}).status_code == 200, host
    replies = {
        "/": 200,
        "/style.css": 200,
        "/?bucket=<b>many</b>": 400,
        "/query/Q99999": 404,
        "/nothing-here": 404,
    }
    for path, status in replies.items():
        response = httpx.get(server + path)
        assert response.status_code == status, path
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["content-security-policy"] == explore.SECURITY_HEADERS["Content-Security-Policy"]
    foreign = httpx.get(server + "/", headers={"Host": "evil.example"})
    assert foreign.headers["x-content-type-options"] == "nosniff" and foreign.headers["content-security-policy"]
    # the pages need neither script nor inline style, so the policy allows none
    page = httpx.get(server + "/").text
    assert "<script" not in page and "style=" not in page and "<style" not in page

    # a crash is answered by FastAPI's own error layer, inside the guard: marked too
    from fastapi import FastAPI

    crashing = FastAPI()
    crashing.get("/")(lambda: 1 / 0)
    crashed = TestClient(explore.Guard(crashing, ["testserver"]), raise_server_exceptions=False).get("/")
    assert crashed.status_code == 500 and crashed.headers["x-content-type-options"] == "nosniff"

    # another name is answered only when given (the CLI's --allowed-host; the bound address is added)
    root, _ = explored_lake
    named = explore.create_app(root, allowed_hosts=["explorer.lan", "10.0.0.7:8765"])
    assert TestClient(named, base_url="http://explorer.lan:8765").get("/style.css").status_code == 200
    assert TestClient(named, base_url="http://10.0.0.7").get("/style.css").status_code == 200
    assert TestClient(named, base_url="http://testserver").get("/style.css").status_code == 400
    with pytest.raises(ValueError, match="allowed hosts"):
        explore.create_app(root, allowed_hosts=["evil.example/path"])
    parser = argparse.ArgumentParser()
    explore.add_arguments(parser)
    parsed = parser.parse_args(["--allowed-host", "a.lan", "--allowed-host", "b.lan"])
    assert parsed.allowed_host == ["a.lan", "b.lan"] and not parsed.openapi
    assert explore.bound_name("0.0.0.0") == [] and explore.bound_name("192.168.1.5") == ["192.168.1.5"]


def test_no_openapi_schema_unless_asked(server, explored_lake):
    for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
        assert httpx.get(server + path).status_code == 404, path
    root, _ = explored_lake
    asked = TestClient(explore.create_app(root, openapi=True), base_url="http://127.0.0.1")
    assert "/trace" in asked.get("/openapi.json").json()["paths"]
    assert asked.get("/docs").status_code == 404  # its page would need scripts from a CDN


def test_query_ids_with_any_character_resolve(explored_lake, tmp_path):
    root, queries = explored_lake
    lake = Lake(copy_lake(root, tmp_path / "lake"))
    odd = 'fact/1 it\'s "odd" ?#%2F é'
    original = queries[0]
    lake.append("queries", pa.Table.from_pylist([{**original, "query_id": odd}], TABLES["queries"].arrow_schema))
    proponents = lake.read("proponents", filters=[("query_id", "=", original["query_id"])]).to_pylist()
    rows = [{**row, "query_id": odd} for row in proponents]
    lake.append("proponents", pa.Table.from_pylist(rows, TABLES["proponents"].arrow_schema))
    running, url = _serve(explore.create_app(str(lake.root)))  # a real server: it decodes the path once
    try:
        listing = httpx.get(url + "/")
        assert listing.status_code == 200
        links = {
            html.unescape(text): html.unescape(href)
            for href, text in re.findall(r"href='([^']*)'>([^<]*)</a>", listing.text)
        }
        page = httpx.get(url + links[odd])  # the link the list page shows for it
        assert page.status_code == 200, (links[odd], page.text[:300])
        assert html.unescape(re.search(r"<title>(.*) · TrackStar", page.text).group(1)) == odd
        assert page.text.count("class='proponent'") == 2 * 5  # trackstar and bm25
        assert httpx.get(url + '/query/fact/1 it\'s "odd" %3F%23%252F é').status_code == 200  # `/` as it is
        assert httpx.get(url + "/query/fact/1").status_code == 404
    finally:
        running.should_exit = True


def test_a_new_prompt_is_traced_from_the_page(server, explored_lake):
    root, queries = explored_lake
    form = httpx.get(server + "/").text
    assert "<form id='trace'" in form and "action='/trace'" in form and "name='prompt'" in form
    client = TestClient(explore.create_app(root), base_url="http://127.0.0.1")  # a fresh app: no model loaded
    lake = Lake(root)
    times = []
    for query in queries[1:3]:  # the second request finds the model, tokenizer and R^(-1/2) loaded
        started = time.perf_counter()
        page = client.get("/trace", params={"prompt": query["prompt0"], "target": query["target"]})
        times.append(time.perf_counter() - started)
        assert page.status_code == 200, page.text[:300]
        stored = sorted(
            lake.read(
                "proponents", filters=[("method", "=", "trackstar"), ("query_id", "=", query["query_id"])]
            ).to_pylist(),
            key=lambda r: r["rank"],
        )
        shown = [float(score) for score in re.findall(r"</b> score (-?[0-9.]+)", page.text)]
        assert shown == pytest.approx([r["score"] for r in stored], abs=2e-4)  # as the score job found them
        assert re.search(r"class='tok heat-p(10|[1-9])", page.text)  # heat maps of the new query
    print(f"\n[explorer] /trace on the test lake: first request {times[0]:.2f} s, second (warm) {times[1]:.2f} s")
    ahead = Explorer(root)
    ahead.warm()  # what `jobs explore` starts in the background
    loaded = ahead.tracer.cache_info().misses
    ahead.tracer(ahead.checkpoint(None), "fact-world")
    assert ahead.tracer.cache_info().misses == loaded  # already there
    own = client.get("/trace", params={"prompt": queries[0]["prompt0"]})
    assert own.status_code == 200 and "the model’s own continuation" in own.text
    assert own.text.count("class='proponent'") == 5
    for params, message in (
        ({"prompt": ""}, "type a prompt"),
        ({"prompt": "x" * 3000}, "longer than"),
        ({"prompt": "a", "k": "0"}, "k must be"),
        ({"prompt": "a", "query_set": "nope"}, "unknown query set"),
    ):
        response = client.get("/trace", params=params)
        assert response.status_code == 400 and message in response.text, params


def test_token_contributions_on_the_page_sum_to_the_score(server, explored_lake):
    root, queries = explored_lake
    explorer = Explorer(root)
    checkpoint = explorer.checkpoint(None)
    query = queries[0]
    top = explorer.ranked(checkpoint, [query["query_id"]])["trackstar"][query["query_id"]][0]
    tokens = explorer.heat_map(checkpoint, "fact-world", query["query_id"], top["doc_id"], top["chunk"])
    assert sum(v for _, v in tokens) == pytest.approx(top["score"], rel=1e-3, abs=1e-5)


def test_browse_filter_open_switch_and_screenshot(server, explored_lake):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as page_is
    from selenium.webdriver.support.ui import Select, WebDriverWait

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "Debian's chromium and chromium-driver are needed: run `make install`"
    options = webdriver.ChromeOptions()
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations are logged there
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(server + "/")
        all_rows = len(browser.find_elements(By.CSS_SELECTOR, "tr.query-row"))
        assert all_rows == len(explored_lake[1])
        Select(browser.find_element(By.ID, "bucket")).select_by_value("30")
        browser.find_element(By.ID, "apply").click()
        wait = WebDriverWait(browser, 30)
        wait.until(page_is.url_contains("bucket=30"))
        rows = browser.find_elements(By.CSS_SELECTOR, "tr.query-row")
        assert 0 < len(rows) < all_rows
        assert browser.find_elements(By.CSS_SELECTOR, "#metrics tr")  # metrics for the filtered queries
        rows[0].find_element(By.TAG_NAME, "a").click()
        wait.until(page_is.url_contains("/query/"))
        columns = browser.find_elements(By.CSS_SELECTOR, ".method")
        assert [c.get_attribute("data-method") for c in columns] == ["trackstar", "bm25"]
        assert len(columns[0].find_elements(By.CSS_SELECTOR, ".proponent")) == 5
        assert len(columns[0].find_elements(By.CSS_SELECTOR, ".tail-patch")) == 5  # measured for every proponent
        heat = columns[0].find_elements(By.CSS_SELECTOR, ".tok")
        # shaded through /style.css's classes: the stylesheet loads under the CSP
        assert heat and any(t.value_of_css_property("background-color") != "rgba(0, 0, 0, 0)" for t in heat)
        assert columns[0].find_elements(By.CSS_SELECTOR, ".tok.mention-subject")  # the subject's tokens are framed
        assert browser.find_elements(By.CSS_SELECTOR, "h1 .subject") and browser.find_elements(
            By.CSS_SELECTOR, "h1 .target"
        )
        REPORTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(REPORTS / "explorer.png"))
        assert (REPORTS / "explorer.png").stat().st_size > 10_000
        switch = [
            a for a in browser.find_elements(By.CSS_SELECTOR, "a.method-link") if a.text == "trackstar-no-hessian"
        ]
        switch[0].click()
        wait.until(page_is.url_contains("methods=trackstar-no-hessian"))
        assert (
            browser.find_elements(By.CSS_SELECTOR, ".method")[0].get_attribute("data-method") == "trackstar-no-hessian"
        )
        # a new prompt, typed into the form on the first page
        browser.get(server + "/")
        browser.find_element(By.NAME, "prompt").send_keys(explored_lake[1][0]["prompt0"])
        browser.find_element(By.ID, "trace-button").click()
        wait.until(page_is.url_contains("/trace?"))
        assert len(browser.find_elements(By.CSS_SELECTOR, ".proponent")) == 5
        violations = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not violations
    finally:
        browser.quit()


def test_trace_recomputes_a_stored_query_and_finds_its_stored_proponents(explored_lake):
    from explorer.trace import TraceContext

    root, queries = explored_lake
    lake = Lake(root)
    context = TraceContext(lake)
    query = queries[1]
    fresh = context.query_vector(query["prompt0"], query["target"])
    assert float((fresh - context.stored_query_vector(query["query_id"])).abs().max()) < 1e-5
    traced = context.top_k(fresh, 5)
    stored = sorted(
        lake.read(
            "proponents", filters=[("method", "=", "trackstar"), ("query_id", "=", query["query_id"])]
        ).to_pylist(),
        key=lambda r: r["rank"],
    )
    assert [r["score"] for r in traced] == pytest.approx([r["score"] for r in stored], rel=1e-4, abs=1e-6)
