"""The playground page, in a real headless Chromium against a real gateway, worker and Redis.

Chromium and its driver are Debian's `chromium` and `chromium-driver` (.ci/run installs them);
the tests skip, saying so, only where no Chromium can be found. Set PLAYGROUND_SCREENSHOT to a
path (docs/playground.png) to save the page with its finished image there.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from imagegen.cli.redis_server import RedisServer
from tests.stack import ROOT, Gateway, Proc, start_gateway, wait_for_job

KEY = "ig_playground_key_0123456789abcdef"
PROMPT = "a large red circle at the top left on a blue background"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
]
# Roles of the controls a user operates; each must have an accessible name.
CONTROL_ROLES = {
    "textbox",
    "searchbox",
    "spinbutton",
    "combobox",
    "listbox",
    "button",
    "link",
    "checkbox",
    "radio",
    "slider",
    "progressbar",
}
T = TypeVar("T")


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    chromium = _find("chromium", "chromium-browser", "google-chrome")
    driver = _find("chromedriver", "chromium-driver")
    if chromium is None or driver is None:
        pytest.skip(
            "no Chromium and chromedriver on PATH: install Debian's `chromium` and "
            "`chromium-driver` (as .ci/run does) to run the playground's browser tests"
        )
    return chromium, driver


@pytest.fixture
def browser(browser_paths: tuple[str, str], tmp_path: Path) -> Iterator[tuple[WebDriver, Path]]:
    """A fresh headless Chromium (its own profile) and the folder its downloads land in."""
    chromium, driver_path = browser_paths
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior",
            {"behavior": "allow", "downloadPath": str(downloads), "eventsEnabled": True},
        )
        yield driver, downloads
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def keyed_gateway(
    redis_server: RedisServer, builtin_worker: Proc, log_dir: Path
) -> Iterator[Gateway]:
    entry = f"player:{hashlib.sha256(KEY.encode()).hexdigest()}"
    gateway = start_gateway(
        redis_server.url, log_dir, {"IMAGEGEN_API_KEYS": entry}, name="gateway-playground-keys"
    )
    yield gateway
    gateway.proc.stop()


def wait(driver: WebDriver, condition: Callable[[WebDriver], T], timeout_s: float = 60) -> T:
    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(condition)


def by_id(driver: WebDriver, element_id: str) -> WebElement:
    return driver.find_element(By.ID, element_id)


def open_page(driver: WebDriver, url: str) -> None:
    driver.get(url)
    # Ready once /v1/models has filled the model list (or the page asked for a key).
    wait(
        driver,
        lambda d: d.execute_script(
            "return document.getElementById('model').options.length > 0"
            " || !document.getElementById('key-section').hidden"
        ),
    )


def set_field(driver: WebDriver, field: str, value: str) -> None:
    element = by_id(driver, field)
    element.clear()
    if value:
        element.send_keys(value)


def job_status(driver: WebDriver) -> str | None:
    return by_id(driver, "job").get_attribute("data-status")


def save_full_page(driver: WebDriver, path: Path) -> None:
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def csp_violations(driver: WebDriver) -> list[str]:
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if "Content Security Policy" in entry["message"]
    ]


def test_generate_shows_the_image_and_downloads_its_png(
    gateway: Gateway, builtin_worker: Proc, browser: tuple[WebDriver, Path]
) -> None:
    driver, downloads = browser
    open_page(driver, f"{gateway.base_url}/playground")
    # An open service: no key field, and the form holds the default model's defaults.
    assert not by_id(driver, "key-section").is_displayed()
    models = httpx.get(f"{gateway.base_url}/v1/models").json()["data"]
    default = next(m for m in models if m["default"])
    assert by_id(driver, "model").get_attribute("value") == default["id"]
    assert by_id(driver, "steps").get_attribute("value") == str(default["steps"])
    assert by_id(driver, "width").get_attribute("value") == str(default["width"])

    set_field(driver, "prompt", PROMPT)
    set_field(driver, "steps", "12")
    set_field(driver, "seed", "4242")
    set_field(driver, "n", "2")
    by_id(driver, "n").send_keys(Keys.ENTER)  # the keyboard submits the form

    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery li")) == 2)
    cards = driver.find_elements(By.CSS_SELECTOR, "#gallery li")
    assert job_status(driver) == "succeeded"
    assert [c.get_attribute("data-seed") for c in cards] == ["4242", "4243"]
    assert "Seed 4243" in cards[1].text
    # The images decoded (blob: URLs fetched by the page) at the model's size.
    for card in cards:
        image = card.find_element(By.TAG_NAME, "img")
        assert image.get_attribute("src").startswith("blob:")
        assert (
            driver.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", image
            )
            == default["width"]
        )
    assert by_id(driver, "job-progress").get_attribute("value") == "1"

    screenshot = os.environ.get("PLAYGROUND_SCREENSHOT")
    if screenshot:
        driver.execute_script("document.activeElement.blur()")
        save_full_page(driver, Path(screenshot))

    job_id = cards[1].get_attribute("data-job")
    cards[1].find_element(By.CSS_SELECTOR, "a.download").click()
    target = downloads / f"{job_id}-1.png"
    wait(driver, lambda d: target.exists() and not list(downloads.glob("*.crdownload")))
    served = httpx.get(f"{gateway.base_url}/v1/generations/{job_id}/images/1").content
    assert target.read_bytes() == served
    parameters = json.loads(Image.open(io.BytesIO(served)).text["parameters"])
    assert parameters["prompt"] == PROMPT
    assert parameters["seed"] == 4243
    assert parameters["steps"] == 12
    assert (parameters["width"], parameters["height"]) == (default["width"], default["height"])
    assert parameters["model"] == default["id"]

    # "Reuse these parameters" fills the form from the PNG's chunk: image 1's own seed.
    for field in ("prompt", "seed", "steps"):
        set_field(driver, field, "")
    cards[1].find_element(By.CSS_SELECTOR, "button.reuse").click()
    wait(driver, lambda d: by_id(d, "seed").get_attribute("value") == "4243")
    assert by_id(driver, "prompt").get_attribute("value") == PROMPT
    assert by_id(driver, "steps").get_attribute("value") == "12"
    assert by_id(driver, "scheduler").get_attribute("value") == parameters["scheduler"]
    assert csp_violations(driver) == []


def test_cancel_stops_a_running_job(
    gateway: Gateway, builtin_worker: Proc, browser: tuple[WebDriver, Path]
) -> None:
    driver, _ = browser
    open_page(driver, gateway.base_url + "/")
    set_field(driver, "prompt", PROMPT)
    set_field(driver, "steps", "100")  # shapes-64's own cap
    set_field(driver, "n", "8")
    by_id(driver, "generate").click()
    # Progress from the event stream: a step past 0 and the bar moving.
    wait(driver, lambda d: job_status(d) == "running")
    wait(driver, lambda d: float(by_id(d, "job-progress").get_attribute("value") or 0) > 0)
    assert by_id(driver, "job-step").text.endswith("of 100")
    wait(driver, lambda d: by_id(d, "job-eta").text.startswith("about"))
    assert by_id(driver, "generate").get_attribute("disabled") is not None
    job_id = by_id(driver, "job-id").text

    by_id(driver, "cancel").click()
    wait(driver, lambda d: job_status(d) == "canceled")
    assert by_id(driver, "job-status").text == "Canceled."
    assert by_id(driver, "generate").get_attribute("disabled") is None
    assert driver.find_elements(By.CSS_SELECTOR, "#gallery li") == []
    with gateway.client() as client:
        document = wait_for_job(client, job_id)
    assert document["status"] == "canceled"
    assert document["images"] == []


def test_a_refused_field_shows_its_error_beside_it(
    gateway: Gateway, builtin_worker: Proc, browser: tuple[WebDriver, Path]
) -> None:
    driver, _ = browser
    open_page(driver, f"{gateway.base_url}/playground")
    set_field(driver, "prompt", PROMPT)
    set_field(driver, "width", "65")
    by_id(driver, "generate").click()
    wait(driver, lambda d: by_id(d, "width-error").text != "")
    assert "multiple of 8" in by_id(driver, "width-error").text
    assert by_id(driver, "width").get_attribute("aria-invalid") == "true"
    assert driver.switch_to.active_element == by_id(driver, "width")
    # Only the field the API named is marked, and no job was made.
    assert by_id(driver, "height-error").text == ""
    assert by_id(driver, "prompt").get_attribute("aria-invalid") is None
    assert job_status(driver) is None

    # A blank prompt is the prompt's error, and fixing both clears them on the next try.
    set_field(driver, "width", "64")
    set_field(driver, "prompt", "   ")
    by_id(driver, "generate").click()
    wait(driver, lambda d: by_id(d, "prompt-error").text != "")
    assert by_id(driver, "width-error").text == ""
    assert "empty" in by_id(driver, "prompt-error").text


def test_with_api_keys_the_key_is_asked_for_kept_locally_and_sent_as_a_header(
    keyed_gateway: Gateway, browser: tuple[WebDriver, Path]
) -> None:
    driver, _ = browser
    open_page(driver, f"{keyed_gateway.base_url}/playground")
    assert by_id(driver, "key-section").is_displayed()
    assert by_id(driver, "model").get_attribute("value") == ""

    # A wrong key: the 401 shows beside the key field.
    set_field(driver, "api-key", "not-the-key")
    by_id(driver, "key-save").click()
    wait(driver, lambda d: "valid API key" in by_id(d, "api-key-error").text)

    set_field(driver, "api-key", KEY)
    by_id(driver, "api-key").send_keys(Keys.ENTER)
    wait(driver, lambda d: by_id(d, "model").get_attribute("value") != "")
    assert by_id(driver, "api-key-error").text == ""
    assert driver.execute_script("return localStorage.getItem('imagegen.apiKey')") == KEY

    set_field(driver, "prompt", PROMPT)
    set_field(driver, "steps", "4")
    set_field(driver, "seed", "7")
    by_id(driver, "generate").click()
    card = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery li") or False)[0]
    assert card.get_attribute("data-seed") == "7"
    assert driver.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth",
        card.find_element(By.TAG_NAME, "img"),
    )
    # The job belongs to the key: the API shows it to the key, and to nobody without it.
    job_id = card.get_attribute("data-job")
    with httpx.Client(base_url=keyed_gateway.base_url) as client:
        assert client.get(f"/v1/generations/{job_id}").status_code == 401
        mine = client.get(f"/v1/generations/{job_id}", headers={"Authorization": f"Bearer {KEY}"})
        assert mine.json()["status"] == "succeeded"
    # The key never went into a URL the page requested.
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any("/events" in url for url in urls), urls
    assert not [url for url in urls if KEY in url]

    # A reload finds the key in local storage and needs no typing.
    driver.refresh()
    open_page(driver, f"{keyed_gateway.base_url}/playground")
    wait(driver, lambda d: by_id(d, "model").get_attribute("value") != "")
    assert by_id(driver, "api-key").get_attribute("value") == KEY
    # The code snippet names the key's variable, never the key.
    snippet = str(driver.execute_script("return document.getElementById('snippet').textContent"))
    assert "$IMAGEGEN_API_KEY" in snippet and KEY not in snippet
    assert csp_violations(driver) == []


def _named_controls(driver: WebDriver) -> dict[str, tuple[str, str]]:
    """Each visible input, select, textarea, button and link: its id or text, AX role and name."""
    driver.execute_cdp_cmd("DOM.enable", {})
    driver.execute_cdp_cmd("Accessibility.enable", {})
    tree = driver.execute_cdp_cmd("Accessibility.getFullAXTree", {})["nodes"]
    by_backend = {node.get("backendDOMNodeId"): node for node in tree}
    root = driver.execute_cdp_cmd("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    found = driver.execute_cdp_cmd(
        "DOM.querySelectorAll",
        {"nodeId": root, "selector": "input, select, textarea, button, a[href], progress"},
    )["nodeIds"]
    controls: dict[str, tuple[str, str]] = {}
    for number, node_id in enumerate(found):
        node = driver.execute_cdp_cmd("DOM.describeNode", {"nodeId": node_id})["node"]
        attributes = node.get("attributes", [])
        attrs = dict(zip(attributes[::2], attributes[1::2], strict=True))
        ax = by_backend.get(node["backendNodeId"])
        if ax is None:  # the full tree leaves out hidden subtrees; ask for the node itself
            ax = driver.execute_cdp_cmd(
                "Accessibility.getPartialAXTree",
                {"backendNodeId": node["backendNodeId"], "fetchRelatives": False},
            )["nodes"][0]
        if ax.get("ignored"):
            continue  # hidden (the key field of an open service)
        label = attrs.get("id") or f"{node['nodeName'].lower()}#{number}"
        role = ax.get("role", {}).get("value", "")
        name = str(ax.get("name", {}).get("value", "")).strip()
        controls[label] = (role, name)
    return controls


def test_every_control_has_an_accessible_name(
    gateway: Gateway,
    keyed_gateway: Gateway,
    builtin_worker: Proc,
    browser: tuple[WebDriver, Path],
) -> None:
    driver, _ = browser
    open_page(driver, f"{gateway.base_url}/playground")
    set_field(driver, "prompt", PROMPT)
    set_field(driver, "steps", "2")
    by_id(driver, "generate").click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery li") or False)
    controls = _named_controls(driver)
    for field in ("prompt", "negative_prompt", "model", "scheduler", "width", "height"):
        assert field in controls
    for field in ("steps", "guidance_scale", "seed", "n", "generate", "cancel", "job-progress"):
        assert field in controls
    assert controls["prompt"] == ("textbox", "Prompt")
    assert controls["model"][0] == "combobox"
    assert "api-key" not in controls  # hidden on an open service
    # The gallery's download link and reuse button, named by their image.
    assert any(name.startswith("Download PNG of image 1") for _, name in controls.values())
    assert any(name.startswith("Reuse these parameters (image 1") for _, name in controls.values())
    unnamed = {label: role for label, (role, name) in controls.items() if not name}
    assert unnamed == {}
    assert {role for role, _ in controls.values()} <= CONTROL_ROLES

    open_page(driver, f"{keyed_gateway.base_url}/playground")
    keyed = _named_controls(driver)
    assert keyed["api-key"] == ("textbox", "API key")
    assert {label: role for label, (role, name) in keyed.items() if not name} == {}


def test_the_page_is_served_with_a_strict_content_security_policy(gateway: Gateway) -> None:
    with gateway.client() as client:
        for path in ("/", "/playground"):
            page = client.get(path)
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            policy = page.headers["content-security-policy"]
            directives = dict(d.strip().partition(" ")[::2] for d in policy.split(";"))
            assert directives["default-src"] == "'self'"
            assert directives["script-src"] == "'self'"
            assert directives["style-src"] == "'self'"
            assert "unsafe" not in policy and "*" not in policy and "http" not in policy
            assert "access-control-allow-origin" not in page.headers
            # Nothing inline for the policy to forbid: scripts and styles are files.
            assert "<style" not in page.text and " style=" not in page.text
            assert re.search(r"<script(?![^>]*\ssrc=)", page.text) is None
            assert re.search(r"\son[a-z]+=", page.text) is None  # no inline event handlers
        for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            response = client.get(f"/playground/{asset}")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith(kind)
        for other in ("%2E%2E%2Fpyproject.toml", "index.html", "__init__.py"):
            assert client.get(f"/playground/{other}").status_code == 404
        assert client.get("/playground/index.htm").json()["error"]["code"] == "not_found"
        # The page adds nothing to the API's document.
        paths = client.get("/openapi.json").json()["paths"]
        assert "/" not in paths and "/playground" not in paths


def test_the_page_ships_in_the_gateway_image_wheel(tmp_path: Path) -> None:
    """The files are package data: a wheel built from what the gateway image copies holds them."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("imagegen", "app"):  # docker/gateway.Dockerfile's COPY lines
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    dockerfile = (ROOT / "docker" / "gateway.Dockerfile").read_text()
    assert "COPY app ./app" in dockerfile
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("imagegen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("index.html", "app.js", "style.css"):
        assert f"app/playground/static/{name}" in names


def test_the_form_as_code_runs_as_shown(
    gateway: Gateway, builtin_worker: Proc, browser: tuple[WebDriver, Path]
) -> None:
    # Each snippet is run as a user would paste it: curl in a shell, Python in a fresh process.
    driver, _ = browser
    open_page(driver, f"{gateway.base_url}/playground")
    set_field(driver, "prompt", "a red 'circle'")  # a quote, which the shell quoting must carry
    set_field(driver, "steps", "3")
    set_field(driver, "seed", "77")

    def shown(kind: str) -> str:
        driver.execute_script(
            "const s = document.getElementById('snippet-kind');"
            "s.value = arguments[0]; s.dispatchEvent(new Event('change'));",
            kind,
        )
        wait(driver, lambda d: by_id(d, "snippet").text.strip() != "")
        return str(driver.execute_script("return document.getElementById('snippet').textContent"))

    native = subprocess.run(
        ["bash", "-c", shown("curl")], capture_output=True, text=True, timeout=60, check=True
    )
    job = json.loads(native.stdout)
    assert job["request"]["prompt"] == "a red 'circle'" and job["request"]["seed"] == 77
    done = wait_for_job(httpx.Client(base_url=gateway.base_url), job["id"])

    a1111 = shown("a1111")
    scheduler = by_id(driver, "scheduler").get_attribute("value")
    names = {
        s["aliases"][0]: s["name"]
        for s in httpx.get(f"{gateway.base_url}/sdapi/v1/samplers").json()
    }
    assert f'"sampler_name":"{names[scheduler]}"' in a1111  # A1111's name for the scheduler
    answer = subprocess.run(
        ["bash", "-c", a1111], capture_output=True, text=True, timeout=120, check=True
    )
    # The same request: the same pixels as the native job (the PNGs' text chunks differ).
    a1111_png = base64.b64decode(json.loads(answer.stdout)["images"][0])
    native_png = httpx.get(f"{gateway.base_url}{done['images'][0]['url']}").content  # type: ignore[index]
    assert (
        Image.open(io.BytesIO(a1111_png)).tobytes() == Image.open(io.BytesIO(native_png)).tobytes()
    )

    code = shown("openai") + "\nprint(len(result.data), result.data[0].b64_json[:8])"
    ran = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert ran.stdout.split()[0] == "1", ran.stdout + ran.stderr


def test_an_image_a_painted_mask_and_a_previewed_control_make_one_job(
    gateway: Gateway, builtin_worker: Proc, browser: tuple[WebDriver, Path], tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    driver, _ = browser
    open_page(driver, f"{gateway.base_url}/playground")
    picture = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (30, 60, 200)).save(picture)
    shape = tmp_path / "shape.png"
    drawn = Image.new("RGB", (64, 64), (255, 255, 255))
    drawn.paste((220, 30, 30), (12, 12, 40, 40))
    drawn.save(shape)

    driver.find_element(By.CSS_SELECTOR, "#inputs summary").click()
    by_id(driver, "image").send_keys(str(picture))
    wait(driver, lambda d: d.execute_script("return document.getElementById('mask').width") == 64)
    canvas = by_id(driver, "mask")
    # Paint a stroke across the canvas's left half (its CSS box is scaled; the page maps it).
    size = canvas.size
    ActionChains(driver).move_to_element_with_offset(
        canvas, -size["width"] // 4, 0
    ).click_and_hold().move_by_offset(0, size["height"] // 4).release().perform()

    Select(by_id(driver, "control-id")).select_by_value("silhouette")
    Select(by_id(driver, "control-preprocess")).select_by_value("canny")
    by_id(driver, "control-image").send_keys(str(shape))
    by_id(driver, "control-preview").click()
    shown = wait(
        driver, lambda d: by_id(d, "control-map").is_displayed() and by_id(d, "control-map")
    )
    assert wait(driver, lambda d: d.execute_script("return arguments[0].naturalWidth", shown) == 64)
    set_field(driver, "steps", "4")
    by_id(driver, "generate").click()
    wait(driver, lambda d: job_status(d) == "succeeded", 120)
    job_id = driver.find_element(By.CSS_SELECTOR, "#gallery li").get_attribute("data-job")
    doc = httpx.get(f"{gateway.base_url}/v1/generations/{job_id}").json()
    assert doc["request"]["task"] == "inpaint", doc["request"]
    assert doc["request"]["controls"][0]["id"] == "silhouette"
    assert doc["request"]["controls"][0]["preprocess"] == "canny"
    # The snippet shows placeholders, never the pictures' bytes.
    snippet = str(driver.execute_script("return document.getElementById('snippet').textContent"))
    assert "<your image as base64>" in snippet and len(snippet) < 4000
    assert csp_violations(driver) == []
