"""The explorer: served from a real indexed lake, driven in headless Chromium (Debian's chromium and
chromedriver, installed by `make install`) through Selenium."""

import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from infra.lake import Lake
from evaluation import evaluate
from explorer import explore
from jobs import extract, fit_hessian, register_queries, score, tokenize
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
    indices, values = evaluate.bm25_top_k(
        documents["text"].to_pylist(), [q["prompt0"] + q["target"] for q in queries], 5
    )
    evaluate.write_text_proponents(
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
    checkpoint = evaluate.evaluated_checkpoint(lake, evaluate.EvaluateConfig(lake=root))
    rule, learning_rate, _ = evaluate.tail_patch_step(Path(checkpoint), {}, 1e-3)
    _, changes = evaluate.tail_patch(
        lake,
        checkpoint,
        rule,
        learning_rate,
        ranked,
        {q["query_id"]: q for q in queries},
        [q["query_id"] for q in queries],
    )
    evaluate.write_tail_patches(lake, "fact-world", extraction["checkpoint_id"], changes, "test")
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
        "/query/..%2F..%2F..%2Fetc%2Fpasswd": (404, "Not Found"),
    }
    for path, (status, message) in cases.items():
        response = httpx.get(server + path)
        assert response.status_code == status and message in response.text, path
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


def test_token_contributions_on_the_page_sum_to_the_score(server, explored_lake):
    root, queries = explored_lake
    explorer = explore.Explorer(root)
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
        assert heat and any("rgba" in (t.get_attribute("style") or "") for t in heat)
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
