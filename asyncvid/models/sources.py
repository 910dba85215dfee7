"""Where a model comes from: an embedded name, a local diffusers folder, or a hub id in the local HF cache."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable

from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open

from asyncvid.errors import UsageError
from asyncvid.requests import UsageWarning

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


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def _from_hf_cache(repo_id: str) -> Path:
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
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path)
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


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header reads (a truncated or damaged download fails here, in one line, not as a
    traceback from deep inside the loader); reads the header only, not the weights."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        reason = str(err).removeprefix("Error while deserializing header: ")
        raise UsageError(f"weights file '{path}' is not a readable safetensors file ({reason}): it is truncated or "
                         f"damaged; download or save the model again") from None
