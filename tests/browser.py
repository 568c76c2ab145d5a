"""A headless browser for the viewer's end-to-end test: Debian's chromium and chromedriver
driven by selenium. `find_browser()` says why not where they are missing.

Run as a script it starts the viewer on a run and saves a screenshot (the README's picture):
    python tests/browser.py CONFIG OUT.png [viewer options...]
"""
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
INSTALL = "apt-get install chromium chromium-driver && pip install selenium"


def find_browser():
    """(chromium path, chromedriver path), or (None, reason)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, f"selenium is not installed ({INSTALL})"
    browser = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        return None, f"no chromium / chromedriver on this machine ({INSTALL})"
    return browser, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ViewerProcess:
    """`python -m osrt_fast.view ARGS` on a free port; its output lines in `lines`."""

    def __init__(self, args, env=None):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "osrt_fast.view", *args, "--port", str(self.port)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.output = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            m = re.search(pattern, line)
            if m:
                return m
        raise AssertionError(f"the viewer did not print {pattern!r} within {timeout} s; "
                             f"output:\n{''.join(self.output)}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def open_page(url: str, driver_path: str, width: int = 1000, height: int = 640):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}",
                "--use-gl=swiftshader", "--enable-unsafe-swiftshader", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.get(url)
    return driver


def click_button(driver, text: str, timeout: float = 20):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    button = WebDriverWait(driver, timeout).until(
        ec.element_to_be_clickable((By.XPATH, f"//button[contains(., '{text}')]")))
    button.click()


def screenshot(config: str, out: str, *viewer_args: str, settle: float = 3.0) -> None:
    """Starts the viewer on `config`, opens it, waits for its first full frame and saves a
    screenshot of the page to `out`."""
    browser, driver_path = find_browser()
    if browser is None:
        raise SystemExit(driver_path)
    viewer = ViewerProcess([config, *viewer_args])
    try:
        viewer.wait_for(r"open (http://\S+)", 120)
        driver = open_page(f"http://localhost:{viewer.port}", driver_path)
        try:
            viewer.wait_for(r"first full frame", 120)
            time.sleep(settle)
            driver.save_screenshot(out)
        finally:
            driver.quit()
    finally:
        viewer.stop()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    screenshot(sys.argv[1], sys.argv[2], *sys.argv[3:])
    print(f"wrote {sys.argv[2]}")
