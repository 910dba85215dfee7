"""Tests for the `asyncvid` CLI: real runs on the tiny embedded models, and one-line refusals of bad input that
write nothing."""

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import asyncvid
from asyncvid.cli.app import app
from asyncvid.video.writers import read_png_frames

FAST = ["--steps", "2", "--frames", "4"]
PROMPT = "a red circle moving left"
STEM = "000-a-red-circle-moving-left"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def prompt_file(folder: Path, text: str = PROMPT + "\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return path


def assert_ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


def assert_one_line_error(result, *shown):
    """Exit code 2, a single `error: ...` line on stderr naming the bad value, nothing else printed."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an escaped Python exception
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for text in shown:
        assert text in lines[0]


def assert_nothing_written(out: Path):
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def decode_mp4(path: Path):
    """(frames as an (F, H, W, 3) array, the stream's codec, pix_fmt and average rate)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        facts = (stream.codec_context.name, stream.codec_context.pix_fmt, stream.average_rate)
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
    return frames, facts


# --- generate: one MP4 and its sidecar ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mp4_run(tmp_path_factory):
    """`generate` on a one-prompt file at the model's default size; returns (result, out folder)."""
    tmp = tmp_path_factory.mktemp("mp4-run")
    out = tmp / "out"
    result = invoke("generate", prompt_file(tmp), *FAST, "--seed", "7", "--fps", "12", "--out", out)
    return result, out


def test_generate_writes_one_mp4_and_its_sidecar(mp4_run):
    result, out = mp4_run
    assert_ok(result)
    assert sorted(p.name for p in out.iterdir()) == [f"{STEM}.json", f"{STEM}.mp4"]
    [line] = result.stdout.splitlines()
    assert line.startswith(f"wrote {out / STEM}.mp4 (4 frames, ")  # one unwrapped line, whatever the width


def test_generated_mp4_decodes_to_the_requested_frames(mp4_run):
    _, out = mp4_run
    frames, (codec, pix_fmt, rate) = decode_mp4(out / f"{STEM}.mp4")
    assert frames.shape == (4, 64, 64, 3)
    assert (codec, pix_fmt, rate) == ("h264", "yuv420p", 12)
    assert frames.std() > 0


def test_sidecar_records_the_settings_versions_and_timings(mp4_run):
    _, out = mp4_run
    meta = json.loads((out / f"{STEM}.json").read_text(encoding="utf-8"))
    assert meta["output"] == f"{STEM}.mp4"
    assert meta["task"] == "text-to-video"
    assert meta["prompt"] == PROMPT
    assert (meta["seed"], meta["num_inference_steps"], meta["num_frames"], meta["fps"]) == (7, 2, 4, 12)
    assert meta["model"] == "tiny-animatediff"
    assert (meta["device"], meta["dtype"]) == ("cpu", "float32")
    assert meta["versions"]["asyncvid"] == asyncvid.__version__
    assert {"torch", "diffusers", "transformers", "av"} <= meta["versions"].keys()
    timings = meta["timings"]
    assert timings["total_s"] > 0
    assert 0 <= timings["until_last_step_s"] <= timings["total_s"]


# --- seeds -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def png_frames(tmp_path_factory):
    """PNG frames of the same prompt for seeds 0, 0 and 1, each written into its own folder."""
    tmp = tmp_path_factory.mktemp("png-runs")
    prompts = prompt_file(tmp)
    runs = []
    for i, seed in enumerate((0, 0, 1)):
        out = tmp / f"out{i}"
        assert_ok(invoke("generate", prompts, *FAST, "--seed", seed, "--format", "png", "--out", out))
        runs.append(read_png_frames(out / STEM))
    return runs


def test_same_seed_gives_identical_frames(png_frames):
    first, again, _ = png_frames
    assert first.shape == (4, 64, 64, 3)
    assert np.array_equal(first, again)


def test_different_seed_gives_different_frames(png_frames):
    first, _, other = png_frames
    assert not np.array_equal(first, other)


# --- i2v and GIF -------------------------------------------------------------------------------------------------


def test_i2v_writes_one_mp4_per_image(tmp_path, red_circle):
    out = tmp_path / "out"
    assert_ok(invoke("i2v", red_circle, *FAST, "--out", out))
    assert sorted(p.name for p in out.iterdir()) == ["000-red-circle.json", "000-red-circle.mp4"]
    frames, (codec, _, rate) = decode_mp4(out / "000-red-circle.mp4")
    assert frames.shape == (4, 64, 64, 3)
    assert (codec, rate) == ("h264", 7)  # SVD's default fps
    meta = json.loads((out / "000-red-circle.json").read_text())
    assert (meta["task"], meta["image"], meta["model"]) == ("image-to-video", str(red_circle), "tiny-svd")


def test_gif_format_writes_a_gif_with_every_frame(tmp_path):
    out = tmp_path / "gifs[1]"  # brackets: the printed path must not be read as rich markup
    result = invoke("generate", prompt_file(tmp_path), *FAST, "--format", "gif", "--out", out)
    assert_ok(result)
    assert f"wrote {out / STEM}.gif (4 frames, " in result.stdout
    with Image.open(out / f"{STEM}.gif") as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == 4
        assert gif.size == (64, 64)
    assert (out / f"{STEM}.json").is_file()


# --- overwriting -------------------------------------------------------------------------------------------------


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    prompts = prompt_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    existing = out / f"{STEM}.mp4"
    existing.write_bytes(b"an earlier video")

    assert_one_line_error(invoke("generate", prompts, *FAST, "--out", out), str(existing), "--overwrite")
    assert existing.read_bytes() == b"an earlier video"
    assert sorted(p.name for p in out.iterdir()) == [existing.name]

    assert_ok(invoke("generate", prompts, *FAST, "--out", out, "--overwrite"))
    frames, _ = decode_mp4(existing)
    assert len(frames) == 4


# --- bad input: exit 2, one line, nothing written ----------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _model_with_sampling(folder: Path, text: bytes) -> Path:
    """A copy of the embedded text-to-video model whose sampling.json is `text`."""
    import shutil

    from asyncvid.pipelines.embedded import EMBEDDED

    model = shutil.copytree(EMBEDDED["tiny-animatediff"].source, folder / "model")
    _write(model / "sampling.json", text)
    return model


# Each case: tmp folder -> (arguments without --out, text the error line must contain).
BAD_INPUTS = {
    "missing prompt file": lambda d: (["generate", d / "nope.txt", *FAST], ["nope.txt", "does not exist"]),
    "empty prompt file": lambda d: (["generate", _write(d / "empty.txt", b""), *FAST], ["empty.txt", "no prompts"]),
    "only comments": lambda d: (
        ["generate", _write(d / "c.txt", b"# one\n  \n# two\n"), *FAST], ["c.txt", "no prompts"]
    ),
    "binary prompt file": lambda d: (
        ["generate", _write(d / "b.txt", "a cat".encode("utf-16")), *FAST], ["b.txt", "binary"]
    ),
    "missing image": lambda d: (["i2v", d / "nope.png", *FAST], ["nope.png", "does not exist"]),
    "text posing as an image": lambda d: (
        ["i2v", _write(d / "fake.png", b"not a picture\n"), *FAST], ["fake.png", "not a readable image"]
    ),
    "height 65": lambda d: (["generate", prompt_file(d), *FAST, "--height", "65"], ["height", "65"]),
    "width 100": lambda d: (["generate", prompt_file(d), *FAST, "--width", "100"], ["width", "100"]),
    "steps 0": lambda d: (["generate", prompt_file(d), "--steps", "0", "--frames", "4"], ["steps", "got 0"]),
    "seed -1": lambda d: (["generate", prompt_file(d), *FAST, "--seed", "-1"], ["seed", "-1"]),
    "unknown model": lambda d: (["generate", prompt_file(d), *FAST, "--model", "bogus-model"], ["'bogus-model'"]),
    "hub id not cached": lambda d: (
        ["generate", prompt_file(d), *FAST, "--model", "nobody/nothing"], ["'nobody/nothing'", "cache"]
    ),
    "frames past the motion adapter": lambda d: (
        ["generate", prompt_file(d), "--steps", "2", "--frames", "100"], ["frames 100", "limit of 32"]
    ),
    "svd model for generate": lambda d: (
        ["generate", prompt_file(d), *FAST, "--model", "tiny-svd"], ["'tiny-svd'", "asyncvid i2v"]
    ),
    "animatediff model for i2v": lambda d: (
        ["i2v", Path(__file__).parent.parent / "samples" / "red_circle.png", *FAST, "--model", "tiny-animatediff"],
        ["'tiny-animatediff'", "asyncvid generate"],
    ),
    "malformed sampling.json": lambda d: (
        ["generate", prompt_file(d), *FAST, "--model", _model_with_sampling(d, b'{"guidance": 2}')],
        ["sampling.json", "guidance_scale", "'guidance'"],
    ),
    "float16 on the cpu": lambda d: (
        ["generate", prompt_file(d), *FAST, "--device", "cpu", "--dtype", "float16"], ["float16"]
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_writes_nothing(case, tmp_path, hf_cache):
    args, shown = BAD_INPUTS[case](tmp_path)
    out = tmp_path / "out"
    assert_one_line_error(invoke(*args, "--out", out), *shown)
    assert_nothing_written(out)


def test_unwritable_out_is_refused_before_any_work(tmp_path):
    # Root ignores chmod, so "unwritable" here is a folder below a regular file.
    blocker = _write(tmp_path / "somefile", b"keep me")
    out = blocker / "sub"
    assert_one_line_error(invoke("generate", prompt_file(tmp_path / "p"), *FAST, "--out", out), str(out))
    assert blocker.read_bytes() == b"keep me"


# --- models and --version ----------------------------------------------------------------------------------------


def test_models_lists_the_embedded_models():
    result = invoke("models")
    assert_ok(result)
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  tiny-")]
    assert listed == ["tiny-animatediff", "tiny-svd"]
    assert "text-to-video" in result.stdout and "image-to-video" in result.stdout


def test_version_prints_the_package_version():
    result = invoke("--version")
    assert_ok(result)
    assert result.stdout == f"asyncvid {version('asyncvid')}\n"
    assert version("asyncvid") == asyncvid.__version__


# --- the real console script -------------------------------------------------------------------------------------


def asyncvid_command() -> list[str]:
    """The installed console script beside this interpreter, else `python -m asyncvid.cli.app`."""
    script = Path(sys.executable).with_name("asyncvid")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "asyncvid.cli.app"]


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    # The environment, ASYNCVID_HOME included, is inherited from this process.
    return subprocess.run(
        [*asyncvid_command(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_console_script_generates_an_mp4(tmp_path, asyncvid_home):
    prompt_file(tmp_path)
    proc = run_cli("generate", "prompts.txt", *FAST, "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    frames, _ = decode_mp4(tmp_path / "out" / f"{STEM}.mp4")
    assert len(frames) == 4
    # The subprocess inherited the session's model home instead of building into ~/.cache.
    sidecar = json.loads((tmp_path / "out" / f"{STEM}.json").read_text())
    assert Path(sidecar["model_folder"]).parent == asyncvid_home / "models"


@pytest.mark.slow
def test_console_script_bad_input_is_one_stderr_line(tmp_path):
    prompt_file(tmp_path)
    proc = run_cli("generate", "prompts.txt", *FAST, "--height", "65", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: height") and "65" in lines[0]
    assert not (tmp_path / "out").exists()
