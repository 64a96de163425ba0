"""The skill explorer (/ui) under a real browser: a real HTTP server (uvicorn on a loopback port,
in a thread) over a real Redis and a real `resa worker`, and a headless Chromium driven by Selenium.

The browser needs a real socket, so the app is not run in a TestClient here; `UiService.client`
is an httpx client on the same server (with the admin key), so `Service.wait_job` works unchanged.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from _helpers_service import Service, UvicornThread, configured_service

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver", "chromium-driver")


@dataclass
class UiService(Service):
    url: str = ""


def start_ui_service(tmp: Path, models_file: Path, cache_dir: Path, redis_url: str, *, api_keys: str = "", worker: bool = True, **extra):
    """A generator for module fixtures: the service on a real port (`.url`), a worker, and an httpx
    client on it that sends the first admin key of `api_keys` (if any)."""
    import httpx

    from app.main import create_app
    from conftest import free_port

    admin = next((k.split(":")[0] for k in api_keys.split(",") if k.endswith(":admin")), None)
    extra.update(RESA_API_KEYS=api_keys, RESA_DEVICE="cpu")
    with configured_service(tmp, models_file, cache_dir, redis_url, kind=UiService, worker=worker, **extra) as service:
        server = UvicornThread(create_app(service.settings), free_port()).start()
        service.url = server.url
        headers = {"Authorization": f"Bearer {admin}"} if admin else {}
        try:
            with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
                service.client = client
                yield service
        finally:
            server.stop()


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) executables, or None."""
    browser = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    driver = next((p for p in map(shutil.which, DRIVERS) if p), None)
    if not browser and Path("/usr/lib/chromium/chromium").exists():
        browser = "/usr/lib/chromium/chromium"
    if not driver and Path("/usr/lib/chromium/chromedriver").exists():
        driver = "/usr/lib/chromium/chromedriver"
    return (browser, driver) if browser and driver else None


def start_browser(width: int = 1280, height: int = 800):
    """Headless Chromium through the system chromedriver (Selenium never downloads a driver here)."""
    found = find_browser()
    if found is None:
        pytest.skip("no chromium + chromedriver: apt-get install chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService
    except ImportError:
        pytest.skip("selenium is not installed: pip install selenium")
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}",
                "--force-device-scale-factor=1", "--hide-scrollbars", "--lang=en-US", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=DriverService(executable_path=driver), options=options)
