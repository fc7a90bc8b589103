"""The painting app in a real headless Chromium (Selenium + Debian's chromium-driver), served by uvicorn.

Loads the page, picks a brush, draws a stroke with the mouse, checks the
returned image changed where the stroke was and nowhere else (against the
editing code called directly with the page's mask), erases, undoes, removes a
stroke, resets, downloads, uploads a photo and waits for its reconstruction.
Screenshots of the main states go to the test's tmp dir.
"""

import base64
import io
import os
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")]


def to_uint8(images):
    return np.clip((np.asarray(images, np.float32) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def decode(url):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_cache(tmp_path_factory) -> str:
    """One cache (the toy dissection) for all app tests of the session."""
    path = tmp_path_factory.getbasetemp() / "ganpaint-cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from jaxdissect.app import build_painter, create_app

    painter = build_painter(cache_dir=shared_cache(tmp_path_factory), num_images=4, invert_steps=20, adapt_steps=0)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(painter), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield painter, f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--window-size=1100,800"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    d.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    d.downloads = downloads
    yield d
    d.quit()


def settle(driver, timeout=20):
    """Wait until the page has answered its newest request; return the shown image (uint8 RGB)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = driver.execute_script("const g = window.ganpaint; return [g.ready, g.seq, g.done, g.busy, g.current];")
        if s[0] and s[1] == s[2] and s[3] == 0 and s[4]:
            assert driver.find_element("id", "spinner").get_attribute("hidden") is not None
            assert driver.find_element("id", "status").text == ""
            return decode(s[4])
        time.sleep(0.05)
    raise AssertionError(f"page did not settle: {driver.find_element('id', 'status').text!r}")


def stroke(driver, cells):
    """Drag the mouse over the overlay through (row, col) cells of the 32x32 grid (8 screen px per cell)."""
    from selenium.webdriver import ActionChains

    overlay = driver.find_element("id", "overlay")
    px = [(c * 8 + 4 - 128, r * 8 + 4 - 128) for r, c in cells]
    chain = ActionChains(driver).move_to_element_with_offset(overlay, *px[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(px, px[1:]):
        chain = chain.move_by_offset(x1 - x0, y1 - y0)
    chain.release().perform()


def stack_masks(driver):
    urls = driver.execute_script("return window.ganpaint.stack.map((s) => s.mask);")
    return [(decode(u)[..., 3] > 0).astype(np.float32) for u in urls]


def affected(mask, layer=8, image=32, spread=6):
    """Image pixels a layer-cell edit can reach: the painted cells' pixel blocks, dilated by the convs above."""
    from scipy.ndimage import binary_dilation

    k = mask.shape[0] // layer
    cells = mask.reshape(layer, k, layer, k).max(axis=(1, 3)) > 0
    block = np.kron(cells, np.ones((image // layer, image // layer))) > 0
    return block, binary_dilation(block, np.ones((3, 3), bool), iterations=spread)


def test_paint_erase_undo_reset_download_upload(server, driver, tmp_path):
    from jaxdissect import editing

    painter, url = server
    driver.get(url)
    base = settle(driver)
    z0 = painter.z[0:1]
    np.testing.assert_array_equal(base, to_uint8(painter.module.apply(painter.variables, z0))[0])
    assert [b.text for b in driver.find_elements("css selector", "#brushes button")] == painter.concepts()
    driver.save_screenshot(str(tmp_path / "1-loaded.png"))

    driver.find_element("css selector", '#brushes button[data-concept="red"]').click()
    stroke(driver, [(6, 18), (6, 22), (6, 26), (9, 26)])
    painted = settle(driver)
    (mask,) = stack_masks(driver)
    assert mask[6, 18:27].all() and mask[9, 26] and mask.sum() < 60
    direct = editing.apply_strokes(painter.module, painter.variables, z0, [editing.Stroke("red", mask, strength=4)],
                                   painter.brushes, layer=painter.layer)
    np.testing.assert_array_equal(painted, to_uint8(direct)[0])
    block, reach = affected(mask)
    changed = np.abs(painted.astype(int) - base).max(-1) > 0
    assert changed[block].mean() > 0.5, "the stroke did not change its own pixels"
    assert not changed[~reach].any(), "pixels away from the stroke changed"
    assert painted[block][:, 0].mean() > base[block][:, 0].mean() + 20, "red was not painted"
    driver.save_screenshot(str(tmp_path / "2-painted.png"))

    driver.find_element("css selector", '#modes button[data-mode="erase"]').click()
    stroke(driver, [(24, 4), (24, 12)])
    erased = settle(driver)
    assert len(stack_masks(driver)) == 2 and not np.array_equal(erased, painted)
    assert "erase" in driver.find_element("id", "history").text
    driver.save_screenshot(str(tmp_path / "3-erased.png"))

    driver.find_element("id", "undo").click()
    np.testing.assert_array_equal(settle(driver), painted)

    # Two strokes in quick succession: the newer request supersedes the older one.
    driver.find_element("css selector", '#modes button[data-mode="draw"]').click()
    driver.find_element("css selector", '#brushes button[data-concept="blue"]').click()
    stroke(driver, [(20, 20), (20, 28)])
    stroke(driver, [(28, 2), (28, 8)])
    both = settle(driver)
    masks = stack_masks(driver)
    assert len(masks) == 3
    strokes = [editing.Stroke(c, m, strength=4) for c, m in zip(("red", "blue", "blue"), masks)]
    np.testing.assert_array_equal(both, to_uint8(editing.apply_strokes(
        painter.module, painter.variables, z0, strokes, painter.brushes, layer=painter.layer))[0])
    driver.save_screenshot(str(tmp_path / "4-three-strokes.png"))

    driver.find_elements("css selector", "#history button.remove")[0].click()  # remove the red stroke
    without_red = settle(driver)
    np.testing.assert_array_equal(without_red, to_uint8(editing.apply_strokes(
        painter.module, painter.variables, z0, strokes[1:], painter.brushes, layer=painter.layer))[0])

    driver.find_element("id", "download").click()
    target = driver.downloads / "MyGanPaint.png"
    deadline = time.time() + 10
    while not target.exists() and time.time() < deadline:
        time.sleep(0.05)
    np.testing.assert_array_equal(np.asarray(Image.open(target).convert("RGB")), without_red)

    driver.find_element("id", "reset").click()
    np.testing.assert_array_equal(settle(driver), base)
    assert driver.find_element("id", "history").text == ""

    photo = tmp_path / "photo.jpg"
    rng = np.random.RandomState(1)
    Image.fromarray(rng.randint(0, 255, (60, 80, 3), np.uint8)).save(photo)
    driver.find_element("id", "upload").send_keys(str(photo))
    deadline = time.time() + 40
    while driver.find_element("id", "upload-text").text != "done":
        assert time.time() < deadline, driver.find_element("id", "status").text
        time.sleep(0.05)
    assert driver.find_element("id", "upload-bar").get_attribute("value") == "1"
    reconstruction = settle(driver)
    thumbs = driver.find_elements("css selector", "#thumbs img")
    assert "selected" in thumbs[-1].get_attribute("class") and thumbs[-1].get_attribute("title") == "your photo"
    np.testing.assert_array_equal(decode(thumbs[-1].get_attribute("src")), reconstruction)
    driver.save_screenshot(str(tmp_path / "5-upload.png"))
    stroke(driver, [(8, 8), (8, 14)])
    assert not np.array_equal(settle(driver), reconstruction)
    driver.save_screenshot(str(tmp_path / "6-upload-painted.png"))
