"""In a real browser: JupyterLab runs the tour notebook, a person moves the guidance slider, the image changes.

Headless Chromium from Debian (`apt-get install chromium chromium-driver`) driven by Playwright with the system
browser (no browser downloads). Skipped when either is missing. Also a script:

    .venv/bin/python tests/test_browser.py [SCREENSHOT.png]

Set SDKIT_BROWSER_SCREENSHOT to keep the screenshot of the widget after the slider moved.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "00_tour.ipynb"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
TOKEN = "sdkit-browser-test"
GUIDANCE = ".widget-slider:has(.widget-label:text-is('guidance'))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_jupyterlab(root: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"), ("MPLCONFIGDIR", "mpl")]:
        env[var] = str(root / ".home" / sub)   # leave nothing in $HOME
    # every cell attached to the page: JupyterLab 4 otherwise skips rendering cells outside the viewport, and "Run
    # All" scrolls to the last cell, past the explorer in a notebook that goes on after it
    settings = root / ".home" / "config" / "lab" / "user-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    # the kernel must find the kernelspec of this Python (JUPYTER_DATA_DIR moved away from the venv's)
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(root / ".home" / "prefix")],
                   env=env, check=True, capture_output=True)
    env["JUPYTER_PATH"] = str(root / ".home" / "prefix" / "share" / "jupyter")
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
               f"--port={port}", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
               "--LabApp.news_url=", "--ServerApp.disable_check_xsrf=True"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=open(root / "jupyter.log", "w"))
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={TOKEN}", timeout=2)
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {(root / 'jupyter.log').read_text()[-2000:]}")
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError("jupyter lab did not answer within 60 s")


def wait_idle(page, seconds: float = 1.0, timeout: float = 120.0) -> None:
    """Until the kernel indicator has said idle for ``seconds`` in a row."""
    indicator = page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
    deadline = time.time() + timeout
    since = None
    while time.time() < deadline:
        if indicator.count():
            since = since or time.time()
            if time.time() - since >= seconds:
                return
        else:
            since = None
        page.wait_for_timeout(200)
    raise TimeoutError("the kernel did not become idle")


def run_all_cells(page, slider, root: Path, timeout_s: float) -> None:
    """Run > Run All Cells, then wait for the explorer's slider. On a busy machine the first click can be lost (the
    kernel still connecting: no cell gets a prompt, the kernel stays idle; seen in full-suite runs beside other
    work, never alone), so a click that starts no cell within a minute is repeated. If cells ran and no slider
    came, fail with the notebook's error outputs (a screenshot is left beside the run folder)."""
    import re

    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    started = page.locator(".jp-InputArea-prompt").filter(has_text=re.compile(r"\[(\*|\d+)\]"))
    for _ in range(3):
        page.get_by_text("Run", exact=True).first.click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:
            started.first.wait_for(state="attached", timeout=60_000)
            break
        except PlaywrightTimeout:
            continue
    else:
        page.screenshot(path=str(root.parent / "sdkit-browser-no-run.png"), full_page=True)
        raise AssertionError("Run All Cells, three times, started no cell")
    try:
        slider.wait_for(state="visible", timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        texts = [errors.nth(i).inner_text()[-800:] for i in range(min(errors.count(), 3))]
        page.screenshot(path=str(root.parent / "sdkit-browser-no-slider.png"), full_page=True)
        raise AssertionError(f"the cells ran but no guidance slider appeared; error outputs: {texts}") from None


def move_guidance_slider(screenshot: Path, timeout_s: float = 480.0) -> dict:
    """Run the tour in JupyterLab, press the guidance slider's ← key 4 times, return what was seen."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
        server = start_jupyterlab(root, port := free_port())
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch_persistent_context(str(root / ".chromium"), executable_path=CHROMIUM,
                                                               headless=True, args=FLAGS,
                                                               viewport={"width": 1400, "height": 1000})
                page = browser.new_page()
                page.set_default_timeout(timeout_s * 1000)
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={TOKEN}")
                wait_idle(page)
                no_news = page.get_by_role("button", name="No", exact=True)
                if no_news.count():
                    no_news.first.click()
                slider = page.locator(GUIDANCE).first
                run_all_cells(page, slider, root, timeout_s)
                wait_idle(page, seconds=2.0, timeout=timeout_s)
                explorer = slider.locator("xpath=ancestor::div[contains(@class,'widget-vbox')][last()]")
                image = explorer.locator("img.sdkit-pixelated").last
                readout = slider.locator(".widget-readout")
                before_value = readout.inner_text()
                before = image.screenshot()
                slider.scroll_into_view_if_needed()
                slider.locator(".noUi-handle").focus()
                for _ in range(4):
                    page.keyboard.press("ArrowLeft")
                page.wait_for_function("([el, v]) => el.innerText !== v", arg=[readout.element_handle(),
                                                                               before_value])
                after_value = readout.inner_text()
                status = explorer.locator(".widget-label").last
                # the explorer's status line names the guidance of the image it finished drawing (the full
                # sampler's, which follows the distilled model's 4-step previews once the slider rests)
                page.wait_for_function("([el, v]) => el.innerText.includes('guidance ' + v) && "
                                       "!el.innerText.startsWith('step') && !el.innerText.startsWith('sampling') && "
                                       "!el.innerText.startsWith('preview')",
                                       arg=[status.element_handle(), str(float(after_value)).rstrip('0').rstrip('.')])
                after = image.screenshot()
                explorer.screenshot(path=str(screenshot))
                result = {"before": before_value, "after": after_value, "changed": before != after,
                          "status": status.inner_text(), "screenshot": str(screenshot)}
                browser.close()
                return result
        finally:
            server.terminate()
            server.wait(timeout=30)


def browser_available() -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(CHROMIUM) and NOTEBOOK.exists()


@pytest.mark.skipif(not browser_available(), reason="needs Debian's chromium, the playwright package and notebooks/00_tour.ipynb")
def test_moving_the_guidance_slider_in_jupyterlab_changes_the_image(tmp_path):
    screenshot = Path(os.environ.get("SDKIT_BROWSER_SCREENSHOT") or tmp_path / "guidance-slider.png")
    seen = move_guidance_slider(screenshot)
    assert float(seen["after"]) == pytest.approx(float(seen["before"]) - 2.0)   # 4 presses of the 0.5 step
    assert seen["changed"], seen
    assert screenshot.stat().st_size > 0


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "guidance-slider.png").resolve()
    print(move_guidance_slider(target))
