"""The page at / in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`)
driven by selenium, against a real `simmim serve` of the embedded model on loopback, with an API
key. Two photographs from scikit-image's bundled data stand in for a user's own images.

Each test opens a fresh tab. Screenshots are kept under pytest's temporary directory (their
paths are printed; `-s` shows them); SIMMIM_PAGE_SCREENSHOT=docs/page.png also writes the one the
README shows (test_two_photographs_show_...). Skipped only where Chromium or its driver is not
installed (tests/run.sh installs them when run as root).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from service_fixtures import API_KEY, ServerProcess, wait_until

from service.settings import default_model_path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
PHOTOS = Path(importlib.util.find_spec("skimage").origin).parent / "data"
CAT, COFFEE = PHOTOS / "chelsea.png", PHOTOS / "coffee.png"  # 451 x 300, 600 x 400 px
LARGE = PHOTOS / "retina.jpg"  # 1411 x 1411 px: over the limit the server is given below
MAX_PIXELS = 1_000_000
MODEL_DIR = default_model_path()
WAIT_S = 60

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="Chromium is not installed (as root: apt-get install -y chromium chromium-driver)",
)


# --- the server and the browser ----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"SIMMIM_MAX_PIXELS": str(MAX_PIXELS)}
    with ServerProcess(MODEL_DIR, tmp_path_factory.mktemp("page"), env=env) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with a fresh profile; the machine's network is closed, so nothing in
    it may try to reach the internet (no updates, sync or background requests)."""
    workdir = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        *CHROMIUM_FLAGS,
        f"--user-data-dir={workdir / 'profile'}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(
        executable_path=str(CHROMEDRIVER), log_output=str(workdir / "chromedriver.log")
    )
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture
def tab(browser):
    """A fresh tab (its own sessionStorage); closed afterwards, when the test must not have made
    the page throw: console errors other than the failed requests the test provoked fail it."""
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    browser.get_log("browser")  # drop what earlier tabs logged
    yield browser
    errors = [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
    ]
    browser.close()
    browser.switch_to.window(first)
    assert not errors, errors


def until(driver, condition, what: str, timeout: float = WAIT_S):
    """Poll condition(driver) (stale elements and the like count as not yet)."""

    def check():
        try:
            return condition(driver)
        except WebDriverException:
            return None

    return wait_until(check, what, timeout)


def by_id(driver, element_id: str):
    return driver.find_element(By.ID, element_id)


def open_page(driver, server) -> None:
    """Load the page, give the key when it asks (once per tab) and wait for the model card."""
    driver.get(server.url + "/")
    until(
        driver,
        lambda d: by_id(d, "model-card").is_displayed() or by_id(d, "key-dialog").is_displayed(),
        "the model card or the key dialog",
    )
    if by_id(driver, "key-dialog").is_displayed():
        by_id(driver, "key-input").send_keys(server.api_key, Keys.ENTER)
    until(driver, lambda d: by_id(d, "model-card").is_displayed(), "the model card")


def add_files(driver, *paths: Path) -> None:
    by_id(driver, "files").send_keys("\n".join(str(p) for p in paths))


def card_rows(driver) -> dict[str, str]:
    card = by_id(driver, "model-card")
    terms = [e.text for e in card.find_elements(By.TAG_NAME, "dt")]
    return dict(zip(terms, [e.text for e in card.find_elements(By.TAG_NAME, "dd")]))


def wait_for_reconstruction(driver, **shown: str) -> dict:
    """Wait until the panels show a reconstruction drawn with the given data-* values (e.g.
    maskRatio="0.65"); return the three pictures' PNG bytes (base64) and the loss shown."""

    def drawn(d):
        panels = by_id(d, "panels")
        return (
            panels.is_displayed()
            and panels.get_attribute("data-image")  # drawn at least once
            and all(panels.get_attribute(f"data-{dashed(k)}") == v for k, v in shown.items())
        )

    until(driver, drawn, f"the reconstruction ({shown})")
    pictures = {
        key: by_id(driver, f"panel-{key}").get_attribute("src").split(",", 1)[1]
        for key in ("original", "masked", "reconstruction")
    }
    return {**pictures, "loss": by_id(driver, "loss-value").text}


def dashed(name: str) -> str:
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in name)


def matrix(driver) -> np.ndarray:
    rows = by_id(driver, "matrix").find_elements(By.CSS_SELECTOR, "tbody tr")
    return np.array(
        [
            [float(td.get_attribute("data-value")) for td in r.find_elements(By.TAG_NAME, "td")]
            for r in rows
        ]
    )


def wait_for_matrix(driver, size: int) -> np.ndarray:
    until(
        driver,
        lambda d: by_id(d, "matrix-wrap").is_displayed() and matrix(d).shape == (size, size),
        f"the {size}x{size} similarity matrix",
    )
    return matrix(driver)


def image_status(driver, name: str) -> str:
    """The status line next to the image of that file name."""
    for item in by_id(driver, "image-list").find_elements(By.TAG_NAME, "li"):
        if item.find_element(By.CLASS_NAME, "name").text.endswith(name):
            return item.find_element(By.CLASS_NAME, "status").text
    raise AssertionError(f"{name} is not in the list")


def screenshot(driver, path: Path) -> Path:
    """The whole page (beyond the window) as a PNG; its path is printed."""
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": metrics["width"], "height": metrics["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"\nscreenshot: {path}")
    return path


def reconstruct(server, image: Path, **form: str) -> dict:
    r = server.http.post(
        "/reconstruct", files={"image": (image.name, image.read_bytes())}, data=form
    )
    assert r.status_code == 200, r.text
    return r.json()


# --- the tests ---------------------------------------------------------------------------------
def test_the_page_asks_for_the_api_key_once_and_keeps_it_for_the_tab(tab, server, tmp_path):
    tab.get(server.url + "/")
    until(tab, lambda d: by_id(d, "key-dialog").is_displayed(), "the key dialog")
    assert not by_id(tab, "model-card").is_displayed()
    by_id(tab, "key-input").send_keys("wrong-key", Keys.ENTER)
    until(tab, lambda d: "refused" in by_id(d, "key-error").text, "the refusal")
    assert by_id(tab, "key-dialog").is_displayed()
    screenshot(tab, tmp_path / "key-refused.png")
    by_id(tab, "key-input").send_keys(API_KEY, Keys.ENTER)
    until(tab, lambda d: by_id(d, "model-card").is_displayed(), "the model card")
    assert tab.execute_script("return sessionStorage.getItem('simmim-api-key')") == API_KEY
    tab.refresh()
    until(tab, lambda d: by_id(d, "model-card").is_displayed(), "the model card after a reload")
    assert not by_id(tab, "key-dialog").is_displayed()


def test_the_model_card_shows_name_training_fine_tuning_dimension_evaluation_and_int8(tab, server):
    open_page(tab, server)
    card = json.loads((MODEL_DIR / "model.json").read_text())
    rows = card_rows(tab)
    assert rows["Name"] == card["name"]
    assert rows["Domain"] == card["domain"]
    assert rows["Training data"].startswith(card["training"]["data"])
    assert rows["Embedding"].startswith(f"{card['embedding_dim']} dimensions")
    knn = card["evaluation"]["fp32"]["knn_top1"]
    assert f"kNN top-1 {knn * 100:.1f}%" in rows["Evaluation"]
    assert rows["int8 served"].startswith("no")
    top1 = card["finetuned"]["test_top1"]  # the default model is a fine-tuned run
    assert rows["Fine-tuned"].startswith(f"on {card['finetuned']['labels']}, 10 classes")
    assert f"test top-1 {top1 * 100:.1f}%; serves its pre-logits features" in rows["Fine-tuned"]
    assert by_id(tab, "mask-ratio").get_attribute("value") == str(card["mask_ratio"])


def test_two_photographs_show_their_reconstruction_and_a_2x2_matrix_equal_to_similarity(
    tab, server, tmp_path
):
    open_page(tab, server)
    add_files(tab, CAT, COFFEE)
    shown = wait_for_reconstruction(tab, maskRatio="0.6", seed="0", pasteVisible="true")
    want = reconstruct(server, CAT, mask_ratio="0.6", seed="0")
    assert shown["original"] == want["original"]
    assert shown["masked"] == want["masked_input"]
    assert shown["reconstruction"] == want["reconstruction"]
    assert shown["loss"] == f"{want['loss']:.4f}"

    scores = wait_for_matrix(tab, 2)
    r = server.http.post("/similarity", files=[("a", p.read_bytes()) for p in (CAT, COFFEE)])
    np.testing.assert_allclose(scores, r.json()["scores"], atol=1e-6)
    cells = by_id(tab, "matrix").find_elements(By.CSS_SELECTOR, "tbody td")
    assert [c.text for c in cells] == [f"{v:.3f}" for v in scores.flatten()]
    neighbours = [li.text for li in by_id(tab, "neighbours").find_elements(By.TAG_NAME, "li")]
    off = scores[0, 1]
    assert neighbours == [
        f"1. chelsea.png: 2. coffee.png ({off:.3f})",
        f"2. coffee.png: 1. chelsea.png ({off:.3f})",
    ]
    path = screenshot(tab, tmp_path / "page.png")
    if target := os.environ.get("SIMMIM_PAGE_SCREENSHOT"):
        shutil.copyfile(path, target)


def test_an_undecodable_file_and_a_too_large_image_show_their_errors_next_to_them(
    tab, server, tmp_path
):
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"these are notes, not an image")
    open_page(tab, server)
    add_files(tab, notes, CAT, LARGE, COFFEE)
    until(tab, lambda d: image_status(d, "notes.png"), "the error next to notes.png")
    until(tab, lambda d: image_status(d, "retina.jpg"), "the error next to retina.jpg")
    assert image_status(tab, "notes.png").startswith(
        "This file cannot be read as an image (400 invalid_image): not a decodable image"
    )
    assert image_status(tab, "retina.jpg").startswith(
        f"Too large (413 image_too_large): image is 1411x1411 = 1990921 pixels, more than the "
        f"limit of {MAX_PIXELS}"
    )
    scores = wait_for_matrix(tab, 2)  # the two photographs
    r = server.http.post("/similarity", files=[("a", p.read_bytes()) for p in (CAT, COFFEE)])
    np.testing.assert_allclose(scores, r.json()["scores"], atol=1e-6)
    wait_for_reconstruction(tab)  # of the first readable image: the cat
    options = by_id(tab, "recon-image").find_elements(By.TAG_NAME, "option")
    assert [o.text for o in options] == ["2. chelsea.png", "4. coffee.png"]  # as in the list
    rows = by_id(tab, "matrix").find_elements(By.CSS_SELECTOR, "tbody th")
    assert [r.text for r in rows] == ["2. chelsea.png", "4. coffee.png"]
    assert image_status(tab, "chelsea.png") == image_status(tab, "coffee.png") == ""
    screenshot(tab, tmp_path / "errors.png")


def press(driver, key: str, shift: bool = False) -> None:
    """A key to whatever has the focus, as a keyboard sends it (shift: held down)."""
    if shift:
        ActionChains(driver).key_down(Keys.SHIFT).send_keys(key).key_up(Keys.SHIFT).perform()
    else:
        ActionChains(driver).send_keys(key).perform()


def focus_until(driver, element_id: str, backwards: bool = False, limit: int = 30):
    """Press Tab (Shift+Tab: backwards) until the element with that id has the focus; check on
    the way that every control the focus passes has a name and a visible focus ring. Returns
    the element."""
    for _ in range(limit):
        press(driver, Keys.TAB, shift=backwards)
        focused = driver.switch_to.active_element
        assert focused.accessible_name, focused.get_attribute("outerHTML")
        outline = driver.execute_script(
            "const s = getComputedStyle(document.activeElement);"
            "return [s.outlineStyle, parseFloat(s.outlineWidth)];"
        )
        assert outline[0] != "none" and outline[1] >= 2, (focused.get_attribute("id"), outline)
        if focused.get_attribute("id") == element_id:
            return focused
    raise AssertionError(f"{element_id!r} not reached with {limit} presses")


def test_the_page_works_from_the_keyboard_alone(tab, server):
    open_page(tab, server)
    add_files(tab, CAT, COFFEE)  # a file input takes its files from the keyboard's dialog
    wait_for_reconstruction(tab, maskRatio="0.6", seed="0")
    wait_for_matrix(tab, 2)
    tab.execute_script("document.activeElement.blur()")  # from the top, keys only

    focus_until(tab, "mask-ratio")
    press(tab, Keys.ARROW_RIGHT)
    assert by_id(tab, "mask-ratio-value").text == "0.65"
    shown = wait_for_reconstruction(tab, maskRatio="0.65", seed="0")
    assert (
        shown["reconstruction"]
        == reconstruct(server, CAT, mask_ratio="0.65", seed="0")["reconstruction"]
    )

    focus_until(tab, "seed")
    press(tab, Keys.ARROW_UP)
    shown = wait_for_reconstruction(tab, maskRatio="0.65", seed="1")
    assert shown["masked"] == reconstruct(server, CAT, mask_ratio="0.65", seed="1")["masked_input"]

    focus_until(tab, "paste-visible")
    press(tab, Keys.SPACE)
    shown = wait_for_reconstruction(tab, seed="1", pasteVisible="false")
    raw = reconstruct(server, CAT, mask_ratio="0.65", seed="1", paste_visible="false")
    assert shown["reconstruction"] == raw["reconstruction"]

    remove = focus_until(tab, "", backwards=True)  # buttons have no id: the first one
    assert remove.accessible_name == "Remove 2. coffee.png"
    press(tab, Keys.ENTER)
    until(tab, lambda d: not by_id(d, "matrix-wrap").is_displayed(), "the matrix to go")
    assert len(by_id(tab, "image-list").find_elements(By.TAG_NAME, "li")) == 1
    assert "Add two images" in by_id(tab, "sim-status").text


def test_the_page_fits_a_375_px_wide_screen(tab, server, tmp_path):
    tab.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 375, "height": 812, "deviceScaleFactor": 1, "mobile": True},
    )
    open_page(tab, server)
    add_files(tab, CAT, COFFEE)
    wait_for_reconstruction(tab)
    wait_for_matrix(tab, 2)
    widths = tab.execute_script(
        "return [window.innerWidth, document.documentElement.scrollWidth,"
        " Math.max(...[...document.querySelectorAll('body *')]"
        "   .map(e => e.getBoundingClientRect().right))]"
    )
    assert widths[0] == 375
    assert widths[1] <= 375 and widths[2] <= 375, widths  # no horizontal scrolling
    panels = [by_id(tab, f"panel-{k}").rect for k in ("original", "masked", "reconstruction")]
    assert len({p["y"] for p in panels}) == 1  # still side by side
    screenshot(tab, tmp_path / "page-375px.png")


# --- waiting for the server: 503 while loading, 429 while the queue is full -------------------
@pytest.fixture
def gated_server(tmp_path):
    """A server whose model calls wait for its gate (closed: still loading), one image in the
    queue at most (and so in a request), int8 served, from a copy of the model whose card
    does not say its domain (an older export)."""
    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model)
    card = json.loads((model / "model.json").read_text())
    del card["domain"]
    (model / "model.json").write_text(json.dumps(card))
    env = {"SIMMIM_MAX_QUEUE": "1", "SIMMIM_MAX_IMAGES": "1", "SIMMIM_INT8": "true"}
    with ServerProcess(model, tmp_path, env=env, gated=True) as s:
        yield s


def test_not_ready_is_shown_next_to_the_image_and_retried(tab, gated_server, tmp_path):
    open_page(tab, gated_server)
    rows = card_rows(tab)
    assert "Domain" not in rows and rows["Name"] == "simmim-vit-tiny-fmnist"
    assert rows["int8 served"].startswith("yes")
    add_files(tab, CAT)
    until(tab, lambda d: "(503 not_ready)" in image_status(d, "chelsea.png"), "the 503")
    assert "retry shortly. Trying again in 1 s" in image_status(tab, "chelsea.png")
    assert not by_id(tab, "panels").is_displayed()
    screenshot(tab, tmp_path / "not-ready.png")
    gated_server.open_gate()
    wait_for_reconstruction(tab, seed="0")
    assert image_status(tab, "chelsea.png") == ""


def test_a_full_queue_is_shown_next_to_the_image_and_retried_after_retry_after(tab, gated_server):
    gated_server.open_gate()
    gated_server.wait_ready()
    open_page(tab, gated_server)
    add_files(tab, CAT)
    wait_for_reconstruction(tab, seed="0")
    gated_server.close_gate()
    held = threading.Thread(target=reconstruct, args=(gated_server, COFFEE))
    held.start()  # fills the queue of one while the gate holds it
    try:
        wait_until(
            lambda: gated_server.metric("simmim_running_items", task="reconstruct") == 1,
            "the held reconstruction",
        )
        by_id(tab, "seed").send_keys(Keys.ARROW_UP)
        until(tab, lambda d: "(429 queue_full)" in image_status(d, "chelsea.png"), "the 429")
        assert "Trying again in 1 s" in by_id(tab, "recon-status").text
    finally:
        gated_server.open_gate()
        held.join()
    wait_for_reconstruction(tab, seed="1")
    assert image_status(tab, "chelsea.png") == ""


def test_the_page_talks_to_nothing_but_its_server(tab, server):
    open_page(tab, server)
    add_files(tab, CAT, COFFEE)
    wait_for_matrix(tab, 2)
    origins = tab.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
    )
    assert origins and set(origins) <= {server.url}, origins
    assert httpx.get(server.url + "/").headers["content-security-policy"]
