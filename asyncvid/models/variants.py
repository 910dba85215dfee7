"""Which form of a model's weights to read: the plain files or a dtype variant (`*.fp16.safetensors`), named as
diffusers and transformers save them, whole or sharded with an index."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from asyncvid.errors import UsageError

SHARD = r"\d{5}-of-\d{5}"
# `diffusion_pytorch_model.safetensors`, `model-00001-of-00002.safetensors`: the plain form.
PLAIN = re.compile(rf"^[a-z_]+(-{SHARD})?\.safetensors$")
# `diffusion_pytorch_model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`, and the older
# `diffusion_pytorch_model-00001-of-00002.fp16.safetensors` diffusers still reads: a variant.
VARIANT = re.compile(rf"^[a-z_]+(\.(?P<variant>[A-Za-z0-9_]+)(-{SHARD})?|-{SHARD}\.(?P<legacy>[A-Za-z0-9_]+))"
                     rf"\.safetensors$")
# `diffusion_pytorch_model.safetensors.index.fp16.json`, and the older `...safetensors.fp16.index.json`.
INDEX = re.compile(r"^(?P<prefix>[a-z_]+)\.safetensors(\.index(\.(?P<variant>[A-Za-z0-9_]+))?"
                   r"|\.(?P<legacy>[A-Za-z0-9_]+)\.index)\.json$")


def forms(component: Path) -> set[str | None]:
    """The forms of a component folder's safetensors weights: None for the plain files, else each variant's name."""
    found: set[str | None] = set()
    for path in component.iterdir():
        if PLAIN.match(path.name):
            found.add(None)
        elif match := VARIANT.match(path.name) or INDEX.match(path.name):
            found.add(_variant(match))
    return found


def _variant(match: re.Match) -> str | None:
    return match["variant"] or match["legacy"]


def weight_files(component: Path, variant: str | None) -> list[Path]:
    """The safetensors files of one form of a component's weights: the shards its index names, or the one file."""
    for path in sorted(component.iterdir()):
        match = INDEX.match(path.name)
        if match and _variant(match) == variant:
            return sorted({component / name for name in json.loads(path.read_text())["weight_map"].values()})
    files = [p for p in sorted(component.iterdir()) if (PLAIN.match(p.name) if variant is None else
                                                         (m := VARIANT.match(p.name)) and _variant(m) == variant)]
    if not files:
        raise UsageError(f"'{component}' has no {describe(variant)} safetensors weights "
                         f"(it has: {', '.join(map(describe, forms(component))) or 'none'})")
    return files


@dataclass(frozen=True)
class Choice:
    """The form to load, and the line that says why when the user did not ask for it (None: nothing to say)."""

    variant: str | None
    note: str | None = None


def choose(folder: Path, components: list[Path], requested: str | None, name: str | None = None) -> Choice:
    """The form every component of `folder` has: `requested` if given, else the plain files, else the one variant
    they all have (said in the note, naming the model `name`, default the folder). Fails in one line naming the
    forms there are."""
    # A component with no safetensors at all has pickles (let through by --allow-pickle): diffusers picks those.
    listed = [(c, forms(c)) for c in components]
    components, held = [c for c, f in listed if f], [f for _, f in listed if f]
    common = set.intersection(*held) if held else {None}
    if requested is not None:
        if requested in common:
            return Choice(requested)
        if not components:
            raise UsageError(f"--variant {requested} chooses among safetensors files, but '{folder}' has none; drop "
                             f"--variant")
        lacking = next(c for c, f in zip(components, held) if requested not in f)
        raise UsageError(f"variant '{requested}' is not in '{lacking}' (it has: "
                         f"{', '.join(map(describe, forms(lacking))) or 'no safetensors weights'}); "
                         f"{_fix(common)}")
    if None in common or not held:
        return Choice(None)
    variants = sorted(v for v in common if v is not None)
    if len(variants) == 1:
        return Choice(variants[0], f"'{name or folder}' has only the {variants[0]} variant of its weights; loading it "
                                   f"(--variant {variants[0]} says so and hides this line)")
    if variants:
        raise UsageError(f"'{folder}' has the weights as variants {', '.join(variants)} and no plain files; "
                         f"choose one with --variant {variants[0]}")
    each = "; ".join(f"{c.name}: {', '.join(map(describe, f))}" for c, f in zip(components, held))
    raise UsageError(f"the components of '{folder}' have no form of safetensors weights in common ({each}); "
                     f"download the same variant of every component")


def describe(variant: str | None) -> str:
    return "plain (no variant)" if variant is None else f"'{variant}' variant"


def _fix(common: set[str | None]) -> str:
    if None in common:
        return "drop --variant to load the plain files"
    if common:
        return f"use --variant {sorted(common)[0]}"
    return "download the same variant of every component"
