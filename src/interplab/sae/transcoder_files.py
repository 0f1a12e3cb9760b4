"""Loading transcoders: one folder (SAELens's or sparsify's transcoder layout), or a set of them, one per layer.

    tc = load_transcoder("run/topk-k32-x16")          # a Transcoder; the layout is detected
    tset = load_transcoder_set("transcoders/")         # a TranscoderSet (or a circuit-tracer folder)

The layouts are described in transcoder.py (`Transcoder.save` writes them):
- SAELens: cfg.json architecture transcoder | skip_transcoder | jumprelu_transcoder | jumprelu_skip_transcoder with
  sae_weights.safetensors; metadata.hook_name is the input hook, metadata.hook_name_out the output hook. Our own
  files carry our SAEConfig under "interplab" (so a batchtopk or matryoshka transcoder comes back as one).
- sparsify: cfg.json with transcode: true and sae.safetensors (encoder.weight [F, d], encoder.bias, W_dec, b_dec,
  W_skip [d_out, d_in] if skip_connection). sparsify names a folder by its hookpoint and records no output hook: a
  folder named `layers.{l}.mlp` (sparsify's name for an MLP, read at its input and written at its output) reads
  blocks.{l}.mlp.hook_in and writes blocks.{l}.hook_mlp_out; any other name needs our "interplab" entry.

A set folder holds one transcoder folder per layer, named `layer_{l}` (our convention; any names are read: the layer
is the one of each transcoder's output hook) or is a circuit-tracer folder (config.yaml; circuit_tracer_files.py).
"""

from __future__ import annotations

import posixpath
import re

import torch
from torch import Tensor

from interplab.errors import InterplabError
from interplab.fileio import join, list_files, open_url
from interplab.models.hooks import parse_block_hook
from interplab.runs import JSONDict
from interplab.sae.base import SparseAutoencoder
from interplab.sae.circuit_tracer_files import CONFIG_FILE, load_circuit_tracer
from interplab.sae.config import SAEConfig
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.files import _from_saelens, _int_field, _read, _take
from interplab.sae.layout import CFG_FILE, FROM_SAELENS_TRANSCODER_ARCH, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS
from interplab.sae.registry import make_sae
from interplab.sae.transcoder import Transcoder, TranscoderSet

SET_FOLDER = "layer_{layer}"
"""Name of the folder of layer l's transcoder in a set folder (what `save_transcoder_set` writes)."""
_SPARSIFY_MLP = re.compile(r"layers\.(\d+)\.mlp")


def load_transcoder(path: str) -> Transcoder:
    """The transcoder saved in folder `path` (SAELens or sparsify transcoder layout), in eval mode."""
    fs, root = open_url(path)
    files = list_files(fs, root)
    if CFG_FILE in files and SAELENS_WEIGHTS in files:
        cfg_dict, tensors = _read(fs, root, SAELENS_WEIGHTS)
        transcoder = _from_saelens_transcoder(cfg_dict, tensors, path)
    elif CFG_FILE in files and SPARSIFY_WEIGHTS in files:
        cfg_dict, tensors = _read(fs, root, SPARSIFY_WEIGHTS)
        transcoder = _from_sparsify_transcoder(cfg_dict, tensors, path)
    elif not fs.exists(root):
        raise InterplabError(f"no transcoder at {path}: the folder does not exist")
    else:
        raise InterplabError(f"no transcoder at {path}: missing {CFG_FILE} with {SAELENS_WEIGHTS} (SAELens) or "
                             f"{SPARSIFY_WEIGHTS} (sparsify); found {sorted(files) or 'no files'}")
    return transcoder.eval()


def save_transcoder_set(tset: TranscoderSet, folder: str) -> None:
    """Save every transcoder of the set as folder/layer_{l} (each in the layout `Transcoder.save` picks)."""
    for layer, transcoder in sorted(tset.transcoders.items()):
        transcoder.save(join(folder, SET_FOLDER.format(layer=layer)))


def load_transcoder_set(path: str) -> TranscoderSet | CrossLayerTranscoder:
    """The transcoders in folder `path`, one per layer: a folder of transcoder folders (`layer_{l}`, or any names),
    or a circuit-tracer folder (config.yaml), which may also hold a cross-layer transcoder (returned as it is)."""
    fs, root = open_url(path)
    if not fs.isdir(root):
        raise InterplabError(f"no transcoder set at {path}: the folder does not exist")
    if CONFIG_FILE in list_files(fs, root):
        return load_circuit_tracer(path)
    subfolders = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False) if fs.isdir(p))
    found = [name for name in subfolders if CFG_FILE in list_files(fs, join(root, name))]
    if not found:
        raise InterplabError(f"no transcoder set at {path}: it holds no {CONFIG_FILE} (circuit-tracer) and no "
                             f"transcoder folders ({SET_FOLDER.format(layer=0)}, ... each with {CFG_FILE})")
    transcoders: dict[int, Transcoder] = {}
    for name in found:
        transcoder = load_transcoder(join(path, name))
        layer = _layer(transcoder, join(path, name))
        if layer in transcoders:
            raise InterplabError(f"{path} holds two transcoders for layer {layer} (the second in {name})")
        transcoders[layer] = transcoder
    return TranscoderSet(dict(sorted(transcoders.items())), *_templates(transcoders, path))


def _layer(transcoder: Transcoder, where: str) -> int:
    """The layer whose MLP the transcoder replaces (from its output hook), or one clear error."""
    parsed = parse_block_hook(transcoder.out_hook)
    if parsed is None:
        raise InterplabError(f"{where}: its output hook {transcoder.out_hook!r} is not a block's hook "
                             "(blocks.{layer}....), so its layer is unknown")
    return parsed[0]


def _templates(transcoders: dict[int, Transcoder], path: str) -> tuple[str, str]:
    """The set's in/out hook templates ("blocks.{layer}.mlp.hook_in"), which every transcoder must follow."""
    templates = set()
    for layer, t in transcoders.items():
        parsed_in = parse_block_hook(t.in_hook)
        if parsed_in is None or parsed_in[0] != layer:
            raise InterplabError(f"{path}: the layer-{layer} transcoder reads {t.in_hook!r}, not a hook of block "
                                 f"{layer}")
        templates.add((f"blocks.{{layer}}.{parsed_in[1]}", f"blocks.{{layer}}.{parse_block_hook(t.out_hook)[1]}"))
    if len(templates) > 1:
        raise InterplabError(f"{path}: its transcoders read and write different hooks: {sorted(templates)}")
    return templates.pop()


# ---- SAELens --------------------------------------------------------------------------------------------------
def _from_saelens_transcoder(cfg_dict: JSONDict, tensors: dict[str, Tensor], path: str) -> Transcoder:
    where = join(path, CFG_FILE)
    arch = cfg_dict.get("architecture")
    ours = cfg_dict.get("interplab") if isinstance(cfg_dict.get("interplab"), dict) else {}
    if arch not in FROM_SAELENS_TRANSCODER_ARCH:
        raise InterplabError(f"{where}: architecture {arch!r} is not a transcoder (valid: "
                             f"{', '.join(FROM_SAELENS_TRANSCODER_ARCH)}); an SAE folder loads with load_sae")
    d_in, d_out = _int_field(cfg_dict, "d_in", where), _int_field(cfg_dict, "d_out", where)
    if d_out != d_in:
        raise InterplabError(f"{where}: d_out={d_out} differs from d_in={d_in}; interplab's transcoders read and "
                             "write vectors of one width (an MLP's input and output)")
    if cfg_dict.get("apply_b_dec_to_input"):
        raise InterplabError(f"{where}: apply_b_dec_to_input=true does not fit a transcoder (b_dec is an output)")
    metadata = cfg_dict.get("metadata") if isinstance(cfg_dict.get("metadata"), dict) else {}
    # The SAE part is an SAELens SAE of the matching architecture whose encoder reads x itself.
    as_sae = {**cfg_dict, "architecture": FROM_SAELENS_TRANSCODER_ARCH[arch], "apply_b_dec_to_input": False}
    sae = _from_saelens(as_sae, tensors, path)
    out_hook = ours.get("out_hook") or metadata.get("hook_name_out") or cfg_dict.get("hook_name_out") or ""
    skip = arch.endswith("skip_transcoder")
    W_skip = _take(tensors, "W_skip", (d_in, d_in), join(path, SAELENS_WEIGHTS)).T if skip else None
    return _transcoder(sae, out_hook, W_skip, where)


# ---- sparsify -------------------------------------------------------------------------------------------------
def _from_sparsify_transcoder(cfg_dict: JSONDict, tensors: dict[str, Tensor], path: str) -> Transcoder:
    where, weights = join(path, CFG_FILE), join(path, SPARSIFY_WEIGHTS)
    if not cfg_dict.get("transcode"):
        raise InterplabError(f"{where}: a sparsify SAE (transcode is not true), not a transcoder; load it with "
                             "load_sae")
    if cfg_dict.get("activation", "topk") != "topk":
        raise InterplabError(f"{where}: sparsify activation {cfg_dict.get('activation')!r} is not supported "
                             "(only 'topk')")
    for flag in ("embed_skip", "gram_lookup", "multi_topk"):
        if cfg_dict.get(flag) and flag != "multi_topk":
            raise InterplabError(f"{where}: sparsify option {flag}=true is not supported")
    d_in = _int_field(cfg_dict, "d_in", where)
    W = tensors.get("encoder.weight")
    d_sae = int(W.shape[0]) if W is not None and W.ndim == 2 else _int_field(cfg_dict, "num_latents", where)
    ours = cfg_dict.get("interplab") if isinstance(cfg_dict.get("interplab"), dict) else {}
    in_hook, out_hook = _sparsify_hooks(posixpath.basename(path.rstrip("/")), ours)
    cfg = SAEConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=_int_field(cfg_dict, "k", where),
                    apply_b_dec_to_input=False, hook_name=in_hook, model=str(ours.get("model", "")))
    try:
        sae = make_sae(cfg)
    except InterplabError as e:
        raise InterplabError(f"{where}: {e}") from e
    W = _take(tensors, "encoder.weight", (d_sae, d_in), weights)
    sae.to(W.dtype)
    with torch.no_grad():
        sae.W_enc.copy_(W.T)
        sae.b_enc.copy_(_take(tensors, "encoder.bias", (d_sae,), weights))
        sae.W_dec.copy_(_take(tensors, "W_dec", (d_sae, d_in), weights))
        sae.b_dec.copy_(_take(tensors, "b_dec", (d_in,), weights))
    W_skip = _take(tensors, "W_skip", (d_in, d_in), weights).T if cfg_dict.get("skip_connection") else None
    return _transcoder(sae, out_hook, W_skip, where)


def _sparsify_hooks(folder_name: str, ours: JSONDict) -> tuple[str, str]:
    """(in hook, out hook) of a sparsify transcoder folder: ours if recorded, else from sparsify's hookpoint name."""
    if ours.get("hook_name") and ours.get("out_hook"):
        return str(ours["hook_name"]), str(ours["out_hook"])
    match = _SPARSIFY_MLP.fullmatch(folder_name)
    if match:
        return f"blocks.{match[1]}.mlp.hook_in", f"blocks.{match[1]}.hook_mlp_out"
    return folder_name, ""


def _transcoder(sae: SparseAutoencoder, out_hook: str, W_skip: Tensor | None, where: str) -> Transcoder:
    if W_skip is not None:
        W_skip = W_skip.to(sae.W_enc.dtype).contiguous()
    try:
        return Transcoder(sae, out_hook, W_skip)
    except InterplabError as e:
        raise InterplabError(f"{where}: {e}") from e
