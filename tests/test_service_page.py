"""The page in a real browser: headless Debian Chromium driven by selenium (no browser is downloaded).

It opens ``/`` served from a test archive, asks for a size, and checks that the table's rows and
the plotted points are the API's answer; the screenshot is saved under the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from archopt.archdb import Archive
from archopt.archdb import models as m
from archopt.archdb.records import ArchRecord, ValueRecord
from archopt.archdb.store import ingest_records
from archopt.optimizer.query import QueryRequest, run_query
from archopt.optimizer.training import ensure_predictors
from archopt.service.app import ServiceConfig, create_app
from archopt.service.server import BackgroundServer

from helpers.archives import MMLU, PPL, fill  # noqa: E402  (synthetic archives with a known truth)

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1300,1900")


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        why = "Debian's chromium and chromium-driver are not installed (make test installs them)"
        if os.environ.get("CI") or os.environ.get("ARCHOPT_REQUIRE_BROWSER"):
            pytest.fail(why)  # make test and CI run the page in a real browser, never skip it silently
        pytest.skip(why)
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def measured_archive(url: str) -> None:
    """A trained archive in which architectures of the 75% answer were measured after training.

    Measured architectures join the next search as warm starts and can move its front, so this
    measures answers until one answer (the request the page sends, with the predictors it will
    use) includes measured ones; nothing is written after that answer, so the page gets it too.
    """
    archive = Archive(url)
    fill(archive, 40)
    ensure_predictors(archive, "synth", ["ppl_wikitext2", "mmlu"])
    request = QueryRequest(model="synth", params="75%", objectives=("ppl_wikitext2", "mmlu"), retrain=False)
    for _ in range(6):
        doc = run_query(archive, request)
        if any(r["measured"]["ppl_wikitext2"] is not None for r in doc["results"]):
            break
        records = [ArchRecord(model="synth", base=None, architecture=r["layers"], origin="verify",
                              values=(ValueRecord("ppl_wikitext2", r["predicted"]["ppl_wikitext2"] * 1.04, PPL),
                                      ValueRecord("mmlu", r["predicted"]["mmlu"] * 0.97, MMLU)))
                   for r in doc["results"]]
        with archive.write() as session:
            ingest_records(session, records)
            session.execute(m.StoredQuery.__table__.delete())
    else:
        raise AssertionError("no answer included a measured architecture")
    with archive.write() as session:
        session.execute(m.StoredQuery.__table__.delete())
    archive.close()


@pytest.mark.slow
def run_and_fetch(browser, wait, url: str) -> dict:
    """Run the page's query, wait until it is done (not failed), and fetch the API's answer to it
    (the query the page ran: a second POST could already see retrained predictors)."""
    from selenium.webdriver.common.by import By
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
        browser.find_element(By.ID, "status").text
    query_id = browser.find_element(By.TAG_NAME, "body").get_attribute("data-query-id")
    with urllib.request.urlopen(f"{url}/v1/queries/{query_id}") as response:
        return json.loads(response.read())


def test_page_shows_the_api_answer(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url = f"sqlite:///{tmp_path / 'archive.db'}"
    measured_archive(url)  # the page's answer uses the (now stale) predictors: the same front, measured in part
    with BackgroundServer(create_app(ServiceConfig(db=url, search_processes=0))) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert browser.find_element(By.ID, "use-mmlu").is_selected()  # the model has MMLU values
        size = browser.find_element(By.ID, "params")
        size.clear()
        size.send_keys("75%")
        api = run_and_fetch(browser, wait, server.url)
        results = api["results"]
        assert results and api["objectives"] == ["ppl_wikitext2", "mmlu"] and api["target_params"] > 0
        assert any(r["measured"]["ppl_wikitext2"] is not None for r in results)
        assert "stale" in browser.find_element(By.ID, "summary").text

        rows = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        assert [r.get_attribute("data-arch-id") for r in rows] == [r["arch_id"] for r in results]
        for row, r in zip(rows, results):
            assert row.find_element(By.CSS_SELECTOR, "td.params").text == f"{r['params']:,}"
            preds = row.find_elements(By.CSS_SELECTOR, "td.pred")
            assert [float(td.get_attribute("data-value")) for td in preds] == [
                r["predicted"]["ppl_wikitext2"], r["predicted"]["mmlu"]]
            assert preds[0].text.startswith(f"{r['predicted']['ppl_wikitext2']:.4g} ± ")
            assert row.find_element(By.CSS_SELECTOR, "td.fraction").text == f"{100 * r['fraction']:.1f}%"

        for panel, metric in (("plot-ppl", "ppl_wikitext2"), ("plot-mmlu", "mmlu")):
            points = browser.find_elements(By.CSS_SELECTOR, f"#{panel} circle.pt-pred")
            plotted = sorted((p.get_attribute("data-arch-id"), int(p.get_attribute("data-params")),
                              float(p.get_attribute("data-value"))) for p in points)
            assert plotted == sorted((r["arch_id"], r["params"], r["predicted"][metric]) for r in results)
            bars = browser.find_elements(By.CSS_SELECTOR, f"#{panel} line.err")
            assert len(bars) == len(results)
            measured = browser.find_elements(By.CSS_SELECTOR, f"#{panel} path.pt-meas")
            assert sorted(float(p.get_attribute("data-value")) for p in measured) == sorted(
                r["measured"][metric] for r in results if r["measured"][metric] is not None)
            # larger models sit further right
            xs = {p.get_attribute("data-arch-id"): float(p.get_attribute("cx")) for p in points}
            by_size = sorted(results, key=lambda r: r["params"])
            assert all(xs[a["arch_id"]] <= xs[b["arch_id"]] for a, b in zip(by_size, by_size[1:]))
        assert browser.find_element(By.ID, "panel-mmlu").is_displayed()

        # the per-layer strip of the selected (first) architecture, then of a clicked row
        layers = browser.find_elements(By.CSS_SELECTOR, "#strip g.layer")
        assert [int(g.get_attribute("data-q-heads")) for g in layers] == [x["q_heads"] for x in results[0]["layers"]]
        if len(rows) > 1:
            rows[1].click()
            strip = browser.find_element(By.ID, "strip")
            assert strip.get_attribute("data-arch-id") == results[1]["arch_id"]
            layers = browser.find_elements(By.CSS_SELECTOR, "#strip g.layer")
            assert [int(g.get_attribute("data-intermediate")) for g in layers] == [
                x["intermediate"] for x in results[1]["layers"]]
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")

        # an impossible size shows the API's message
        size.clear()
        size.send_keys("1K")
        browser.find_element(By.ID, "run").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
        assert "below the smallest architecture" in browser.find_element(By.ID, "status").text


@pytest.mark.slow
def test_page_shows_warnings_quality_base_line_and_distinct_ticks(browser, tmp_path):
    """Issue 17: a 7-architecture archive's answer carries its warning on the page, with the
    predictors' quality, the base model's measured value (a line on the plot, a row under the
    table), tick labels that differ, the sketch legend, and where look-alike rows differ."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from archopt.archdb.arch import full

    from helpers.archives import SPEC, record_ppl
    url = f"sqlite:///{tmp_path / 'archive.db'}"
    archive = Archive(url)
    fill(archive, 7)
    record_ppl(archive, [full(SPEC)], [3.0], origin="base")
    ensure_predictors(archive, "synth", ["ppl_wikitext2"])
    archive.close()
    with BackgroundServer(create_app(ServiceConfig(db=url, search_processes=0))) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        if browser.find_element(By.ID, "use-mmlu").is_selected():
            browser.find_element(By.ID, "use-mmlu").click()   # perplexity only
        api = run_and_fetch(browser, wait, server.url)   # the default size, 80%
        assert api["warnings"]
        shown = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#warnings li.warning")]
        assert shown == api["warnings"] and browser.find_element(By.ID, "warnings").is_displayed()
        summary = browser.find_element(By.ID, "summary").text
        assert f"on {api['predictor_quality']['ppl_wikitext2']['rows']} rows, CV Kendall τ" in summary

        base = browser.find_element(By.CSS_SELECTOR, "#plot-ppl g.base-ref")
        assert float(base.get_attribute("data-value")) == api["base_measured"]["ppl_wikitext2"] == 3.0
        assert "base model, measured: 3" in base.text
        foot = browser.find_element(By.CSS_SELECTOR, "#results tfoot tr.base-ref td.meas")
        assert float(foot.get_attribute("data-value")) == 3.0
        for axis in ("tick-x", "tick-y"):
            labels = [t.text for t in browser.find_elements(By.CSS_SELECTOR, f"#plot-ppl text.{axis}")]
            assert len(labels) >= 2 and len(set(labels)) == len(labels), labels
        assert "F all" in browser.find_element(By.ID, "sketch-legend").text
        rows = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        assert [r.get_attribute("data-arch-id") for r in rows] == [r["arch_id"] for r in api["results"]]
        for tr, r in zip(rows, api["results"]):
            notes = tr.find_elements(By.CSS_SELECTOR, "td.sketch .note")
            assert [n.text for n in notes] == ([r["sketch_note"]] if r.get("sketch_note") else [])
        shot = tmp_path / "page-warnings.png"
        assert browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
