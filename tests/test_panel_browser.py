"""The instructor panel as the room sees it: JupyterLab, headless on localhost, the instructor notebook in a real
headless browser (Debian's Chromium, driven by Playwright), every cell run, a scene composed and asked, both
models' answers on the page, screenshots in runs/browser/.

nbval runs the notebook's cells but never renders a widget; this test does, in the smol profile with the trained
model the room sees (runs/demo if `make demo` wrote one, else assets/demo_checkpoint). `make test-browser` (part
of `make test`) runs it with VLM_COURSE_BROWSER_TEST=1; without that it is skipped. Chromium comes from Debian's
packages (`make setup` installs it); set CHROMIUM to use another binary. Playwright's own browser download is
never used. JupyterLab serves a copy of the notebook from a scratch folder, so the lesson file never gets outputs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "lessons" / "instructor_demo.ipynb"
SHOTS = ROOT / "runs" / "browser"
BUDGET_S = 240  # the whole test: server, browser, every cell (two SmolLM2 models load), the questions
SERVER_START_S = 60
CELLS_S = 150  # every cell of the notebook, in the smol profile

pytestmark = pytest.mark.skipif(os.environ.get("VLM_COURSE_BROWSER_TEST") != "1",
                                reason="the browser test runs with `make test-browser` (VLM_COURSE_BROWSER_TEST=1)")


def chromium_binary() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    pytest.fail("no Chromium binary: run `make setup` (it installs Debian's chromium) or set CHROMIUM=/path/to/it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


class JupyterLab:
    """A JupyterLab server on 127.0.0.1 serving `root`, with its config, settings and workspaces in scratch
    folders; always shut down (REST shutdown, then SIGTERM, then SIGKILL of it and the kernels it started)."""

    def __init__(self, root: Path, scratch: Path, log: Path):
        self.port, self.token = free_port(), secrets.token_hex(16)
        settings = scratch / "settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        # no news or update checks (no network; no toast over the panel)
        (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                               "checkForUpdates": False}))
        env = dict(os.environ, VLM_COURSE_PROFILE="smol", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   VLM_COURSE_OFFLINE="1", JUPYTER_CONFIG_DIR=str(scratch / "config"),
                   JUPYTER_RUNTIME_DIR=str(scratch / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(scratch / "settings"),
                   JUPYTERLAB_WORKSPACES_DIR=str(scratch / "workspaces"))
        env.pop("MPLBACKEND", None)  # the kernel's inline backend, as in a workshop (make exports Agg)
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--ServerApp.disable_check_xsrf=True",
             "--allow-root", "--ServerApp.terminals_enabled=False"],  # --allow-root: CI runs as root
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, seconds: float):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.process.returncode}; see {self.log.name}")
            try:
                if _get(f"{self.url}/api/status?token={self.token}") == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"JupyterLab did not answer on {self.url} within {seconds:.0f} s; see {self.log.name}")

    def stop(self):
        import psutil

        try:
            children = psutil.Process(self.process.pid).children(recursive=True)  # the kernels it started
        except psutil.NoSuchProcess:
            children = []
        try:
            request = urllib.request.Request(f"{self.url}/api/shutdown?token={self.token}", method="POST")
            urllib.request.urlopen(request, timeout=5).close()
            self.process.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for child in children:  # a kernel the shutdown left behind
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.log.close()


def _select(row, index: int, label: str):
    row.locator("select").nth(index).select_option(label=label)


def test_the_room_composes_a_scene_and_both_models_answer(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    started = time.monotonic()
    chromium = chromium_binary()
    SHOTS.mkdir(parents=True, exist_ok=True)
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(NOTEBOOK, served / NOTEBOOK.name)  # autosave writes here, never into lessons/
    server = JupyterLab(served, tmp_path / "jupyter", SHOTS / "jupyterlab.log")
    try:
        server.wait_ready(SERVER_START_S)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(30_000)
                page.goto(f"{server.url}/lab/tree/{NOTEBOOK.name}?token={server.token}")
                notebook = page.locator(".jp-NotebookPanel .jp-Notebook")
                expect(notebook).to_be_visible(timeout=60_000)
                cells = json.loads(NOTEBOOK.read_text())["cells"]
                code_cells = sum(c["cell_type"] == "code" for c in cells)
                expect(notebook.locator(".jp-Cell")).to_have_count(len(cells))
                expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(1, timeout=60_000)

                # Run every cell, as the instructor does: Run menu > Run All Cells
                page.locator("#jp-MainMenu").get_by_text("Run", exact=True).click()
                page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
                composer = page.locator(".vlm-composer")
                expect(composer).to_be_visible(timeout=CELLS_S * 1000)
                prompts = notebook.locator(".jp-CodeCell .jp-InputArea-prompt")
                deadline = time.monotonic() + CELLS_S
                while time.monotonic() < deadline:  # every code cell has run: "[n]:", none waiting "[*]:"
                    texts = prompts.all_text_contents()  # off-screen cells too (their innerText is empty)
                    if len(texts) == code_cells and all(t.strip() not in ("[ ]:", "[*]:", "") for t in texts):
                        break
                    time.sleep(0.5)
                else:
                    pytest.fail(f"the notebook's cells did not all run within {CELLS_S} s: prompts {texts}")
                outputs = " ".join(notebook.locator(".jp-OutputArea-output").all_text_contents())
                assert "Traceback" not in outputs and "Error displaying widget" not in outputs, outputs[-3000:]
                # the earlier panel (pick or upload a picture) rendered as a widget too, with its figure
                assert page.locator(".widget-dropdown").count() > 0

                composer.scroll_into_view_if_needed()
                message = composer.locator(".vlm-composer-message")
                rows = composer.locator(".vlm-composer-object")
                expect(rows).to_have_count(2)
                picture = composer.locator("img").first
                drawn = picture.get_attribute("src")
                assert drawn and drawn.startswith(("blob:", "data:image/png"))

                # compose: the square becomes a green triangle in the bottom right, and a third object is added
                _select(rows.nth(1), 0, "triangle")
                _select(rows.nth(1), 1, "green")
                _select(rows.nth(1), 2, "bottom right")
                expect(composer.locator(".vlm-composer-scene")).to_have_text(
                    "red circle (top left), green triangle (bottom right)")
                composer.locator(".vlm-composer-add button, button.vlm-composer-add").click()
                expect(rows).to_have_count(3)

                # bad input gets a message in the widget: two objects in one cell, then an empty question
                _select(rows.nth(2), 2, "top left")
                expect(message).to_contain_text("two objects in the top left cell")
                _select(rows.nth(2), 2, "center")
                expect(message).to_have_text("")
                question = composer.locator(".vlm-composer-question input")
                question.fill("   ")
                composer.get_by_role("button", name="Ask both models").click()
                expect(message).to_contain_text("the question is empty")
                page.screenshot(path=str(SHOTS / "composer_message.png"))

                # a question from the room, both models answer
                placeholders = [img.get_attribute("src") for img in composer.locator("img").all()][1:]
                question.fill("In which part of the image is the green triangle?")
                composer.get_by_role("button", name="Ask both models").click()
                expect(message).to_have_text("asked: In which part of the image is the green triangle?",
                                             timeout=60_000)
                answers = {}
                for name in ("untrained", "trained"):
                    text = composer.locator(f".vlm-answer-{name}")
                    expect(text).to_contain_text("of attention on the image")
                    answers[name] = text.locator(".vlm-answer-text").inner_text().strip()
                    assert answers[name], f"the {name} model's answer is not on the page"
                expect(composer.locator(".vlm-composer-truth")).to_have_text("right answer: bottom right")
                overlays = [img.get_attribute("src") for img in composer.locator("img").all()][1:]
                assert len(overlays) == 2 and all(overlays) and not set(overlays) & set(placeholders), overlays
                composer.scroll_into_view_if_needed()
                composer.screenshot(path=str(SHOTS / "scene_composer.png"))
                page.screenshot(path=str(SHOTS / "instructor_demo.png"))
                print(f"answers on the page: {answers}; {time.monotonic() - started:.0f} s")
            finally:
                browser.close()
    finally:
        server.stop()
    assert time.monotonic() - started < BUDGET_S, f"the browser test took {time.monotonic() - started:.0f} s"
