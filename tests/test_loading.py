"""Tests for loading models (asyncvid.pipelines, asyncvid.models.sources): exact save/load round trips, Stable Diffusion
base folders with a motion adapter, hub ids from the local cache, and one-line refusals of broken folders."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNetMotionModel,
)

from asyncvid.errors import UsageError
from asyncvid.pipelines import adapter_for, animatediff, load_pipeline, resolve_model, svd
from asyncvid.pipelines.tiny_models import (
    CHANNELS,
    DOWN_2D,
    LATENT_SIZE,
    UP_2D,
    build_tiny_animatediff,
    build_tiny_svd,
)
from asyncvid.requests import ImageToVideo, TextToVideo
from asyncvid.runtime.generate import sample

CPU = torch.device("cpu")
SMALL = dict(num_frames=4, height=64, width=64, num_inference_steps=2, seed=1)
BUILDERS = {"animatediff": build_tiny_animatediff, "svd": build_tiny_svd}


@dataclass
class Saved:
    """A pipeline built in code, the frames it generated, and the folder it was saved to."""

    pipe: object
    adapter: ModuleType
    request: object
    frames: np.ndarray
    folder: Path


def load(folder: Path, **kwargs):
    return load_pipeline(str(folder), device=CPU, dtype=torch.float32, **kwargs)


def build_generate_save(tmp_path_factory, family: str, adapter: ModuleType, request) -> Saved:
    pipe = BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    frames = sample(pipe, adapter, request).frames
    folder = tmp_path_factory.mktemp(f"saved-{family}")
    pipe.save_pretrained(folder, safe_serialization=True)
    return Saved(pipe, adapter, request, frames, folder)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    """A private copy of a saved folder, for a test that breaks it."""
    return Path(shutil.copytree(folder, tmp_path / "model"))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{what}: {key} differs"


@pytest.fixture(scope="module")
def saved_animatediff(tmp_path_factory) -> Saved:
    return build_generate_save(tmp_path_factory, "animatediff", animatediff, TextToVideo("a red circle", **SMALL))


@pytest.fixture(scope="module")
def saved_svd(tmp_path_factory, red_circle) -> Saved:
    return build_generate_save(tmp_path_factory, "svd", svd, ImageToVideo(red_circle, **SMALL))


@pytest.fixture(params=sorted(BUILDERS))
def saved(request) -> Saved:
    return request.getfixturevalue(f"saved_{request.param}")


# --- round trips and determinism ---------------------------------------------------------------------------------


def test_tiny_pipelines_generate_the_requested_frames(saved):
    assert saved.frames.shape == (4, 64, 64, 3)
    assert saved.frames.dtype == np.uint8
    assert saved.frames.std() > 0  # not a blank video


def test_save_and_load_round_trip_gives_identical_frames(saved):
    pipe, adapter, folder = load(saved.folder)
    assert folder == saved.folder
    assert adapter is saved.adapter
    assert type(pipe) is type(saved.pipe)
    assert pipe.unet.dtype == torch.float32
    frames = sample(pipe, adapter, saved.request).frames
    assert np.array_equal(frames, saved.frames)


def test_one_frame_svd_video_gets_the_min_guidance(saved_svd, red_circle):
    # Guidance ramps from min to max over the frames, so a single frame is sampled at min (here 1: no guidance).
    def one_frame(max_guidance):
        settings = dict(SMALL, num_frames=1, min_guidance_scale=1.0, max_guidance_scale=max_guidance)
        return sample(saved_svd.pipe, svd, ImageToVideo(red_circle, **settings))

    ramp, flat = one_frame(3.0), one_frame(1.0)
    assert ramp.frames.shape == (1, 64, 64, 3)
    assert np.array_equal(ramp.frames, flat.frames)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_building_twice_gives_identical_weights(family, request):
    first = request.getfixturevalue(f"saved_{family}").pipe
    second = BUILDERS[family]()
    modules = {name: m for name, m in first.components.items() if isinstance(m, torch.nn.Module)}
    assert {"unet", "vae"} <= modules.keys()
    for name, module in modules.items():
        assert_same_weights(module, second.components[name], name)


def test_the_build_seed_changes_the_weights_and_leaves_the_global_rng_alone(saved_svd):
    state = torch.random.get_rng_state()
    other = build_tiny_svd(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(other.unet.conv_in.weight, saved_svd.pipe.unet.conv_in.weight)


def test_embedded_model_is_materialized_under_asyncvid_home(asyncvid_home):
    folder = resolve_model("tiny-svd")
    assert folder.parent == asyncvid_home / "models"
    assert (folder / "model_index.json").is_file()
    assert adapter_for(folder) is svd
    assert resolve_model("tiny-svd") == folder  # the second call reuses the folder


# --- a Stable Diffusion base folder plus a motion adapter --------------------------------------------------------


@pytest.fixture(scope="module")
def sd_base_and_adapter(tmp_path_factory, saved_animatediff) -> tuple[Path, Path, StableDiffusionPipeline]:
    """A Stable Diffusion folder (2D UNet, SD's PNDM scheduler) and a motion adapter folder, from the tiny parts."""
    parts = saved_animatediff.pipe
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE, block_out_channels=CHANNELS, down_block_types=DOWN_2D, up_block_types=UP_2D,
            layers_per_block=2, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True)
    sd = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    root = tmp_path_factory.mktemp("sd-base")
    sd.save_pretrained(root / "sd", safe_serialization=True)
    parts.motion_adapter.save_pretrained(root / "adapter", safe_serialization=True)
    return root / "sd", root / "adapter", sd


def test_sd_folder_with_motion_adapter_loads_as_animatediff_with_ddim(sd_base_and_adapter, saved_animatediff):
    sd_folder, adapter_folder, sd = sd_base_and_adapter
    pipe, adapter, folder = load(sd_folder, motion_adapter=str(adapter_folder))
    assert adapter is animatediff
    assert type(pipe).__name__ == "AnimateDiffPipeline"
    assert isinstance(pipe.unet, UNetMotionModel)
    # AnimateDiff's sampler, not the base model's PNDM with scaled-linear betas.
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "linear"
    assert pipe.scheduler.config.clip_sample is False
    # The spatial weights come from the SD folder and the motion modules from the adapter folder.
    assert torch.equal(pipe.unet.conv_in.weight, sd.unet.conv_in.weight)
    assert_same_weights(
        pipe.unet.down_blocks[0].motion_modules, saved_animatediff.pipe.motion_adapter.down_blocks[0].motion_modules,
        "motion modules",
    )
    frames = sample(pipe, adapter, TextToVideo("a red circle", **SMALL)).frames
    assert frames.shape == (4, 64, 64, 3)
    assert frames.std() > 0


def test_sd_folder_without_motion_adapter_asks_for_one(sd_base_and_adapter):
    sd_folder, _, _ = sd_base_and_adapter
    with pytest.raises(UsageError, match="--motion-adapter") as info:
        load(sd_folder)
    assert "StableDiffusionPipeline" in str(info.value)


def test_pickle_only_motion_adapter_is_refused(sd_base_and_adapter, saved_animatediff, tmp_path):
    sd_folder, _, _ = sd_base_and_adapter
    adapter_folder = tmp_path / "adapter"
    saved_animatediff.pipe.motion_adapter.save_pretrained(adapter_folder, safe_serialization=False)
    assert not list(adapter_folder.glob("*.safetensors"))
    with pytest.raises(UsageError, match="pickle"):
        load(sd_folder, motion_adapter=str(adapter_folder))


def test_motion_adapter_is_refused_for_image_to_video(saved_svd, sd_base_and_adapter):
    _, adapter_folder, _ = sd_base_and_adapter
    with pytest.raises(UsageError, match="--motion-adapter applies to AnimateDiff"):
        load(saved_svd.folder, motion_adapter=str(adapter_folder))


# --- hub ids from the local Hugging Face cache -------------------------------------------------------------------


def add_to_hf_cache(cache: Path, repo_id: str, files: Path) -> Path:
    """Lay out `files` as the `main` snapshot of `repo_id` the way huggingface_hub's cache does; returns it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_to_its_snapshot_in_the_local_cache(hf_cache, saved_svd):
    snapshot = add_to_hf_cache(hf_cache, "org/name", saved_svd.folder)
    folder = resolve_model("org/name")
    assert folder.resolve() == snapshot.resolve()
    assert adapter_for(folder) is svd


def test_cached_hub_id_that_is_not_a_diffusers_folder_is_refused(hf_cache, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "README.md").write_text("only part of a download")
    add_to_hf_cache(hf_cache, "org/partial", partial)
    with pytest.raises(UsageError, match="'org/partial' in the local Hugging Face cache .* has no model_index.json"):
        resolve_model("org/partial")


def test_hub_id_missing_from_the_cache_is_refused_without_downloading(hf_cache):
    with pytest.raises(UsageError, match="'org/missing' is not in the local Hugging Face cache") as info:
        resolve_model("org/missing")
    assert "hf download org/missing" in str(info.value)


# --- broken folders ----------------------------------------------------------------------------------------------


def test_pickle_only_component_is_refused(saved_animatediff, tmp_path):
    folder = copy_of(saved_animatediff.folder, tmp_path)
    saved_animatediff.pipe.vae.save_pretrained(folder / "vae", safe_serialization=False)
    for weights in (folder / "vae").glob("*.safetensors"):
        weights.unlink()
    assert list((folder / "vae").glob("*.bin"))
    with pytest.raises(UsageError, match="only as pickle files") as info:
        load(folder)
    assert str(folder / "vae") in str(info.value)


def test_folder_missing_a_component_is_refused_by_name(saved_animatediff, tmp_path):
    folder = copy_of(saved_animatediff.folder, tmp_path)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(UsageError, match="missing component 'text_encoder'"):
        load(folder)


def test_folder_without_model_index_is_refused(saved_animatediff, tmp_path):
    folder = copy_of(saved_animatediff.folder, tmp_path)
    (folder / "model_index.json").unlink()
    with pytest.raises(UsageError, match="has no model_index.json"):
        load(folder)


def test_unsupported_pipeline_class_is_refused_by_name(saved_svd, tmp_path):
    folder = copy_of(saved_svd.folder, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="is a KandinskyPipeline; asyncvid supports"):
        load(folder)


def test_unknown_model_name_lists_the_embedded_ones():
    with pytest.raises(UsageError, match=r"'no-such-model' is not an embedded model \(tiny-animatediff, tiny-svd\)"):
        resolve_model("no-such-model")


# --- safe loading: safetensors only, never code from the folder --------------------------------------------------


class _RunsCode:
    """Unpickling this calls `open(marker, 'w')`: what a hostile pickle can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_pickles_beside_safetensors_are_never_read(family, request, tmp_path):
    import pickle

    folder = copy_of(request.getfixturevalue(f"saved_{family}").folder, tmp_path)
    marker = tmp_path / "pickle-ran"
    for component in ("unet", "vae"):
        (folder / component / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    pipe, _, _ = load(folder)
    assert pipe.unet is not None
    assert not marker.exists()


def test_allow_pickle_loads_pickle_only_weights_with_a_warning(saved_svd, tmp_path):
    from asyncvid.models.sources import check_components
    from asyncvid.requests import UsageWarning

    folder = copy_of(saved_svd.folder, tmp_path)
    saved_svd.pipe.unet.save_pretrained(folder / "unet", safe_serialization=False)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UsageError, match="only as pickle files .* --allow-pickle"):
        check_components(folder)
    with pytest.warns(UsageWarning, match=r"loading pickle weights .*unet.* can run code"):
        check_components(folder, allow_pickle=True)
    with pytest.raises(OSError):  # safetensors only by default, whatever the caller checked
        svd.load(folder, dtype=torch.float32)
    pipe = svd.load(folder, dtype=torch.float32, allow_pickle=True)
    assert_same_weights(pipe.unet, saved_svd.pipe.unet, "unet")


def _placement(rank, folder, adapter_folder):
    """Set AsyncDiff up on this one rank with the meta device standing in for a GPU: where each UNet tensor lands."""
    from asyncvid.asyncdiff.config import AsyncDiffConfig
    from asyncvid.asyncdiff.setup import setup_asyncdiff
    from asyncvid.pipelines import units_for

    staged = setup_asyncdiff(folder, adapter_for(folder), units_for, AsyncDiffConfig(stages=1, cost="flops"),
                             shape={"frames": 4, "height": 64, "width": 64}, device=torch.device("meta"),
                             dtype=torch.float32, motion_adapter=adapter_folder, settings={})
    unet = staged.pipe.unet
    return {name: t.device.type for name, t in [*unet.named_parameters(), *unet.named_buffers()]}


def test_asyncdiff_puts_every_unet_tensor_a_rank_holds_on_the_runs_device(sd_base_and_adapter):
    """The base-plus-adapter form fills only this stage's tensors of the assembled skeleton; what the rank keeps
    must then move to the run's device with the rest of the pipeline (it stayed on the CPU, so a GPU run failed).
    The meta device stands in for the GPU: every tensor must end up there."""
    from asyncvid.runtime import launch

    sd_folder, adapter_folder, _ = sd_base_and_adapter
    placement = launch.run(_placement, 1, torch.device("cpu"), sd_folder, adapter_folder, threads=1)
    elsewhere = {name: kind for name, kind in placement.items() if kind != "meta"}
    assert not elsewhere, f"{len(elsewhere)} UNet tensors not on the run's device, e.g. {next(iter(elsewhere))}"
