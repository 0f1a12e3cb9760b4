"""The dashboard in a real browser: Playwright driving Debian's chromium (headless, no sandbox, no network).

Skips with a clear message when the `playwright` package is missing or chromium cannot be installed; never runs
`playwright install` (that downloads a browser). Served by interplab's own server in a thread, and once straight
from file:// to show that no server is needed. Screenshots go to the test's tmp_path, with a copy of the latent
page under the system temp folder (printed) for a human to look at.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import tempfile
import threading
import zlib
from pathlib import Path

import pytest
import torch
from test_site import SHOWCASE, XSS_BOLD, XSS_SCRIPT, write_fake_site  # the fake-site builder, shared

from interplab.dashboard import store
from interplab.dashboard.configs import DashboardConfig, ServeConfig
from interplab.dashboard.serve import make_server
from interplab.dashboard.site import build_site, write_assets
from interplab.models.load import load_model
from interplab.report.configs import RunReportConfig
from interplab.report.run_reports import write_run_reports
from interplab.sae import make_sae
from interplab.sae.config import SAEConfig

sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need `pip install playwright`")

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SCREENSHOT_COPY = Path(tempfile.gettempdir()) / "interplab-dashboard-latent.png"


def _ensure_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"browser tests need {CHROMIUM}; install it with `apt-get install -y chromium`")
    try:
        done = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"browser tests need {CHROMIUM}; `apt-get install -y chromium` failed: {e}")
    if done.returncode != 0 or not Path(CHROMIUM).exists():
        pytest.skip(f"browser tests need {CHROMIUM}; `apt-get install -y chromium` failed: {done.stderr[-300:]}")


@pytest.fixture(scope="module")
def browser():
    _ensure_chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("browser") / "site"
    write_fake_site(str(folder), d_sae=600, chunk_size=256)  # 3 chunks: pages must load the right one
    return folder


@pytest.fixture(scope="module")
def server_url(fake_site):
    server = make_server(ServeConfig(site=str(fake_site), port=0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url
    server.shutdown()
    server.server_close()


@pytest.fixture
def page(browser):
    """A fresh page that records script errors and dialogs (an alert() would mean corpus text ran as code)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(5000)  # fail fast: every wait here is for a local file
    pg = context.new_page()
    pg.errors, pg.dialogs, pg.csp = [], [], []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    # What the page's Content-Security-Policy refused (Chromium logs each refusal on the console): must stay empty.
    pg.on("console", lambda m: pg.csp.append(m.text) if "Content Security Policy" in m.text else None)
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    # Nothing may leave the machine: the site needs no CDN, font or API.
    pg.outside = []
    pg.route("**/*", lambda route: (pg.outside.append(route.request.url), route.abort())
             if not route.request.url.startswith(("file://", "http://127.0.0.1")) else route.continue_())
    yield pg
    context.close()


def _check_showcase_latent(pg) -> None:
    """The latent page of SHOWCASE: the top example's max token and its value are shown, HTML stays text."""
    top = pg.get_by_test_id("top-example")
    top.wait_for()
    assert pg.get_by_test_id("latent-title").text_content() == f"Latent {SHOWCASE}"
    max_token = top.locator(".tok.max")
    assert max_token.count() == 1
    assert max_token.text_content() == XSS_SCRIPT
    assert max_token.get_attribute("title") == f'"{XSS_SCRIPT}": 12.34'
    assert "max 12.34" in top.text_content()
    assert top.locator(".tok").nth(3).text_content() == XSS_BOLD
    assert top.locator(".tok").nth(4).text_content() == "\u21b5"  # the newline, made visible
    # The max token is the most highlighted one: its background is the full activation colour.
    assert max_token.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(255, 140, 0)"
    # Corpus HTML rendered as text: no <b> or extra <script> element came from it, and nothing ran.
    assert pg.locator("#app b").count() == 0
    assert pg.evaluate("[...document.scripts].every(s => s.src && !s.text)")
    assert pg.get_by_test_id("stat-max").text_content() == "12.34"
    # The histogram draws one bar per non-empty bin (13 bins: activations 0..12).
    assert pg.locator("[data-testid=activation-histogram] rect").count() == 13
    assert pg.locator("[data-testid=logits] .logit-table.positive tr").count() == 10
    assert pg.dialogs == [] and pg.errors == [] and pg.outside == [] and pg.csp == []


def test_search_open_and_read_a_latent_served(page, server_url, tmp_path: Path) -> None:
    page.goto(server_url)
    rows = page.locator("#rows tr")
    assert rows.count() == 100  # one page of rows in the DOM, not all 600
    assert page.get_by_test_id("range").text_content() == "1–100 of 600"

    # Search by top token text, then click through.
    page.get_by_test_id("search").fill("alert")
    assert rows.count() == 1 and rows.first.get_attribute("data-id") == str(SHOWCASE)
    assert rows.first.locator("td.token").first.text_content() == XSS_SCRIPT
    page.screenshot(path=str(tmp_path / "index.png"), full_page=True)
    rows.first.locator("a.latent-link").click()
    page.wait_for_url(f"**/latent.html?id={SHOWCASE}")
    _check_showcase_latent(page)
    page.screenshot(path=str(tmp_path / "latent.png"), full_page=True)
    shutil.copyfile(tmp_path / "latent.png", SCREENSHOT_COPY)
    print(f"latent page screenshot: {SCREENSHOT_COPY}")

    # A correlated latent in another chunk is a link away; going back returns to the same search.
    page.locator("[data-testid=correlations] a.latent-link").first.click()
    page.get_by_test_id("top-example").wait_for()
    assert page.get_by_test_id("latent-title").text_content() == f"Latent {SHOWCASE + 1}"
    page.go_back()
    page.go_back()
    assert page.get_by_test_id("search").input_value() == "alert"
    assert page.errors == [] and page.dialogs == [] and page.csp == []


def test_search_by_id_enter_jumps_and_sorting(page, server_url) -> None:
    page.goto(server_url)
    search = page.get_by_test_id("search")
    page.keyboard.press("/")  # focuses the search box
    page.keyboard.type("555")  # an id in the last chunk
    assert search.input_value() == "555"
    assert page.locator("#rows tr").count() == 1
    search.press("Enter")
    page.wait_for_url("**/latent.html?id=555")
    page.get_by_test_id("top-example").wait_for()
    assert page.get_by_test_id("top-example").locator(".tok.max").text_content() == " tok555"

    page.goto(server_url)
    page.get_by_test_id("sort").select_option("freq:-1")
    ids = [int(x) for x in page.locator("#rows tr").evaluate_all("rs => rs.map(r => r.dataset.id)")]
    # freq = (id % 50) / 1000: the top frequency is 0.049, held by ids 49, 99, ..., 599 (ties in id order).
    assert ids[:12] == list(range(49, 600, 50))
    page.locator("th[data-sort=id]").click()
    first = page.locator("#rows tr").first.get_attribute("data-id")
    assert first == "0"
    page.locator("#next").click()
    assert page.locator("#rows tr").first.get_attribute("data-id") == "100"
    assert page.errors == [] and page.dialogs == []


def test_opens_from_file_without_a_server(page, fake_site, tmp_path: Path) -> None:
    page.goto((fake_site / "index.html").as_uri())
    page.get_by_test_id("search").fill("bold")
    rows = page.locator("#rows tr")
    assert rows.count() == 1 and rows.first.get_attribute("data-id") == str(SHOWCASE + 1)
    page.goto((fake_site / "latent.html").as_uri() + f"?id={SHOWCASE}")
    _check_showcase_latent(page)
    page.goto((fake_site / "latent.html").as_uri() + "#7")  # the hash form of the id
    page.get_by_test_id("top-example").wait_for()
    assert page.get_by_test_id("latent-title").text_content() == "Latent 7"
    page.keyboard.press("ArrowRight")  # the arrow keys step to the next latent
    page.wait_for_url("**/latent.html?id=8")
    page.get_by_test_id("top-example").wait_for()
    assert page.get_by_test_id("latent-title").text_content() == "Latent 8"
    page.screenshot(path=str(tmp_path / "latent-file.png"), full_page=True)
    assert page.csp == [] and page.errors == []


def test_bad_ids_and_missing_data_say_so(page, fake_site, tmp_path: Path) -> None:
    page.goto((fake_site / "latent.html").as_uri() + "?id=600")
    assert "ids run from 0 to 599" in page.locator(".error").text_content()
    page.goto((fake_site / "latent.html").as_uri() + "?id=%3Cb%3Ex")
    assert 'No latent "<b>x" here' in page.locator(".error").text_content()
    page.goto((fake_site / "latent.html").as_uri() + "?id=50")  # a dead latent
    assert "never fired" in page.get_by_test_id("top-examples").text_content()
    empty = tmp_path / "empty"
    write_assets(str(empty))
    page.goto((empty / "index.html").as_uri())
    assert "did not load" in page.locator(".error").text_content()
    assert page.errors == []


def test_index_stays_responsive_with_thirty_thousand_latents(page, tmp_path: Path) -> None:
    folder = tmp_path / "big"
    write_fake_site(str(folder), d_sae=30_000, chunk_size=256, full=False)
    page.goto((folder / "index.html").as_uri())
    assert page.locator("#rows tr").count() == 100
    # Filtering and re-rendering all 30k rows on a keystroke, and sorting them, each well under a second.
    elapsed = page.evaluate("""() => {
        const box = document.getElementById("search");
        const t0 = performance.now();
        box.value = "tok2999"; box.dispatchEvent(new Event("input"));
        const t1 = performance.now();
        const sort = document.getElementById("sort");
        sort.value = "freq:-1"; sort.dispatchEvent(new Event("change"));
        return [t1 - t0, performance.now() - t1];
    }""")
    assert page.locator("#rows tr").count() == 11  # tok2999 and tok29990 ... tok29999
    assert max(elapsed) < 1000, elapsed
    assert page.errors == []


def test_a_real_build_of_a_tiny_model_reads_in_the_browser(page, tiny_gpt2_dir, tmp_path: Path) -> None:
    """The whole path: data from the real builder (tiny GPT-2, random TopK SAE), pages, browser."""
    model = load_model(str(tiny_gpt2_dir), device="cpu")
    torch.manual_seed(0)
    hook = "blocks.0.hook_resid_post"
    sae = make_sae(SAEConfig(arch="topk", d_in=model.info.d_model, d_sae=40, k=4, hook_name=hook))
    cfg = DashboardConfig(sae="tiny-sae", model=str(tiny_gpt2_dir), hook=hook, tokens=512, ctx_len=32,
                          chunk_size=16, out=str(tmp_path / "site"), device="cpu")
    summary = build_site(cfg, model=model, sae=sae)
    index = store.load_index(cfg.out)
    busiest = max(range(40), key=lambda i: index["freq"][i])
    latent = store.load_latent(cfg.out, busiest)
    top = latent["top"][0]
    page.goto(Path(summary["index"]).as_uri())
    page.get_by_test_id("search").fill(str(busiest))
    page.locator("#rows a.latent-link").click()
    shown = page.get_by_test_id("top-example")
    shown.wait_for()
    max_token = shown.locator(".tok.max")
    assert max_token.get_attribute("data-testid") is None and max_token.count() == 1
    want = top["tokens"][top["max_pos"]].replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "\u240d")
    assert max_token.text_content() == want
    assert float(max_token.get_attribute("data-act")) == top["acts"][top["max_pos"]]
    value = shown.locator(".example-value").text_content()
    assert value.startswith("max ") and abs(float(value[4:]) - latent["max_act"]) <= 1e-3 * latent["max_act"]
    assert page.errors == [] and page.dialogs == []


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(path: Path) -> None:
    """A real 2x2 PNG (the browser must decode it: a loaded image has a natural width)."""
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))
    chunk = _png_chunk
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_run_reports_work_under_their_policy_from_file(page, tmp_path: Path) -> None:
    """`report runs` pages hold the policy too: their one inline stylesheet (allowed by its hash) and their figures
    still load from file://, while an injected inline script is refused (so the check above can see a refusal)."""
    run = tmp_path / "runs" / "r"
    (run / "figures").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"kind": "lens", "config": {"layer": 1}}))
    (run / "metrics.json").write_text(json.dumps({"kind": "lens", "n_tokens": 5}))
    _png(run / "figures" / "curve.png")
    (run / "report.md").write_text("# Notes\n\n![curve](figures/curve.png) ![far](\\\\\\\\evil.example\\\\a.png)\n")
    write_run_reports(RunReportConfig(root=str(tmp_path / "runs")))
    page.goto((run / "report.html").as_uri())
    assert page.evaluate("getComputedStyle(document.body).maxWidth") == "1100px"  # the hashed <style> applied
    widths = page.locator("img").evaluate_all("imgs => imgs.map(i => [i.getAttribute('src'), i.naturalWidth])")
    assert ["figures/curve.png", 2] in widths and all(src is None or "evil" not in src for src, _ in widths)
    assert page.csp == [] and page.errors == [] and page.outside == []
    page.goto((tmp_path / "runs" / "index.html").as_uri())
    assert page.locator("a", has_text="r").count() >= 1 and page.csp == []
    tampered = run / "tampered.html"
    tampered.write_text((run / "report.html").read_text().replace("</body>", "<script>window.ran = 1</script></body>"))
    page.goto(tampered.as_uri())
    assert page.evaluate("window.ran") is None and page.csp != []
