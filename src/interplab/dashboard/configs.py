"""The configs of `interplab dashboard build`, `serve` and `neuronpedia` (standard library only, so `--help` stays
fast). Their `validate()` methods need no model and no data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from interplab.config import ModelFields, TextFields
from interplab.errors import InterplabError

__all__ = ["LAYOUTS", "DashboardConfig", "NeuronpediaConfig", "ServeConfig"]

LAYOUTS = ("export", "saedashboard", "both")
"""The layouts `interplab dashboard neuronpedia` writes (see `neuronpedia`)."""


@dataclass
class DashboardConfig(TextFields, ModelFields):
    """Build a feature dashboard for one SAE: per-latent statistics over a corpus, written as a static site."""

    model: str = ""
    """Model spec (default: the model the SAE was trained on, from its cfg.json, else smollm2-135m)."""
    batch_size: int = 32
    sae: str = ""
    """Folder of the SAE (SAELens or sparsify layout)."""
    hook: str = ""
    """Hook point the SAE reads (default: the SAE's hook_name)."""
    tokens: int = 200_000
    """Tokens to read (rounded up to whole contexts)."""
    top_k: int = 20
    """Top-activating examples per latent (from distinct contexts)."""
    window: list[int] = field(default_factory=lambda: [12, 4])
    """Tokens shown before and after an example's token: before,after."""
    quantile_bins: int = 5
    """Activation intervals per latent, (0, 1/n], ..., ((n-1)/n, 1] times its max, each with sampled examples."""
    quantile_examples: int = 5
    """Random examples per activation interval."""
    chunk_size: int = 256
    """Latents per data file."""
    neurons: bool = True
    """Also correlate every latent with the MLP neurons of the SAE's layer (blocks.L.mlp.hook_post)."""
    out: str = "dashboard"
    """Site folder; the data goes to OUT/data/."""

    def validate(self) -> None:
        """Refuse settings that are wrong whatever the model (an `InterplabError` naming the option)."""
        if not self.sae:
            raise InterplabError("--sae is required: the folder of a saved SAE")
        for name, minimum in (("tokens", 1), ("ctx_len", 2), ("batch_size", 1), ("top_k", 1),
                              ("quantile_bins", 1), ("quantile_examples", 1), ("chunk_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InterplabError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
        w = self.window
        if len(w) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in w):
            raise InterplabError(f"--window must be two integers >= 0 (tokens before,after), got {w!r}")
        if self.split not in ("train", "test", "all"):
            raise InterplabError(f"--split {self.split!r} is not valid; valid: train, test, all")


@dataclass
class ServeConfig:
    """Serve a static dashboard folder over HTTP."""

    site: str = "dashboard"
    """The dashboard folder (written by `interplab dashboard build`)."""
    host: str = "127.0.0.1"
    """Address to bind. Only loopback by default; any other address exposes the site to the network."""
    port: int = 8000
    """Port to listen on (0: any free port)."""

    def validate(self) -> None:
        """Refuse a port out of range and a folder that is not a built site."""
        if not 0 <= self.port <= 65535:
            raise InterplabError(f"--port {self.port} is not a port: use 0..65535 (0 picks a free one)")
        if not (Path(self.site) / "index.html").is_file():
            raise InterplabError(f"{self.site} is not a dashboard folder (no index.html); build one with "
                                 "`interplab dashboard build --out SITE`")


@dataclass
class NeuronpediaConfig:
    """Export a dashboard site's data to Neuronpedia's upload/import layout."""

    site: str = "dashboard"
    """Dashboard site folder (written by `interplab dashboard build`)."""
    out: str = "neuronpedia"
    """Output folder."""
    layout: str = "export"
    """export (Neuronpedia's export/import layout: MODEL/SOURCE/{features,activations}/*.jsonl.gz + *.jsonl),
    saedashboard (SAEDashboard NeuronpediaRunner batch-N.json files), or both."""
    model_id: str = ""
    """Neuronpedia model id, e.g. smollm2-135m (default: the dashboard's model spec, if it is a valid id)."""
    source_set: str = "interplab-res"
    """Neuronpedia source set name (no layer number: the source id is <layer>-<source_set>)."""
    layer: int | None = None
    """Layer number of the source id (default: read from the hook name, blocks.<layer>.)."""
    description: str = ""
    """Source set description shown on Neuronpedia (default: the hook name and width)."""
    release: str = ""
    """Release id (default: the source set name)."""
    creator_name: str = "interplab"
    """Creator name written to the release and source set."""
    creator_id: str = ""
    """Neuronpedia user id written as creatorId (an importing instance may require an existing user's id)."""
    url: str = ""
    """URL of the paper or weights, written to the release."""
    features_per_batch: int = 128
    """Features per batch file."""
