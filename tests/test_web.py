"""`pks4 serve`: the page's endpoints over HTTP, and the page itself in a real headless Chromium."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'pks4[web]'")
httpx = pytest.importorskip("httpx", reason="httpx (the test extra) is not installed")
import uvicorn  # noqa: E402

import pks4  # noqa: E402
from inference_fixtures import data, long_video, run, val_videos  # noqa: E402, F401 (fixtures)
from pks4.cli import main  # noqa: E402
from pks4.web import create_app, find_examples  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


def _free_port() -> int:
    """A port free now, for a server started in another process (which cannot report the one it bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def hub(run, tmp_path_factory):
    return pks4.VideoClassifier.from_pretrained(run, device="cpu").save_pretrained(tmp_path_factory.mktemp("hub") / "m")


@pytest.fixture(scope="module")
def clf(hub):
    """The page's classifier, loaded from the exported folder."""
    return pks4.VideoClassifier.from_pretrained(hub, device="cpu")


@pytest.fixture(scope="module")
def server(clf, data):
    """The app on a free local port, served by uvicorn in a thread for the module's tests."""
    app = create_app(clf, examples=find_examples(data.root / "val"), max_upload_mb=1)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))  # any free port
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def _upload(server, path, name=None):
    with open(path, "rb") as fh:
        return httpx.post(f"{server}/api/predict", files={"file": (name or os.path.basename(path), fh, "video/mp4")},
                          timeout=60)


def test_info_and_page(server, clf):
    info = httpx.get(f"{server}/api/info").json()
    assert info["model"] == "pks4_vit_tiny" and info["classes"] == clf.classes and info["views"] == "8x2x1"
    assert len(info["examples"]) == 10 and info["examples"][0].endswith("_000.mp4") and info["window"] == "2s"
    page = httpx.get(f"{server}/").text
    assert '<input type="file" id="file"' in page and 'id="label"' in page


def test_upload_answers_like_the_classifier(server, clf, data, long_video):
    video = val_videos(data)[0]
    short = _upload(server, video).json()
    expected = clf(video)
    assert (short["label"], short["topk"], short["timeline"]) == (expected["label"], expected["topk"], None)
    assert short["frames"] == 16 and short["seconds"] == 2.0
    long = _upload(server, long_video).json()  # 12 s: at least two 2 s windows, so it gets a timeline
    assert long["label"] == clf(str(long_video))["label"]
    windows = long["timeline"]["windows"]
    assert len(windows) == 11 and windows[1]["start"] == 1.0 and windows[1]["end"] == 3.0
    expected_windows = clf.timeline(long_video, "2s", "1s").to_dict()["windows"]
    assert [w["label"] for w in windows] == [w["label"] for w in expected_windows]
    assert long["timeline"]["plot"].startswith("data:image/png;base64,")
    name = "moving_right/moving_right_000.mp4"
    picked = httpx.post(f"{server}/api/example", data={"name": name})
    assert picked.status_code == 200 and picked.json()["label"] == clf(str(data.root / "val" / name))["label"]


def test_bad_requests_say_what_is_wrong(server, tmp_path):
    junk = tmp_path / "notes.mp4"
    junk.write_text("not a video")
    bad = _upload(server, junk, "holiday.mp4")
    assert bad.status_code == 400 and bad.json()["error"].startswith("holiday.mp4: not a readable video")
    assert str(tmp_path) not in bad.json()["error"]
    big = tmp_path / "big.mp4"
    big.write_bytes(b"\0" * 1_100_000)
    too_big = _upload(server, big)
    assert too_big.status_code == 413 and "larger than 1 MB" in too_big.json()["error"]
    missing = httpx.post(f"{server}/api/example", data={"name": "../secret.mp4"})
    assert missing.status_code == 404 and "not one of the example videos" in missing.json()["error"]


def test_serve_command_serves_the_page(hub, tmp_path):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pks4.cli", "serve", str(hub), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, info = time.time() + 90, None
        while info is None and proc.poll() is None and time.time() < deadline:
            try:
                info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=2))
            except OSError:
                time.sleep(0.2)
        assert info is not None, proc.stdout.read() if proc.poll() is not None else "no answer in 90 s"
        assert info["model"] == "pks4_vit_tiny" and info["examples"] == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_without_the_web_extra_says_how_to_install(monkeypatch, hub, capsys):
    import pks4.web

    monkeypatch.setattr(pks4.web, "missing_web_modules", lambda: ["fastapi", "uvicorn"])
    assert main(["serve", str(hub)]) == 2
    err = capsys.readouterr().err
    assert "missing: fastapi, uvicorn" in err and "pip install 'pks4[web]'" in err


def test_bad_serve_options(hub, tmp_path, capsys):
    assert main(["serve", str(hub), "--window", "0"]) == 2
    assert "--window 0" in capsys.readouterr().err
    assert main(["serve", str(hub), "--examples", str(tmp_path / "none")]) == 2
    assert "--examples" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real browser


def _browser(profile):
    """A headless Chromium driven by Selenium, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no Chromium / chromedriver on this machine: `make browser` installs Debian's chromium and "
                    "chromium-driver (the CI set-up does)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")  # a fresh profile: no state from other runs
    return webdriver.Chrome(service=Service(driver), options=options)


def _state(browser, states, timeout=60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout).until(
        lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in states)
    return browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def test_page_in_a_real_browser(server, clf, data, long_video, tmp_path):
    from selenium.webdriver.common.by import By

    browser = _browser(tmp_path / "profile")
    try:
        browser.get(server + "/")
        assert _state(browser, ("ready", "error")) == "ready"
        video = val_videos(data)[3]
        browser.find_element(By.ID, "file").send_keys(video)
        browser.find_element(By.ID, "classify").click()
        assert _state(browser, ("done", "error")) == "done"
        assert browser.find_element(By.ID, "label").text == clf(video)["label"]
        rows = browser.find_elements(By.CSS_SELECTOR, "#topk tbody tr")
        assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == [t["label"] for t in clf(video)["topk"]]
        assert not browser.find_element(By.ID, "timeline").is_displayed()
        browser.find_element(By.ID, "file").send_keys(str(long_video))  # a long video also shows its timeline
        browser.execute_script("document.body.dataset.state = 'sent'")  # so the wait below sees this answer
        browser.find_element(By.ID, "classify").click()
        assert _state(browser, ("done", "error")) == "done"
        assert browser.find_element(By.ID, "timeline").is_displayed()
        plot = browser.find_element(By.ID, "timeline-plot")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", plot) > 0
        assert len(browser.find_elements(By.CSS_SELECTOR, "#timeline-table tbody tr")) == 11
    finally:
        browser.quit()
