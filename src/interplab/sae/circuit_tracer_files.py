"""circuit-tracer's transcoder folders: save a `TranscoderSet` or `CrossLayerTranscoder` there, load one back.

The layout is circuit-tracer 0.5.0's local one (what its `save_transcoders_to_cache` writes and
`load_transcoders_from_cache` reads; uploaded to a hub repository, its `load_transcoder_from_hub` reads it too):

    config.yaml       model_name, model_kind (transcoder_set | cross_layer_transcoder), feature_input_hook,
                      feature_output_hook (TransformerLens names without "blocks.{l}."), plus our `interplab` entry
    transcoder_set:   layer_{l}.safetensors   W_enc [F, d] (their encoder is F.linear(x, W_enc): pre = x @ W_encᵀ),
                                              W_dec [F, d], b_enc [F], b_dec [d], activation_function.threshold [F]
                                              (JumpReLU; absent: ReLU), W_skip [d, d] (they apply x @ W_skipᵀ)
    cross_layer:      W_enc_{i}.safetensors   W_enc_{i} [F, d], b_enc_{i} [F], b_dec_{i} [d], threshold_{i} [F]
                      W_dec_{i}.safetensors   W_dec_{i} [F, L − i, d]

Their encoders read x itself: an SAE that subtracts b_dec is written with b_enc − b_dec @ W_enc (the same
pre-activations up to rounding), and its exact b_enc goes to `interplab_exact.safetensors`, which circuit-tracer
never opens, so that our loader gives back the transcoder bit for bit. A hub config may list `transcoders: [...]`
(one file per layer); we do not write that key (circuit-tracer would then read our relative names from its working
directory) but read it when present.

circuit-tracer builds only ReLU and JumpReLU from files (pre·1[pre > θ]). BatchTopK and Matryoshka are the
single-threshold JumpReLU they are at inference, exactly. TopK has no exact equivalent (whether a latent fires
depends on the other latents): `save_circuit_tracer` refuses it unless given `topk_threshold=θ` (one value, or one
per layer), and then writes a JumpReLU with threshold θ for every latent — θ = 0 is plain ReLU (every positive
pre-activation fires); `topk_equivalent_threshold` picks the θ at which the mean L0 on a sample equals k. Our own
loader reads the `interplab` entry and rebuilds the TopK transcoder itself; circuit-tracer uses the JumpReLU.

Hooks: theirs `mlp.hook_in` (also `ln2.hook_normalized`, the same tensor once norms are folded) ↔ our
`blocks.{layer}.mlp.hook_in`; `hook_resid_mid` ↔ `blocks.{layer}.hook_resid_mid`; `hook_mlp_out` (also
`mlp.hook_out`) ↔ `blocks.{layer}.hook_mlp_out`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import yaml
from jaxtyping import Float
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from interplab.errors import InterplabError
from interplab.fileio import join, list_files, open_url, write_url_atomic
from interplab.sae.config import SAEConfig
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.registry import make_sae
from interplab.sae.transcoder import Transcoder, TranscoderSet

CONFIG_FILE = "config.yaml"
EXACT_FILE = "interplab_exact.safetensors"
FORMAT_VERSION = 1
"""Version of our `interplab` entry in config.yaml."""
SET_KIND, CLT_KIND = "transcoder_set", "cross_layer_transcoder"
IN_HOOKS = {"mlp.hook_in": "mlp.hook_in", "ln2.hook_normalized": "mlp.hook_in", "hook_resid_mid": "hook_resid_mid"}
"""circuit-tracer's feature_input_hook -> our block hook."""
OUT_HOOKS = {"hook_mlp_out": "hook_mlp_out", "mlp.hook_out": "hook_mlp_out"}
"""circuit-tracer's feature_output_hook -> our block hook."""
_OURS = re.compile(r"^(layer_\d+|W_enc_\d+|W_dec_\d+|interplab_exact)\.safetensors$")
"""Files an export writes (besides config.yaml)."""
_TEMPLATE = re.compile(r"^blocks\.\{layer\}\.(.+)$")

Tensors = dict[str, Tensor]
TopKThreshold = float | Mapping[int, float] | None
"""How TopK layers are written: one JumpReLU threshold, one per layer, or None (refuse)."""
Reader = Callable[[str], Tensors]
"""Reads one file of the folder by name."""


# ---- hook names ---------------------------------------------------------------------------------------------
def to_circuit_tracer_hook(template: str, *, output: bool) -> str:
    """`blocks.{layer}.mlp.hook_in` -> `mlp.hook_in` (their hooks are relative to a block)."""
    valid = OUT_HOOKS if output else IN_HOOKS
    m = _TEMPLATE.match(template)
    if m is None or m.group(1) not in set(valid.values()):
        ends = ", ".join(f"blocks.{{layer}}.{h}" for h in sorted(set(valid.values())))
        raise InterplabError(f"circuit-tracer cannot hold the {'output' if output else 'input'} hook {template!r}; "
                             f"valid: {ends}")
    return m.group(1)


def from_circuit_tracer_hook(name: Any, *, output: bool) -> str:
    """`mlp.hook_in` -> `blocks.{layer}.mlp.hook_in` (see IN_HOOKS / OUT_HOOKS)."""
    valid = OUT_HOOKS if output else IN_HOOKS
    if name not in valid:
        key = "feature_output_hook" if output else "feature_input_hook"
        raise InterplabError(f"{key} {name!r} is not an MLP {'output' if output else 'input'} hook; "
                             f"valid: {', '.join(valid)}")
    return f"blocks.{{layer}}.{valid[name]}"


def topk_equivalent_threshold(pre: Float[Tensor, "n d_sae"], k: int) -> float:
    """θ ≥ 0 with Σ 1[pre > θ] = n·k over a sample of pre-activations [n, d_sae] (the (n·k + 1)-th largest value,
    ties aside): the single JumpReLU threshold whose mean L0 on the sample equals TopK's k."""
    if pre.ndim != 2 or not 1 <= k < pre.shape[1]:
        raise InterplabError(f"need pre-activations [n, d_sae] and 1 <= k < d_sae, got {tuple(pre.shape)}, k={k}")
    kth = pre.flatten().topk(pre.shape[0] * k + 1).values[-1]
    return max(float(kth), 0.0)


# ---- saving -------------------------------------------------------------------------------------------------
def save_circuit_tracer(transcoders: TranscoderSet | CrossLayerTranscoder, folder: str, model_name: str, *,
                        topk_threshold: float | Mapping[int, float] | None = None) -> None:
    """Write `transcoders` as a circuit-tracer folder (module docstring); config.yaml last, so a folder with it is
    complete. `topk_threshold`: how to write TopK (circuit-tracer has none): a JumpReLU with this threshold (one
    for all layers, or {layer: θ})."""
    if topk_threshold is not None:
        values = topk_threshold.values() if isinstance(topk_threshold, Mapping) else [topk_threshold]
        if not all(isinstance(v, (int, float)) and v >= 0 for v in values):
            raise InterplabError(f"topk_threshold must be a number >= 0 or {{layer: number}}, got {topk_threshold}")
    if isinstance(transcoders, CrossLayerTranscoder):
        files, config = _clt_files(transcoders, topk_threshold)
    elif isinstance(transcoders, TranscoderSet):
        files, config = _set_files(transcoders, topk_threshold)
    else:
        raise InterplabError(f"save_circuit_tracer takes a TranscoderSet or CrossLayerTranscoder, "
                             f"got {type(transcoders).__name__}")
    fs, root = open_url(folder)
    stale = sorted(name for name in list_files(fs, root) if _OURS.match(name) and name not in files)
    if stale:  # circuit-tracer globs these: an old export's extra layers would be read with the new ones
        raise InterplabError(f"{folder} already holds transcoder files this export would not replace ({stale[0]}, "
                             f"...); write to an empty folder")
    config = {"model_name": model_name, "model_kind": config.pop("model_kind"), **config}
    for name, tensors in files.items():
        write_url_atomic(join(folder, name), save_safetensors(
            {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}))
    write_url_atomic(join(folder, CONFIG_FILE), yaml.safe_dump(config, sort_keys=False).encode())


def _topk_threshold(d_sae: int, k: int, topk_threshold: TopKThreshold, layer: int, what: str) -> Tensor:
    """The JumpReLU threshold written for a TopK layer, or the error naming the options."""
    if isinstance(topk_threshold, Mapping):
        if layer not in topk_threshold:
            raise InterplabError(f"topk_threshold has no value for layer {layer} ({what} is TopK)")
        topk_threshold = topk_threshold[layer]
    if topk_threshold is None:
        raise InterplabError(
            f"{what} is TopK (k={k}), which circuit-tracer cannot build and no JumpReLU equals: pass "
            f"topk_threshold=θ to write a JumpReLU with threshold θ (0 = plain ReLU; topk_equivalent_threshold "
            f"picks θ for mean L0 = k on a sample)")
    return torch.full((d_sae,), float(topk_threshold))


def _set_files(tset: TranscoderSet, topk_threshold: TopKThreshold) -> tuple[dict[str, Tensors], dict[str, Any]]:
    """layer_{l}.safetensors per layer, the exact b_enc of folded layers, and the config entries."""
    layers = sorted(tset.transcoders)
    if layers != list(range(len(layers))) or not layers:
        raise InterplabError(f"circuit-tracer needs a transcoder at every layer from 0 on; got layers {layers}")
    widths = {t.sae.cfg.d_sae for t in tset.transcoders.values()}
    if len(widths) > 1:
        raise InterplabError(f"circuit-tracer needs one width for all layers; got d_sae {sorted(widths)}")
    config = {"model_kind": SET_KIND, "feature_input_hook": to_circuit_tracer_hook(tset.in_hook, output=False),
              "feature_output_hook": to_circuit_tracer_hook(tset.out_hook, output=True)}
    files: dict[str, Tensors] = {}
    exact: Tensors = {}
    for layer in layers:
        t = tset.transcoders[layer]
        for got, template in ((t.in_hook, tset.in_hook), (t.out_hook, tset.out_hook)):
            if got != template.format(layer=layer):
                raise InterplabError(f"the layer-{layer} transcoder uses {got!r}, the set says {template!r}")
        files[f"layer_{layer}.safetensors"] = _layer_tensors(t, topk_threshold, layer)
        if t.sae.cfg.subtract_b_dec:
            exact[f"b_enc_{layer}"] = t.sae.b_enc
    if exact:
        files[EXACT_FILE] = exact
    config["interplab"] = {"format": FORMAT_VERSION, "layers": [tset.transcoders[i].sae.cfg.to_dict() for i in layers]}
    if any(t.sae.cfg.arch == "topk" for t in tset.transcoders.values()):
        config["interplab"]["note"] = f"TopK written as JumpReLU with threshold {topk_threshold}: not equivalent"
    return files, config


def _layer_tensors(t: Transcoder, topk_threshold: TopKThreshold, layer: int) -> Tensors:
    """One layer's tensors in their orientation, with the encoder reading x itself."""
    sae = t.sae
    with torch.no_grad():
        b_enc = sae.b_enc - sae.b_dec @ sae.W_enc if sae.cfg.subtract_b_dec else sae.b_enc
        out: Tensors = {"W_enc": sae.W_enc.T, "W_dec": sae.W_dec, "b_enc": b_enc, "b_dec": sae.b_dec}
        arch = sae.cfg.arch
        if arch == "topk":
            out["activation_function.threshold"] = _topk_threshold(sae.cfg.d_sae, sae.cfg.k, topk_threshold, layer,
                                                                     f"the layer-{layer} transcoder")
        elif arch != "relu":  # jumprelu, and batchtopk/matryoshka: one θ; ours is ReLU(pre)·1[pre>θ], so θ >= 0
            out["activation_function.threshold"] = sae.threshold.expand(sae.cfg.d_sae).clamp_min(0.0)
        if t.W_skip is not None:
            out["W_skip"] = t.W_skip.T
    return out


def _clt_files(clt: CrossLayerTranscoder, topk_threshold: TopKThreshold) -> tuple[dict[str, Tensors], dict[str, Any]]:
    """W_enc_{i} and W_dec_{i} files per layer and the config entries."""
    config = {"model_kind": CLT_KIND, "feature_input_hook": to_circuit_tracer_hook(clt.in_hook, output=False),
              "feature_output_hook": to_circuit_tracer_hook(clt.out_hook, output=True),
              "interplab": {"format": FORMAT_VERSION, "activation": clt.activation, "k": clt.k}}
    files: dict[str, Tensors] = {}
    with torch.no_grad():
        for i in range(clt.n_layers):
            enc = {f"W_enc_{i}": clt.W_enc[i].T, f"b_enc_{i}": clt.b_enc[i], f"b_dec_{i}": clt.b_dec[i]}
            if clt.activation == "jumprelu":
                enc[f"threshold_{i}"] = clt.threshold[i]
            elif clt.activation == "topk":
                enc[f"threshold_{i}"] = _topk_threshold(clt.d_sae, clt.k, topk_threshold, i, "the CLT")
            files[f"W_enc_{i}.safetensors"] = enc
            files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": clt.W_dec[i]}
    if clt.activation == "topk":
        config["interplab"]["note"] = f"TopK written as JumpReLU with threshold {topk_threshold}: not equivalent"
    return files, config


# ---- loading ------------------------------------------------------------------------------------------------
def is_circuit_tracer_folder(folder: str) -> bool:
    """Whether `folder` holds a config.yaml with a circuit-tracer `model_kind` (so `load_circuit_tracer` reads it)."""
    fs, root = open_url(folder)
    if CONFIG_FILE not in list_files(fs, root):
        return False
    try:
        config = yaml.safe_load(fs.cat_file(join(root, CONFIG_FILE)).decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and config.get("model_kind") in (SET_KIND, CLT_KIND)


def load_circuit_tracer(folder: str) -> TranscoderSet | CrossLayerTranscoder:
    """The per-layer transcoders or cross-layer transcoder of a circuit-tracer folder (module docstring), in eval
    mode; folders we wrote come back exactly as saved (TopK too)."""
    fs, root = open_url(folder)
    files = list_files(fs, root)
    if CONFIG_FILE not in files:
        raise InterplabError(f"no circuit-tracer transcoders at {folder}: missing {CONFIG_FILE}; "
                             f"found {sorted(files) or 'no files'}")
    config = _read_config(fs.cat_file(join(root, CONFIG_FILE)), join(folder, CONFIG_FILE))
    in_hook = from_circuit_tracer_hook(config.get("feature_input_hook"), output=False)
    out_hook = from_circuit_tracer_hook(config.get("feature_output_hook"), output=True)
    ours = config.get("interplab") if isinstance(config.get("interplab"), dict) else {}

    def read(name: str) -> Tensors:
        if name not in files:
            raise InterplabError(f"{folder}: missing file {name}")
        try:
            return load_safetensors(fs.cat_file(join(root, name)))
        except Exception as e:  # safetensors raises its own types for truncated or foreign files
            raise InterplabError(f"cannot read {join(folder, name)}: {e}") from e

    kind = config.get("model_kind")
    if kind == SET_KIND:
        return _load_set(config, ours, files, read, in_hook, out_hook, folder)
    if kind == CLT_KIND:
        return _load_clt(ours, files, read, in_hook, out_hook, folder)
    raise InterplabError(f"{folder}/{CONFIG_FILE}: model_kind {kind!r}; valid: {SET_KIND}, {CLT_KIND}")


def _read_config(data: bytes, where: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise InterplabError(f"{where} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(config, dict):
        raise InterplabError(f"{where} holds {type(config).__name__}, not a mapping")
    return config


def _layer_files(files: dict[str, int], pattern: str, folder: str) -> int:
    """How many layers a folder holds files for (named pattern.format(i)), requiring 0..n−1 without gaps."""
    regex = re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")
    found = sorted(int(m.group(1)) for name in files if (m := regex.match(name)))
    if not found:
        raise InterplabError(f"{folder}: no {pattern.format('{l}')} files")
    missing = sorted(set(range(found[-1] + 1)) - set(found))
    if missing:
        raise InterplabError(f"{folder}: missing layer file {pattern.format(missing[0])} (found layers {found})")
    return len(found)


def _take(tensors: Tensors, name: str, shape: tuple[int, ...], where: str) -> Tensor:
    if name not in tensors:
        raise InterplabError(f"{where}: missing tensor {name!r}; found {sorted(tensors)}")
    if tuple(tensors[name].shape) != shape:
        raise InterplabError(f"{where}: tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)}")
    return tensors[name].float()


def _load_set(config: dict[str, Any], ours: dict[str, Any], files: dict[str, int], read: Reader, in_hook: str,
              out_hook: str, folder: str) -> TranscoderSet:
    names = config.get("transcoders")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) and "://" not in n for n in names):
            raise InterplabError(f"{folder}/{CONFIG_FILE}: `transcoders` must list local file names in the folder; "
                                 f"download hub files first")
    else:
        names = [f"layer_{i}.safetensors" for i in range(_layer_files(files, "layer_{}.safetensors", folder))]
    saved_cfgs = ours.get("layers") if isinstance(ours.get("layers"), list) else None
    if saved_cfgs is not None and not all(isinstance(c, dict) for c in saved_cfgs):
        raise InterplabError(f"{folder}/{CONFIG_FILE}: interplab.layers must be a list of SAE configs")
    if saved_cfgs is not None and len(saved_cfgs) != len(names):
        raise InterplabError(f"{folder}: config.yaml's interplab entry has {len(saved_cfgs)} layers, "
                             f"the folder {len(names)}")
    exact = read(EXACT_FILE) if EXACT_FILE in files else {}
    transcoders = {}
    for layer, name in enumerate(names):
        saved = SAEConfig.from_dict(saved_cfgs[layer]) if saved_cfgs is not None else None
        transcoders[layer] = _load_layer(read(name), saved, exact.get(f"b_enc_{layer}"), layer, in_hook, out_hook,
                                         config.get("model_name", ""), f"{folder}/{name}")
    return TranscoderSet(transcoders=transcoders, in_hook=in_hook, out_hook=out_hook)


def _load_layer(tensors: Tensors, saved: SAEConfig | None, exact_b_enc: Tensor | None, layer: int, in_hook: str,
                out_hook: str, model_name: Any, where: str) -> Transcoder:
    """One layer file as a Transcoder: the saved interplab config if any, else ReLU or JumpReLU from the tensors."""
    if "b_enc" not in tensors or "b_dec" not in tensors:
        raise InterplabError(f"{where}: missing b_enc or b_dec; found {sorted(tensors)}")
    F, d = tensors["b_enc"].shape[0], tensors["b_dec"].shape[0]
    threshold = tensors.get("activation_function.threshold")
    if saved is None:
        saved = SAEConfig(arch="relu" if threshold is None else "jumprelu", d_in=d, d_sae=F,
                          apply_b_dec_to_input=False, hook_name=in_hook.format(layer=layer),
                          model=model_name if isinstance(model_name, str) else "")
    elif (saved.d_in, saved.d_sae) != (d, F):
        raise InterplabError(f"{where}: tensors are d={d}, F={F}, config.yaml's interplab entry says "
                             f"d={saved.d_in}, F={saved.d_sae}")
    if exact_b_enc is None and saved.subtract_b_dec:  # b_enc on disk is folded: read x itself
        saved.apply_b_dec_to_input = False
    sae = make_sae(saved)
    with torch.no_grad():
        sae.W_enc.copy_(_take(tensors, "W_enc", (F, d), where).T)
        sae.W_dec.copy_(_take(tensors, "W_dec", (F, d), where))
        sae.b_dec.copy_(tensors["b_dec"].float())
        sae.b_enc.copy_(exact_b_enc if exact_b_enc is not None else tensors["b_enc"].float())
        if saved.arch == "jumprelu":
            sae.set_threshold(_take(tensors, "activation_function.threshold", (F,), where))
        elif saved.arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(float(_take(tensors, "activation_function.threshold", (F,), where)[0]))
    W_skip = _take(tensors, "W_skip", (d, d), where).T.contiguous() if "W_skip" in tensors else None
    return Transcoder(sae.eval(), out_hook=out_hook.format(layer=layer), W_skip=W_skip)


def _load_clt(ours: dict[str, Any], files: dict[str, int], read: Reader, in_hook: str, out_hook: str,
              folder: str) -> CrossLayerTranscoder:
    L = _layer_files(files, "W_enc_{}.safetensors", folder)
    encs = [read(f"W_enc_{i}.safetensors") for i in range(L)]
    if "W_enc_0" not in encs[0] or encs[0]["W_enc_0"].ndim != 2:
        raise InterplabError(f"{folder}/W_enc_0.safetensors: missing tensor 'W_enc_0' [F, d]")
    F, d = encs[0]["W_enc_0"].shape
    has_threshold = "threshold_0" in encs[0]
    activation = ours.get("activation", "jumprelu" if has_threshold else "relu")
    k = ours.get("k", 32)
    clt = CrossLayerTranscoder(L, d, F, activation=activation, k=k, in_hook=in_hook, out_hook=out_hook)
    with torch.no_grad():
        for i, enc in enumerate(encs):
            where = f"{folder}/W_enc_{i}.safetensors"
            clt.W_enc[i].copy_(_take(enc, f"W_enc_{i}", (F, d), where).T)
            clt.b_enc[i].copy_(_take(enc, f"b_enc_{i}", (F,), where))
            clt.b_dec[i].copy_(_take(enc, f"b_dec_{i}", (d,), where))
            if activation == "jumprelu":
                clt.threshold[i].copy_(_take(enc, f"threshold_{i}", (F,), where))
            dec = read(f"W_dec_{i}.safetensors")
            clt.W_dec[i].copy_(_take(dec, f"W_dec_{i}", (F, L - i, d), f"{folder}/W_dec_{i}.safetensors"))
    return clt.eval()
