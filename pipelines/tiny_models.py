"""Tiny SVD and AnimateDiff pipelines with the real models' 4-level block structure and random weights.

Same layout as SVD-xt and SD1.5 + AnimateDiff (three cross-attention down blocks, a plain last down block, a plain
first up block, three cross-attention up blocks, two layers per block), so a split planned on them is meaningful for
the real ones, at a size where 25 steps of 8 frames at 64x64 take a few seconds on two CPU cores.
"""

from __future__ import annotations

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    EulerDiscreteScheduler,
    MotionAdapter,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from asyncvid.pipelines.clip_vocab import build_vocab

CHANNELS = (32, 64, 64, 64)
LATENT_SIZE = 8  # 64x64 frames through a 4-level VAE (factor 8)
DOWN_3D = ("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",)
UP_3D = ("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3
DOWN_2D = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
UP_2D = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def build_tiny_svd(seed: int = 0) -> StableVideoDiffusionPipeline:
    """SVD-xt's components and Euler scheduler (Karras sigmas, v-prediction), scaled down."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNetSpatioTemporalConditionModel(
            sample_size=LATENT_SIZE, block_out_channels=CHANNELS, down_block_types=DOWN_3D, up_block_types=UP_3D,
            layers_per_block=2, cross_attention_dim=32, num_attention_heads=(2, 4, 4, 4),
            addition_time_embed_dim=32, projection_class_embeddings_input_dim=96, num_frames=8,
        )
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=[32] * 4, down_block_types=["DownEncoderBlock2D"] * 4, latent_channels=4,
            layers_per_block=1, sample_size=64,
        )
        # SVD resizes the conditioning image to 224x224 before the CLIP vision tower.
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=224, patch_size=32,
        ))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )
    return StableVideoDiffusionPipeline(
        unet=unet.eval(), vae=vae.eval(), image_encoder=image_encoder.eval(), scheduler=scheduler,
        feature_extractor=CLIPImageProcessorPil(size=224, crop_size=224),
    )


def build_tiny_animatediff(seed: int = 0, *, text_layers: int = 2, text_positions: bool = True) -> AnimateDiffPipeline:
    """SD1.5 + motion adapter v1-5-2 components with AnimateDiff's DDIM settings, scaled down.

    `text_layers` is the text encoder's depth and `text_positions=False` zeroes its position embeddings (training
    variants: asyncvid/training/animatediff.py)."""
    vocab, merges = build_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE, block_out_channels=CHANNELS, down_block_types=DOWN_2D, up_block_types=UP_2D,
            layers_per_block=2, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        )
        motion_adapter = MotionAdapter(
            block_out_channels=CHANNELS, motion_layers_per_block=2, motion_norm_num_groups=8,
            motion_num_attention_heads=2, motion_max_seq_length=32,
        )
        vae = AutoencoderKL(
            block_out_channels=[32] * 4, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=8, layers_per_block=1,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_hidden_layers=text_layers, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ))
        if not text_positions:
            text_encoder.get_submodule("embeddings.position_embedding").weight.data.zero_()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False, steps_offset=1,
        timestep_spacing="linspace",
    )
    return AnimateDiffPipeline(
        unet=unet.eval(), motion_adapter=motion_adapter.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
        tokenizer=tokenizer, scheduler=scheduler,
    )
