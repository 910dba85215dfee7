"""Models as users download them (asyncvid.bench.checkpoints: the published architectures in their hub file layouts,
random weights): every sampler through the CLI on each form (fp16 variant only, plain, sharded), SVD-xt and a Stable
Diffusion base folder with its safety checker plus a motion adapter; AsyncDiff at warm-up = steps equals sequential.
The UNets here are the published configs at reduced width; test_full_size.py runs them at full size."""

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from asyncvid.bench.checkpoints import REPOS, build
from asyncvid.cli.app import app
from asyncvid.video.writers import read_png_frames

pytestmark = pytest.mark.slow
FAST = ["--steps", "2", "--frames", "4", "--height", "64", "--width", "64", "--format", "png", "--threads", "1"]
SAMPLERS = {"sequential": [], "asyncdiff": ["--sampler", "asyncdiff", "--devices", "2", "--warmup", "2"],
            "parataa": ["--sampler", "parataa", "--devices", "2"]}
SVD, SD, MOTION = REPOS["svd-xt"], REPOS["sd15"], REPOS["motion-v152"]


def use_cache(mp: pytest.MonkeyPatch, cache: Path) -> None:
    """Point huggingface_hub (read once at import, so its constants too) and the CLI's workers at `cache`."""
    import huggingface_hub.constants

    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module", params=["fp16", "plain", "sharded"])
def hub(request, tmp_path_factory):
    """A hub cache holding the three repos in one form, in use for the module's tests."""
    cache = tmp_path_factory.mktemp(f"hub-{request.param}")
    for name in REPOS:
        build(name, cache, form=request.param, scale="small")
    with pytest.MonkeyPatch.context() as mp:
        use_cache(mp, cache)
        yield request.param


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def frames_of(out: Path) -> np.ndarray:
    (video,) = [p for p in out.iterdir() if p.is_dir()]
    return read_png_frames(video)


def run_all(command: list, out: Path) -> dict[str, np.ndarray]:
    results = {}
    for name, sampler in SAMPLERS.items():
        result = invoke(*command, *FAST, *sampler, "--out", out / name)
        assert result.exit_code == 0, f"{name}: {result.output}"
        results[name] = frames_of(out / name)
    return results


def test_svd_xt_every_sampler(hub, red_circle, tmp_path):
    frames = run_all(["i2v", red_circle, "--model", SVD], tmp_path)
    assert all(f.shape == (4, 64, 64, 3) for f in frames.values())
    np.testing.assert_array_equal(frames["asyncdiff"], frames["sequential"])
    if hub != "fp16":
        return  # the forms differ in their files, not in what the UNet computes: the check below once is enough
    # The equality is not for want of a UNet that matters: with stale activations (warm-up 1) the frames move.
    stale = invoke("i2v", red_circle, "--model", SVD, *FAST, *SAMPLERS["asyncdiff"], "--warmup", "1",
                   "--out", tmp_path / "stale")
    assert stale.exit_code == 0, stale.output
    assert not np.array_equal(frames_of(tmp_path / "stale"), frames["sequential"])


def test_sd_base_with_safety_checker_plus_adapter_every_sampler(hub, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n")
    frames = run_all(["generate", prompts, "--model", SD, "--motion-adapter", MOTION], tmp_path)
    assert all(f.shape == (4, 64, 64, 3) for f in frames.values())
    np.testing.assert_array_equal(frames["asyncdiff"], frames["sequential"])


def test_what_is_decided_for_the_user_is_said_once(hub, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n")
    result = invoke("generate", prompts, "--model", SD, "--motion-adapter", MOTION, *FAST, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    safety = [line for line in lines if "safety_checker" in line]
    assert safety == [f"warning: '{SD}' has a safety_checker (StableDiffusionSafetyChecker), which "
                      f"AnimateDiffPipeline does not take: it is not loaded"]
    variant = [line for line in lines if "variant" in line]
    if hub == "fp16":  # the only form there: chosen, said once for each folder
        assert variant == [f"warning: '{SD}' has only the fp16 variant of its weights; loading it (--variant fp16 "
                           f"says so and hides this line)",
                           f"warning: '{MOTION}' has only the fp16 variant of its weights; loading it (--variant "
                           f"fp16 says so and hides this line)"]
        quiet = invoke("generate", prompts, "--model", SD, "--motion-adapter", MOTION, *FAST, "--variant", "fp16",
                       "--out", tmp_path / "o2")
        assert quiet.exit_code == 0 and "has only" not in quiet.output, quiet.output
    else:
        assert variant == []


def test_a_variant_that_is_not_there_fails_in_one_line(hub, red_circle, tmp_path):
    asked = "bf16" if hub == "fp16" else "fp16"
    result = invoke("i2v", red_circle, "--model", SVD, *FAST, "--variant", asked, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: variant '{asked}' is not in ") and "it has: " in line, line
    assert not (tmp_path / "o").exists()


def test_fp16_variant_chosen_beside_plain_files(tmp_path, red_circle):
    """A download with both forms loads the plain files by default and the fp16 ones when asked: they differ."""
    import json

    cache = tmp_path / "hub"
    plain = build("svd-xt", cache, form="plain", scale="small", dtype=torch.float32)
    half = build("svd-xt", tmp_path / "half", form="fp16", scale="small", hub_cache=False)
    for component in ("unet", "vae", "image_encoder"):
        for path in (half / component).glob("*.safetensors"):
            (plain / component / path.name).symlink_to(path)
    assert json.loads((plain / "model_index.json").read_text())["_class_name"] == "StableVideoDiffusionPipeline"
    outs = {}
    for name, extra in (("plain", []), ("fp16", ["--variant", "fp16"])):
        result = invoke("i2v", red_circle, "--model", plain, *FAST, *extra, "--out", tmp_path / name)
        assert result.exit_code == 0 and "warning" not in result.output, result.output
        outs[name] = frames_of(tmp_path / name)
    assert not np.array_equal(outs["plain"], outs["fp16"])  # float16-rounded weights: other frames


def test_base_plus_adapter_unet_equals_diffusers_merge_and_keeps_no_adapter(tmp_path):
    """The UNet assembled on the meta device and filled from the two folders' files holds exactly the tensors
    diffusers' own merge (AnimateDiffPipeline with a MotionAdapter) gives; the adapter is not kept."""
    from diffusers import AnimateDiffPipeline, MotionAdapter

    from asyncvid.pipelines import animatediff

    sd = build("sd15", tmp_path, form="sharded", scale="small", hub_cache=False)
    motion = build("motion-v152", tmp_path, form="plain", scale="small", hub_cache=False)
    pipe = animatediff.load(sd, dtype=torch.float32, motion_adapter=motion)
    assert pipe.components["motion_adapter"] is None
    reference = AnimateDiffPipeline.from_pretrained(sd, motion_adapter=MotionAdapter.from_pretrained(motion),
                                                    dtype=torch.float32).unet
    ours, theirs = pipe.unet.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"
    assert dict(pipe.unet.config) == dict(reference.config)


def test_planning_reads_no_weights(tmp_path, monkeypatch):
    """`asyncvid plan` (and a run's own planning) on a base model plus adapter reads configs only."""
    import safetensors

    from asyncvid.runtime.loaders import describe_plan

    sd = build("sd15", tmp_path, form="fp16", scale="small", hub_cache=False)
    motion = build("motion-v152", tmp_path, form="fp16", scale="small", hub_cache=False)

    def no_weights(*args, **kwargs):
        raise AssertionError("planning opened a weights file")

    monkeypatch.setattr(safetensors, "safe_open", no_weights)
    monkeypatch.setattr("asyncvid.asyncdiff.weights.read_tensors", no_weights)
    monkeypatch.setattr("safetensors.torch.load_file", no_weights)
    monkeypatch.setattr("asyncvid.models.sources.check_safetensors", lambda path: None)
    text = describe_plan(str(sd), 2, motion_adapter=str(motion), frames=4, height=64, width=64)
    assert "UNetMotionModel" in text and "2 stages" in text


def test_components_in_different_forms_fail_in_one_line(tmp_path, red_circle):
    svd = build("svd-xt", tmp_path, form="plain", scale="small", hub_cache=False)
    weights = svd / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))  # the UNet in fp16, the rest plain
    result = invoke("i2v", red_circle, "--model", svd, *FAST, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: the components of '{svd}' have no form of safetensors weights in common (")
    assert "unet: 'fp16' variant" in line and "vae: plain (no variant)" in line, line
    assert not (tmp_path / "o").exists()


def test_a_pia_style_adapter_is_refused_in_one_line(tmp_path):
    import json

    from asyncvid.errors import UsageError
    from asyncvid.pipelines import animatediff

    sd = build("sd15", tmp_path, form="fp16", scale="small", hub_cache=False)
    motion = build("motion-v152", tmp_path, form="fp16", scale="small", hub_cache=False)
    config = json.loads((motion / "config.json").read_text())
    (motion / "config.json").write_text(json.dumps({**config, "conv_in_channels": 9}))
    with pytest.raises(UsageError, match=r"brings its own conv_in \(a PIA-style adapter, conv_in_channels=9\)"):
        animatediff.unet_skeleton(sd, motion)


def test_tensors_read_without_mapping_equal_safetensors_own(tmp_path):
    from safetensors.torch import load_file, save_file

    from asyncvid.asyncdiff.weights import read_tensors

    tensors = {"a.weight": torch.randn(3, 5), "b.half": torch.randn(7).half(), "c.bf16": torch.randn(2, 2).bfloat16(),
               "d.int": torch.arange(6).reshape(2, 3), "e.empty": torch.zeros(0, 4), "f.flag": torch.tensor([True])}
    path = tmp_path / "w.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    ours, theirs = dict(read_tensors(path, lambda name: True)), load_file(path)
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name
    assert list(dict(read_tensors(path, lambda name: name.startswith("b")))) == ["b.half"]


@pytest.mark.parametrize("names, expected", [
    (["diffusion_pytorch_model.safetensors"], {None}),
    (["diffusion_pytorch_model.fp16.safetensors"], {"fp16"}),
    (["model.fp16-00001-of-00002.safetensors", "model.safetensors.index.fp16.json"], {"fp16"}),
    # the older names diffusers still reads
    (["diffusion_pytorch_model-00001-of-00002.fp16.safetensors", "diffusion_pytorch_model.safetensors.fp16.index.json"],
     {"fp16"}),
    (["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model.safetensors.index.json",
      "diffusion_pytorch_model.bf16.safetensors"], {None, "bf16"}),
    (["config.json", "diffusion_pytorch_model.bin"], set()),
])
def test_forms_of_a_component_by_file_name(tmp_path, names, expected):
    from asyncvid.models.variants import forms

    for name in names:
        (tmp_path / name).touch()
    assert forms(tmp_path) == expected


def test_a_truncated_file_is_named_not_read_as_zeros(tmp_path):
    from safetensors.torch import save_file

    from asyncvid.asyncdiff.weights import read_tensors
    from asyncvid.errors import UsageError

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64), "b": torch.ones(64)}, path)
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(UsageError, match=r"ends inside tensor 'b': it is truncated"):
        dict(read_tensors(path, lambda name: True))


def test_a_variant_without_safetensors_fails_in_one_line(tmp_path):
    from asyncvid.errors import UsageError
    from asyncvid.models.variants import choose

    with pytest.raises(UsageError, match=r"--variant fp16 chooses among safetensors files, but '.*' has none"):
        choose(tmp_path, [], "fp16")


def test_plan_and_runs_take_the_variant_where_a_download_has_two(tmp_path, red_circle):
    import shutil

    svd = build("svd-xt", tmp_path, form="fp16", scale="small", hub_cache=False)
    for path in list(svd.glob("*/*.fp16.safetensors")):
        shutil.copy(path, path.with_name(path.name.replace(".fp16.", ".bf16.")))
    unsure = invoke("plan", "--model", svd, "--frames", "4", "--height", "64", "--width", "64")
    assert unsure.exit_code == 2
    assert unsure.output.strip().endswith("has the weights as variants bf16, fp16 and no plain files; choose one "
                                          "with --variant bf16"), unsure.output
    told = invoke("plan", "--model", svd, "--variant", "fp16", "--frames", "4", "--height", "64", "--width", "64")
    assert told.exit_code == 0, told.output
    run = invoke("i2v", red_circle, "--model", svd, *FAST, *SAMPLERS["asyncdiff"], "--variant", "fp16",
                 "--out", tmp_path / "o")
    assert run.exit_code == 0, run.output


def test_plans_sample_at_the_latent_the_vae_makes(tmp_path):
    """A 2-block VAE shrinks frames by 2, not 8: the split is planned (and its tensors sized) at that latent."""
    import json

    from asyncvid.pipelines import adapter_for, latent_shape, resolve_model, unet_inputs

    folder = resolve_model("tiny-svd")
    unet = adapter_for(folder).unet_skeleton(folder)
    two = tmp_path / "two-block"
    (two / "vae").mkdir(parents=True)
    config = json.loads((folder / "vae" / "config.json").read_text())
    (two / "vae" / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 32]}))
    for model, side in ((folder, 8), (two, 32)):
        shape = latent_shape(model, 2, 64, 64)
        with torch.device("meta"):
            sample = unet_inputs.SVD.example_inputs(unet, **shape)[0][0]
        assert tuple(sample.shape[-2:]) == (side, side), model
