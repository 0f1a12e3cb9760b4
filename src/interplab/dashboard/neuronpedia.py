"""`interplab dashboard neuronpedia`: a dashboard site's data in the layouts Neuronpedia ingests.

Two layouts, both established from their public sources (field names and meanings read from them, no code copied):

1. `export` (default) — Neuronpedia's export/import layout, v1: the layout of the public exports bucket
   (docs.neuronpedia.org/api-and-data/exports, "v1/[MODEL_ID]/[SOURCE_ID]/features/ activations/ model.jsonl
   release.jsonl source.jsonl sourceset.jsonl", each *.jsonl.gz one JSON object per line), which a self-hosted
   Neuronpedia imports from its admin panel and which the neuronpedia repo's
   utils/neuronpedia-utils/convert-saedashboard-to-neuronpedia-export.py writes. Row fields follow that script and
   its db_models (Feature, Activation, Model, Source, SourceSet, SourceRelease dataclasses). Written to
   OUT/<model_id>/<layer>-<source_set>/.
2. `saedashboard` — the intermediate that SAEDashboard's NeuronpediaRunner writes and that conversion reads:
   OUT/batch-<n>.json = {"model_id", "layer", "sae_set", "sae_id_suffix", "features": [...]} and
   OUT/skipped_indexes.json (dead latents, left out of the batches), field names per SAEDashboard's
   neuronpedia_converter.py and its acceptance batch tests/acceptance/test_converter/batch-0.json.

What maps to what (dashboard data -> Neuronpedia):
    latent id                 feature_index / index (a string in the export)
    freq                      frac_nonzero
    max_act                   maxActApprox (export; exact here, where SAEDashboard takes the max over its examples)
    hist + meta.hist_edges    freq_hist_data_bar_heights + freq_hist_data_bar_values (bin centres: parallel arrays)
    logits.top / .bottom      pos_str + pos_values / neg_str + neg_values (same order: strongest first)
    logits.hist + edges       logits_hist_data_bar_heights + logits_hist_data_bar_values (bin centres)
    corr_latents              correlated_features_indices + correlated_features_pearson
    corr_neurons              correlated_neurons_indices + correlated_neurons_pearson
    top examples              activations with bin_min -1, bin_max max_act, bin_contains -1 (SAEDashboard's marking
                              of the "top activations" group)
    quantile examples         activations with bin_min, bin_max = the quantile bin's bounds
    example tokens / acts     tokens / values; max_pos -> qualifying_token_index (maxValueTokenIndex in the export);
                              context -> dataIndex, corpus -> dataSource (export)
    meta.corpus, ctx_len,     dataset, n_tokens_in_prompt, n_prompts_total (n_tokens // ctx_len) — source.jsonl in
    n_tokens                  the export, per feature in the batches
Missing (written empty, as the formats' own defaults): neuron_alignment_* (decoder-weight alignment with neurons),
correlated_*_l1 (SAEDashboard's cosine similarities), decoder_weights_dist (attention SAEs only), DFA values, loss
values, logit contributions, feature vectors (hasVector false), explanations. bin_contains of a quantile group
(the share of the latent's activations in that bin) is not in the dashboard data and is written null. Tokens are
the dashboard's window around each example's maximum (default 12 before, 4 after), not the whole prompt. Values
are written at full precision (SAEDashboard rounds to 3 decimals).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

from interplab.dashboard import store
from interplab.dashboard.configs import LAYOUTS, NeuronpediaConfig
from interplab.errors import InterplabError
from interplab.fileio import join, write_url_atomic
from interplab.models.hooks import parse_block_hook
from interplab.runs import folder_entries

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass
class _Context:
    meta: dict
    model_id: str
    layer: int
    source_id: str
    creator_id: str
    created_at: str


def _bin_centres(edges: list[float]) -> list[float]:
    return [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]


def _layer_of(hook: str) -> int | None:
    parsed = parse_block_hook(hook or "")
    return parsed[0] if parsed else None


def _context(cfg: NeuronpediaConfig, meta: dict) -> _Context:
    model_id = cfg.model_id or str(meta.get("model", ""))
    if not _ID_RE.match(model_id):
        raise InterplabError(f"model id {model_id!r} is not a Neuronpedia id (lowercase letters, digits, '.', '-', "
                             "'_'); pass --model-id, e.g. --model-id smollm2-135m")
    if not _ID_RE.match(cfg.source_set):
        raise InterplabError(f"--source-set {cfg.source_set!r} must be lowercase letters, digits, '.', '-', '_'")
    layer = cfg.layer if cfg.layer is not None else _layer_of(meta.get("hook", ""))
    if layer is None:
        raise InterplabError(f"cannot read a layer number from hook {meta.get('hook')!r}; pass --layer")
    if cfg.layout not in LAYOUTS:
        raise InterplabError(f"--layout {cfg.layout!r} is not valid; choose from {', '.join(LAYOUTS)}")
    if cfg.features_per_batch < 1:
        raise InterplabError("--features-per-batch must be >= 1")
    return _Context(meta, model_id, layer, f"{layer}-{cfg.source_set}", cfg.creator_id,
                    datetime.now(timezone.utc).isoformat())


def _activation(example: dict, bin_min: float, bin_max: float, bin_contains: float | None) -> dict:
    return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains, "tokens": list(example["tokens"]),
            "values": list(example["acts"]), "qualifying_token_index": example["max_pos"],
            "dfa_values": [], "dfa_maxValue": 0, "dfa_targetIndex": -1, "context": example.get("context")}


def batch_feature(latent: dict, meta: dict) -> dict:
    """One latent as a SAEDashboard Neuronpedia batch feature (the module docstring has the mapping)."""
    acts = [_activation(e, -1, latent["max_act"], -1) for e in latent["top"]]
    for group in latent["quantiles"]:
        lo, hi = group["bin"]
        acts += [_activation(e, lo, hi, None) for e in group["examples"]]
    logits = latent["logits"]
    return {
        "feature_index": latent["id"],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [int(i) for i, _ in latent["corr_neurons"]], "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [r for _, r in latent["corr_neurons"]],
        "correlated_features_indices": [int(i) for i, _ in latent["corr_latents"]], "correlated_features_l1": [],
        "correlated_features_pearson": [r for _, r in latent["corr_latents"]],
        "neg_str": [t for t, _ in logits["bottom"]], "neg_values": [v for _, v in logits["bottom"]],
        "pos_str": [t for t, _ in logits["top"]], "pos_values": [v for _, v in logits["top"]],
        "frac_nonzero": latent["freq"],
        "freq_hist_data_bar_values": _bin_centres(meta["hist_edges"]),
        "freq_hist_data_bar_heights": list(latent["hist"]),
        "logits_hist_data_bar_heights": list(logits["hist"]),
        "logits_hist_data_bar_values": _bin_centres(meta["logit_hist_edges"]),
        "n_prompts_total": meta["n_tokens"] // meta["ctx_len"], "n_tokens_in_prompt": meta["ctx_len"],
        "dataset": meta["corpus"], "decoder_weights_dist": [],
        "max_act": latent["max_act"],
        "activations": acts,
    }


def _strip_private(feature: dict) -> dict:
    """The batch feature without the two fields we carry for the export only (not in SAEDashboard's layout)."""
    out = {k: v for k, v in feature.items() if k != "max_act"}
    out["activations"] = [{k: v for k, v in a.items() if k != "context"} for a in feature["activations"]]
    return out


def _row_id(*parts: Any) -> str:
    # Neuronpedia ids are cuid2 strings (a letter, then lowercase letters and digits, 25 long); a hash of what the
    # row is keeps re-exports identical and re-imports idempotent.
    return "c" + hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:24]


def export_rows(feature: dict, ctx: _Context) -> tuple[dict, list[dict]]:
    """A batch feature as one export Feature row and its Activation rows."""
    keep = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
            "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
            "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
            "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
            "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
            "decoder_weights_dist")
    index = str(feature["feature_index"])
    row = {"modelId": ctx.model_id, "layer": ctx.source_id, "index": index, "creatorId": ctx.creator_id,
           "createdAt": ctx.created_at, "maxActApprox": feature["max_act"], "hasVector": False, "vector": [],
           "vectorLabel": None, "vectorDefaultSteerStrength": 10, "hookName": None, "topkCosSimIndices": [],
           "topkCosSimValues": [], **{k: feature[k] for k in keep}}
    acts = []
    for k, a in enumerate(feature["activations"]):
        values = a["values"]
        top = max(range(len(values)), key=values.__getitem__) if values else 0
        acts.append({
            "id": _row_id(ctx.model_id, ctx.source_id, index, k), "tokens": a["tokens"], "index": index,
            "layer": ctx.source_id, "modelId": ctx.model_id, "maxValue": max(values, default=0.0),
            "maxValueTokenIndex": top, "minValue": min(values, default=0.0), "values": values,
            "creatorId": ctx.creator_id, "dataSource": ctx.meta["corpus"],
            "dataIndex": None if a.get("context") is None else str(a["context"]),
            "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None, "createdAt": ctx.created_at,
            "lossValues": [], "logitContributions": None, "binMin": a["bin_min"], "binMax": a["bin_max"],
            "binContains": a["bin_contains"], "qualifyingTokenIndex": a["qualifying_token_index"]})
    return row, acts


def _batches(site: str, meta: dict, size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for latent in store.iter_latents(site):
        batch.append(latent)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _metadata_rows(cfg: NeuronpediaConfig, ctx: _Context) -> dict[str, dict]:
    meta, release = ctx.meta, cfg.release or cfg.source_set
    description = cfg.description or f"{meta['hook']} - {meta['d_sae']:,} latents (interplab)"
    return {
        "release.jsonl": {"name": release, "description": description, "descriptionShort": description,
                          "urls": [cfg.url] if cfg.url else [], "creatorNameShort": cfg.creator_name,
                          "creatorName": cfg.creator_name, "creatorId": ctx.creator_id, "visibility": "PUBLIC",
                          "createdAt": ctx.created_at},
        "model.jsonl": {"id": ctx.model_id, "instruct": ctx.model_id.endswith(("-it", "-instruct")),
                        "displayNameShort": ctx.model_id, "displayName": ctx.model_id,
                        "creatorId": ctx.creator_id, "createdAt": ctx.created_at, "updatedAt": ctx.created_at},
        "sourceset.jsonl": {"modelId": ctx.model_id, "name": cfg.source_set, "creatorId": ctx.creator_id,
                            "createdAt": ctx.created_at, "creatorName": cfg.creator_name, "releaseName": release,
                            "description": description, "visibility": "PUBLIC"},
        "source.jsonl": {"id": ctx.source_id, "modelId": ctx.model_id, "setName": cfg.source_set,
                         "creatorId": ctx.creator_id, "visibility": "PUBLIC", "dataset": meta["corpus"],
                         "num_prompts": meta["n_tokens"] // meta["ctx_len"], "num_tokens_in_prompt": meta["ctx_len"],
                         "hasDashboards": True, "inferenceEnabled": False, "notes": f"interplab SAE {meta['sae']}",
                         "createdAt": ctx.created_at},
    }


def _check_latents(site: str, meta: dict, ctx: _Context) -> None:
    """Convert every latent once without writing, so that damaged data is one error before any file is written."""
    for latent in store.iter_latents(site):
        try:
            export_rows(batch_feature(latent, meta), ctx)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise InterplabError(f"latent {latent.get('id')!r} in {site} is not dashboard data ({type(e).__name__}: "
                                 f"{str(e)[:80]}); rebuild the site with `interplab dashboard build`") from None


_BATCH_RE = re.compile(r"batch-\d+\.json")


def _check_out(out: str, ctx: _Context) -> None:
    """--out must be new, empty, or hold only what an export writes (its files are then replaced): Neuronpedia's
    importers read every file of the folder, so it carries no config.json of ours, and anything else there is
    someone else's."""
    ours = {ctx.model_id, "skipped_indexes.json"}
    others = [n for n in folder_entries(out) if n not in ours and not _BATCH_RE.fullmatch(n)]
    if others:
        raise InterplabError(f"{out} holds files that are not a Neuronpedia export (found {', '.join(others[:3])}); "
                             "choose a new or empty --out")


def export_neuronpedia(cfg: NeuronpediaConfig) -> dict[str, Any]:
    """Write the site's latents in the chosen layout(s); return counts and paths. The site's data is read and
    checked whole first: a damaged or foreign data/ is one `InterplabError` and nothing is written."""
    meta = store.load_meta(cfg.site)
    ctx = _context(cfg, meta)
    _check_latents(cfg.site, meta, ctx)
    _check_out(cfg.out, ctx)
    export_dir = join(join(cfg.out, ctx.model_id), ctx.source_id)
    want_export, want_batches = cfg.layout in ("export", "both"), cfg.layout in ("saedashboard", "both")
    n_features = n_activations = n_batches = 0
    dead: list[int] = []
    for b, latents in enumerate(_batches(cfg.site, meta, cfg.features_per_batch)):
        features = [batch_feature(x, meta) for x in latents]
        alive = [f for f in features if f["frac_nonzero"] > 0]
        dead += [f["feature_index"] for f in features if f["frac_nonzero"] <= 0]
        if want_batches and alive:
            batch = {"model_id": ctx.model_id, "layer": ctx.layer, "sae_set": cfg.source_set, "sae_id_suffix": None,
                     "features": [_strip_private(f) for f in alive]}
            write_url_atomic(join(cfg.out, f"batch-{b}.json"), json.dumps(batch, ensure_ascii=False).encode())
        if want_export:
            rows = [export_rows(f, ctx) for f in features]  # dead latents too, empty, so every index exists
            write_url_atomic(join(export_dir, f"features/batch-{b}.jsonl.gz"),
                             gzip.compress(_jsonl([r for r, _ in rows]), compresslevel=5, mtime=0))
            write_url_atomic(join(export_dir, f"activations/batch-{b}.jsonl.gz"),
                             gzip.compress(_jsonl([a for _, acts in rows for a in acts]), compresslevel=5, mtime=0))
        n_features += len(features)
        n_activations += sum(len(f["activations"]) for f in features)
        n_batches += 1
    if want_batches:
        skipped = {"model_id": ctx.model_id, "layer": ctx.layer, "sae_set": cfg.source_set, "skipped_indexes": dead}
        write_url_atomic(join(cfg.out, "skipped_indexes.json"), json.dumps(skipped).encode())
    if want_export:
        for name, row in _metadata_rows(cfg, ctx).items():
            write_url_atomic(join(export_dir, name), _jsonl([row]))
    return {"site": cfg.site, "out": cfg.out, "layout": cfg.layout, "model_id": ctx.model_id,
            "source_id": ctx.source_id, "export_dir": export_dir if want_export else None,
            "n_features": n_features, "n_dead": len(dead), "n_activations": n_activations, "n_batches": n_batches}


def format_summary(result: dict[str, Any]) -> str:
    """What was written, where."""
    where = result["export_dir"] or result["out"]
    return (f"exported {result['n_features']:,} latents ({result['n_dead']:,} dead) with {result['n_activations']:,} "
            f"activation examples in {result['n_batches']} batch(es) as Neuronpedia source {result['model_id']}/"
            f"{result['source_id']} ({result['layout']} layout) to {where}")
