"""Every bad input a newcomer can give the CLI, in one table: each is one `error:` line on stderr naming the value
(and the fix), exit code 2, no traceback, and nothing written: the --out folder is not even created. Also random
bytes as prompt files, images and weights, and how fast a value error answers (before torch is imported)."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from asyncvid.cli.app import app
from asyncvid.pipelines.embedded import EMBEDDED

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
IMAGE = SAMPLES / "red_circle.png"
FAST = ["--steps", "2", "--frames", "4"]
PARALLEL = ["--sampler", "asyncdiff", "--devices", "2", "--oversubscribe"]
PARATAA = ["--sampler", "parataa"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(result, out: Path, *shown):
    """Exit code 2, exactly one `error: ...` line on stderr containing each of `shown`, nothing on stdout, no
    traceback, and no output folder."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == "" and "Traceback" not in result.output
    for text in shown:
        assert text in lines[0], lines[0]
    assert not out.exists(), f"{out} was created"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Files for the table: good ones to pair with a bad option, and bad ones of every kind."""
    d = tmp_path_factory.mktemp("inputs")
    files = {"prompts": d / "prompts.txt", "empty": d / "empty.txt", "comments": d / "comments.txt",
             "utf16": d / "utf16.txt", "latin1": d / "latin1.txt", "folder": d / "a-folder", "file": d / "a-file",
             "one_px": d / "one.png", "huge": d / "huge.png", "not_image": d / "text.png", "truncated": d / "cut.png",
             "empty_image": d / "empty.png"}
    files["prompts"].write_text("a red circle moving left\n")
    files["empty"].write_bytes(b"")
    files["comments"].write_text("# only a comment\n\n")
    files["utf16"].write_bytes("a cat".encode("utf-16"))
    files["latin1"].write_bytes("a caf\xe9 moving left\n".encode("latin-1"))
    files["folder"].mkdir()
    files["file"].write_text("keep me")
    Image.new("RGB", (1, 1)).save(files["one_px"])
    Image.new("RGB", (8000, 8000)).save(files["huge"])
    files["not_image"].write_text("not a picture\n")
    files["truncated"].write_bytes(IMAGE.read_bytes()[:100])
    files["empty_image"].write_bytes(b"")
    svd = EMBEDDED["tiny-svd"].source
    for name, damage in (("cut_weights", lambda b: b[: len(b) // 2]), ("garbage_weights", lambda b: b"x" * 64)):
        model = shutil.copytree(svd, d / name)
        unet = model / "unet" / "diffusion_pytorch_model.safetensors"
        unet.write_bytes(damage(unet.read_bytes()))
        files[name] = model
    files["no_index"] = shutil.copytree(svd, d / "no-index")
    (files["no_index"] / "model_index.json").unlink()
    files["custom_code"] = shutil.copytree(svd, d / "custom")
    index = files["custom_code"] / "model_index.json"
    index.write_text(index.read_text().replace('"StableVideoDiffusionPipeline"', '["my_repo", "MyPipeline"]', 1))
    files["missing_part"] = shutil.copytree(svd, d / "missing-part")
    shutil.rmtree(files["missing_part"] / "vae")
    return files


G = "generate"
I2V = "i2v"
# id -> (arguments, given the inputs; text the error line must contain)
CASES = {
    # the prompt file
    "prompt file missing": (lambda f: [G, f["prompts"].with_name("nope.txt"), *FAST], ["nope.txt", "does not exist"]),
    "prompt file is a folder": (lambda f: [G, f["folder"], *FAST], ["a-folder"]),
    "prompt file empty": (lambda f: [G, f["empty"], *FAST], ["empty.txt", "no prompts"]),
    "prompt file only comments": (lambda f: [G, f["comments"], *FAST], ["comments.txt", "no prompts"]),
    "prompt file utf-16": (lambda f: [G, f["utf16"], *FAST], ["utf16.txt"]),
    "prompt file latin-1": (lambda f: [G, f["latin1"], *FAST], ["latin1.txt"]),
    "prompt file missing argument": (lambda f: [G], ["PROMPT_FILE"]),
    # request values
    "steps 0": (lambda f: [G, f["prompts"], "--steps", "0"], ["steps", "got 0", "--steps 1"]),
    "steps negative": (lambda f: [G, f["prompts"], "--steps", "-3"], ["got -3"]),
    "steps not a number": (lambda f: [G, f["prompts"], "--steps", "abc"], ["--steps", "abc"]),
    "frames 0": (lambda f: [G, f["prompts"], "--steps", "2", "--frames", "0"], ["frames", "got 0"]),
    "frames past the motion adapter": (lambda f: [G, f["prompts"], "--steps", "2", "--frames", "100"],
                                       ["frames 100", "limit of 32"]),
    "height not a multiple of 8": (lambda f: [G, f["prompts"], *FAST, "--height", "65"], ["height", "65", "try 64"]),
    "width 0": (lambda f: [G, f["prompts"], *FAST, "--width", "0"], ["width", "got 0"]),
    "guidance nan": (lambda f: [G, f["prompts"], *FAST, "--guidance", "nan"], ["guidance", "nan"]),
    "guidance inf": (lambda f: [G, f["prompts"], *FAST, "--guidance", "inf"], ["guidance", "inf"]),
    "guidance negative": (lambda f: [G, f["prompts"], *FAST, "--guidance", "-1"], ["guidance", "-1"]),
    "shared noise 1.5": (lambda f: [G, f["prompts"], *FAST, "--shared-noise", "1.5"],
                         ["shared noise", "got 1.5", "[0, 1]"]),
    "noise mean 2": (lambda f: [G, f["prompts"], *FAST, "--noise-mean", "2"], ["noise mean", "got 2.0", "[0, 1]"]),
    "shared grid past the latent": (lambda f: [G, f["prompts"], *FAST, "--shared-grid", "9"],
                                    ["shared grid", "got 9", "--shared-grid 1"]),
    "seed negative": (lambda f: [G, f["prompts"], *FAST, "--seed", "-1"], ["seed", "-1"]),
    "seed too large": (lambda f: [G, f["prompts"], *FAST, "--seed", str(2**63)], ["seed"]),
    "fps 0": (lambda f: [G, f["prompts"], *FAST, "--fps", "0"], ["fps", "got 0"]),
    "format webm": (lambda f: [G, f["prompts"], *FAST, "--format", "webm"], ["--format", "webm"]),
    "scheduler unknown": (lambda f: [G, f["prompts"], *FAST, "--scheduler", "unknown"], ["--scheduler", "unknown"]),
    "sampler unknown": (lambda f: [G, f["prompts"], *FAST, "--sampler", "turbo"], ["--sampler", "turbo"]),
    "option unknown": (lambda f: [G, f["prompts"], *FAST, "--bogus"], ["--bogus"]),
    "command unknown": (lambda f: ["gnerate", f["prompts"]], ["gnerate", "generate"]),
    # processes and samplers
    "devices 0": (lambda f: [G, f["prompts"], *FAST, "--devices", "0"], ["devices", "got 0"]),
    "devices 2 sequential": (lambda f: [G, f["prompts"], *FAST, "--devices", "2"], ["--devices 2", "--sampler"]),
    "threads 0": (lambda f: [G, f["prompts"], *FAST, "--threads", "0"], ["threads", "got 0"]),
    "stages 0": (lambda f: [G, f["prompts"], *FAST, *PARALLEL, "--stages", "0"], ["stages", "got 0"]),
    "stride 0": (lambda f: [G, f["prompts"], *FAST, *PARALLEL, "--stride", "0"], ["stride", "got 0"]),
    "stride 3 on 2 devices": (lambda f: [G, f["prompts"], *FAST, *PARALLEL, "--stride", "3"],
                              ["--devices 4", "--stride"]),
    "warmup 0": (lambda f: [G, f["prompts"], *FAST, *PARALLEL, "--warmup", "0"], ["warmup", "got 0"]),
    "warmup above steps": (lambda f: [G, f["prompts"], *PARALLEL, "--warmup", "30"], ["warm-up 30", "--warmup 25"]),
    "cost unknown": (lambda f: [G, f["prompts"], *FAST, *PARALLEL, "--cost", "guess"], ["--cost", "guess"]),
    "weight cap 0": (lambda f: [G, f["prompts"], *FAST, *PARALLEL, "--weight-cap", "0"], ["weight cap"]),
    "weight cap 1.5": (lambda f: [G, f["prompts"], *FAST, *PARALLEL, "--weight-cap", "1.5"], ["1.5"]),
    "weight cap nan": (lambda f: [G, f["prompts"], *FAST, *PARALLEL, "--weight-cap", "nan"], ["nan"]),
    "split unknown unit": (lambda f: [G, f["prompts"], *FAST, *PARALLEL, "--split", "bogus"], ["'bogus'"]),
    "split too many units": (lambda f: [G, f["prompts"], *FAST, *PARALLEL, "--split", "a,b"], ["2 stages"]),
    "cfg-parallel on 2 devices": (lambda f: [G, f["prompts"], *FAST, *PARALLEL, "--cfg-parallel"],
                                  ["--devices 4"]),
    "allow-pickle with asyncdiff": (lambda f: [G, f["prompts"], *FAST, *PARALLEL, "--allow-pickle"],
                                    ["--allow-pickle"]),
    "tol 0": (lambda f: [G, f["prompts"], *FAST, *PARATAA, "--tol", "0"], ["tol", "0.001"]),
    "tol nan": (lambda f: [G, f["prompts"], *FAST, *PARATAA, "--tol", "nan"], ["tol", "nan"]),
    "history 0": (lambda f: [G, f["prompts"], *FAST, *PARATAA, "--history", "0"], ["history"]),
    "window 0": (lambda f: [G, f["prompts"], *FAST, *PARATAA, "--window", "0"], ["window"]),
    "order 0": (lambda f: [G, f["prompts"], *FAST, *PARATAA, "--order", "0"], ["order"]),
    "max rounds 0": (lambda f: [G, f["prompts"], *FAST, *PARATAA, "--max-rounds", "0"], ["max rounds"]),
    "eta 2": (lambda f: [G, f["prompts"], *FAST, *PARATAA, "--eta", "2"], ["eta"]),
    # devices and precision
    "device tpu": (lambda f: [G, f["prompts"], *FAST, "--device", "tpu"], ["'tpu'"]),
    "device cuda without a gpu": (lambda f: [G, f["prompts"], *FAST, "--device", "cuda"], ["cuda"]),
    "float16 on the cpu": (lambda f: [G, f["prompts"], *FAST, "--device", "cpu", "--dtype", "float16"],
                           ["float16"]),
    "dtype unknown": (lambda f: [G, f["prompts"], *FAST, "--dtype", "float8"], ["--dtype", "float8"]),
    # the output folder
    "out is a file": (lambda f: [G, f["prompts"], *FAST, "--out", f["file"]], ["a-file", "is a file"]),
    "out below a file": (lambda f: [G, f["prompts"], *FAST, "--out", f["file"] / "sub"], ["a-file"]),
    # models
    "model unknown": (lambda f: [G, f["prompts"], *FAST, "--model", "bogus-model"], ["'bogus-model'"]),
    "model hub id not cached": (lambda f: [G, f["prompts"], *FAST, "--model", "nobody/nothing"],
                                ["'nobody/nothing'"]),
    "model folder without index": (lambda f: [I2V, IMAGE, *FAST, "--model", f["no_index"]], ["model_index.json"]),
    "model with custom code": (lambda f: [I2V, IMAGE, *FAST, "--model", f["custom_code"]], ["custom"]),
    "model missing a component": (lambda f: [I2V, IMAGE, *FAST, "--model", f["missing_part"]], ["'vae'"]),
    "model with truncated weights": (lambda f: [I2V, IMAGE, *FAST, "--model", f["cut_weights"]],
                                     ["diffusion_pytorch_model.safetensors", "truncated"]),
    "model with garbage weights": (lambda f: [I2V, IMAGE, *FAST, "--model", f["garbage_weights"]],
                                   ["safetensors"]),
    "model with truncated weights, 2 devices": (
        lambda f: [I2V, IMAGE, *FAST, *PARALLEL, "--model", f["cut_weights"]], ["truncated"]),
    "image model for generate": (lambda f: [G, f["prompts"], *FAST, "--model", "tiny-svd"], ["asyncvid i2v"]),
    "text model for i2v": (lambda f: [I2V, IMAGE, *FAST, "--model", "tiny-animatediff"], ["asyncvid generate"]),
    "motion adapter missing": (lambda f: [G, f["prompts"], *FAST, "--motion-adapter", f["folder"] / "nope"],
                               ["nope"]),
    "scheduler for continuous timesteps": (lambda f: [I2V, IMAGE, *FAST, "--scheduler", "dpm-solver"],
                                           ["dpm-solver", "--scheduler euler"]),
    # images
    "image missing": (lambda f: [I2V, f["folder"] / "nope.png", *FAST], ["nope.png", "does not exist"]),
    "image is a folder": (lambda f: [I2V, f["folder"], *FAST], ["a-folder", "folder"]),
    "image is text": (lambda f: [I2V, f["not_image"], *FAST], ["text.png", "not a readable image"]),
    "image truncated": (lambda f: [I2V, f["truncated"], *FAST], ["cut.png", "truncated"]),
    "image empty": (lambda f: [I2V, f["empty_image"], *FAST], ["empty.png"]),
    "image 1x1": (lambda f: [I2V, f["one_px"], *FAST], ["1x1", "8x8"]),
    "image 8000x8000": (lambda f: [I2V, f["huge"], *FAST], ["8000x8000", "downscale"]),
    "image missing argument": (lambda f: [I2V], ["IMAGE"]),
    "motion bucket 5000": (lambda f: [I2V, IMAGE, *FAST, "--motion-bucket-id", "5000"], ["5000", "127"]),
    "guidance range reversed": (lambda f: [I2V, IMAGE, *FAST, "--min-guidance", "5", "--max-guidance", "1"],
                                ["min 5.0"]),
    "noise augmentation negative": (lambda f: [I2V, IMAGE, *FAST, "--noise-aug-strength", "-1"], ["-1"]),
    "i2v shared noise 1.5": (lambda f: [I2V, IMAGE, *FAST, "--shared-noise", "1.5"],
                             ["shared noise", "got 1.5", "[0, 1]"]),
    "i2v noise mean negative": (lambda f: [I2V, IMAGE, *FAST, "--noise-mean", "-0.5"],
                                ["noise mean", "got -0.5", "--noise-mean 0"]),
    "decode chunk 0": (lambda f: [I2V, IMAGE, *FAST, "--decode-chunk-size", "0"], ["decode chunk"]),
    "motion adapter option for i2v": (lambda f: [I2V, IMAGE, *FAST, "--motion-adapter", "x"], ["--motion-adapter"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_creates_nothing(case, inputs, tmp_path, hf_cache):
    build, shown = CASES[case]
    args = build(inputs)
    out = tmp_path / "out"
    if "--out" not in args:
        args = [*args, "--out", out]
    assert_refused(invoke(*args), out, *shown)


def test_the_table_covers_at_least_sixty_inputs():
    assert len(CASES) >= 60


@pytest.mark.parametrize("args", [["plan", "--stages", "0"], ["plan", "--split", "bogus"], ["bench", "--size", "100"],
                                  ["bench", "--warmups", "abc"], ["bench", "--repeats", "0"]],
                         ids=["plan stages 0", "plan split", "bench size", "bench warmups", "bench repeats"])
def test_bad_plan_and_bench_options_are_one_line(args, tmp_path):
    result = invoke(*args)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert result.stderr.startswith("error: ")


SLOW_OK = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SLOW_OK
@given(data=st.binary(max_size=400))
def test_random_bytes_as_a_prompt_file_never_trace_back(data, tmp_path_factory):
    # With a model that does not exist, every prompt file is refused: by its own content, or then by the model.
    folder = tmp_path_factory.mktemp("random-prompts")
    prompts = folder / "prompts.txt"
    prompts.write_bytes(data)
    assert_refused(invoke(G, prompts, *FAST, "--model", folder / "no-model", "--out", folder / "out"),
                   folder / "out")


@SLOW_OK
@given(data=st.binary(max_size=2000))
def test_random_bytes_as_an_image_are_refused(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("random-image")
    image = folder / "image.png"
    image.write_bytes(data)
    assert_refused(invoke(I2V, image, *FAST, "--out", folder / "out"), folder / "out", "image.png")


@SLOW_OK
@given(data=st.binary(max_size=2000))
def test_random_bytes_as_weights_are_refused(data, inputs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("random-weights")
    model = shutil.copytree(EMBEDDED["tiny-svd"].source, folder / "model")
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(data)
    assert_refused(invoke(I2V, IMAGE, *FAST, "--model", model, "--out", folder / "out"), folder / "out",
                   "safetensors")


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "asyncvid"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "asyncvid.cli.app"]


def test_a_value_error_answers_in_under_a_second(tmp_path):
    """Checked before torch and diffusers are imported: a typo costs no model load."""
    command = [*_console_script(), "generate", str(SAMPLES / "prompt.txt"), "--steps", "0", "--out", str(tmp_path / "o")]
    times = []
    for _ in range(3):  # the fastest of three: this machine is shared
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        assert done.returncode == 2 and done.stderr.startswith("error: steps must be at least 1"), done.stderr
    assert min(times) < 1.0, times
    assert not (tmp_path / "o").exists()
