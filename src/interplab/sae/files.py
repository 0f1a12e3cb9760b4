"""Loading dictionaries: the SAELens layout (written by `SparseAutoencoder.save`, base.py) and the sparsify layout.

SAELens layout — a folder with
    cfg.json                   what `sae_lens.SAE.load_from_disk` needs: architecture ("standard" | "topk" |
                               "jumprelu"), d_in, d_sae, dtype, device, apply_b_dec_to_input,
                               normalize_activations, reshape_activations, k (topk), metadata {sae_lens_version,
                               hook_name, model_name, ...}; plus our SAEConfig under "interplab" for an exact
                               round trip (SAELens ignores keys it does not know)
    sae_weights.safetensors    W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in],
                               threshold [d_sae] (jumprelu)
Our relu is SAELens's "standard" (with apply_b_dec_to_input as configured), topk is "topk", jumprelu is
"jumprelu", and batchtopk/matryoshka are saved as the JumpReLU they are at inference (threshold θ everywhere).

sparsify layout (EleutherAI) — a hookpoint folder with cfg.json {d_in, k, num_latents or expansion_factor, ...}
and sae.safetensors {encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec}: a TopK SAE that
subtracts b_dec from its input, f = TopK(ReLU(pre)), which is exactly our topk.
"""

from __future__ import annotations

import json
import posixpath

import torch
from fsspec import AbstractFileSystem
from safetensors.torch import load as load_safetensors

from interplab.errors import InterplabError
from interplab.fileio import join, list_files, open_url
from interplab.runs import JSONDict
from interplab.sae.base import SparseAutoencoder
from interplab.sae.config import SAEConfig
from interplab.sae.layout import CFG_FILE, FROM_SAELENS_ARCH, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS
from interplab.sae.registry import make_sae


def load_sae(path: str) -> SparseAutoencoder:
    """Load a saved SAE, in eval mode (call .train() to train): a SAELens-layout folder (ours, or one SAELens
    wrote) or a sparsify hookpoint folder. Saving is `SparseAutoencoder.save`."""
    return _load_folder(path).eval()


def _load_folder(path: str) -> SparseAutoencoder:
    """The SAE in `path` (train mode), or an InterplabError naming what the folder lacks."""
    fs, root = open_url(path)
    files = list_files(fs, root)
    if CFG_FILE in files and SAELENS_WEIGHTS in files:
        cfg_dict, tensors = _read(fs, root, SAELENS_WEIGHTS)
        return _from_saelens(cfg_dict, tensors, path)
    if CFG_FILE in files and SPARSIFY_WEIGHTS in files:
        cfg_dict, tensors = _read(fs, root, SPARSIFY_WEIGHTS)
        return _from_sparsify(cfg_dict, tensors, path)
    if not fs.exists(root):
        raise InterplabError(f"no SAE at {path}: the folder does not exist")
    hookpoints = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)
                        if fs.isdir(p) and SPARSIFY_WEIGHTS in list_files(fs, p))
    if hookpoints:
        raise InterplabError(f"{path} holds sparsify SAEs for several hookpoints; load one of their folders: "
                             f"{', '.join(hookpoints)}")
    if CFG_FILE in files:
        missing = f"{SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} (sparsify)"
    else:
        missing = CFG_FILE + ("" if {SAELENS_WEIGHTS, SPARSIFY_WEIGHTS} & set(files)
                              else f" and {SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} (sparsify)")
    raise InterplabError(f"no SAE at {path}: missing {missing}; found {sorted(files) or 'no files'}")


def _read(fs: AbstractFileSystem, root: str, weights_name: str) -> tuple[JSONDict, dict[str, torch.Tensor]]:
    try:
        cfg_dict = json.loads(fs.cat_file(join(root, CFG_FILE)))
    except json.JSONDecodeError as e:
        raise InterplabError(f"{join(root, CFG_FILE)} is not valid JSON: {e}") from e
    if not isinstance(cfg_dict, dict):
        raise InterplabError(f"{join(root, CFG_FILE)} holds JSON {type(cfg_dict).__name__}, not an object")
    try:
        tensors = load_safetensors(fs.cat_file(join(root, weights_name)))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise InterplabError(f"cannot read {join(root, weights_name)}: {e}") from e
    return cfg_dict, tensors


def _take(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """tensors[name] with the expected shape, or an InterplabError naming what is wrong."""
    if name not in tensors:
        raise InterplabError(f"{where}: missing tensor {name!r}; found {sorted(tensors)}")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise InterplabError(f"{where}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
    return t


def _int_field(cfg_dict: JSONDict, name: str, where: str) -> int:
    value = cfg_dict.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InterplabError(f"{where}: cfg.json needs an integer {name!r}, got {value!r}")
    return value


def _from_saelens(cfg_dict: JSONDict, tensors: dict[str, torch.Tensor], path: str) -> SparseAutoencoder:
    where = join(path, SAELENS_WEIGHTS)
    ours = cfg_dict.get("interplab")
    if isinstance(ours, dict):
        cfg = SAEConfig.from_dict(ours)
    else:
        cfg = _config_from_saelens(cfg_dict, path)
    try:
        sae = make_sae(cfg)
    except InterplabError as e:
        raise InterplabError(f"{join(path, CFG_FILE)}: {e}") from e
    d_in, d_sae = cfg.d_in, cfg.d_sae
    weights = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    loaded = {name: _take(tensors, name, shape, where) for name, shape in weights.items()}
    dtype = loaded["W_enc"].dtype
    sae.to(dtype)
    with torch.no_grad():
        for name, t in loaded.items():
            getattr(sae, name).copy_(t)
        if cfg.arch == "jumprelu":
            sae.set_threshold(_take(tensors, "threshold", (d_sae,), where))
        elif cfg.arch in ("batchtopk", "matryoshka"):
            if "topk_threshold" in tensors:  # a SAELens BatchTopK training checkpoint
                theta = tensors["topk_threshold"].reshape(-1)[:1]
            else:
                theta = _take(tensors, "threshold", (d_sae,), where)[:1]
            sae.threshold.copy_(theta.reshape(()).to(sae.threshold.dtype))
            updates = ours.get("threshold_updates", 0) if isinstance(ours, dict) else 0
            sae.threshold_updates.fill_(int(updates))
        if cfg_dict.get("rescale_acts_by_decoder_norm"):
            # SAELens TopK option: pre-activations are multiplied by ‖W_dec[i]‖ and f divided by it before
            # decoding; folding ‖W_dec[i]‖ into W_enc, b_enc and W_dec gives the same outputs without it.
            norms = sae.W_dec.norm(dim=1).clamp_min(1e-8)
            sae.W_enc.mul_(norms)
            sae.b_enc.mul_(norms)
            sae.W_dec.div_(norms[:, None])
    return sae


def _config_from_saelens(cfg_dict: JSONDict, path: str) -> SAEConfig:
    """Our SAEConfig for a cfg.json written by SAELens itself (no "interplab" entry)."""
    where = join(path, CFG_FILE)
    arch_name = cfg_dict.get("architecture", "standard")
    if arch_name not in FROM_SAELENS_ARCH:
        raise InterplabError(f"{where}: unknown SAE architecture {arch_name!r}; interplab loads "
                             f"{', '.join(FROM_SAELENS_ARCH)}")
    arch = FROM_SAELENS_ARCH[arch_name]
    norm = cfg_dict.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in", False):
        raise InterplabError(f"{where}: normalize_activations={norm!r} is not supported (only 'none', or "
                             "'expected_average_only_in' with the scale already folded into the weights)")
    metadata = cfg_dict.get("metadata") or {}
    cfg = SAEConfig(
        arch=arch,
        d_in=_int_field(cfg_dict, "d_in", where),
        d_sae=_int_field(cfg_dict, "d_sae", where),
        apply_b_dec_to_input=bool(cfg_dict.get("apply_b_dec_to_input", True)),
        hook_name=str(metadata.get("hook_name") or cfg_dict.get("hook_name") or ""),
        model=str(metadata.get("model_name") or cfg_dict.get("model_name") or ""),
    )
    if arch in ("topk", "batchtopk", "matryoshka"):
        k = cfg_dict.get("k", 100)
        if not isinstance(k, (int, float)) or k != int(k):
            raise InterplabError(f"{where}: k={k!r} is not a whole number of latents")
        cfg.k = int(k)
    if arch == "matryoshka":
        cfg.matryoshka_prefixes = list(cfg_dict.get("matryoshka_widths") or []) or None
    for ours, theirs in (("l1_coefficient", "l1_coefficient"), ("l0_coefficient", "l0_coefficient"),
                         ("jumprelu_bandwidth", "jumprelu_bandwidth"),
                         ("jumprelu_init_threshold", "jumprelu_init_threshold")):
        if isinstance(cfg_dict.get(theirs), (int, float)) and cfg_dict[theirs] > 0:
            setattr(cfg, ours, float(cfg_dict[theirs]))
    return cfg


def _from_sparsify(cfg_dict: JSONDict, tensors: dict[str, torch.Tensor], path: str) -> SparseAutoencoder:
    where = join(path, SPARSIFY_WEIGHTS)
    cfg_where = join(path, CFG_FILE)
    d_in = _int_field(cfg_dict, "d_in", cfg_where)
    activation = cfg_dict.get("activation", "topk")
    if activation != "topk":
        raise InterplabError(f"{cfg_where}: sparsify activation {activation!r} is not supported (only 'topk')")
    for flag in ("transcode", "skip_connection", "embed_skip", "gram_lookup"):
        if cfg_dict.get(flag):
            raise InterplabError(f"{cfg_where}: sparsify option {flag}=true is not supported (plain SAEs only)")
    d_sae = cfg_dict.get("num_latents") or d_in * cfg_dict.get("expansion_factor", 32)
    if "encoder.weight" in tensors and tensors["encoder.weight"].ndim == 2 and not cfg_dict.get("num_latents"):
        d_sae = tensors["encoder.weight"].shape[0]
    k = _int_field(cfg_dict, "k", cfg_where)
    hook_name = posixpath.basename(path.rstrip("/"))
    cfg = SAEConfig(arch="topk", d_in=d_in, d_sae=int(d_sae), k=k, apply_b_dec_to_input=True,
                    hook_name=hook_name)
    try:
        sae = make_sae(cfg)
    except InterplabError as e:
        raise InterplabError(f"{cfg_where}: {e}") from e
    W = _take(tensors, "encoder.weight", (cfg.d_sae, d_in), where)
    b = _take(tensors, "encoder.bias", (cfg.d_sae,), where)
    W_dec = _take(tensors, "W_dec", (cfg.d_sae, d_in), where)
    b_dec = _take(tensors, "b_dec", (d_in,), where)
    sae.to(W.dtype)
    with torch.no_grad():
        sae.W_enc.copy_(W.T)
        sae.b_enc.copy_(b)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
    return sae

