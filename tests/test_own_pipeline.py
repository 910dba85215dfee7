"""asyncvid.parallelize on a pipeline built with diffusers alone, as a user's script does under torchrun: on real gloo
groups, warm-up = steps equals the pipeline run sequentially bit for bit, the default schedule equals the oracle,
and remove() gives back the pipeline's own outputs."""

import warnings

import pytest
import torch
from diffusers import AnimateDiffPipeline, AnimateDiffVideoToVideoPipeline, StableVideoDiffusionPipeline
from PIL import Image

import asyncvid
from asyncvid.asyncdiff.oracle import apply_oracle
from asyncvid.asyncdiff.setup import flops_plan
from asyncvid.asyncdiff.weights import materialised_share
from asyncvid.pipelines import units_for
from asyncvid.pipelines.embedded import materialize
from asyncvid.runtime import launch
from asyncvid.video.images import load_image

CPU = torch.device("cpu")
STEPS = 4
SIZE = dict(num_frames=4, height=64, width=64, num_inference_steps=STEPS)


def _build(model: str):
    """The user's code: diffusers' own loader, no asyncvid."""
    cls = StableVideoDiffusionPipeline if model == "tiny-svd" else AnimateDiffPipeline
    pipe = cls.from_pretrained(materialize(model), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, image_path) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    if isinstance(pipe, StableVideoDiffusionPipeline):
        return pipe(load_image(image_path), generator=generator, output_type="latent", **SIZE).frames
    return pipe("a red circle moving left", guidance_scale=2.0, generator=generator, output_type="latent",
                **SIZE).frames


def _parallel(rank, model: str, image_path, config: dict, keep_weights: bool):
    """On every rank: build, parallelize, sample; then remove() and sample again. Rank 0 returns both, the weight
    share it held and any warning of remove()."""
    pipe = _build(model)
    handle = asyncvid.parallelize(pipe, asyncvid.AsyncDiffConfig(**config), num_frames=4, height=64, width=64,
                                  keep_weights=keep_weights)
    share = materialised_share(pipe.unet)
    staged = _call(pipe, image_path)
    assert torch.equal(_call(pipe, image_path), staged)  # a second call starts the schedule afresh
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle.remove()
    after = _call(pipe, image_path) if keep_weights else None
    return staged, after, share, [str(w.message) for w in caught]


def _sequential(model: str, image_path) -> torch.Tensor:
    with launch.cpu_threads(1, CPU):
        return _call(_build(model), image_path)


def _oracle(model: str, image_path, config: asyncvid.AsyncDiffConfig) -> torch.Tensor:
    with launch.cpu_threads(1, CPU):
        pipe = _build(model)
        family = units_for(pipe.unet)
        shape = {"frames": 4, "height": 64, "width": 64, "scale": pipe.vae_scale_factor}
        _, plan = flops_plan(pipe.unet, family, config, shape)
        apply_oracle(pipe.unet, family.build_program(pipe.unet), plan, config, pipe.scheduler)
        return _call(pipe, image_path)


EXACT = dict(stages=2, warmup=STEPS, cost="flops")  # warm-up = steps: the sequential forward, relayed
DEFAULTS = dict(stages=2, warmup=1, cost="flops")  # past warm-up the stages run on stale inputs


def _runs(rank, red_circle) -> dict:
    """The module's runs on 2 ranks by name, each a call not yet made."""
    return {
        "tiny-svd exact": lambda: _parallel(rank, "tiny-svd", red_circle, EXACT, False),
        "tiny-animatediff exact": lambda: _parallel(rank, "tiny-animatediff", red_circle, EXACT, False),
        "defaults, keep weights": lambda: _parallel(rank, "tiny-animatediff", red_circle, DEFAULTS, True),
        "defaults": lambda: _parallel(rank, "tiny-animatediff", red_circle, DEFAULTS, False),
        "free-init exact": lambda: _free_init(rank, EXACT),
        "video-to-video exact": lambda: _video_to_video(rank, EXACT),
        "video-to-video defaults": lambda: _video_to_video(rank, DEFAULTS),
    }


def _runs_on_ranks(rank, names: list[str], red_circle) -> dict:
    """The runs, one after another in one launch (starting the ranks costs more than a run)."""
    runs = _runs(rank, red_circle)
    return {name: runs[name]() for name in names}


@pytest.fixture(scope="module")
def on_ranks(red_circle, one_launch_per_world):
    return one_launch_per_world(_runs_on_ranks, list(_runs(None, red_circle)), lambda name: 2, red_circle)


@pytest.mark.parametrize("model", ["tiny-svd", "tiny-animatediff"])
def test_warmup_equal_to_steps_equals_the_pipeline(model, red_circle, on_ranks):
    staged, _, _, _ = on_ranks(f"{model} exact")
    assert torch.equal(staged, _sequential(model, red_circle))


@pytest.mark.parametrize("keep_weights", [True, False])
def test_default_schedule_equals_the_oracle_and_remove_restores_the_pipeline(keep_weights, red_circle, on_ranks):
    staged, after, share, caught = on_ranks("defaults, keep weights" if keep_weights else "defaults")
    reference = _sequential("tiny-animatediff", red_circle)
    assert torch.equal(staged, _oracle("tiny-animatediff", red_circle, asyncvid.AsyncDiffConfig(**DEFAULTS)))
    assert not torch.equal(staged, reference)  # past warm-up the stages run on stale inputs
    if keep_weights:
        assert torch.equal(after, reference) and share == 1.0 and not caught
    else:  # on the CPU the other stage's weights are dropped, and remove() says so
        assert share < 0.9 and len(caught) == 1 and "keep_weights=True" in caught[0]


def _free_init(rank, config: dict):
    """FreeInit runs the whole schedule twice within one pipeline call."""
    pipe = _build("tiny-animatediff")
    pipe.enable_free_init(num_iters=2)
    if config:
        asyncvid.parallelize(pipe, asyncvid.AsyncDiffConfig(**config), num_frames=4, height=64, width=64)
    return _call(pipe, None)


def test_free_init_loops_restart_the_schedule(on_ranks):
    with launch.cpu_threads(1, CPU):
        reference = _free_init(None, {})
    assert torch.equal(on_ranks("free-init exact"), reference)


def _video_to_video(rank, config: dict):
    """Video-to-video starts part way down the schedule (strength 0.5: the last 2 of 4 steps); called twice."""
    pipe = AnimateDiffVideoToVideoPipeline.from_pipe(_build("tiny-animatediff"))
    if config:
        asyncvid.parallelize(pipe, asyncvid.AsyncDiffConfig(**config), num_frames=4, height=64, width=64)
    video = [Image.new("RGB", (64, 64), (40 * i, 90, 200 - 40 * i)) for i in range(4)]
    calls = [pipe(video=video, prompt="a red circle moving left", strength=0.5, guidance_scale=2.0,
                  num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3), output_type="latent").frames
             for _ in range(2)]
    assert torch.equal(*calls)
    return calls[0]


def test_video_to_video_follows_the_part_of_the_schedule_it_runs(on_ranks):
    with launch.cpu_threads(1, CPU):
        reference = _video_to_video(None, {})
    assert torch.equal(on_ranks("video-to-video exact"), reference)
    # Past warm-up the second step runs as a parallel round, on stale inputs: not the sequential latents.
    assert not torch.equal(on_ranks("video-to-video defaults"), reference)


def test_refuses_without_a_process_group_and_a_second_time(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    pipe = _build("tiny-svd")
    with pytest.raises(asyncvid.UsageError, match="torchrun"):
        asyncvid.parallelize(pipe)
    with pytest.raises(asyncvid.UsageError, match="unet and a scheduler"):
        asyncvid.parallelize(object())
    with pytest.raises(asyncvid.UsageError, match="AsyncDiffConfig"):
        asyncvid.parallelize(pipe, asyncvid.ParaTAAConfig())


def _twice(rank):
    pipe = _build("tiny-svd")
    asyncvid.parallelize(pipe, asyncvid.AsyncDiffConfig(stages=1, cost="flops"))
    try:
        asyncvid.parallelize(pipe, asyncvid.AsyncDiffConfig(stages=1, cost="flops"))
    except asyncvid.UsageError as e:
        return str(e)


def test_refuses_a_pipeline_parallelized_already():
    assert "already" in launch.run(_twice, 1, CPU, threads=1)


def build_tiny_animatediff():
    """A notebook user's build function: top level in an importable module, so spawned workers can call it."""
    return _build("tiny-animatediff")


def test_load_takes_a_build_function_in_workers_and_in_process():
    config = asyncvid.AsyncDiffConfig(stages=2, warmup=STEPS, cost="flops")
    args = dict(num_frames=4, height=64, width=64, num_inference_steps=STEPS, guidance_scale=2.0, seed=3)
    with asyncvid.load(build_tiny_animatediff, devices=2, sampler=config, threads=1, oversubscribe=True) as pipe:
        staged = pipe.text_to_video("a red circle moving left", **args)
        assert staged.metadata["model"] == "test_own_pipeline.build_tiny_animatediff"
        assert len(staged.metadata["sampler"]["plan"]) == 2 and staged.metadata["sampler"]["bytes_sent_rank0"] > 0
    with asyncvid.load(build_tiny_animatediff, threads=1) as pipe:
        sequential = pipe.text_to_video("a red circle moving left", **args)
    assert (staged.frames == sequential.frames).all()


def test_load_refuses_build_functions_workers_cannot_import():
    config = asyncvid.AsyncDiffConfig(stages=2)
    with pytest.raises(asyncvid.UsageError, match="top level of a .py file"):
        asyncvid.load(lambda: _build("tiny-svd"), devices=2, sampler=config)
    with pytest.raises(asyncvid.UsageError, match="returned a object"):
        asyncvid.load(object)


def _traces(rank, model: str) -> list[int]:
    """How often the UNet is traced to attach AsyncDiff: by `parallelize`, then by the loader the CLI uses."""
    from asyncvid.asyncdiff import costs
    from asyncvid.runtime.loaders import ModelSpec, load_sampler

    counted = []
    real = costs.trace

    def counting(*args, **kwargs):
        counted[-1] += 1
        return real(*args, **kwargs)

    config = asyncvid.AsyncDiffConfig(stages=1, warmup=1, cost="flops")
    costs.trace, kept = counting, costs._TRACES
    costs._TRACES = {}  # one rank runs in this process, where other tests may have traced the model before
    try:
        counted.append(0)
        asyncvid.parallelize(_build(model), config, num_frames=4, height=64, width=64).remove()
        counted.append(0)
        load_sampler(rank, ModelSpec(model, config, dtype="float32", plan_shape=(4, 64, 64)))
    finally:
        costs.trace, costs._TRACES = real, kept
    return counted


def test_attaching_traces_the_unet_once_per_rank():
    """The program and the FLOPs plan come from one trace, and a second attach of the same architecture at the same
    shape in the process (the CLI's loader after `parallelize`) takes it as it is: a trace costs seconds per rank
    on a real UNet."""
    assert launch.run(_traces, 1, CPU, "tiny-svd", threads=1) == [1, 0]
