"""Bad inputs beyond the basics in test_cli.py (docs/ERRORS.md lists them all): each is one `error:` line naming the
value and the fix, exit code 2, no traceback unless --debug, and nothing written; also with --devices 2."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import asyncvid.video.writers
from asyncvid.cli.app import app
from asyncvid.errors import UsageError
from asyncvid.models.sources import check_components
from asyncvid.pipelines import animatediff, resolve_model
from asyncvid.requests import UsageWarning

FAST = ["--steps", "2", "--frames", "4"]
PROMPT = "a red circle moving left"
STEM = "000-a-red-circle-moving-left"
PARALLEL = ["--sampler", "asyncdiff", "--devices", "2"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def prompt_file(folder: Path, data: bytes = (PROMPT + "\n").encode()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prompts.txt"
    path.write_bytes(data)
    return path


def assert_one_line_error(result, *shown):
    """Exit code 2, one `error: ...` line on stderr that contains each of `shown`, nothing else printed."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for text in shown:
        assert text in lines[0], lines[0]


def assert_empty(out: Path):
    """Nothing at the target, no sidecar, no temporary file or folder left behind."""
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


# --- images and prompt files -------------------------------------------------------------------------------------


def test_unreadable_image(tmp_path, red_circle, monkeypatch):
    # Root reads any file whatever its mode, so the refusal comes from a patched Image.open.
    def deny(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("asyncvid.video.images.Image.open", deny)
    result = invoke("i2v", red_circle, *FAST, "--out", tmp_path / "out")
    assert_one_line_error(result, str(red_circle), "permission denied", "chmod")
    assert_empty(tmp_path / "out")


def test_truncated_image(tmp_path, red_circle):
    image = tmp_path / "cut.png"
    image.write_bytes(red_circle.read_bytes()[:120])  # a valid header, then the data stops
    result = invoke("i2v", image, *FAST, "--out", tmp_path / "out")
    assert_one_line_error(result, "cut.png", "truncated", "complete PNG or JPEG")
    assert_empty(tmp_path / "out")


def test_folder_as_image(tmp_path):
    result = invoke("i2v", tmp_path, *FAST, "--out", tmp_path / "out")
    assert_one_line_error(result, str(tmp_path), "is a folder")
    assert_empty(tmp_path / "out")


def test_bad_second_image_fails_before_any_video(tmp_path, red_circle):
    result = invoke("i2v", red_circle, tmp_path / "missing.png", *FAST, "--out", tmp_path / "out")
    assert_one_line_error(result, "missing.png", "does not exist")
    assert_empty(tmp_path / "out")


@pytest.mark.parametrize(
    "data, shown",
    [
        ("café\n".encode("latin-1"), ["not UTF-8", "0xe9", "save it as UTF-8"]),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["looks binary", "save it as UTF-8"]),
        ("\ufeffa cat\n".encode("utf-16-le"), ["looks binary"]),
    ],
    ids=["latin-1", "png bytes", "utf-16"],
)
def test_prompt_file_that_is_not_utf8_text(tmp_path, data, shown):
    result = invoke("generate", prompt_file(tmp_path, data), *FAST, "--out", tmp_path / "out")
    assert_one_line_error(result, "prompts.txt", *shown)
    assert_empty(tmp_path / "out")


def test_unreadable_prompt_file(tmp_path, monkeypatch):
    path = prompt_file(tmp_path)

    def deny(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", deny)
    result = invoke("generate", path, *FAST, "--out", tmp_path / "out")
    assert_one_line_error(result, str(path), "permission denied", "chmod u+r")


def test_folder_as_prompt_file(tmp_path):
    result = invoke("generate", tmp_path, *FAST, "--out", tmp_path / "out")
    assert_one_line_error(result, "is a folder")
    assert_empty(tmp_path / "out")


@pytest.mark.parametrize("parallel", [[], PARALLEL + ["--cost", "flops"]], ids=["sequential", "2 processes"])
def test_too_long_prompt_is_one_warning_line_and_the_video_is_made(tmp_path, parallel):
    long_prompt = "a red circle moving left over a blue sky " * 12  # ~110 tokens; CLIP reads 77
    result = invoke("generate", prompt_file(tmp_path, long_prompt.encode()), *FAST, *parallel,
                    "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: prompt 'a red circle"), result.stderr
    assert "the text encoder reads 77" in lines[0] and "shorten it" in lines[0]
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 1


# --- numbers and layouts -----------------------------------------------------------------------------------------


CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

LAYOUTS = {
    "more processes than cores": (
        ["--sampler", "asyncdiff", "--stages", CORES + 1, "--devices", CORES + 1],
        [f"--devices {CORES + 1} exceeds the {CORES} CPU cores", "--oversubscribe"],
    ),
    "stride not matching --devices": (
        ["--sampler", "asyncdiff", "--stride", "2", "--devices", "2"], ["2 + 2 - 1 = 3", "but 2 were started"]
    ),
    "cfg degree not matching --devices": (
        ["--sampler", "asyncdiff", "--cfg-parallel", "--devices", "2"], ["x 2 = 4", "but 2 were started"]
    ),
    "stages 0": (["--sampler", "asyncdiff", "--stages", "0", "--devices", "2"], ["stages", "got 0"]),
    "devices 0": (["--devices", "0"], ["devices must be at least 1, got 0"]),
    "threads 0": (["--threads", "0"], ["threads must be at least 1, got 0"]),
    "fps 0": (["--fps", "0"], ["fps must be at least 1, got 0"]),
    "negative guidance": (["--guidance", "-1"], ["guidance", "-1.0"]),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_bad_numbers_and_layouts_fail_before_any_process_starts(case, tmp_path):
    options, shown = LAYOUTS[case]
    result = invoke("generate", prompt_file(tmp_path), *FAST, *options, "--out", tmp_path / "out")
    assert_one_line_error(result, *shown)
    assert_empty(tmp_path / "out")


def test_more_processes_than_gpus(monkeypatch):
    from asyncvid.runtime.launch import check_device_count

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="--devices 2 needs 2 GPUs but 1 are visible"):
        check_device_count(2, torch.device("cuda"))


def test_debug_shows_the_exception_instead_of_one_line(tmp_path):
    result = invoke("generate", prompt_file(tmp_path), *FAST, "--height", "65", "--debug", "--out", tmp_path / "out")
    assert result.exit_code != 0
    assert isinstance(result.exception, UsageError) and "got 65" in str(result.exception)
    assert_empty(tmp_path / "out")


# --- model folders -----------------------------------------------------------------------------------------------


@pytest.fixture
def model_copy(tmp_path) -> Path:
    """A private copy of the embedded tiny-animatediff folder, for a test that breaks it."""
    return Path(shutil.copytree(resolve_model("tiny-animatediff"), tmp_path / "model"))


def pickle_only(component: Path) -> None:
    """Replace a component's safetensors by the same tensors in a pickle (.bin)."""
    [weights] = component.glob("*.safetensors")
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()


def test_model_folder_missing_a_component(tmp_path, model_copy):
    shutil.rmtree(model_copy / "vae")
    result = invoke("generate", prompt_file(tmp_path), *FAST, "--model", model_copy, "--out", tmp_path / "out")
    assert_one_line_error(result, "missing component 'vae'", "re-save")
    assert_empty(tmp_path / "out")


def test_pickle_only_weights_are_refused_naming_the_flag(tmp_path, model_copy):
    pickle_only(model_copy / "vae")
    result = invoke("generate", prompt_file(tmp_path), *FAST, "--model", model_copy, "--out", tmp_path / "out")
    assert_one_line_error(result, str(model_copy / "vae"), "pickle", "safetensors", "--allow-pickle")
    assert_empty(tmp_path / "out")


def test_allowed_pickle_weights_load_with_a_warning(model_copy):
    original = load_file(model_copy / "vae" / "diffusion_pytorch_model.safetensors")
    pickle_only(model_copy / "vae")
    with pytest.warns(UsageWarning, match="pickle can run code"):
        check_components(model_copy, allow_pickle=True)
    pipe = animatediff.load(model_copy, dtype=torch.float32, allow_pickle=True)
    for name, tensor in pipe.vae.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_component_from_code_in_the_model_folder_is_refused_and_never_run(tmp_path, model_copy):
    marker = tmp_path / "ran"
    (model_copy / "unet" / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n")
    index = json.loads((model_copy / "model_index.json").read_text())
    index["unet"] = ["evil", "Evil"]
    (model_copy / "model_index.json").write_text(json.dumps(index))
    result = invoke("generate", prompt_file(tmp_path), *FAST, "--model", model_copy, "--out", tmp_path / "out")
    assert_one_line_error(result, "component 'unet'", "'evil'", "never runs code")
    assert not marker.exists()
    assert_empty(tmp_path / "out")


def test_custom_pipeline_class_is_refused(tmp_path, model_copy):
    index = json.loads((model_copy / "model_index.json").read_text())
    index["_class_name"] = ["pipeline", "MyPipeline"]
    (model_copy / "model_index.json").write_text(json.dumps(index))
    result = invoke("generate", prompt_file(tmp_path), *FAST, "--model", model_copy, "--out", tmp_path / "out")
    assert_one_line_error(result, "custom pipeline", "never runs code")


# --- a full disk -------------------------------------------------------------------------------------------------


@pytest.fixture
def temp_tag(monkeypatch) -> str:
    """The writers' temporary names, made predictable: `.{stem}.tmp-{tag}{suffix}`."""
    monkeypatch.setattr(asyncvid.video.writers.secrets, "token_hex", lambda n=None: "0decaf00")
    return f"{os.getpid()}-0decaf00"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("suffix", [".mp4", ".json"], ids=["video", "sidecar"])
def test_disk_full_leaves_no_video_no_sidecar_and_no_temp(tmp_path, temp_tag, suffix):
    # The temporary file the writer opens is a link to /dev/full: its writes fail with a real ENOSPC.
    out = tmp_path / "out"
    out.mkdir()
    (out / f".{STEM}.tmp-{temp_tag}{suffix}").symlink_to("/dev/full")
    result = invoke("generate", prompt_file(tmp_path), *FAST, "--out", out)
    assert_one_line_error(result, f"{STEM}{suffix}", "No space left on device", "free some space")
    assert_empty(out)


def test_disk_full_while_writing_png_frames(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "out"
    result = invoke("generate", prompt_file(tmp_path), *FAST, "--format", "png", "--out", out)
    assert_one_line_error(result, STEM, "No space left on device", "--out on another disk")
    assert_empty(out)


# --- with --devices 2: the same one line, from the checks that run before any worker starts ----------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "options, shown",
    [
        (["--height", "65"], ["height", "got 65"]),
        (["--model", "bogus-model"], ["'bogus-model'", "not an embedded model"]),
        (["--frames", "100", "--cost", "flops"], ["frames 100", "limit of 32"]),
    ],
    ids=["request value", "model name", "frames past the model's limit (read from its config)"],
)
def test_bad_input_with_two_processes_is_still_one_line(tmp_path, options, shown):
    args = ["generate", prompt_file(tmp_path), "--steps", "2", "--frames", "4", *PARALLEL, *options]
    result = invoke(*args, "--out", tmp_path / "out")
    assert_one_line_error(result, *shown)
    assert_empty(tmp_path / "out")


@pytest.mark.parametrize("rank", ["0", "1"])
@pytest.mark.parametrize(
    "options, shown",
    [(["--model", "bogus-model"], ["'bogus-model'"]), (["--frames", "100"], ["frames 100", "limit of 32"])],
    ids=["model name", "frames past the model's limit"],
)
def test_under_a_launcher_every_rank_fails_alone_before_joining_the_group(rank, options, shown, tmp_path,
                                                                          monkeypatch):
    # No MASTER_ADDR: a rank that tried to join the process group would fail differently (or wait for the others).
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("generate", prompt_file(tmp_path), *FAST, "--sampler", "asyncdiff", *options,
                    "--out", tmp_path / "out")
    assert_one_line_error(result, *shown)
    assert_empty(tmp_path / "out")


def test_allow_pickle_flag_makes_the_video_with_a_warning(tmp_path, model_copy):
    pickle_only(model_copy / "vae")
    result = invoke("generate", prompt_file(tmp_path), *FAST, "--model", model_copy, "--allow-pickle",
                    "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "pickle can run code" in result.output
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 1


def test_allow_pickle_is_refused_with_asyncdiff(tmp_path, model_copy):
    pickle_only(model_copy / "vae")
    result = invoke("generate", prompt_file(tmp_path), *FAST, "--model", model_copy, "--allow-pickle",
                    "--sampler", "asyncdiff", "--devices", "2", "--out", tmp_path / "out")
    assert_one_line_error(result, "--allow-pickle", "safetensors")
    assert_empty(tmp_path / "out")
