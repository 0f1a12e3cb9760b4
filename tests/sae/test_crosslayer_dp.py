"""`interplab transcoder train` under torchrun (2 CPU ranks, gloo): each rank runs the model on its half of every
batch's contexts, and the run equals one process on the whole batch up to float rounding."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from interplab.cli import main


def test_two_ranks_train_the_same_clts_as_one_process(tiny_gpt2_dir, tmp_path, torchrun):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"rank test sentence {i} about layers and features {i % 7}" for i in range(80)))
    flags = ["transcoder", "train", "--model", str(tiny_gpt2_dir), "--corpus", str(corpus), "--split", "all",
             "--ctx-len", "16", "--batch-size", "4", "--tokens", str(20 * 60), "--d-sae", "24", "--k", "2,3",
             "--lr", "0.01", "--dead-tokens", "120", "--aux-k", "4", "--log-every", "5", "--device", "cpu"]
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    torchrun(["-m", "interplab", *flags, "--out", str(tmp_path / "two")])
    for name in ("clt-topk-k2-f24", "clt-topk-k3-f24"):
        for file in sorted(p.name for p in (tmp_path / "one" / name).glob("*.safetensors")):
            a, b = (load_file(tmp_path / run / name / file) for run in ("one", "two"))
            for key in a:
                scale = float(a[key].abs().max()) or 1.0
                assert torch.allclose(a[key], b[key], rtol=0, atol=1e-4 * scale), (name, key)
        ha, hb = (json.loads((tmp_path / run / name / "metrics.json").read_text())["history"] for run in ("one", "two"))
        assert [e["step"] for e in ha] == [e["step"] for e in hb] == [5, 10, 15, 20]
        for ea, eb in zip(ha, hb):
            for key in ("fvu", "l0", "dead_fraction"):
                assert abs(ea[key] - eb[key]) <= 1e-3 * max(1.0, abs(ea[key])), (key, ea["step"])
