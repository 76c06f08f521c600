"""The web demo in a real browser: headless Chromium (Debian's chromium + chromium-driver, through
selenium) uploads a WAV, waits for the result, and checks the players, the spectrogram and the
downloaded file's rate and length.

Skipped when no Chromium is installed, unless JAT_REQUIRE_BROWSER=1 (.ci/run sets it, so CI fails
instead). JAT_WEB_SCREENSHOT=PATH keeps a screenshot of the finished page (docs/web_demo.png is one).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf
import torch
from helpers import ROOT

from jat.checkpoint import store as ckpt
from jat.codecs import LatentNorm
from jat.codecs.base import SAMPLE_RATE
from jat.config import Config, resolve_config_path
from jat.data.synth import demo_clip
from jat.model.dit import JaT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.slow
if not (CHROMIUM and DRIVER):
    if os.environ.get("JAT_REQUIRE_BROWSER") == "1":
        raise RuntimeError("JAT_REQUIRE_BROWSER=1 but chromium / chromedriver are not installed "
                           "(apt-get install chromium chromium-driver)")
    pytest.skip("no chromium + chromedriver (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("gradio")
from selenium.webdriver.common.by import By  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`scripts/web.py` on a tiny random checkpoint, on a free port; stopped after the module."""
    root = tmp_path_factory.mktemp("web")
    cfg = Config.from_yaml(resolve_config_path("tiny.yaml"), ["flow.steps=4"])
    torch.manual_seed(0)
    state = JaT(cfg.model).state_dict()
    tmp = ckpt.begin_save(root / "run", 1)
    ckpt.write_main(tmp, cfg=cfg, step=1, model=state, ema={k: v.clone() for k, v in state.items()},
                    norm=LatentNorm.identity(cfg.model.in_channels).state_dict(),
                    optimizer={"state": {}, "param_groups": []}, state={})
    checkpoint = ckpt.finish_save(tmp)
    port = _free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "web.py"), "--checkpoint",
                             str(checkpoint), "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log.close()
                tail = (root / "server.log").read_text()[-3000:]
                raise RuntimeError(f"the web demo did not start:\n{tail}") from None
            time.sleep(0.5)
    yield url, root
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


def _browser(download_dir: Path):
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    opts.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                           "download.prompt_for_download": False})
    return webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=opts)


def _wait(find, timeout: float = 120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = find()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError("timed out waiting for the page")


def _upload_and_run(browser, url: str, wav: Path) -> None:
    """Open the page, upload `wav` into the input player, wait until it shows, press Upsample."""
    browser.get(url)
    upload = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#input-audio input[type=file]"))
    upload[0].send_keys(str(wav))
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#input-audio [data-testid^='waveform']"))
    browser.find_element(By.ID, "upsample").click()


def test_upload_upsample_listen_and_download_in_a_browser(server, tmp_path):
    url, _ = server
    sr, seconds = 16000, 2.0
    wav = tmp_path / "speech16k.wav"
    sf.write(wav, demo_clip(seconds, sr, seed=1), sr, subtype="PCM_16")  # band-limited at 8 kHz by its rate
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser = _browser(downloads)
    try:
        _upload_and_run(browser, url, wav)
        image = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#spectrogram img"))[0]
        assert image.get_attribute("naturalWidth") not in (None, "0")  # the PNG loaded
        report = browser.find_element(By.CSS_SELECTOR, "#report textarea").get_attribute("value")
        assert report.startswith("speech16k.wav: 16000 Hz, 1 channel(s), 2.00 s; cutoff ")
        cutoff = float(report.split("cutoff ")[1].split(" Hz")[0])
        assert 7000 <= cutoff <= 8000  # the rate's Nyquist, found from the spectrum
        # the output player holds the result: its waveform and a duration label
        player = browser.find_element(By.ID, "output-audio")
        assert player.find_elements(By.CSS_SELECTOR, "[data-testid^='waveform']")
        assert player.find_element(By.CSS_SELECTOR, "time#duration").text == "0:02"
        link = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#download a[download]"))[0]
        assert link.get_attribute("download") == "speech16k_jat.wav"
        link.click()
        path = _wait(lambda: [p for p in downloads.glob("*.wav")])[0]
        _wait(lambda: not list(downloads.glob("*.crdownload")))
        if os.environ.get("JAT_WEB_SCREENSHOT"):
            browser.save_screenshot(os.environ["JAT_WEB_SCREENSHOT"])
    finally:
        browser.quit()
    info = sf.info(str(path))
    assert info.samplerate == SAMPLE_RATE
    assert info.frames == math.ceil(seconds * sr * SAMPLE_RATE / sr)  # the same duration, to the sample
    assert info.subtype == "PCM_16"  # the input's resolution kept
    audio, _ = sf.read(str(path))
    assert float(abs(audio).max()) > 0.01  # not silence


def test_a_bad_upload_shows_an_error_and_the_page_goes_on(server, tmp_path):
    url, _ = server
    bad = tmp_path / "short.wav"
    sf.write(bad, demo_clip(0.01, 16000, seed=2), 16000)  # 10 ms: below the upsampler's minimum
    browser = _browser(tmp_path)
    try:
        _upload_and_run(browser, url, bad)
        toast = _wait(lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")
                               if "too short" in e.text])
        assert "short.wav" in toast[0].text
    finally:
        browser.quit()
