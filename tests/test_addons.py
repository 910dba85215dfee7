"""Add-ons people put on AnimateDiff and SVD pipelines, under asyncvid.parallelize on real gloo groups: each either
runs (warm-up = steps equals the same pipeline run sequentially, bit for bit) or is refused in one line on every
rank (docs/ASYNCDIFF.md says why)."""

import pytest
import torch
from diffusers import AnimateDiffControlNetPipeline, ControlNetModel, MotionAdapter
from PIL import Image
from test_own_pipeline import STEPS, _build

import asyncvid
from asyncvid.runtime import launch

CPU = torch.device("cpu")
PROMPT = dict(prompt="a red circle moving left", guidance_scale=2.0, num_inference_steps=STEPS, height=64, width=64,
              output_type="latent")


def _with_addon(rank, addon: str, config: dict, tiny_lora=None):
    """Build the tiny AnimateDiff pipeline, put `addon` on it, parallelize it (unless `config` is empty), sample."""
    pipe = _build("tiny-animatediff")
    frames = 4
    if addon.startswith("lora"):
        pipe.load_lora_weights(tiny_lora, adapter_name="style")
        if addon == "lora-fused":
            pipe.fuse_lora(lora_scale=0.7)
        else:
            pipe.set_adapters(["style"], [0.7])
    elif addon == "free-noise":  # 8 frames in sliding windows of 4
        # FreeNoise reads the motion adapter's config; the tiny model's folder has its motion modules merged in.
        pipe.register_modules(motion_adapter=MotionAdapter(block_out_channels=pipe.unet.config.block_out_channels,
                                                           motion_norm_num_groups=8, motion_max_seq_length=32))
        pipe.enable_free_noise(context_length=4, context_stride=2)
        frames = 8
    if config:
        asyncvid.parallelize(pipe, asyncvid.AsyncDiffConfig(**config), num_frames=frames, height=64, width=64)
    return pipe(num_frames=frames, generator=torch.Generator().manual_seed(3), **PROMPT).frames


@pytest.mark.parametrize("addon", ["lora", "lora-fused", "free-noise"])
def test_addon_with_warmup_equal_to_steps_equals_sequential(addon, tiny_lora):
    with launch.cpu_threads(1, CPU):
        reference = _with_addon(None, addon, {}, tiny_lora)
        plain = _with_addon(None, "none", {})
    assert not torch.equal(reference, plain)  # the add-on changes the video
    staged = launch.run(_with_addon, 2, CPU, addon, dict(stages=2, warmup=STEPS, cost="flops"), tiny_lora,
                        threads=1, oversubscribe=True)
    assert torch.equal(staged, reference)


def _svd_with_every_argument(rank, config: dict):
    pipe = _build("tiny-svd")
    if config:
        asyncvid.parallelize(pipe, asyncvid.AsyncDiffConfig(**config), num_frames=4, height=64, width=64)
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    return pipe(image, num_frames=4, height=64, width=64, num_inference_steps=STEPS, decode_chunk_size=2,
                motion_bucket_id=40, noise_aug_strength=0.1, fps=4, min_guidance_scale=1.5, max_guidance_scale=2.5,
                generator=torch.Generator().manual_seed(3), output_type="pt").frames


def test_svd_call_arguments_with_warmup_equal_to_steps_equal_sequential():
    with launch.cpu_threads(1, CPU):
        reference = _svd_with_every_argument(None, {})
    staged = launch.run(_svd_with_every_argument, 2, CPU, dict(stages=2, warmup=STEPS, cost="flops"), threads=1,
                        oversubscribe=True)
    assert torch.equal(staged, reference)


def _controlnet(rank):
    """AnimateDiffControlNetPipeline with a tiny ControlNet shaped like the tiny UNet's down path."""
    base = _build("tiny-animatediff")
    unet = base.unet.config
    torch.manual_seed(0)
    controlnet = ControlNetModel(block_out_channels=unet.block_out_channels, layers_per_block=unet.layers_per_block,
                                 cross_attention_dim=unet.cross_attention_dim, norm_num_groups=unet.norm_num_groups,
                                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                 conditioning_embedding_out_channels=(8, 8, 8, 8), attention_head_dim=8)
    pipe = AnimateDiffControlNetPipeline(**{k: v for k, v in base.components.items() if k != "motion_adapter"},
                                         motion_adapter=None, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    asyncvid.parallelize(pipe, asyncvid.AsyncDiffConfig(stages=2, cost="flops"), num_frames=4, height=64, width=64)
    conditioning = [Image.new("RGB", (64, 64), (30 * i, 0, 0)) for i in range(4)]
    try:
        pipe(num_frames=4, conditioning_frames=conditioning, generator=torch.Generator().manual_seed(3), **PROMPT)
    except asyncvid.UsageError as e:
        return str(e)


def test_controlnet_is_refused_on_every_rank_in_one_line():
    said = launch.run(_controlnet, 2, CPU, threads=1, oversubscribe=True)
    assert said.startswith("ControlNet residuals are not supported") and "\n" not in said


def _ip_adapter_like(rank):
    """A UNet set up as load_ip_adapter leaves it (image projection in encoder_hid_proj), without the download."""
    pipe = _build("tiny-animatediff")
    pipe.unet.encoder_hid_proj = torch.nn.Identity()
    pipe.unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    try:
        asyncvid.parallelize(pipe, asyncvid.AsyncDiffConfig(stages=2, cost="flops"), num_frames=4, height=64,
                             width=64)
    except asyncvid.UsageError as e:
        return str(e)


def test_ip_adapter_is_refused_before_any_collective():
    said = launch.run(_ip_adapter_like, 2, CPU, threads=1, oversubscribe=True)
    assert said.startswith("IP-Adapter image embeddings are not supported")


def _free_u(rank):
    pipe = _build("tiny-animatediff")
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        asyncvid.parallelize(pipe, asyncvid.AsyncDiffConfig(stages=2, cost="flops"), num_frames=4, height=64,
                             width=64)
    except asyncvid.UsageError as e:
        return str(e)


def test_freeu_is_refused_before_any_collective():
    said = launch.run(_free_u, 2, CPU, threads=1, oversubscribe=True)
    assert said.startswith("FreeU is enabled")
