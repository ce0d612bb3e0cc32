"""The web page of `python -m embedding serve`, in a real browser: Debian's headless
Chromium driven by Playwright. It enrols a person from photographs, identifies a photo
(the label drawn on it, the box's pixels checked on the canvas), verifies two photos and
deletes the person, by the controls' accessible names; nothing is fetched from another
host and the console stays clean."""

import os
import re

import pytest
import requests
from conftest import ServerProcess

pytestmark = [pytest.mark.once("torch"), pytest.mark.slow]  # the page needs no backend
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = "/usr/bin/chromium"  # Debian's package (.ci/run installs it)
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
KEY = "page-test-key-0123456789"
GREEN = (0x00, 0xC8, 0x53)  # the page's colour of a MATCH box
playwright.expect.set_options(timeout=60_000)  # a loaded CI machine: enrolment takes seconds


@pytest.fixture(scope="module")
def server(small_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    (folder / "key").write_text(KEY)
    args = ["--model", small_checkpoint[0], "--api-key-file", folder / "key",
            "--gallery", folder / "galleries", "--cache-dir", folder / "cache"]  # fmt: skip
    process = ServerProcess(args, folder / "server.log")
    try:
        yield process.wait_ready()
    finally:
        assert process.stop() == 0, process.log()[-3000:]


@pytest.fixture(scope="module")
def page(server):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.requested = []
        page.console_errors = []
        page.on("request", lambda request: page.requested.append(request.url))
        page.on(
            "console",
            lambda message: message.type == "error" and page.console_errors.append(message.text),
        )
        page.goto(server.url + "/")
        playwright.expect(page.get_by_role("status").first).to_contain_text(
            "is ready", timeout=60_000
        )
        yield page
        browser.close()


def test_the_controls_have_accessible_names(page):
    for name in ("Verify", "Enroll", "Identify"):
        playwright.expect(page.get_by_role("button", name=name, exact=True)).to_be_visible()
    for label in ("API key", "Gallery", "First photo", "Second photo", "Name", "Photos",
                  "Photo to identify"):  # fmt: skip
        playwright.expect(page.get_by_label(label, exact=True)).to_be_attached()


def test_a_wrong_key_shows_the_servers_message(page, face_photos):
    page.get_by_label("API key").fill("not-the-key")
    page.get_by_label("Name", exact=True).fill("Alice")
    page.get_by_label("Photos", exact=True).set_input_files([face_photos["astronaut"]])
    page.get_by_role("button", name="Enroll", exact=True).click()
    playwright.expect(page.locator("#enroll-result")).to_have_text("the API key is not valid")


def test_enrol_from_photographs(page, face_photos):
    page.get_by_label("API key").fill(KEY)
    page.get_by_label("Name", exact=True).fill("Alice")
    photos = [face_photos["astronaut"], face_photos["smaller"]]
    page.get_by_label("Photos", exact=True).set_input_files(photos)
    page.get_by_role("button", name="Enroll", exact=True).click()
    playwright.expect(page.locator("#enroll-result")).to_have_text("Enrolled Alice: 2 photos.")
    row = page.get_by_role("row").filter(has_text="Alice")
    playwright.expect(row).to_contain_text("2")


def canvas_pixel(page, x, y):
    return page.evaluate(
        "([x, y]) => Array.from(document.getElementById('identify-canvas')"
        ".getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3))",
        [x, y],
    )


def test_identify_draws_the_label_on_the_photo(page, server, face_photos):
    page.get_by_label("Photo to identify").set_input_files(face_photos["mirror"])
    page.get_by_role("button", name="Identify", exact=True).click()
    playwright.expect(page.locator("#identify-result")).to_have_text("1 face found.")
    playwright.expect(page.locator("#identify-faces li")).to_contain_text("MATCH: Alice")
    canvas = page.get_by_role("img", name=re.compile("Alice"))
    playwright.expect(canvas).to_be_visible()
    # the box the server found, drawn in green on the photo (512 px wide: drawn 1:1)
    with open(face_photos["mirror"], "rb") as file:
        found = requests.post(
            server.url + "/v1/galleries/default/identify",
            files={"image": ("mirror.jpg", file.read())},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        ).json()
    x1, y1, x2, y2 = (round(v) for v in found["faces"][0]["box"])
    for x, y in (((x1 + x2) // 2, y1), (x1, (y1 + y2) // 2), ((x1 + x2) // 2, y2)):
        assert canvas_pixel(page, x, y) == list(GREEN), (x, y)
    assert canvas_pixel(page, (x1 + x2) // 2, (y1 + y2) // 2) != list(GREEN)  # the face


def test_verify_two_photos(page, server, face_photos):
    page.get_by_label("First photo").set_input_files(face_photos["astronaut"])
    page.get_by_label("Second photo").set_input_files(face_photos["mirror"])
    page.get_by_role("button", name="Verify", exact=True).click()
    result = page.locator("#verify-result")
    playwright.expect(result).to_contain_text("similarity")
    with open(face_photos["astronaut"], "rb") as a, open(face_photos["mirror"], "rb") as b:
        expected = requests.post(
            server.url + "/v1/verify",
            files={"a": ("a.jpg", a.read()), "b": ("b.jpg", b.read())},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        ).json()
    verdict = "Same person" if expected["same"] else "Different people"
    playwright.expect(result).to_contain_text(f"{verdict}: similarity {expected['similarity']:.4f}")


def test_delete_the_identity(page):
    page.get_by_role("button", name="Delete Alice").click()
    playwright.expect(page.locator("#identities-result")).to_contain_text("Deleted Alice")
    playwright.expect(page.get_by_role("row").filter(has_text="Alice")).to_have_count(0)


def test_nothing_came_from_another_host_and_no_console_error(page, server):
    assert page.requested and all(url.startswith(server.url + "/") for url in page.requested)
    # the one error: the refused key's 401 (test_a_wrong_key_shows_the_servers_message)
    assert all("401" in error for error in page.console_errors), page.console_errors
