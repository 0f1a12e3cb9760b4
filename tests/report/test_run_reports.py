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
from interplab.report.html import markdown_to_html
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

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "img":
            self.images.append(a["src"])


def parse(page: Path) -> Links:
    parser = Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


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
    assert "<h2>Report: report.md</h2>" in inspect and "<table><tr><th>head</th>" in inspect  # markdown table
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


def test_markdown_subset():
    html = markdown_to_html("## Head\n\ntext with `a<b` and **bold**\n\n- one\n- two\n\n1. x\n\n```\n<raw>\n```\n"
                            "[ok](sub/file.md) [up](../x) [abs](/etc/passwd) [web](https://e.org)", Path("."))
    assert "<h3>Head</h3>" in html and "<code>a&lt;b</code>" in html and "<strong>bold</strong>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>x</li></ol>" in html
    assert "<pre>&lt;raw&gt;</pre>" in html
    assert '<a href="sub/file.md">ok</a>' in html and '<a href="https://e.org">web</a>' in html
    assert 'href="../x"' not in html and 'href="/etc/passwd"' not in html


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
