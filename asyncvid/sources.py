"""Where a model comes from: an embedded name, a local diffusers folder, or a hub id in the local HF cache."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable

from .errors import UsageError
from .requests import UsageWarning

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Libraries a component may come from. diffusers imports any other name, or runs `<component>/<library>.py`.
LIBRARIES = ("diffusers", "transformers")


def resolve_folder(spec: str, embedded: Iterable[str], materialize, *, marker: str = "model_index.json") -> Path:
    """Turn `spec` into a local folder holding `marker`; never downloads."""
    names = sorted(embedded)
    if spec in names:
        return materialize(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / marker).is_file():
            raise UsageError(f"model folder '{spec}' has no {marker}; pass a diffusers folder saved by save_pretrained")
        return path
    if _looks_like_hub_id(spec):
        folder = _from_hf_cache(spec)
        if not (folder / marker).is_file():
            raise UsageError(
                f"hub model '{spec}' in the local Hugging Face cache ({folder}) has no {marker}; it is not a "
                f"diffusers folder, or only part of it was downloaded: run `hf download {spec}` to complete it"
            )
        return folder
    raise UsageError(
        f"model '{spec}' is not an embedded model ({', '.join(names)}), a local folder, or a hub id (org/name)"
    )


def preflight(model: str, task: str | None, requests: list, *, motion_adapter: str | None = None,
              allow_pickle: bool = False) -> Path:
    """Every check on the model that needs no weights, run once before any worker starts, so that a bad model fails
    in one line from one process: its source, components and weights, its task (unless None: any), and each request
    (frames, and a warning for a prompt longer than the text encoder reads)."""
    from .pipelines import EMBEDDED, adapter_for, materialize  # the pipelines package imports this module

    folder = resolve_folder(model, EMBEDDED, materialize)
    check_components(folder, allow_pickle=allow_pickle)
    adapter = adapter_for(folder)
    if task is not None and adapter.TASK != task:
        command = "generate" if adapter.TASK == "text-to-video" else "i2v"
        raise UsageError(f"model '{model}' does {adapter.TASK}, not {task}; use `asyncvid {command}` with it")
    motion = None
    if motion_adapter is not None:
        motion = resolve_folder(motion_adapter, (), materialize, marker="config.json")
        check_weights(motion, allow_pickle=allow_pickle)
    adapter.check_folder(folder, requests, motion_adapter=motion)
    return folder


def recommended_guidance(model: str) -> float:
    """The guidance scale `model` is sampled with when the user gives none: its folder's sampling.json, else 7.5."""
    from . import sampling_defaults
    from .pipelines import EMBEDDED, materialize

    return sampling_defaults.guidance(resolve_folder(model, EMBEDDED, materialize))


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def _from_hf_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # Offline by design: asyncvid never downloads; weights come from a cache filled elsewhere.
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise UsageError(
            f"hub model '{repo_id}' is not in the local Hugging Face cache and asyncvid does not download; "
            f"run `hf download {repo_id}` on a connected machine (or pass a local folder)"
        ) from None


def check_components(folder: Path, *, allow_pickle: bool = False) -> None:
    """Fail early, in one line, on a pipeline folder with a missing component, code to run, or pickle-only weights."""
    index = json.loads((folder / "model_index.json").read_text())
    if not isinstance(index.get("_class_name"), str):
        raise UsageError(
            f"model folder '{folder}' names a custom pipeline ({index.get('_class_name')!r}) in model_index.json; "
            f"asyncvid never runs code from a model folder: use a diffusers pipeline class"
        )
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        sub = folder / name
        library = entry[0]
        if library not in LIBRARIES or (sub / f"{library}.py").exists():
            raise UsageError(
                f"component '{name}' of '{folder}' comes from {library!r}, not {' or '.join(LIBRARIES)}; asyncvid "
                f"never runs code from a model folder: re-save the pipeline with library classes"
            )
        if not sub.is_dir():
            raise UsageError(f"model folder '{folder}' is missing component '{name}' ({sub}); re-save the pipeline")
        check_weights(sub, allow_pickle=allow_pickle)


def check_weights(folder: Path, *, allow_pickle: bool = False) -> None:
    """Refuse pickle-only weights: loading a pickle can run arbitrary code. `allow_pickle` lets them through with a
    warning, for weights from a source the user trusts."""
    files = [p for p in folder.iterdir() if p.is_file()]
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if not pickles or any(p.suffix == ".safetensors" for p in files):
        return
    if not allow_pickle:
        raise UsageError(
            f"'{folder}' has weights only as pickle files ({pickles[0]}), which can run code when loaded; convert "
            f"them to safetensors (load and save_pretrained(..., safe_serialization=True) in a trusted environment), "
            f"or pass --allow-pickle if you trust their source"
        )
    warnings.warn(UsageWarning(
        f"loading pickle weights '{folder / pickles[0]}' (--allow-pickle): a pickle can run code when loaded; "
        f"convert them to safetensors once and drop --allow-pickle"
    ), stacklevel=2)
