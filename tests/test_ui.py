"""The skill explorer at /ui in a real headless Chromium (Selenium), against a real server (uvicorn on a
loopback port) with API keys, a real Redis and a real worker, over tiny-llama.

One browser and one service for the module. The skill `arith` is made by a real extraction job
over HTTP; the page then shows it in the list, renders a latent card with highlighted contexts,
inspects a prompt token by token, compares steered and unsteered completions in the playground,
follows an extraction submitted from its form to the end, and says clearly when a key is wrong.
Screenshots of each page go to the test's output folder (pytest's basetemp, `ui-shots*`), and are
also copied to $RESA_UI_SHOTS_DIR when it is set.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from _helpers_service import TINY_SAE, TINY_TRAIN, upload_rows
from _helpers_ui import find_browser, start_browser, start_ui_service
from conftest import arithmetic_rows

pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
pytestmark = [
    pytest.mark.skipif(find_browser() is None, reason="no headless browser: apt-get install chromium chromium-driver"),
    pytest.mark.usefixtures("one_thread"),
]

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ADMIN_KEY, GENERATE_KEY = "ui-admin-key-0123456789", "ui-generate-key-0123456789"
PROMPT = "What is 12 + 30?"
STEER_LAYER = 2
SHOTS_DIR = os.environ.get("RESA_UI_SHOTS_DIR")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def svc(tmp_path_factory, models_file, session_cache_dir, redis_server):
    yield from start_ui_service(
        tmp_path_factory.mktemp("ui"), models_file, session_cache_dir, redis_server.url, api_keys=f"{ADMIN_KEY}:admin,{GENERATE_KEY}:generate"
    )


@pytest.fixture(scope="module")
def dataset(svc):
    return upload_rows(svc.client, arithmetic_rows(200))


@pytest.fixture(scope="module")
def skill(svc, dataset):
    """`arith`: SAEs on layers 1 and 2 of tiny-llama, made by a real extraction job, with an adapter."""
    body = {"name": "arith", "source": {"model": "tiny-llama"}, "layers": [1, 2], "dataset": dataset, "sae": TINY_SAE, "train": TINY_TRAIN,
            "adapters_for": ["tiny-llama"], "tune": {"max_steps": 2, "chunk_len": 32, "lr": 1e-3}}
    res = svc.client.post("/skills", json=body)
    assert res.status_code == 202, res.text
    extract = svc.wait_job(res.json()["job"]["id"], timeout_s=120)
    assert extract["state"] == "finished", extract
    tune = svc.wait_job(res.json()["adapter_jobs"][0]["id"], timeout_s=120)
    assert tune["state"] == "finished", tune
    return svc.client.get("/skills/arith").json()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui-shots")
    yield folder
    if SHOTS_DIR:  # a copy where people look at them
        Path(SHOTS_DIR).mkdir(parents=True, exist_ok=True)
        for png in folder.glob("*.png"):
            shutil.copy2(png, Path(SHOTS_DIR) / png.name)


@pytest.fixture(scope="module")
def driver():
    browser = start_browser(1280, 800)
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def page(driver, svc, shots, skill):
    """The browser on the explorer with the admin key entered in the header (the way a person does)."""
    p = Page(driver, svc.url, shots)
    p.open("/skills")
    p.enter_key(ADMIN_KEY)
    p.wait_text("#key-state", "key accepted")
    return p


class Page:
    def __init__(self, driver, url: str, shots: Path):
        self.d, self.url, self.shots = driver, url, shots

    def open(self, route: str) -> None:
        if self.d.current_url.startswith(f"{self.url}/ui"):
            self.d.execute_script("location.hash = arguments[0]", route)
        else:
            self.d.get(f"{self.url}/ui#{route}")
        self.wait(lambda d: d.execute_script("return document.readyState") == "complete")

    def wait(self, predicate, timeout: float = 30, what: str = ""):
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.1).until(predicate)
        except TimeoutException:
            main = self.d.execute_script("return document.getElementById('main') && document.getElementById('main').innerText")
            raise AssertionError(f"timed out waiting for {what or predicate}; page shows:\n{(main or '')[:2000]}\nlogs: {self.logs()}") from None

    def css(self, selector: str, timeout: float = 30):
        return self.wait(lambda d: (d.find_elements(By.CSS_SELECTOR, selector) or [None])[0], timeout, selector)

    def all(self, selector: str):
        return self.d.find_elements(By.CSS_SELECTOR, selector)

    def wait_text(self, selector: str, text: str, timeout: float = 30):
        def found(d):
            for el in d.find_elements(By.CSS_SELECTOR, selector):
                if text in el.text:
                    return el
            return None

        return self.wait(found, timeout, f"{text!r} in {selector}")

    def enter_key(self, key: str) -> None:
        field = self.css("#apikey")
        field.clear()
        field.send_keys(key, Keys.ENTER)  # Enter submits the key form

    def hover(self, element) -> str:
        ActionChains(self.d).move_to_element(element).perform()
        tip = self.wait(lambda d: d.find_element(By.ID, "tooltip").is_displayed() and d.find_element(By.ID, "tooltip"), 5, "tooltip")
        return tip.text

    def shot(self, name: str) -> Path:
        """A full-page screenshot at the current width."""
        self.d.execute_script("for (const id of ['tooltip', 'toast']) document.getElementById(id).hidden = true")
        width, height = self.d.get_window_size()["width"], self.d.get_window_size()["height"]
        full = self.d.execute_script("return Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)")
        self.d.set_window_size(width, min(max(height, full + 140), 4000))
        time.sleep(0.2)
        path = self.shots / f"{name}.png"
        self.d.save_screenshot(str(path))
        self.d.set_window_size(width, height)
        return path

    def logs(self) -> list[str]:
        try:
            return [e["message"] for e in self.d.get_log("browser")]
        except Exception:  # noqa: BLE001 - logs are diagnostics only
            return []


@pytest.fixture(scope="module")
def cards(svc, skill) -> list[dict]:
    """The live latents of `arith` at STEER_LAYER, densest first (read over the API)."""
    got = [svc.client.get(f"/skills/arith/latents/{i}", params={"layer": STEER_LAYER}).json() for i in range(TINY_SAE["num_latents"])]
    return sorted((c for c in got if c["contexts"]), key=lambda c: (-c["density"], c["index"]))


def text_of(page, element_id: str) -> str:
    """textContent, untrimmed (WebDriver's .text trims and collapses)."""
    return page.d.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


# ---------------------------------------------------------------- the page itself


def test_ui_is_served_with_a_strict_csp(svc):
    res = svc.client.get("/ui")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    csp = res.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "style-src 'self'" in csp and "'unsafe" not in csp
    assert "<script" in res.text and "onclick" not in res.text and " style=" not in res.text
    for asset in ("app.js", "app.css", "api.js", "charts.js"):
        one = svc.client.get(f"/ui/{asset}")
        assert one.status_code == 200 and one.headers["content-security-policy"] == csp
    assert svc.client.get("/ui/../app/main.py").status_code == 404
    assert svc.client.get("/ui/nope.js").json()["error"]["type"] == "not_found"


def test_the_forms_start_from_the_engines_defaults():
    """The job forms' prefilled values are the engine's defaults, so an untouched form submits what the API would do."""
    import dataclasses
    import re

    from resa_engine.evaluate import EvalConfig
    from resa_engine.extract import ExtractConfig
    from resa_engine.tune.config import LoraSettings, TuneConfig

    source = (Path(__file__).parents[1] / "app" / "ui" / "jobs.js").read_text()

    def js(name: str) -> dict:
        body = re.search(rf"const {name} = (\{{.*?\}});", source).group(1)
        return json.loads(re.sub(r"(\w+):", r'"\1":', body))

    def defaults(*classes) -> dict:
        return {f.name: f.default for c in classes for f in dataclasses.fields(c) if f.default is not dataclasses.MISSING}

    extract = {**defaults(ExtractConfig), "chunk_len": 2048}  # unset: the authors' 2048, capped at the model's context
    tune = {**defaults(TuneConfig, LoraSettings), "chunk_len": 2048}
    for name, engine in (("EXTRACT_DEFAULTS", extract), ("TUNE_DEFAULTS", tune), ("EVAL_DEFAULTS", defaults(EvalConfig))):
        form = js(name)
        assert form and {key: engine[key] for key in form} == form, name


def test_wrong_api_key_shows_a_clear_message(driver, svc, shots, skill):
    p = Page(driver, svc.url, shots)
    p.open("/skills")
    p.enter_key("not-the-key")
    banner = p.wait_text("#banner", "API key rejected")
    assert "invalid API key" in banner.text
    error = p.wait_text("#main .error", "API key rejected")
    assert "invalid API key" in error.text and "unauthorized" in error.text  # the API's message and type
    assert p.css("#key-state").text == "key rejected"
    assert "not-the-key" not in driver.current_url
    p.shot("01-wrong-key")
    # the key lives in this tab's sessionStorage only
    assert driver.execute_script("return sessionStorage.getItem('resa.apiKey')") == "not-the-key"
    assert driver.execute_script("return localStorage.length") == 0
    # a generate-scoped key may read but not extract: a 403 is a clear message too
    p.enter_key(GENERATE_KEY)
    p.wait_text("#key-state", "key accepted")
    p.open("/jobs?form=extract")
    p.css("#form-extract #ex-name").send_keys("nope", Keys.ENTER)
    scope = p.wait_text("#form-extract .error", "API key rejected")
    assert "may not admin" in scope.text


# ---------------------------------------------------------------- skills and latents


def test_skills_list_shows_the_skill_made_in_the_test(page, skill):
    page.open("/skills")
    row = page.css('tr[data-skill="arith"]')
    text = row.text
    assert "tiny-llama" in text and "1, 2" in text and "128 · k 8" in text
    fvu = skill["metrics"][str(skill["manifest"]["default_layer"])]["fvu"]
    assert f"{fvu:.3f}".rstrip("0") in text
    assert skill["manifest"]["dataset"]["sha256"][:10] in text
    page.shot("02-skills")

    row.find_element(By.CSS_SELECTOR, "a.skill-link").click()
    page.wait(lambda d: d.execute_script("return location.hash") == "#/skills/arith")
    bars = page.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".report-chart .bar")) == 8 and d.find_elements(By.CSS_SELECTOR, ".report-chart .bar"))
    fvu_bar = next(b for b in bars if b.get_attribute("data-metric") == "fvu" and b.get_attribute("data-layer") == "1")
    assert "FVU" in page.hover(fvu_bar) and "Layer 1" in page.hover(fvu_bar)
    assert "tiny-llama" in page.css(".adapter-list").text
    page.css(".latent-table tbody tr")
    # keyboard: Enter on a bar of the report browses that layer's latents
    other = 1 if skill["manifest"]["default_layer"] == 2 else 2
    bar = next(b for b in bars if b.get_attribute("data-metric") == "loss_recovered" and b.get_attribute("data-layer") == str(other))
    page.d.execute_script("arguments[0].focus()", bar)
    ActionChains(page.d).send_keys(Keys.ENTER).perform()
    page.wait(lambda d: Select(d.find_element(By.ID, "lb-layer")).first_selected_option.get_attribute("value") == str(other))
    page.wait(lambda d: f"layer={other}" in d.execute_script("return location.hash"))
    page.wait_text(".lb-hist figcaption", f"layer {other}")  # that layer's latents and density histogram
    page.shot("03-skill")


def test_latents_search_by_word_and_index(page, cards):
    token = next(x["token"].strip() for c in cards for x in c["contexts"] if len(x["token"].strip()) >= 3 and x["token"].strip().isalpha())
    page.open(f"/skills/arith?layer={STEER_LAYER}")
    query = page.css("#lb-q")
    query.clear()
    query.send_keys(token, Keys.ENTER)
    page.wait_text(".lb-results .pager", f"matching “{token}”")
    rows = page.all(".latent-table tbody tr")
    expected = {c["index"] for c in cards if any(token.lower() in (x["before"] + x["token"] + x["after"]).lower() for x in c["contexts"])}
    shown = {int(r.get_attribute("data-latent")) for r in rows}
    assert shown and shown <= expected and len(shown) == min(len(expected), 25)
    query.clear()
    query.send_keys("#5", Keys.ENTER)
    page.wait(lambda d: [r.get_attribute("data-latent") for r in d.find_elements(By.CSS_SELECTOR, ".latent-table tbody tr")] == ["5"])


def test_latent_card_renders_highlighted_contexts(page, cards):
    card = next(c for c in cards if len(c["contexts"]) >= 3)
    page.open(f"/skills/arith?layer={STEER_LAYER}")
    page.css(f'.latent-table tr[data-latent="{card["index"]}"] a.latent-link', timeout=30)
    page.d.execute_script("location.hash = arguments[0]", f"#/skills/arith/latents/{card['index']}?layer={STEER_LAYER}")
    items = page.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#contexts li.context")) == len(card["contexts"]) and d.find_elements(By.CSS_SELECTOR, "#contexts li.context"))
    marks = [li.find_element(By.CSS_SELECTOR, "mark.fire") for li in items]
    strengths = [float(page.d.execute_script("return arguments[0].style.getPropertyValue('--a')", m)) for m in marks]
    assert strengths[0] == 1.0 and strengths == sorted(strengths, reverse=True)  # shaded by activation
    for li, mark, ctx in zip(items, marks, card["contexts"]):
        assert mark.text.replace("·", " ").strip() == ctx["token"].strip() or mark.text == "↵"
        assert f"{ctx['activation']:.2f}".rstrip("0").rstrip(".") in li.text
        if ctx["after"].split():
            assert ctx["after"].split()[0] in li.text
    assert f"{100 * card['density']:.3f}%" in page.css("#stat-density").text
    assert page.css(".hist-pair svg.histogram")
    page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, ".density-slot svg.histogram"), 30, "the layer density histogram")
    page.shot("04-latent-card")


def test_inspect_shows_each_token_with_its_latents(page, svc, skill):
    expected = svc.client.post("/skills/arith/inspect", json={"model": "tiny-llama", "prompt": PROMPT, "layer": STEER_LAYER, "top": 8}).json()
    page.open("/inspect?skill=arith")
    Select(page.css("#inspect-layer")).select_by_value(str(STEER_LAYER))
    prompt = page.css("#inspect-prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)  # Ctrl+Enter runs it
    cols = page.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#token-strip .tok-col")) == len(expected["tokens"]) and d.find_elements(By.CSS_SELECTOR, "#token-strip .tok-col"))
    for col, tok in zip(cols, expected["tokens"]):
        chips = col.find_elements(By.CSS_SELECTOR, ".lat-chip")
        assert [int(c.get_attribute("data-latent")) for c in chips] == [lat["index"] for lat in tok["latents"][:3]]
    first = cols[0].find_element(By.CSS_SELECTOR, ".lat-chip")
    tip = page.hover(first)
    assert f"latent #{expected['tokens'][0]['latents'][0]['index']}" in tip and "activation" in tip
    cols[1].find_element(By.CSS_SELECTOR, "button.tok").click()
    rows = page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#token-detail tbody tr"))
    assert len(rows) == len(expected["tokens"][1]["latents"])
    page.all(".chip-row .chip-btn")[0].click()  # trace the strongest latent across the prompt
    page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, ".tok-col.traced"))
    page.shot("05-inspect")
    index = first.get_attribute("data-latent")
    first.click()  # a latent opens its card
    page.wait(lambda d: d.execute_script("return location.hash") == f"#/skills/arith/latents/{index}?layer={STEER_LAYER}")
    page.css("#stat-density")


# ---------------------------------------------------------------- playground


def _changing_edit(svc, cards) -> tuple[int, dict]:
    """A latent whose clamp to 50 changes tiny-llama's greedy completion (found over the API)."""
    for card in cards[:16]:
        sae = {"skill": "arith", "layer": STEER_LAYER, "edits": [{"latent": card["index"], "mode": "clamp", "value": 50.0}]}
        res = svc.client.post("/generate", json={"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "sae": sae, "compare": True}).json()
        if res["text"] != res["unsteered"]["text"]:
            return card["index"], res
    pytest.fail("no latent clamp changed the greedy completion")


def _generate(page) -> tuple[str, str, str]:
    page.css("#pg-run").click()
    verdict = page.wait(lambda d: d.find_element(By.ID, "pg-verdict").text and d.find_element(By.ID, "pg-verdict"), 60, "the compare verdict")
    page.wait(lambda d: "finish:" in d.find_element(By.ID, "pg-meta-0").text and "finish:" in d.find_element(By.ID, "pg-meta-1").text)
    return text_of(page, "pg-out-0"), text_of(page, "pg-out-1"), verdict.text


def test_playground_compare_streams_steered_and_unsteered(page, svc, cards):
    latent, expected = _changing_edit(svc, cards)
    # pick the latent from the explorer: its card's "Steer with this latent"
    page.open("/playground")  # start from a clean slate of edits
    page.d.execute_script("sessionStorage.removeItem('resa.playground')")
    page.open(f"/skills/arith/latents/{latent}?layer={STEER_LAYER}")
    page.css(".steer-button").click()
    page.wait_text("#toast", f"Latent {latent} → playground")
    page.open("/playground")
    row = page.css("#pg-edits tr.edit-row")
    inputs = row.find_elements(By.CSS_SELECTOR, "input")
    assert inputs[0].get_attribute("value") == str(latent)
    assert Select(page.css("#pg-sae-skill")).first_selected_option.get_attribute("value") == "arith"
    assert Select(page.css("#pg-layer")).first_selected_option.get_attribute("value") == str(STEER_LAYER)
    inputs[1].clear()
    inputs[1].send_keys("50")
    Select(row.find_element(By.CSS_SELECTOR, "select")).select_by_value("clamp")
    tokens = page.css("#pg-max-tokens")
    tokens.clear()
    tokens.send_keys("12")
    prompt = page.css("#pg-prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)

    steered, unsteered, verdict = _generate(page)
    assert steered != unsteered and "differ" in verdict
    assert (steered, unsteered) == (expected["text"], expected["unsteered"]["text"])
    page.shot("06-playground-differ")

    page.css("#pg-clear-edits").click()
    steered, unsteered, verdict = _generate(page)
    assert steered == unsteered == expected["unsteered"]["text"] and "Identical" in verdict
    page.shot("07-playground-same")

    # splice mode: sent as sae.mode; a server without it answers 422, shown as a readable error
    page.css("#pg-mode-splice").click()
    page.css("#pg-run").click()
    outcome = page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, ".pg-error .error") or (d.find_element(By.ID, "pg-verdict").text and d.find_elements(By.ID, "pg-verdict")), 60, "splice result")
    if "error" in (outcome[0].get_attribute("class") or ""):
        assert "sae" in outcome[0].text and "invalid_request" in outcome[0].text
    page.shot("08-playground-splice")
    page.css("#pg-mode-steer").click()


# ---------------------------------------------------------------- jobs


def _fill(page, selector: str, value) -> None:
    el = page.css(selector)
    el.clear()
    el.send_keys(str(value))


def test_job_submitted_from_the_form_shows_progress_and_finishes(page, svc, dataset):
    page.open("/jobs?form=extract")
    form = page.css("#form-extract")
    assert page.css("#ex-chunk_len").get_attribute("value") == "2048" and page.css("#ex-k").get_attribute("value") == "32"  # the API's defaults
    assert Select(page.css("#ex-dataset")).first_selected_option.get_attribute("value") == dataset
    _fill(page, "#ex-name", "arith-ui")
    _fill(page, "#ex-layers", "1")
    _fill(page, "#ex-num_latents", 64)
    _fill(page, "#ex-k", 8)
    _fill(page, "#ex-chunk_len", 32)
    _fill(page, "#ex-batch_size", 4)
    _fill(page, "#ex-max_tokens", 32768)
    _fill(page, "#ex-heldout_max_tokens", 256)
    form.find_element(By.ID, "ex-submit").click()
    page.wait(lambda d: d.execute_script("return location.hash").startswith("#/jobs/"), 20, "the job page")
    job_id = page.d.execute_script("return location.hash").split("/")[-1]
    page.wait(lambda d: (d.find_element(By.ID, "job-progress").get_attribute("data-stages") or "") != "", 60, "a progress event")
    page.shot("09-job-running")
    page.wait(lambda d: d.find_element(By.ID, "job-state").get_attribute("data-state") in ("finished", "failed", "canceled"), 120, "the job to end")
    state = page.css("#job-state").get_attribute("data-state")
    assert state == "finished", page.css("#job-progress").text
    progress = page.css("#job-progress")
    assert int(progress.get_attribute("data-events")) >= 2
    stages = set(progress.get_attribute("data-stages").split(","))  # the stages seen live (a fast stage may end before the page listens)
    assert stages and stages <= {"extract", "cards"} and "cards" in stages, stages
    assert page.css("#job-result #result-skill").text == "arith-ui"
    assert page.css("#job-result .report-chart")
    assert svc.client.get(f"/jobs/{job_id}").json()["state"] == "finished"
    page.shot("10-job-finished")
    page.open("/jobs")
    page.css(f'tr[data-job="{job_id}"][data-state="finished"]')
    page.shot("11-jobs")


def test_dataset_upload_from_the_form(page, tmp_path):
    good = tmp_path / "more.jsonl"
    good.write_text("".join(r.to_json() + "\n" for r in arithmetic_rows(20, seed=7)))
    page.open("/jobs?form=dataset")
    page.css("#ds-file").send_keys(str(good))
    page.css("#ds-submit").click()
    done = page.wait_text("#ds-result", "Stored 20 rows")
    dataset_id = done.find_element(By.TAG_NAME, "code").text
    assert page.d.execute_script("return fetch('/datasets/' + arguments[0], {headers: {Authorization: 'Bearer ' + sessionStorage.getItem('resa.apiKey')}}).then(r => r.status)", dataset_id) == 200
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n{"question": "no answer"}\nnot json\n')
    page.open("/jobs?form=extract")
    page.open("/jobs?form=dataset")
    page.css("#ds-file").send_keys(str(bad))
    page.css("#ds-submit").click()
    error = page.wait_text("#form-dataset .error", "Could not upload the dataset")
    assert "invalid_dataset" in error.text and "line 2" in error.text and "line 3" in error.text  # every bad line, by number
    page.shot("12-dataset-error")


def test_evaluation_from_the_form_shows_its_report(page, dataset):
    page.open("/jobs?form=eval&skill=arith")
    Select(page.css("#ev-model")).select_by_value("tiny-llama")
    Select(page.css("#ev-skill")).select_by_value("arith")
    Select(page.css("#ev-dataset")).select_by_value(dataset)
    assert page.css("#ev-temperature").get_attribute("value") == "0.6"  # the API's defaults
    _fill(page, "#ev-samples", 1)
    _fill(page, "#ev-limit", 2)
    _fill(page, "#ev-max_tokens", 4)
    page.css("#ev-max_tokens").send_keys(Keys.ENTER)  # Enter submits
    page.wait(lambda d: d.execute_script("return location.hash").startswith("#/jobs/"), 20, "the job page")
    page.wait(lambda d: d.find_element(By.ID, "job-state").get_attribute("data-state") in ("finished", "failed", "canceled"), 120, "the evaluation to end")
    assert page.css("#job-state").get_attribute("data-state") == "finished", page.css("#job-progress").text
    report = page.css("#job-result")
    assert "pass@1" in report.text.lower() and "base" in report.text and "skill" in report.text and "2 of 200 questions" in report.text
    page.shot("13-eval-finished")


def test_adapter_build_from_the_form_can_be_canceled(page):
    page.open("/jobs?form=adapter&skill=arith")
    assert page.css("#ad-lr").get_attribute("value") == "0.000001" and page.css("#ad-r").get_attribute("value") == "32"
    Select(page.css("#ad-target")).select_by_value("tiny-llama-b")
    _fill(page, "#ad-chunk_len", 32)
    _fill(page, "#ad-epochs", 1000)
    _fill(page, "#ad-lr", 0.001)
    page.css("#ad-submit").click()
    page.wait(lambda d: d.execute_script("return location.hash").startswith("#/jobs/"), 20, "the job page")
    page.wait(lambda d: d.find_element(By.ID, "job-state").get_attribute("data-state") == "started" and "tune" in (d.find_element(By.ID, "job-progress").get_attribute("data-stages") or ""), 60, "tuning to start")
    page.css("#job-cancel").click()
    page.wait(lambda d: d.find_element(By.ID, "job-state").get_attribute("data-state") == "canceled", 60, "the job to be canceled")
    assert "cancel" in page.css("#job-progress .error").text.lower()
    page.shot("14-job-canceled")


# ---------------------------------------------------------------- errors, layout, keyboard, development mode


def test_api_errors_are_readable_messages(page):
    page.open("/skills/no-such-skill")
    error = page.wait_text("#main .error", "no-such-skill")
    assert "not_found" in error.text and "HTTP 404" in error.text
    page.open("/skills/arith/latents/9999?layer=2")
    assert "invalid_latent" in page.wait_text("#main .error", "out of range").text
    page.open("/nowhere")
    page.wait_text("#main h1", "Not found")


def test_keyboard_reaches_the_main_actions(page):
    page.open("/skills")
    page.d.refresh()  # a fresh document: Tab starts at the top
    page.css('tr[data-skill="arith"]')
    seen = []
    for _ in range(12):  # skip link, brand, Skills, Inspect, Playground, Jobs, ...
        ActionChains(page.d).send_keys(Keys.TAB).perform()
        active = page.d.switch_to.active_element
        seen.append(active.text or active.get_attribute("id"))
        if active.text == "Playground":
            break
    assert "Skip to content" in seen and "Skills" in seen and seen[-1] == "Playground", seen
    outline = page.d.execute_script("return getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # a visible focus ring
    ActionChains(page.d).send_keys(Keys.ENTER).perform()
    page.wait(lambda d: d.execute_script("return location.hash") == "#/playground")
    page.css("#pg-run")
    page.d.back()  # hash routes: the back button works
    page.wait(lambda d: d.execute_script("return location.hash") == "#/skills")
    page.css('tr[data-skill="arith"]')


@pytest.mark.parametrize("width, height", [(1280, 800), (2560, 1440)])
def test_pages_fit_laptop_and_wide_screens(page, width, height):
    page.d.set_window_size(width, height)
    try:
        for route, ready in (("/skills/arith", ".latent-table tbody tr"), ("/jobs", "#form-extract"), ("/playground", "#pg-run")):
            page.open(route)
            page.css(ready)
            overflow = page.d.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0, f"{route} scrolls sideways by {overflow}px at {width}x{height}"
        if width > 2000:
            page.open("/skills/arith")
            page.css(".latent-table tbody tr")
            page.shot("15-skill-wide")
    finally:
        page.d.set_window_size(1280, 800)


def test_no_csp_violations_or_script_errors(page):
    logs = page.logs()
    bad = [m for m in logs if "Content Security Policy" in m or "Uncaught" in m]
    assert not bad, bad


def test_development_mode_needs_no_key(driver, shots, tmp_path_factory, models_file, session_cache_dir, redis_server, page):
    gen = start_ui_service(tmp_path_factory.mktemp("ui-dev"), models_file, session_cache_dir, redis_server.url, worker=False)
    dev = next(gen)
    try:
        p = Page(driver, dev.url, shots)
        p.d.get(f"{dev.url}/ui#/skills")  # another origin: another sessionStorage, no key
        p.wait_text("#key-state", "development mode")
        p.wait_text("#main", "No skills yet")
        assert not p.css("#banner", 5).is_displayed()
        p.shot("16-dev-mode")
    finally:
        gen.close()


def test_screenshots_were_saved(shots):
    names = sorted(p.name for p in shots.glob("*.png"))
    assert {"01-wrong-key.png", "04-latent-card.png", "05-inspect.png", "06-playground-differ.png", "10-job-finished.png"} <= set(names), names
    (shots / "index.json").write_text(json.dumps(names, indent=1))
