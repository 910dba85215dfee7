"""Random-weight diffusers pipelines written in the file layouts users have in their Hugging Face cache (SVD-xt, SD1.5,
AnimateDiff motion adapter v1-5-2), so loading code can be tested the way users hit it, without the hub."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import torch

REPOS = {
    "svd-xt": "stabilityai/stable-video-diffusion-img2vid-xt",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "motion-v152": "guoyww/animatediff-motion-adapter-v1-5-2",
}
FORMS = ("fp16", "plain", "sharded")
SCALES = ("full", "small")
SMALL_CHANNELS = [32, 64, 64, 64]
TOKENIZER = Path(__file__).resolve().parents[2] / "pipelines" / "weights" / "tiny-animatediff" / "tokenizer"

# The published configs, key for key as they are on the hub (diffusers fills newer keys with their defaults on load).
SVD_XT_UNET = {
    "_class_name": "UNetSpatioTemporalConditionModel", "_diffusers_version": "0.24.0.dev0",
    "addition_time_embed_dim": 256, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"], "in_channels": 8,
    "layers_per_block": 2, "num_attention_heads": [5, 10, 20, 20], "num_frames": 25, "out_channels": 4,
    "projection_class_embeddings_input_dim": 768, "sample_size": 96, "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
}
SVD_XT_VAE = {
    "_class_name": "AutoencoderKLTemporalDecoder", "_diffusers_version": "0.24.0.dev0",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "out_channels": 3, "sample_size": 768,
    "scaling_factor": 0.18215,
}
SVD_XT_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.24.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False, "sigma_max": 700.0,
    "sigma_min": 0.002, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "timestep_type": "continuous", "trained_betas": None, "use_karras_sigmas": True,
}
SVD_XT_FEATURE_EXTRACTOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SD15_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
SD15_FEATURE_EXTRACTOR = {
    "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}
MOTION_V152 = {
    "_class_name": "MotionAdapter", "_diffusers_version": "0.24.0.dev0", "block_out_channels": [320, 640, 1280, 1280],
    "conv_in_channels": None, "motion_layers_per_block": 2, "motion_max_seq_length": 32,
    "motion_mid_block_layers_per_block": 1, "motion_norm_num_groups": 32, "motion_num_attention_heads": 8,
    "use_motion_mid_block": True,
}
MODEL_INDEX = {
    "svd-xt": {
        "_class_name": "StableVideoDiffusionPipeline", "_diffusers_version": "0.24.0.dev0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
        "vae": ["diffusers", "AutoencoderKLTemporalDecoder"],
    },
    "sd15": {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
}
# Tiny CLIP towers: only the widths the pipelines read (projection_dim, hidden_size) are kept at their real values.
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=224,
                   patch_size=14)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                 max_position_embeddings=77)


def scaled(config: dict, scale: str) -> dict:
    """`config` as built at `scale`: "full" is the published config, "small" has narrow blocks of the same layout."""
    if scale == "full":
        return dict(config)
    small = dict(config, block_out_channels=list(SMALL_CHANNELS))
    if "num_attention_heads" in config and isinstance(config["num_attention_heads"], list):
        small["num_attention_heads"] = [2, 4, 4, 4]  # SVD: channels / heads must divide; 32/5 does not
    return small


def build(name: str, root: Path, *, form: str = "fp16", scale: str = "full", dtype=torch.float16, seed: int = 0,
          hub_cache: bool = True) -> Path:
    """Write `name` under `root` (an HF hub cache if hub_cache, else a plain folder); return the snapshot/folder."""
    if name not in REPOS:
        raise ValueError(f"unknown checkpoint {name!r}; expected one of {', '.join(REPOS)}")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {', '.join(FORMS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating torch dtype")
    dtype = torch.float16 if form == "fp16" else dtype
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    repo_id = REPOS[name]
    if not hub_cache and (root / repo_id.split("/")[1]).exists():
        raise FileExistsError(f"{root / repo_id.split('/')[1]} exists; build into an empty root")
    # Staged next to the destination, so moving files into blobs/ or the folder is a rename, not a copy.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        writer = _Writer(form=form, dtype=dtype, seed=seed)
        if name == "svd-xt":
            _svd_xt(staging, writer, scale)
        elif name == "sd15":
            _sd15(staging, writer, scale)
        else:
            writer.diffusers_model(staging, scaled(MOTION_V152, scale), shard=True)
        if not hub_cache:
            folder = root / repo_id.split("/")[1]
            staging.rename(folder)
            return folder
        commit = hashlib.sha1(f"{repo_id}|{form}|{scale}|{dtype}|{seed}".encode()).hexdigest()
        return _into_cache(staging, root, repo_id, commit)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _svd_xt(folder: Path, writer: _Writer, scale: str) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    _write_json(folder / "model_index.json", MODEL_INDEX["svd-xt"])
    writer.diffusers_model(folder / "unet", scaled(SVD_XT_UNET, scale), shard=True)
    # 4 blocks keep the VAE scale factor 8; its encoder and temporal decoder hard-code 32 norm groups, so 32 wide.
    writer.diffusers_model(folder / "vae", dict(SVD_XT_VAE, block_out_channels=[32] * 4, layers_per_block=1))
    # projection_dim is the UNet's cross_attention_dim (1024) at both scales: the image embedding feeds it.
    config = CLIPVisionConfig(**TINY_VISION, projection_dim=SVD_XT_UNET["cross_attention_dim"], hidden_act="gelu")
    writer.transformers_model(folder / "image_encoder", lambda: CLIPVisionModelWithProjection(config))
    _write_json(folder / "feature_extractor" / "preprocessor_config.json", SVD_XT_FEATURE_EXTRACTOR)
    _write_json(folder / "scheduler" / "scheduler_config.json", SVD_XT_SCHEDULER)


def _sd15(folder: Path, writer: _Writer, scale: str) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    _write_json(folder / "model_index.json", MODEL_INDEX["sd15"])
    writer.diffusers_model(folder / "unet", scaled(SD15_UNET, scale), shard=True)
    writer.diffusers_model(folder / "vae", dict(SD15_VAE, block_out_channels=[32] * 4, layers_per_block=1,
                                                norm_num_groups=8))
    shutil.copytree(TOKENIZER, folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    # hidden_size is the UNet's cross_attention_dim (768) at both scales: the prompt embedding feeds it.
    text = CLIPTextConfig(**dict(TINY_TEXT, hidden_size=SD15_UNET["cross_attention_dim"], num_attention_heads=12),
                          projection_dim=768, hidden_act="quick_gelu", **ids)
    writer.transformers_model(folder / "text_encoder", lambda: CLIPTextModel(text))
    checker = CLIPConfig(text_config=dict(TINY_TEXT, **ids), vision_config=TINY_VISION, projection_dim=32)
    writer.transformers_model(folder / "safety_checker", lambda: StableDiffusionSafetyChecker(checker))
    _write_json(folder / "feature_extractor" / "preprocessor_config.json", SD15_FEATURE_EXTRACTOR)
    _write_json(folder / "scheduler" / "scheduler_config.json", SD15_SCHEDULER)


class _Writer:
    """Writes model folders in one form: weight file names, variant and dtype as diffusers/transformers save them."""

    def __init__(self, *, form: str, dtype: torch.dtype, seed: int):
        self.form, self.dtype, self.seed = form, dtype, seed
        self.variant = "fp16" if form == "fp16" else None

    def diffusers_model(self, folder: Path, config: dict, shard: bool = False) -> None:
        """config.json plus random weights for the diffusers model class named in `config`; `shard`: split in the
        sharded form (the hub's large UNets and adapters are, the small VAEs are not)."""
        import diffusers
        from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
        from diffusers.utils.hub_utils import _add_variant
        from huggingface_hub import split_torch_state_dict_into_shards

        _write_json(folder / "config.json", config)
        with _empty_weights():
            model = getattr(diffusers, config["_class_name"]).from_config(config)
        state = {k: v for k, v in model.state_dict(keep_vars=True).items()}
        # The same file names and split diffusers' save_pretrained makes, computed on meta tensors of the stored dtype.
        name = _add_variant(SAFETENSORS_WEIGHTS_NAME, self.variant)
        sizes = {k: torch.empty(v.shape, dtype=self._dtype(v), device="meta") for k, v in state.items()}
        if shard and self.form == "sharded":
            total = sum(t.nbytes for t in sizes.values())
            max_shard = max(total // 3, max(t.nbytes for t in sizes.values()))  # a few shards at any scale
            split = split_torch_state_dict_into_shards(sizes, max_shard_size=max_shard,
                                                       filename_pattern=name.replace(".safetensors",
                                                                                     "{suffix}.safetensors"))
            files = split.filename_to_tensors
            index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
            _write_json(folder / _add_variant(SAFE_WEIGHTS_INDEX_NAME, self.variant), index)
        else:
            files = {name: list(state)}
        from safetensors.torch import save_file

        for filename, keys in files.items():  # one file's tensors in memory at a time
            tensors = {k: self._random(k, state[k]) for k in keys}
            save_file(tensors, folder / filename, metadata={"format": "pt"})
            del tensors

    def transformers_model(self, folder: Path, make) -> None:
        """A tiny transformers model, built for real from a seeded generator and saved with save_pretrained."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = make()
        model.to(self.dtype).save_pretrained(folder, variant=self.variant)

    def _dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.dtype if tensor.is_floating_point() else tensor.dtype

    def _random(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self._dtype(tensor)
        if tensor.device.type != "meta":  # persistent buffers (e.g. motion positional encodings): the module's values
            return tensor.detach().to(dtype).contiguous()
        init = getattr(tensor, "init_value", None)
        if init is not None:  # one-element parameters (SVD's time_mixer mix_factor): the module's own init value
            return init.to(dtype).reshape(tensor.shape)
        # One generator per tensor name: values do not depend on file order or sharding. CPU generators keep 32 bits
        # of the seed, so seed and name are hashed into 32 bits together.
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{name}".encode()))
        if tensor.ndim >= 2:  # std 1/sqrt(fan_in) keeps activations at unit scale layer to layer
            out = torch.randn(tensor.shape, generator=gen).div_(math.sqrt(tensor[0].numel()))
        elif name.endswith("bias"):
            out = torch.randn(tensor.shape, generator=gen).mul_(0.02)
        else:  # 1-D weights are norm scales
            out = torch.ones(tensor.shape)
        return out.to(dtype)


@contextlib.contextmanager
def _empty_weights():
    """Parameters go to the meta device as they are registered (no memory, no init), like accelerate's
    init_empty_weights; one-element parameters keep their init value, since modules give them meaningful defaults."""
    register = torch.nn.Module.register_parameter

    def register_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            meta = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            meta.init_value = param.detach().clone() if param.numel() == 1 else None
            module._parameters[name] = meta

    torch.nn.Module.register_parameter = register_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _into_cache(staging: Path, cache: Path, repo_id: str, commit: str) -> Path:
    """Move `staging`'s files into the hub cache layout: content-addressed blobs, a snapshot of relative symlinks."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    if snapshot.exists():
        shutil.rmtree(snapshot)
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        blob = blobs / _sha256(file)
        os.replace(file, blob)  # same content, same blob: replacing an existing one changes nothing
        link = snapshot / file.relative_to(staging)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # huggingface_hub writes it without a newline
    return snapshot


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> int:
    """Command line: build one checkpoint and print where it went and how big it is."""
    parser = argparse.ArgumentParser(prog="python -m asyncvid.bench.checkpoints", description=main.__doc__)
    parser.add_argument("name", help=f"one of {', '.join(REPOS)}")
    parser.add_argument("--root", required=True, type=Path, help="HF hub cache folder (or parent folder with --folder)")
    parser.add_argument("--form", default="fp16", help=f"one of {', '.join(FORMS)}")
    parser.add_argument("--scale", default="full", help=f"one of {', '.join(SCALES)}")
    parser.add_argument("--folder", action="store_true", help="write a plain folder instead of the hub cache layout")
    args = parser.parse_args(argv)
    try:
        path = build(args.name, args.root, form=args.form, scale=args.scale, hub_cache=not args.folder)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())  # stat follows the snapshot's symlinks
    print(f"{path}\t{size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
