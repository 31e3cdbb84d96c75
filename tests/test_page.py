"""The playground page in a real headless browser, against the embedded server.

Chromium comes from Debian's packages (`apt-get install chromium`, done here when it is missing
and this runs as root); Playwright drives it (its own browser download cannot work here). Skipped
with the reason where Chromium cannot be had. Screenshots are written to `HYPERSD_SCREENSHOTS`
(default `runs/test-artifacts/page/`); `make screenshot` writes the README's into `docs/`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from serving_fixtures import REPO, Server, serving_env, start_server

sync_api = pytest.importorskip("playwright.sync_api")

CAPTION = "a large red circle in the center on a white background"
COMPARED = [
    "shapes-hyper-1step",
    "shapes-hyper-2step",
    "shapes-hyper-4step",
    "shapes-hyper-8step",
    "shapes-base",
]
SCREENSHOTS = Path(os.environ.get("HYPERSD_SCREENSHOTS", REPO / "runs" / "test-artifacts" / "page"))


def chromium() -> str:
    """Debian's Chromium, installed first where it is missing and we may (root, apt-get)."""
    path = shutil.which("chromium")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "chromium"],
        ):
            subprocess.run(command, env=env, capture_output=True, timeout=900, check=False)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("Chromium is not installed and could not be (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`hypersd serve` in embedded mode, serving the distilled models and their teacher."""
    log = tmp_path_factory.mktemp("page") / "server.log"
    env = serving_env(embedded_models=json.dumps(COMPARED))
    server = start_server(env, log, timeout_s=180)
    try:
        yield server
    finally:
        server.process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def decode_image(src: str) -> Image.Image:
    """A `data:image/png;base64,...` URL's image."""
    header, _, data = src.partition(",")
    assert header == "data:image/png;base64", header
    return Image.open(io.BytesIO(base64.b64decode(data)))


def judged_correct(images: list[Image.Image], captions: list[str]) -> list[bool]:
    """The Shapes attribute network's verdicts on images for their captions."""
    from training.attributes import load_attribute_net
    from training.image_ops import images_to_tensor

    verdicts = load_attribute_net().is_correct(images_to_tensor(images), captions)
    return [bool(v) for v in verdicts.tolist()]


def test_generate_shows_the_image_with_its_seed_and_timings(server: Server, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url)
    # the model list comes from /v1/models: the served models, the registry default's steps
    page.wait_for_selector("#model option", state="attached")
    assert page.input_value("#model") in COMPARED
    page.select_option("#model", "shapes-hyper-4step")
    assert page.input_value("#steps") == "4"
    page.fill("#prompt", CAPTION)
    page.fill("#seed", "7")
    page.click("#generate-button")
    page.wait_for_selector("#results img.generated", timeout=60_000)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "playground-generate.png"))

    image = decode_image(page.get_attribute("#results img.generated", "src") or "")
    assert image.format == "PNG" and image.size == (64, 64)
    assert judged_correct([image.convert("RGB")], [CAPTION]) == [True]
    caption = page.text_content("#results figcaption") or ""
    assert caption == "seed 7"
    meta = page.text_content("#results .meta") or ""
    assert meta.startswith("shapes-hyper-4step · queue ") and " run " in meta and " total " in meta
    # the negative prompt shows only for models that take one (the distilled ones do not)
    assert page.is_hidden("#negative-row")
    # an error answer is shown with the API's own message, naming the field
    page.fill("#seed", str(2**60))  # past the seed range the API accepts
    page.click("#generate-button")
    page.wait_for_selector("#error:not([hidden])")
    assert "(seed)" in (page.text_content("#error") or "")
    assert page.locator("#results .result").count() == 1  # the earlier result is kept
    page.close()


def test_compare_runs_every_step_count_side_by_side(server: Server, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url)
    page.wait_for_selector("#model option", state="attached")
    page.click("button[data-view=compare]")
    page.fill("#compare-prompt", CAPTION)
    page.fill("#compare-seed", "3")
    page.click("#compare-button")
    page.wait_for_function(
        "document.querySelectorAll('#compare-results img.generated').length === 5",
        timeout=120_000,
    )
    cards = page.locator("#compare-results .card")
    assert [cards.nth(i).get_attribute("data-model") for i in range(5)] == COMPARED
    images = [
        decode_image(cards.nth(i).locator("img").get_attribute("src") or "") for i in range(5)
    ]
    assert all(image.size == (64, 64) for image in images)
    # each card says its steps and its time; the teacher takes the most steps
    metas = [cards.nth(i).locator(".meta").text_content() or "" for i in range(5)]
    assert [meta.split(" step")[0] for meta in metas] == ["1", "2", "4", "8", "25"]
    assert all(" total " in meta for meta in metas)
    # the distilled models draw this caption right (the attribute network's verdict)
    assert sum(judged_correct([image.convert("RGB") for image in images], [CAPTION] * 5)) >= 4
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "playground-compare.png"), full_page=True)
    page.close()
