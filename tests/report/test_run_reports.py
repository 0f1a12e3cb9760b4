"""Run reports on real (tiny) run folders written by the commands' own functions, on a generic folder, and on HTML
in the inputs; every link and image of every page must point at a file that exists."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from interplab.beliefs.configs import BeliefRegressConfig, BeliefTrainConfig
from interplab.beliefs.regress import run_regress
from interplab.beliefs.train import train_beliefs
from interplab.dashboard import store
from interplab.errors import InterplabError
from interplab.evals.configs import EvalConfig
from interplab.evals.sae_eval import evaluate
from interplab.lens.configs import LensConfig
from interplab.lens.run import run_lens
from interplab.models.load import load_model
from interplab.probes.configs import ProbeConfig
from interplab.probes.probe_run import run_probe
from interplab.report.configs import RunReportConfig
from interplab.dashboard.serve import PAGE_POLICY
from interplab.report.html import POLICY, markdown_to_html, safe_relative_url
from interplab.report.run_reports import HEADLINE_KEYS, format_summary, write_run_reports
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import train
from interplab.synth.configs import TMSRunConfig
from interplab.synth.tms_run import run_tms
from interplab.toy.configs import InspectToyConfig, ToyTrainConfig
from interplab.toy.readouts import run_toy_inspect
from interplab.toy.train import run_toy_train
from interplab.weights.configs import OutliersConfig, SVDConfig
from interplab.weights.outliers import run_outliers
from interplab.weights.svd_run import run_svd

HOOK = "blocks.1.hook_resid_post"
EXPECTED = {"sae": "sae train", "sae/topk-k4-x2": "sae", "eval": "sae eval", "beliefs": "beliefs train",
            "toy": "toy train", "toy/inspect": "toy inspect", "tms": "synth tms", "svd": "weights svd",
            "outliers": "weights outliers", "lens": "lens", "probe": "probe"}


@pytest.fixture(scope="module")
def runs(tiny_gpt2_dir, tmp_path_factory) -> Path:
    """One small real run of each command, all under one root (about 5 s in total)."""
    root = tmp_path_factory.mktemp("runs")
    m = str(tiny_gpt2_dir)
    model = load_model(m, device="cpu")
    train(TrainConfig(model=m, hook=HOOK, ctx_len=16, tokens=1024, batch_size=128, shuffle_buffer=256, k=[4],
                      expansion=[2], lr=1e-2, device="cpu", out=str(root / "sae")), progress=False)
    evaluate(EvalConfig(sae=str(root / "sae/topk-k4-x2"), split="train", tokens=160, ctx_len=16, batch_size=4,
                        device="cpu", out=str(root / "eval/metrics.json"), figures=str(root / "eval/figures")),
             model=model, progress=False)
    train_beliefs(BeliefTrainConfig(process="mess3", layers=2, d_model=16, heads=1, ctx=4, tokens=6400,
                                    batch_size=64, out=str(root / "beliefs"), progress=False))
    run_regress(BeliefRegressConfig(run=str(root / "beliefs"), shuffles=2), progress=False)
    run_toy_train(ToyTrainConfig(task="ov-coherent:n_signal=2,n_noise=2,n_ctx=4", d_model=16, heads=2, d_head=4,
                                 steps=100, batch_size=64, lr=0.01, warmup=10, qualify_every=20, thorough_every=20,
                                 checkpoint_every=50, eval_examples=256, out=str(root / "toy"), progress=False))
    run_toy_inspect(InspectToyConfig(run=str(root / "toy"), examples=50))
    run_tms(TMSRunConfig(steps=50, sweep_instances=2, out=str(root / "tms")), progress=False)
    run_svd(SVDConfig(model=m, what="ov", layer=1, directions=2, top_k=5, controls=10, out=str(root / "svd")),
            model=model)
    run_outliers(OutliersConfig(model=m, tokens=256, ctx_len=32, top=3, out=str(root / "outliers")), model=model,
                 progress=False)
    run_lens(LensConfig(model=m, kind="logit", eval_tokens=60, ctx_len=16, batch_size=2, prompt="The quick fox",
                        out=str(root / "lens")), model=model, progress=False)
    data = root.parent / "probe.jsonl"
    data.write_text("".join(json.dumps({"text": f"a b {'dog' if i % 2 else 'cat'}", "label": i % 2}) + "\n"
                            for i in range(40)))
    run_probe(ProbeConfig(model=m, hook="hook_embed", data=str(data), methods=["diff-means"], shuffles=2,
                          out=str(root / "probe"), device="cpu"), model=model)
    return root


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.policies: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "img" and a.get("src") is not None:
            self.images.append(a["src"])
        if tag == "meta" and (a.get("http-equiv") or "").lower() == "content-security-policy":
            self.policies.append(a.get("content") or "")


def parse_fragment(html: str) -> Links:
    parser = Links()
    parser.feed(html)
    return parser


def parse(page: Path) -> Links:
    return parse_fragment(page.read_text(encoding="utf-8"))


def targets(page: Path, refs: list[str]) -> list[Path]:
    return [(page.parent / unquote(r)).resolve() for r in refs if not r.startswith(("http://", "https://"))]


def test_every_real_run_gets_a_report_listed_in_the_index(runs):
    result = write_run_reports(RunReportConfig(root=str(runs)))
    found = {Path(r["path"]).relative_to(runs).as_posix(): r["kind"] for r in result["runs"]}
    assert found == EXPECTED  # and no checkpoint, model/ or probe acts/ folder is mistaken for a run
    index = runs / "index.html"
    assert result["index"] == str(index)
    linked = set(targets(index, parse(index).links))
    for rel, kind in EXPECTED.items():
        report = runs / rel / "report.html"
        assert report.resolve() in linked
        text = report.read_text()
        assert f"<title>{kind}: {Path(rel).name}</title>" in text
    assert "11 run folder(s)" in format_summary(result) and "sae eval 1" in format_summary(result)


def test_links_and_images_resolve_and_every_figure_is_shown_once(runs):
    write_run_reports(RunReportConfig(root=str(runs)))
    shown: list[Path] = []
    for page in [runs / "index.html", *runs.rglob("report.html")]:
        parsed = parse(page)
        for target in targets(page, parsed.links + parsed.images):
            assert target.is_file(), f"{page}: broken link {target}"
        shown += targets(page, parsed.images)
    pngs = sorted(p.resolve() for p in runs.rglob("*.png") if "checkpoints" not in p.parts)
    assert len(pngs) >= 15 and sorted(shown) == pngs


def test_reports_show_config_and_metric_values(runs):
    write_run_reports(RunReportConfig(root=str(runs)))
    toy = (runs / "toy/report.html").read_text()
    assert "<th>d_model</th><td class=num>16</td>" in toy  # config.json
    train = json.loads((runs / "toy/metrics.json").read_text())
    assert f"<th>final.test_acc</th><td class=num>{train['final']['test_acc']:.4g}</td>" in toy
    sae = (runs / "sae/topk-k4-x2/report.html").read_text()
    fvu = json.loads((runs / "sae/topk-k4-x2/metrics.json").read_text())["fvu"]
    assert f"<th>fvu</th><td class=num>{fvu:.4g}</td>" in sae and "<h2>Config: cfg.json</h2>" in sae
    inspect = (runs / "toy/inspect/report.html").read_text()
    assert "<h2>Report: report.md</h2>" in inspect and "<th>head</th>" in inspect  # markdown table
    parent = (runs / "toy/report.html").read_text()
    assert 'href="inspect/report.html"' in parent  # nested runs are linked from their parent


def test_generic_folder_and_html_in_inputs_are_escaped(tmp_path):
    run = tmp_path / "mystery"
    run.mkdir()
    evil = "<script>alert(1)</script>"
    (run / "config.json").write_text(json.dumps({"name": evil, "nested": {"lr": 0.5}}))
    (run / "scores.json").write_text(json.dumps({"accuracy": 0.75, "note": evil}))
    (run / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (run / "report.md").write_text(f"# Title {evil}\n\n| a | b |\n|---|---|\n| {evil} | 2 |\n\n"
                                   "[click](javascript:alert(1)) and ![x](plot.png)\n")
    ckpt = tmp_path / "mystery" / "model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "extra.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"0")
    result = write_run_reports(RunReportConfig(root=str(tmp_path), out=str(tmp_path / "site" / "runs.html")))
    assert [(r["kind"], Path(r["path"]).name) for r in result["runs"]] == [("run", "mystery")]
    text = (run / "report.html").read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<th>nested.lr</th><td class=num>0.5</td>" in text and "<th>accuracy</th><td class=num>0.75</td>" in text
    assert 'href="javascript' not in text and '<img src="plot.png" alt="x">' in text
    assert '<figure><img src="plot.png"' in text
    index = tmp_path / "site" / "runs.html"
    assert targets(index, parse(index).links) == [(run / "report.html").resolve()]
    assert parse(run / "report.html").links[0] == "../site/runs.html"


def test_markdown_subset(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "file.md").write_text("x")
    html = markdown_to_html("## Head\n\ntext with `a<b` and **bold**\n\n- one\n- two\n\n1. x\n\n```\n<raw>\n```\n"
                            "[ok](sub/file.md) [up](../x) [abs](/etc/passwd) [web](https://e.org)\n\n"
                            "| a | b |\n|---|--:|\n| <b>c</b> | 2 |\n", tmp_path)
    assert "<h3>Head</h3>" in html and "<code>a&lt;b</code>" in html and "<strong>bold</strong>" in html
    assert "<ul>\n<li>one</li>\n<li>two</li>\n</ul>" in html and "<ol>\n<li>x</li>\n</ol>" in html
    assert "<pre><code>&lt;raw&gt;\n</code></pre>" in html
    assert '<a href="sub/file.md">ok</a>' in html
    # a report is a local page: links leaving the run folder, and every scheme (http too), keep only their text
    assert "<a>up</a>" in html and "<a>abs</a>" in html and "<a>web</a>" in html
    assert "<td>&lt;b&gt;c&lt;/b&gt;</td>" in html and "style=" not in html  # alignment styles would break the CSP


EVIL_URLS = [
    "\\\\evil.example\\a.png",  # \\evil.example\a.png: a UNC path (SMB on Windows), //evil.example for a browser
    "\\\\evil.example/a.png",
    "..\\..\\secret.txt",       # ..\..\secret.txt
    "sub\\..\\..\\secret.txt",
    "sub/..\\..\\secret.txt",
    "%2e%2e/secret.txt",
    "%2E%2E%5Csecret.txt",
    "..%2fsecret.txt",
    "//evil.example/a.png",
    "/etc/passwd",
    "C:/Windows/win.ini",
    "C:secret.txt",
    "file:///etc/passwd",
    "https://evil.example/a.png",
    "javascript:alert(1)",
    "data:image/png;base64,iVBORw0KGgo=",
    "java%0ascript:alert(1)",
    ".../secret.txt",
    ".. /secret.txt",
    "escape/secret.txt",           # a symlink inside the run folder that points out of it
]


@pytest.mark.parametrize("url", EVIL_URLS)
def test_urls_leaving_the_run_folder_are_refused(tmp_path, url):
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("secret")
    (tmp_path / "outside").mkdir()
    (run / "escape").symlink_to(tmp_path / "outside")
    assert not safe_relative_url(url, run)
    literal = url.replace("\\", "\\\\")  # Markdown reads \\ as one backslash: the link is exactly `url`
    for markdown in (f"![pic]({literal}) [link]({literal})", f"![pic](<{literal}>) [link](<{literal}>)"):
        refs = parse_fragment(markdown_to_html(markdown, run))
        assert refs.links == [] and refs.images == [], markdown
    # Written without doubling, Markdown's own escapes make another link of it: whatever it is, it stays inside.
    refs = parse_fragment(markdown_to_html(f"![pic]({url}) [link]({url})", run))
    for ref in refs.links + refs.images:
        target = (run / unquote(ref).replace("\\", "/")).resolve()
        assert target == run.resolve() or run.resolve() in target.parents, (url, ref)


@pytest.mark.parametrize("url", ["plot.png", "sub/plot.png", "sub/../plot.png", "./sub/plot.png", "sub/",
                                 "sub\\plot.png", "a%20b.png", "plot.png?x=1#y", "#section", "sub/..\\plot.png"])
def test_urls_inside_the_run_folder_are_kept(tmp_path, url):
    (tmp_path / "sub").mkdir()
    assert safe_relative_url(url, tmp_path)


def test_every_generated_page_carries_the_content_security_policy(runs):
    write_run_reports(RunReportConfig(root=str(runs)))
    pages = [runs / "index.html", *runs.rglob("report.html")]
    for page in pages:
        policies = parse(page).policies
        assert policies == [POLICY], page
    assert POLICY.startswith(PAGE_POLICY + "; style-src 'self' 'sha256-")


def test_errors(tmp_path):
    with pytest.raises(InterplabError, match="not a local folder"):
        write_run_reports(RunReportConfig(root=str(tmp_path / "nowhere")))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InterplabError, match="no run folders under .*looked for .*probe.json"):
        write_run_reports(RunReportConfig(root=str(tmp_path)))
    (tmp_path / "tms.json").write_text("{}")
    (tmp_path / "index.html").write_text("<html>someone else's page</html>")
    with pytest.raises(InterplabError, match="not written by `interplab report runs`"):
        write_run_reports(RunReportConfig(root=str(tmp_path)))
    assert (tmp_path / "index.html").read_text() == "<html>someone else's page</html>"


def test_a_dashboard_site_is_linked_not_reported(tmp_path):
    site = tmp_path / "dash"
    meta = {"sae": "s", "model": "m", "hook": HOOK, "corpus": "c", "n_tokens": 64, "ctx_len": 16, "d_sae": 1,
            "chunk_size": 1, "n_chunks": 1, "window": [1, 1], "hist_edges": [0, 1], "logit_hist_edges": [0, 1],
            "quantile_bins": [0, 1]}
    index = {"id": [0], "freq": [0.0], "max_act": [0.0], "mean_act": [0.0], "top_token": [""], "top_logit": [""]}
    store.write_site_data(str(site), meta, index, [[{"id": 0}]])
    (site / "index.html").write_text("<html>the dashboard</html>")
    result = write_run_reports(RunReportConfig(root=str(tmp_path), out=str(tmp_path / "runs.html")))
    assert [(r["kind"], r["headline"]) for r in result["runs"]] == [
        ("dashboard", {"d_sae": 1, "n_tokens": 64, "hook": HOOK})]
    assert not (site / "report.html").exists()
    assert parse(tmp_path / "runs.html").links == ["dash/index.html"]


def test_a_site_of_dashboard_build_is_linked_not_reported(tmp_path):
    """`interplab dashboard build` records its kind in the site's config.json and metrics.json: still a site, whose
    own index.html is linked and into which no report.html is written."""
    site = tmp_path / "dash"
    meta = {"sae": "../sae", "model": "m", "hook": HOOK, "corpus": "c", "n_tokens": 64, "ctx_len": 16, "d_sae": 1,
            "chunk_size": 1, "n_chunks": 1, "window": [1, 1], "hist_edges": [0, 1], "logit_hist_edges": [0, 1],
            "quantile_bins": [0, 1]}
    index = {"id": [0], "freq": [0.0], "max_act": [0.0], "mean_act": [0.0], "top_token": [""], "top_logit": [""]}
    store.write_site_data(str(site), meta, index, [[{"id": 0}]])
    (site / "index.html").write_text("<html>the dashboard</html>")
    (site / "config.json").write_text(json.dumps({"kind": "dashboard build", "config": {"tokens": 64}}))
    (site / "metrics.json").write_text(json.dumps({"kind": "dashboard build", "d_sae": 1, "n_tokens": 64,
                                                   "hook": HOOK, "total_s": 0.5}))
    before = sorted(p.name for p in site.iterdir())
    result = write_run_reports(RunReportConfig(root=str(tmp_path), out=str(tmp_path / "runs.html")))
    assert [(r["kind"], r["headline"]) for r in result["runs"]] == [
        ("dashboard build", {"d_sae": 1, "n_tokens": 64, "hook": HOOK})]
    assert sorted(p.name for p in site.iterdir()) == before
    assert parse(tmp_path / "runs.html").links == ["dash/index.html"]


def test_a_run_folder_is_reported_as_the_kind_it_records_whatever_its_file_names(tmp_path):
    """config.json {"kind": "probe", ...} + metrics.json: kind probe, although train.json + log.jsonl would say
    "toy train" and tms.json "synth tms"; the headline follows HEADLINE_KEYS["probe"] into metrics.json."""
    run = tmp_path / "misnamed"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "probe", "config": {"hook": HOOK, "seed": 0}}))
    metrics = {"kind": "probe", "config": {"hook": HOOK}, "n_positive": 20, "d": 32, "collect_s": 0.5,
               "logistic": {"scores": {"auc": 0.625}}, "n_examples": 40, "diff_means": {"scores": {"auc": 0.875}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    for decoy in ("train.json", "log.jsonl", "tms.json"):
        (run / decoy).write_text("{}\n")
    result = write_run_reports(RunReportConfig(root=str(tmp_path), out=str(tmp_path / "runs.html")))
    assert [(r["kind"], Path(r["path"]).name) for r in result["runs"]] == [("probe", "misnamed")]
    assert HEADLINE_KEYS["probe"][:2] == ("diff_means.scores.auc", "logistic.scores.auc")
    assert result["runs"][0]["headline"] == {"diff_means.scores.auc": 0.875, "logistic.scores.auc": 0.625,
                                             "n_examples": 40}
    text = (run / "report.html").read_text()
    assert "<title>probe: misnamed</title>" in text and "<th>kind</th>" not in text.split("Metrics:")[1]


@pytest.mark.parametrize("kind", ["toy train", "beliefs train", "weights svd", "lens"])
def test_the_kind_may_be_read_from_metrics_json_alone(tmp_path, kind):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"kind": kind, "value": 1.5}))
    result = write_run_reports(RunReportConfig(root=str(tmp_path), out=str(tmp_path / "runs.html")))
    assert [r["kind"] for r in result["runs"]] == [kind]
    assert result["runs"][0]["headline"] == {"value": 1.5}


def test_a_run_without_metrics_json_is_reported_as_incomplete(tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "lens", "config": {"kind": "logit"}}))
    result = write_run_reports(RunReportConfig(root=str(tmp_path), out=str(tmp_path / "runs.html")))
    assert [(r["kind"], r["headline"]) for r in result["runs"]] == [
        ("lens", {"status": "incomplete (no metrics.json)"})]


def test_folders_that_record_no_kind_fall_back_to_their_file_names(tmp_path):
    """An old-style result file, a SAELens SAE folder, and a config.json that is not {"kind", "config"}."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tms.json").write_text(json.dumps({"sweep": {"d_star": 2}}))
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8}))
    (tmp_path / "sae" / "metrics.json").write_text(json.dumps({"fvu": 0.25}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"kind": "probe"}))  # no "config": not runs.py's
    (tmp_path / "other" / "scores.json").write_text(json.dumps({"accuracy": 0.5}))
    result = write_run_reports(RunReportConfig(root=str(tmp_path), out=str(tmp_path / "runs.html")))
    assert {Path(r["path"]).name: r["kind"] for r in result["runs"]} == {"old": "synth tms", "sae": "sae",
                                                                         "other": "run"}
