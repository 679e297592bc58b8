"""Drive the demo page in headless Chromium (Debian's ``/usr/bin/chromium``, never a downloaded one).

Used by the browser test and by ``scripts/demo_screenshot.py``; needs the ``playwright`` Python
package (the ``dev`` extra), not its browser download. The flags keep a browser with no network
from trying to reach update, sync and field-trial servers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@contextlib.contextmanager
def chromium_page(profile_dir: str | Path, width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A Playwright page in a fresh headless Chromium whose profile lives in ``profile_dir``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=str(CHROMIUM),
            headless=True,
            args=list(CHROMIUM_FLAGS),
            viewport={"width": width, "height": height},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def ask(
    page: Any,
    url: str,
    question: str,
    image: str | Path | None = None,
    example: str | None = None,
    timeout_s: float = 60,
) -> str:
    """Open the page, give it an image, type ``question``, press Answer; the answer shown.

    The image is uploaded from ``image``, or taken from the preloaded example whose button
    label contains ``example``. Raises ``RuntimeError`` with the page's message when the page
    refuses the input (an error toast).
    """
    page.goto(url)
    if example is not None:
        page.get_by_role("button", name=example).first.click()
    elif image is not None:
        page.locator("#image input[type=file]").set_input_files(str(image))
    if example is not None or image is not None:
        # the preview appears once the file is on the server (Gradio refuses big files itself)
        _wait(page, lambda: page.locator("#image img").count() > 0, timeout_s)
    page.locator("#question textarea").fill(question)
    page.locator("#submit").click()
    # Every answer fills the caption's markdown (the answer itself may be empty); while the
    # request runs, only the component's status tracker shows text.
    caption = page.locator("#attention-caption [data-testid=markdown]")
    _wait(page, lambda: bool("".join(caption.all_inner_texts()).strip()), timeout_s)
    return page.locator("#answer textarea").input_value()


def _wait(page: Any, done: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``done`` until it holds; an error toast on the page raises ``RuntimeError``."""
    error = page.locator("[data-testid=toast-text]")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if error.count():
            raise RuntimeError(error.first.inner_text())
        if done():
            return
        page.wait_for_timeout(100)
    raise TimeoutError(f"the page did not get there in {timeout_s:g} s")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def demo_server(
    run_dir: str | Path, extra: Sequence[str] = (), log: str | Path | None = None
) -> Iterator[str]:
    """``vqadapt demo --run RUN_DIR`` in a subprocess on a free local port; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    argv = [sys.executable, "-m", "vqadapt", "demo", "--run", str(run_dir), "--port", str(port)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    process = subprocess.Popen([*argv, *extra], stdout=out, stderr=subprocess.STDOUT, env=env)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vqadapt demo exited with code {process.returncode}")
            try:
                with direct.open(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vqadapt demo did not answer on {url}") from None
                time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log:
            out.close()
