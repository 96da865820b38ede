"""The web pages in real headless Chromium against a real gunicorn (Selenium)."""

from __future__ import annotations

import base64
import io
import itertools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.restyle import encode, ink_on_paper, low_resolution, png, tight_crop

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "screenshots"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's Chromium, headless; if it cannot start the tests fail and say why."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: `make test` installs chromium and "
                        "chromium-driver from Debian")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic",
                 "--window-size=1100,1100",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as err:
        pytest.fail(f"Chromium could not start: {err.msg}")
    yield driver
    driver.quit()


def console_errors(driver) -> list[str]:
    """SEVERE console entries since the last call (reading them empties the log)."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE"]


def wait_for_digit(driver, timeout: float = 15) -> str:
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.ID, "digit").text not in ("", "?"))
    return driver.find_element(By.ID, "digit").text


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Saved under the test's folder; copied to tests/screenshots/ for the README when
    SAVE_SCREENSHOTS=1."""
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    if os.environ.get("SAVE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(exist_ok=True)
        shutil.copy(path, SCREENSHOTS / name)
    return path


def draw(driver, strokes: list[list[tuple[int, int]]]) -> None:
    """Mouse strokes on #pad; points are offsets from the pad's centre in CSS pixels."""
    pad = driver.find_element(By.ID, "pad")
    for stroke in strokes:
        actions = ActionChains(driver)
        actions.move_to_element_with_offset(pad, *stroke[0]).click_and_hold()
        for (x0, y0), (x1, y1) in itertools.pairwise(stroke):
            for _ in range(8):
                actions.move_by_offset(round((x1 - x0) / 8), round((y1 - y0) / 8))
        actions.release().perform()


def test_drawing_a_one_predicts_one_and_shows_what_the_model_saw(browser, server, tmp_path):
    browser.get(server.url + "/")
    draw(browser, [[(0, -100), (0, 100)]])
    assert wait_for_digit(browser) == "1"
    seen = browser.find_element(By.ID, "seen")
    WebDriverWait(browser, 5).until(
        lambda d: seen.get_attribute("src").startswith("data:image/png"))
    widths = [bar.value_of_css_property("width") for bar in
              browser.find_elements(By.CSS_SELECTOR, "#bars .fill")]
    assert len(widths) == 10 and widths[1] != "0px"
    screenshot(browser, tmp_path, "draw.png")
    assert console_errors(browser) == []


def test_drawing_a_seven(browser, server):
    browser.get(server.url + "/")
    draw(browser, [[(-70, -90), (70, -90), (-10, 100)]])
    assert wait_for_digit(browser) == "7"


INKED_PIXELS = """
const pad = document.getElementById("pad");
const data = pad.getContext("2d").getImageData(0, 0, pad.width, pad.height).data;
let inked = 0;
for (let i = 0; i < data.length; i += 4) {
  if (data[i] !== 255 || data[i + 1] !== 255 || data[i + 2] !== 255) inked += 1;
}
return inked;
"""


def test_clear_empties_the_pad_and_the_answer(browser, server):
    browser.get(server.url + "/")
    draw(browser, [[(0, -100), (0, 100)]])
    wait_for_digit(browser)
    assert browser.execute_script(INKED_PIXELS) > 1000  # the stroke is on the pad
    browser.find_element(By.ID, "clear").click()
    assert browser.execute_script(INKED_PIXELS) == 0  # every pixel white again
    assert browser.find_element(By.ID, "digit").text == "?"
    assert browser.find_element(By.ID, "confidence").text == ""
    widths = [bar.value_of_css_property("width") for bar in
              browser.find_elements(By.CSS_SELECTOR, "#bars .fill")]
    assert widths == ["0px"] * 10


def test_uploading_a_real_digit_photo_predicts_it(browser, server, mnist, tmp_path):
    path = tmp_path / "seven.jpg"
    path.write_bytes(encode(ink_on_paper(mnist.x_test[0], np.random.default_rng(0))
                            .convert("RGB"), "JPEG"))
    browser.get(server.url + "/")
    browser.find_element(By.ID, "file").send_keys(str(path))
    assert wait_for_digit(browser) == "7"
    assert console_errors(browser) == []


def test_a_frame_filling_scan_is_read_and_the_page_shows_what_the_model_saw(
        browser, server, mnist, tmp_path):
    """A 12×12 black-on-white scan of a test 7, cropped to its ink: the page shows the
    digit and, beside it, the 28×28 white-on-black digit the model received."""
    path = tmp_path / "scan.png"
    path.write_bytes(png(255 - low_resolution(tight_crop(mnist.x_test[0]), 12)))
    browser.get(server.url + "/")
    browser.find_element(By.ID, "file").send_keys(str(path))
    assert wait_for_digit(browser) == "7"
    seen = browser.find_element(By.ID, "seen")
    WebDriverWait(browser, 10).until(lambda d: seen.is_displayed())
    source = seen.get_attribute("src")
    with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
        pixels = np.asarray(image, dtype=np.float64)
    rows, cols = np.indices(pixels.shape)
    centre = ((rows * pixels).sum() / pixels.sum(), (cols * pixels).sum() / pixels.sum())
    assert pixels.shape == (28, 28) and pixels[0, 0] == 0 and pixels.max() == 255
    assert np.allclose(centre, (14, 14), atol=1.0)
    assert console_errors(browser) == []


def test_an_unreadable_upload_is_explained_in_words(browser, server, tmp_path):
    path = tmp_path / "not-really.png"
    path.write_bytes(b"this is text, not a picture")
    browser.get(server.url + "/")
    browser.find_element(By.ID, "file").send_keys(str(path))
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 10).until(lambda d: error.is_displayed())
    assert "not a readable image" in error.text
    # The refused request is the only console entry: Chromium logs every 4xx response.
    assert [m for m in console_errors(browser) if "status of 400" not in m] == []


def test_the_model_page_shows_parameters_memory_accuracy_and_plots(browser, server, tmp_path):
    browser.get(server.url + "/model")
    WebDriverWait(browser, 15).until(
        lambda d: "1,199,882" in d.find_element(By.ID, "params").text)
    assert "%" in browser.find_element(By.ID, "accuracy").text
    rows = browser.find_elements(By.CSS_SELECTOR, "#layers tr")
    assert len(rows) == 9 and "conv2d_1" in rows[1].text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#classes tr")) == 10
    WebDriverWait(browser, 15).until(lambda d: len(d.find_elements(
        By.CSS_SELECTOR, "#plots img")) == 3 and all(
        img.get_property("naturalWidth") > 0 for img in d.find_elements(
            By.CSS_SELECTOR, "#plots img")))
    size = browser.find_element(By.ID, "batch-size")
    size.clear()
    size.send_keys("64")
    # Each keystroke recomputes the table ("6", then "64"): wait for the final figure.
    WebDriverWait(browser, 10).until(  # 64 × 348,776 bytes
        lambda d: "21.29 MiB" in d.find_element(By.ID, "memory").text)
    screenshot(browser, tmp_path, "model.png")
    assert console_errors(browser) == []


HOLD_BATCH_SIX = """
// Hold the page's request for batch size 6 until the test releases it; once its body has
// been read, a macrotask (after every microtask of the page's handler) sets staleDone.
const realFetch = window.fetch;
window.staleDone = false;
let release;
window.releaseStale = () => release();
window.fetch = (url, ...rest) => {
  if (!String(url).endsWith("batch_size=6")) return realFetch(url, ...rest);
  return new Promise((resolve) => { release = resolve; })
    .then(() => realFetch(url, ...rest))
    .then((response) => {
      const json = response.json.bind(response);
      response.json = () => json().then((body) => {
        setTimeout(() => { window.staleDone = true; }, 0);
        return body;
      });
      return response;
    });
};
"""


def test_a_late_answer_for_an_earlier_keystroke_never_replaces_the_latest(browser, server):
    browser.get(server.url + "/model")
    WebDriverWait(browser, 15).until(
        lambda d: "1,199,882" in d.find_element(By.ID, "params").text)
    browser.execute_script(HOLD_BATCH_SIX)
    size = browser.find_element(By.ID, "batch-size")
    size.clear()
    size.send_keys("64")  # asks for 6 (held), then 64 (answered)
    WebDriverWait(browser, 10).until(
        lambda d: "21.29 MiB" in d.find_element(By.ID, "memory").text)
    browser.execute_script("window.releaseStale()")  # now the answer for 6 arrives
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return window.staleDone"))
    assert "21.29 MiB" in browser.find_element(By.ID, "memory").text
    assert console_errors(browser) == []


def test_the_pages_fit_a_phone_screen(browser, server, tmp_path):
    browser.set_window_size(390, 844)
    try:
        browser.get(server.url + "/")
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
        screenshot(browser, tmp_path, "phone.png")
    finally:
        browser.set_window_size(1100, 1100)
