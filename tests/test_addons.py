"""Add-ons people put on AnimateDiff and SVD pipelines, under asyncvid.parallelize on real gloo groups, each built
tiny in the test: warm-up = steps equals the same pipeline run sequentially bit for bit, and AsyncDiff's defaults
stay within the PSNR floor measured for it (docs/ASYNCDIFF.md lists the floors)."""

import math

import pytest
import torch
from diffusers import (
    AnimateDiffControlNetPipeline,
    AnimateDiffSDXLPipeline,
    AnimateDiffSparseControlNetPipeline,
    ControlNetModel,
    MotionAdapter,
    SparseControlNetModel,
    UNetMotionModel,
)
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from PIL import Image
from test_own_pipeline import STEPS, _build
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import asyncvid
from asyncvid.runtime import launch

CPU = torch.device("cpu")
EXACT = dict(stages=2, warmup=STEPS, cost="flops")  # warm-up = steps: the sequential forward, relayed
DEFAULTS = dict(stages=2, cost="flops")  # AsyncDiff's default warm-up and stale-input prediction
# PSNR (dB) of the defaults against sequential (decoded frames in [0, 1]) on these tiny models at 4 steps: measured
# (in the comment; tiny-animatediff r13, tiny-svd r7) on this 2-core CPU, the floor about 1 dB below. These requests
# sample diffusers' own independent noise; r13 was fine-tuned on zero-mean shared noise (docs/MODELS.md, round 38).
FLOOR = {"lora": 25.0, "lora-fused": 25.0,  # 25.9, 25.9 (r12: 29.4, r11: 28.7, r10: 33.0, r9: 28.9)
         "free-noise": 23.0, "svd": 53.0, "odd-size": 19.0,  # 24.2 (r12: 32.0), 54.0 (the default warm-up covers
         # most steps; tiny-svd r6 and r5: 54.3, r4: 57.9, r3: 70.1), 20.2 (r12: 27.6; r9 to r13 were trained at 64x64 only)
         "controlnet": 24.5, "sparsectrl": 24.0, "ip-adapter": 26.0,  # 25.4, 25.1, 27.3 (r12: 31.6, 31.4, 34.1)
         "freeu": 24.0, "sdxl": 39.0}  # 25.1, 40.1 (r12: 31.5, 40.1)


def _prompt(frames: int = 4, height: int = 64, width: int = 64) -> dict:
    return dict(prompt="a red circle moving left", guidance_scale=2.0, num_inference_steps=STEPS, num_frames=frames,
                height=height, width=width, output_type="pt")


def _controlnet_like(cls, unet, **extra):
    """A ControlNet (or SparseCtrl) shaped like `unet`'s down path, its zero-initialised output layers made random
    (as training leaves them), so that its residuals change the video."""
    torch.manual_seed(1)
    config = unet.config
    model = cls(block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
                cross_attention_dim=config.cross_attention_dim, norm_num_groups=config.norm_num_groups,
                conditioning_embedding_out_channels=(8, 8, 8, 8), attention_head_dim=8, **extra)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                param.normal_(0, 0.05)
    return model


def _ip_adapter(unet):
    """An IP-Adapter as load_ip_adapter leaves one (image projection, decoupled cross-attention), random weights."""
    torch.manual_seed(1)
    dim = unet.config.cross_attention_dim
    adapter, key = {}, 1
    for name in unet.attn_processors:  # the state dict's order: cross-attention layers numbered 1, 3, 5, ...
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        block = name.split(".")[0]
        index = int(name.split(".")[1]) if block != "mid_block" else -1
        channels = unet.config.block_out_channels
        hidden = channels[-1] if block == "mid_block" else (channels[index] if block == "down_blocks"
                                                            else channels[::-1][index])
        layer = IPAdapterAttnProcessor2_0(hidden_size=hidden, cross_attention_dim=dim, scale=1.0)
        adapter[f"{key}.to_k_ip.weight"] = layer.to_k_ip[0].weight.detach()
        adapter[f"{key}.to_v_ip.weight"] = layer.to_v_ip[0].weight.detach()
        key += 2
    proj = torch.nn.Linear(dim, 4 * dim)
    image_proj = {"proj.weight": proj.weight.detach(), "proj.bias": proj.bias.detach(),
                  "norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)}
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": adapter}])


def _sdxl():
    """AnimateDiffSDXLPipeline around a UNetMotionModel with SDXL's conditioning (two text encoders, pooled text and
    size embeddings), reusing the tiny model's VAE, tokenizer and scheduler."""
    base = _build("tiny-animatediff")
    torch.manual_seed(1)
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=766,
                max_position_embeddings=77, projection_dim=32)
    encoder, encoder_2 = CLIPTextModel(CLIPTextConfig(**text)), CLIPTextModelWithProjection(CLIPTextConfig(**text))
    unet = UNetMotionModel(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                           down_block_types=("DownBlockMotion", "CrossAttnDownBlockMotion"),
                           up_block_types=("CrossAttnUpBlockMotion", "UpBlockMotion"), cross_attention_dim=64,
                           num_attention_heads=4, use_linear_projection=True, addition_embed_type="text_time",
                           addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                           sample_size=8, motion_max_seq_length=32)
    pipe = AnimateDiffSDXLPipeline(vae=base.vae, text_encoder=encoder, text_encoder_2=encoder_2,
                                   tokenizer=base.tokenizer, tokenizer_2=base.tokenizer, unet=unet,
                                   motion_adapter=None, scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _setup(addon: str, on: bool, tiny_lora):
    """(pipeline, its call's arguments) with `addon` on, or present but switched off."""
    conditioning = [Image.new("RGB", (64, 64), (60 * i, 40, 0)) for i in range(4)]
    if addon == "svd":  # every call argument, and a size that is no multiple of 64 (latents of 10 x 6)
        image = Image.new("RGB", (64, 64), (200, 40, 40))
        return _build("tiny-svd"), dict(image=image, num_frames=4, height=80 if on else 64, width=48 if on else 64,
                                        num_inference_steps=STEPS,
                                        decode_chunk_size=2, motion_bucket_id=40 if on else 127,
                                        noise_aug_strength=0.1 if on else 0.02, fps=4 if on else 7,
                                        min_guidance_scale=1.5, max_guidance_scale=2.5, output_type="pt")
    if addon == "sdxl":  # with SDXL's size conditioning (time ids) off its defaults
        return _sdxl(), {**_prompt(), **(dict(original_size=(48, 48), crops_coords_top_left=(8, 0)) if on else {})}
    pipe = _build("tiny-animatediff")
    call = _prompt()
    if addon.startswith("lora") and on:
        pipe.load_lora_weights(tiny_lora, adapter_name="style")
        if addon == "lora-fused":
            pipe.fuse_lora(lora_scale=0.7)
        else:
            pipe.set_adapters(["style"], [0.7])
    elif addon == "free-noise":  # 8 frames in sliding windows of 4
        # FreeNoise reads the motion adapter's config; the tiny model's folder has its motion modules merged in.
        pipe.register_modules(motion_adapter=MotionAdapter(block_out_channels=pipe.unet.config.block_out_channels,
                                                           motion_norm_num_groups=8, motion_max_seq_length=32))
        if on:
            pipe.enable_free_noise(context_length=4, context_stride=2)
        call = _prompt(frames=8)
    elif addon == "odd-size":  # latents of 10 x 6: upsample sizes the UNet computes from its skips
        call = _prompt(height=80 if on else 64, width=48 if on else 64)
    elif addon == "controlnet":
        controlnet = _controlnet_like(ControlNetModel, pipe.unet,
                                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
        pipe = AnimateDiffControlNetPipeline(**{k: v for k, v in pipe.components.items() if k != "motion_adapter"},
                                             motion_adapter=None, controlnet=controlnet)
        call.update(conditioning_frames=conditioning, controlnet_conditioning_scale=1.0 if on else 0.0)
    elif addon == "sparsectrl":
        controlnet = _controlnet_like(SparseControlNetModel, pipe.unet,
                                      down_block_types=("CrossAttnDownBlockMotion",) * 3 + ("DownBlockMotion",),
                                      motion_max_seq_length=32)
        pipe = AnimateDiffSparseControlNetPipeline(
            **{k: v for k, v in pipe.components.items() if k != "motion_adapter"}, motion_adapter=None,
            controlnet=controlnet)
        call.update(conditioning_frames=conditioning[:2], controlnet_frame_indices=[0, 3],
                    controlnet_conditioning_scale=1.0 if on else 0.0)
    elif addon == "ip-adapter":
        _ip_adapter(pipe.unet)
        pipe.set_ip_adapter_scale(1.0 if on else 0.0)
        torch.manual_seed(2)
        call.update(ip_adapter_image_embeds=[torch.randn(2, 1, pipe.unet.config.cross_attention_dim)])
    elif addon == "freeu" and on:
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


def _frames(rank, addon: str, configs: list[dict], tiny_lora=None, on: bool = True) -> list[torch.Tensor]:
    """Build the pipeline with `addon`, then for each config: parallelize (none: sequential), sample, remove()."""
    pipe, call = _setup(addon, on, tiny_lora)
    out = []
    for config in configs:
        handle = None
        if config:
            handle = asyncvid.parallelize(pipe, asyncvid.AsyncDiffConfig(**config), num_frames=call["num_frames"],
                                          height=call["height"], width=call["width"], keep_weights=True)
        out.append(pipe(**call, generator=torch.Generator().manual_seed(3)).frames)
        if handle is not None:
            handle.remove()
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _addons_on_ranks(rank, addons: list[str], tiny_lora) -> dict[str, list[torch.Tensor]]:
    return {addon: _frames(rank, addon, [EXACT, DEFAULTS], tiny_lora) for addon in addons}


@pytest.fixture(scope="module")
def distributed(tiny_lora, one_launch_per_world):
    """An add-on's frames at full warm-up and at the defaults on 2 real ranks. Every add-on runs in the one launch
    (even under -k): starting the ranks costs about as much as an add-on's runs."""
    return one_launch_per_world(_addons_on_ranks, list(FLOOR), lambda addon: 2, tiny_lora)


@pytest.mark.parametrize("addon", list(FLOOR))
def test_addon_equals_sequential_at_full_warmup_and_stays_near_it_at_the_defaults(addon, tiny_lora, distributed):
    with launch.cpu_threads(1, CPU):
        reference, = _frames(None, addon, [{}], tiny_lora)
        off, = _frames(None, addon, [{}], tiny_lora, on=False)
    assert reference.shape != off.shape or not torch.equal(reference, off)  # the add-on is in effect
    exact, defaults = distributed(addon)
    assert torch.equal(exact, reference)
    print(f"{addon}: defaults {psnr(defaults, reference):.1f} dB from sequential")
    assert psnr(defaults, reference) >= FLOOR[addon]


def test_freeu_with_a_stage_boundary_inside_its_block_equals_sequential():
    """FreeU scales the up path's hidden state in place between units: the producing rank must send its unit's
    output as it was, not after its own copy of that code has scaled it (the consumer scales it once)."""
    with launch.cpu_threads(1, CPU):
        reference, = _frames(None, "freeu", [{}])
    inside = dict(EXACT, split=["up_blocks.1.resnets.1"])  # FreeU acts on up blocks 0 and 1
    exact, = launch.run(_frames, 2, CPU, "freeu", [inside], threads=1, oversubscribe=True)
    assert torch.equal(exact, reference)
