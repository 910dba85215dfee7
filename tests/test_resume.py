"""Multi-prompt runs: a rerun skips outputs whose sidecar settings match, and one failing prompt loses no other."""

import json

import pytest
from typer.testing import CliRunner

from asyncvid.cli.app import app
from asyncvid.requests import TextToVideo
from asyncvid.runtime.loaders import ModelSpec
from asyncvid.video.resume import to_make

FAST = ["--steps", "2", "--frames", "2", "--height", "32", "--width", "32", "--format", "png", "--threads", "1"]
NAMES = ["000-a-red-circle", "001-a-blue-square", "002-a-green-triangle"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\na green triangle\n")
    return path


def stamps(out):
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def test_a_rerun_skips_done_outputs_and_refuses_changed_settings_without_overwrite(prompts, tmp_path):
    out = tmp_path / "out"
    assert invoke("generate", prompts, *FAST, "--out", out).exit_code == 0
    before = stamps(out)
    assert sorted(before) == sorted(NAMES + [f"{n}.json" for n in NAMES])

    again = invoke("generate", prompts, *FAST, "--out", out)
    assert again.exit_code == 0, again.output
    assert again.stdout.count("skipped") == 3 and stamps(out) == before

    changed = invoke("generate", prompts, *FAST, "--seed", "1", "--out", out)
    assert changed.exit_code == 2
    assert "exists with other settings (request.seed differ); pass --overwrite" in changed.stderr
    assert stamps(out) == before

    replaced = invoke("generate", prompts, *FAST, "--seed", "1", "--overwrite", "--out", out)
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / f"{NAMES[0]}.json").read_text())["settings"]["request"]["seed"] == 1


def test_one_failing_prompt_is_reported_and_the_others_are_written_then_resumed(prompts, tmp_path, monkeypatch):
    import asyncvid.runtime.loaders

    real = asyncvid.runtime.loaders.sample

    def fail_on_the_square(pipe, adapter, request, **kwargs):
        if "square" in request.prompt:
            raise RuntimeError("out of memory (simulated)")
        return real(pipe, adapter, request, **kwargs)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(asyncvid.runtime.loaders, "sample", fail_on_the_square)
        result = invoke("generate", prompts, *FAST, "--out", out)
    assert result.exit_code == 1
    assert "error: 001-a-blue-square failed: out of memory (simulated)" in result.stderr
    assert "error: 1 of 3 videos failed; the others were written" in result.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [NAMES[0], NAMES[2]]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    resumed = invoke("generate", prompts, *FAST, "--out", out)
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout.count("skipped") == 2 and "wrote" in resumed.stdout
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == NAMES


def test_an_output_without_a_sidecar_is_not_taken_for_done(tmp_path):
    target = tmp_path / "000-x"
    target.mkdir()
    request = TextToVideo("x")
    with pytest.raises(Exception, match="already exists without a sidecar from asyncvid; pass --overwrite"):
        to_make([request], [target], ModelSpec("tiny-animatediff"), overwrite=False)
    assert to_make([request], [target], ModelSpec("tiny-animatediff"), overwrite=True) == [True]
    assert to_make([request], [tmp_path / "001-y"], ModelSpec("tiny-animatediff"), overwrite=False) == [True]
