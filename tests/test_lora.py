"""`--lora PATH[:scale]`: fused into each rank's share of the weights exactly as into the whole pipeline, recorded in
the sidecar, and checked before anything loads."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from test_asyncdiff_cli import frames_of, invoke

from asyncvid.errors import UsageError
from asyncvid.models.lora import WEIGHT_NAME, parse

FAST = ["--steps", "3", "--frames", "4", "--format", "png", "--threads", "1"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle moving left\n")
    return path


@pytest.mark.slow
def test_asyncdiff_with_a_lora_equals_sequential_with_it(prompts, tiny_lora, tmp_path):
    runs = {}
    for name, extra in {"plain": [], "sequential": ["--lora", f"{tiny_lora}:0.7"],
                        "asyncdiff": ["--lora", f"{tiny_lora}:0.7", "--sampler", "asyncdiff", "--devices", "2",
                                      "--warmup", "3", "--cost", "flops"]}.items():
        result = invoke("generate", prompts, *FAST, *extra, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        runs[name] = frames_of(tmp_path / name)
    (video,) = runs["sequential"]
    assert np.array_equal(runs["asyncdiff"][video], runs["sequential"][video])
    assert not np.array_equal(runs["plain"][video], runs["sequential"][video])  # the LoRA changes the video
    sidecar = json.loads((tmp_path / "asyncdiff" / f"{video}.json").read_text())
    assert sidecar["settings"]["loras"] == [[str(tiny_lora / WEIGHT_NAME), 0.7]]


def test_parse_takes_a_file_or_a_folder_and_an_optional_scale(tiny_lora):
    assert parse(str(tiny_lora)) == parse(str(tiny_lora / WEIGHT_NAME) + ":1")
    assert parse(f"{tiny_lora}:0.25").scale == 0.25
    with pytest.raises(UsageError, match="finite"):
        parse(f"{tiny_lora}:nan")


def _bad_lora(tmp_path: Path, tiny_lora: Path) -> Path:
    """The tiny LoRA widened by 3 input features: it fits no module of the model."""
    state = load_file(tiny_lora / WEIGHT_NAME)
    path = tmp_path / "wrong_base.safetensors"
    save_file({k: v.repeat(1, 2)[:, : v.shape[1] + 3].contiguous() if ".lora_A." in k else v
               for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize("case", ["missing", "pickle", "no-scale", "wrong-base"])
def test_bad_loras_fail_in_one_line_before_any_worker_starts(case, prompts, tiny_lora, tmp_path):
    spec, said = {
        "missing": (tmp_path / "nope.safetensors", "does not exist"),
        "pickle": (tmp_path / "lora.bin", "not a .safetensors file"),
        "no-scale": (f"{tiny_lora}:inf", "must be a finite number"),
        "wrong-base": (f"{_bad_lora(tmp_path, tiny_lora)}:0.5", "does not fit this model's UNet (size mismatch"),
    }[case]
    (tmp_path / "lora.bin").write_bytes(b"\0" * 8)
    out = tmp_path / "out"
    result = invoke("generate", prompts, *FAST, "--lora", spec, "--sampler", "asyncdiff", "--devices", "2",
                    "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], result.output
    assert not out.exists()
