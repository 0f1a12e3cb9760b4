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
import math
import posixpath

import torch
from fsspec import AbstractFileSystem
from safetensors.torch import load as load_safetensors

from interplab.errors import InterplabError
from interplab.fileio import join, list_files, open_url
from interplab.runs import JSONDict, JSONValue
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
    """cfg.json (a UTF-8 JSON object) and the weights of the folder, or one InterplabError naming what is wrong."""
    cfg_path = join(root, CFG_FILE)
    try:
        cfg_dict = json.loads(fs.cat_file(cfg_path).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InterplabError(f"{cfg_path} is not UTF-8 text (byte {e.start}); cfg.json must be a JSON object") from e
    except json.JSONDecodeError as e:
        raise InterplabError(f"{cfg_path} is not valid JSON: {e}") from e
    except OSError as e:
        raise InterplabError(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(cfg_dict, dict):
        raise InterplabError(f"{cfg_path} holds JSON {type(cfg_dict).__name__}, not an object")
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
    if ours is not None and not isinstance(ours, dict):
        raise InterplabError(f"{join(path, CFG_FILE)}: 'interplab' must be an object, got {ours!r}")
    cfg = SAEConfig.from_dict(ours) if ours is not None else _config_from_saelens(cfg_dict, path)
    try:
        sae = make_sae(cfg)
    except InterplabError as e:
        raise InterplabError(f"{join(path, CFG_FILE)}: {e}") from e
    d_in, d_sae = cfg.d_in, cfg.d_sae
    weights = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    loaded = {name: _take(tensors, name, shape, where) for name, shape in weights.items()}
    if cfg.arch == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:  # SAELens < 6 training
        tensors = {**tensors, "threshold": _take(tensors, "log_threshold", (d_sae,), where).exp()}
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
            updates = ours.get("threshold_updates", 0) if ours is not None else 0
            if not isinstance(updates, int) or isinstance(updates, bool):
                raise InterplabError(f"{join(path, CFG_FILE)}: threshold_updates must be an integer, got {updates!r}")
            sae.threshold_updates.fill_(updates)
        if ours is None and cfg.arch in ("topk", "batchtopk", "matryoshka") and _flag(
                cfg_dict, "rescale_acts_by_decoder_norm", path):
            # SAELens TopK option: pre-activations are multiplied by ‖W_dec[i]‖ and f divided by it before
            # decoding; folding ‖W_dec[i]‖ into W_enc, b_enc and W_dec gives the same outputs without it.
            norms = sae.W_dec.norm(dim=1).clamp_min(1e-8)
            sae.W_enc.mul_(norms)
            sae.b_enc.mul_(norms)
            sae.W_dec.div_(norms[:, None])
        if ours is None and _flag(cfg_dict, "finetuning_scaling_factor", path):
            # SAELens < 6: x̂ = (f · scaling_factor) @ W_dec + b_dec; the per-latent factor folds into W_dec's rows.
            sae.W_dec.mul_(_take(tensors, "scaling_factor", (d_sae,), where).to(dtype)[:, None])
    return sae


def _flag(cfg_dict: JSONDict, name: str, path: str) -> bool:
    """A true/false option of cfg.json (absent or null: false)."""
    value = cfg_dict.get(name)
    if value is not None and not isinstance(value, bool):
        raise InterplabError(f"{join(path, CFG_FILE)}: {name} must be true or false, got {value!r}")
    return bool(value)


def _saelens_value(cfg_dict: JSONDict, *names: str) -> JSONValue:
    """The first value that is set among `names` (current name first, then the names before SAELens 6.0), looked up
    in "metadata" (where SAELens 6 keeps model and hook) and at the top level (where older versions kept them)."""
    metadata = cfg_dict.get("metadata")
    for name in names:
        for source in (metadata if isinstance(metadata, dict) else {}, cfg_dict):
            if source.get(name) is not None:
                return source[name]
    return None


def _normalization(cfg_dict: JSONDict, where: str) -> None:
    """Refuse an input normalisation interplab's SAEs do not apply (SAELens < 6 wrote it as a bool)."""
    norm = cfg_dict.get("normalize_activations")
    if norm is None or norm is False or norm == "none":
        return
    if norm is True or norm == "expected_average_only_in":
        raise InterplabError(
            f"{where}: normalize_activations='expected_average_only_in' means the weights expect activations scaled "
            "by a factor this folder does not record (SAELens folds it into the weights and writes 'none' when "
            "training ends); fold it (SAELens: sae.fold_activation_norm_scaling_factor) and save again")
    raise InterplabError(f"{where}: normalize_activations={norm!r} is not supported (only 'none': interplab's SAEs "
                         "read the activations as they are)")


def _config_from_saelens(cfg_dict: JSONDict, path: str) -> SAEConfig:
    """Our SAEConfig for a cfg.json written by SAELens itself (no "interplab" entry), of any version.

    Before 6.0 (as SAELens's own `handle_pre_6_0_config` reads them): `hook_point` and `hook_point_head_index` for
    hook_name and hook_head_index, model/hook at the top level rather than in "metadata", `activation_fn_str` (with
    `activation_fn_kwargs`) for the activation, TopK as architecture "standard" (or none) with activation "topk" and
    k in its kwargs, normalize_activations as a bool, `finetuning_scaling_factor` with a `scaling_factor` tensor.
    Every key that changes the maths and that interplab cannot reproduce exactly is refused, never guessed."""
    where = join(path, CFG_FILE)
    arch_name = cfg_dict.get("architecture", "standard")
    if not isinstance(arch_name, str):
        raise InterplabError(f"{where}: architecture must be a string, got {arch_name!r}")
    activation = _saelens_value(cfg_dict, "activation_fn", "activation_fn_str")
    kwargs = cfg_dict.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise InterplabError(f"{where}: activation_fn_kwargs must be an object, got {kwargs!r}")
    if activation not in (None, "relu", "topk"):
        raise InterplabError(f"{where}: activation function {activation!r} is not supported (interplab loads "
                             "'relu' and 'topk')")
    if activation == "topk":
        if arch_name not in ("standard", "topk"):
            raise InterplabError(f"{where}: activation 'topk' does not fit architecture {arch_name!r}")
        arch_name = "topk"  # before SAELens 6.0 a TopK SAE was a "standard" one with a topk activation
    if arch_name not in FROM_SAELENS_ARCH:
        raise InterplabError(f"{where}: unknown SAE architecture {arch_name!r}; interplab loads "
                             f"{', '.join(FROM_SAELENS_ARCH)}")
    arch = FROM_SAELENS_ARCH[arch_name]
    unknown = sorted(set(kwargs) - {"k"})
    if unknown:
        raise InterplabError(f"{where}: activation_fn_kwargs {unknown} are not understood (only k)")
    _normalization(cfg_dict, where)
    head = _saelens_value(cfg_dict, "hook_head_index", "hook_point_head_index")
    if head is not None:
        raise InterplabError(f"{where}: the SAE reads attention head {head!r} alone (hook_head_index); interplab's "
                             "hooks give the whole vector of a position")
    reshape = cfg_dict.get("reshape_activations") or "none"
    if reshape not in ("none", "hook_z"):  # hook_z: heads flattened into d_in, the same maths on that vector
        raise InterplabError(f"{where}: reshape_activations={reshape!r} is not supported (only 'none' or 'hook_z')")
    hook_name = _saelens_value(cfg_dict, "hook_name", "hook_point") or ""
    model = _saelens_value(cfg_dict, "model_name") or ""
    cfg = SAEConfig(arch=arch, d_in=_int_field(cfg_dict, "d_in", where), d_sae=_int_field(cfg_dict, "d_sae", where),
                    apply_b_dec_to_input=_flag({"apply_b_dec_to_input": True, **cfg_dict}, "apply_b_dec_to_input",
                                               path),
                    hook_name=hook_name, model=model)  # types checked by validate() (make_sae)
    if arch in ("topk", "batchtopk", "matryoshka"):
        ks = [v for v in (cfg_dict.get("k"), kwargs.get("k")) if v is not None]
        if not ks:
            raise InterplabError(f"{where}: a {arch_name} SAE needs k (the active latents per token)")
        if len(ks) == 2 and ks[0] != ks[1]:
            raise InterplabError(f"{where}: k={cfg_dict.get('k')!r} and activation_fn_kwargs k={kwargs.get('k')!r} "
                                 "disagree")
        k = ks[0]
        if isinstance(k, float) and k.is_integer():  # 8.0 from some writers
            k = int(k)
        cfg.k = k  # type: ignore[assignment]  # anything but an int is refused by validate()
    if arch == "matryoshka":
        cfg.matryoshka_prefixes = cfg_dict.get("matryoshka_widths") or None  # type: ignore[assignment]
    for name in ("l1_coefficient", "l0_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold"):
        value = cfg_dict.get(name)  # training settings: kept when sensible, never needed to run the SAE
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            setattr(cfg, name, float(value))
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
    d_sae = (_int_field(cfg_dict, "num_latents", cfg_where) if cfg_dict.get("num_latents")
             else d_in * _int_field({"expansion_factor": 32, **cfg_dict}, "expansion_factor", cfg_where))
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

