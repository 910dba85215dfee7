"""Where a model comes from: an embedded name, a local diffusers folder, or a hub id in the local HF cache."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Collection, Iterable

from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open

from asyncvid.errors import UsageError
from asyncvid.models.variants import Choice, choose, describe, forms, weight_files
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


def pipeline_class(folder: Path) -> str:
    """The pipeline class a folder was saved from (model_index.json); a custom pipeline (code) is refused."""
    name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    if not isinstance(name, str):
        raise UsageError(f"model folder '{folder}' names a custom pipeline ({name!r}) in model_index.json; asyncvid "
                         f"never runs code from a model folder: use a diffusers pipeline class")
    return name


def takes(pipeline_class) -> frozenset[str]:
    """The component names a diffusers pipeline class takes (its constructor's parameters)."""
    return frozenset(inspect.signature(pipeline_class.__init__).parameters) - {"self"}


def check_components(folder: Path, *, loads: Collection[str] | None = None, allow_pickle: bool = False,
                     variant: str | None = None, name: str | None = None) -> Choice:
    """Fail early, in one line, on a pipeline folder with a missing component, code to run, or pickle-only weights;
    returns the form of the weights to load (asyncvid.models.variants). Components the pipeline does not take
    (`loads`: its component names; None: all) are not loaded, so they are not checked."""
    pipeline_class(folder)
    index = json.loads((folder / "model_index.json").read_text())
    for component in components(index):
        if loads is not None and component not in loads:
            continue
        sub, library = folder / component, index[component][0]
        if library not in LIBRARIES or (sub / f"{library}.py").exists():
            raise UsageError(
                f"component '{component}' of '{folder}' comes from {library!r}, not {' or '.join(LIBRARIES)}; "
                f"asyncvid never runs code from a model folder: re-save the pipeline with library classes"
            )
        if not sub.is_dir():
            raise UsageError(f"model folder '{folder}' is missing component '{component}' ({sub}); re-save the "
                             f"pipeline")
    choice = choose(folder, weighted(folder, loads), variant, name)
    for sub in weighted(folder, loads):
        check_weights(sub, allow_pickle=allow_pickle, variant=choice.variant)
    return choice


def variant_of(folder: Path, loads: Collection[str] | None, requested: str | None) -> Choice:
    """The form of the weights that every loaded component of a pipeline folder has (asyncvid.models.variants)."""
    return choose(folder, weighted(folder, loads), requested)


def adapter_variant(folder: Path, requested: str | None, name: str | None = None) -> Choice:
    """A model folder of its own (a motion adapter): `requested` where it has that form, else the form it has (said
    in the note: --variant names the pipeline's form, and an adapter is often shared in one form only)."""
    if requested is None or requested in forms(folder):
        return choose(folder, [folder], requested, name)
    chosen = choose(folder, [folder], None)
    return Choice(chosen.variant, f"'{name or folder}' has no '{requested}' variant; loading its "
                                  f"{describe(chosen.variant)} weights")


def weighted(folder: Path, loads: Collection[str] | None) -> list[Path]:
    """The component folders with weights that a pipeline taking `loads` reads."""
    index = json.loads((folder / "model_index.json").read_text())
    subs = [folder / name for name in components(index) if loads is None or name in loads]
    return [s for s in subs if s.is_dir() and any(p.suffix in (".safetensors", *PICKLE_SUFFIXES) for p in s.iterdir())]


def components(index: dict) -> list[str]:
    """The components a model_index.json names (those set to null excluded)."""
    return [name for name, entry in index.items()
            if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None]


def check_weights(folder: Path, *, allow_pickle: bool = False, variant: str | None = None,
                  name: str | None = None) -> Choice:
    """Refuse pickle-only weights: loading a pickle can run arbitrary code. `allow_pickle` lets them through with a
    warning, for weights from a source the user trusts. Reads the headers of the safetensors files of the form
    chosen (`variant` if given, else the one there is); returns that choice."""
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        choice = choose(folder, [folder], variant, name)
        for path in weight_files(folder, choice.variant):
            check_safetensors(path)
        return choice
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise UsageError(
            f"'{folder}' has weights only as pickle files ({pickles[0]}), which can run code when loaded; convert "
            f"them to safetensors (load and save_pretrained(..., safe_serialization=True) in a trusted environment), "
            f"or pass --allow-pickle if you trust their source"
        )
    if pickles:
        warnings.warn(UsageWarning(
            f"loading pickle weights '{folder / pickles[0]}' (--allow-pickle): a pickle can run code when loaded; "
            f"convert them to safetensors once and drop --allow-pickle"
        ), stacklevel=2)
    return Choice(None)


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
