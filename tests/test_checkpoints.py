"""The random-weight hub checkpoints (asyncvid.bench.checkpoints): cache layout, file names per form, loading with
diffusers, published configs, determinism. All at scale="small"; test_full_size.py samples the full-size SVD-xt."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from asyncvid.bench import checkpoints
from asyncvid.bench.checkpoints import REPOS, build

SVD_SMALL = ["feature_extractor/preprocessor_config.json", "image_encoder/config.json", "model_index.json",
             "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json"]
SD15_SMALL = ["feature_extractor/preprocessor_config.json", "model_index.json", "safety_checker/config.json",
              "scheduler/scheduler_config.json", "text_encoder/config.json", "tokenizer/tokenizer.json",
              "tokenizer/tokenizer_config.json", "unet/config.json", "vae/config.json"]
SHARDS = [f"diffusion_pytorch_model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
WEIGHTS = {  # the weight files each form writes, per model folder
    "fp16": {"diffusers": ["diffusion_pytorch_model.fp16.safetensors"], "transformers": ["model.fp16.safetensors"],
             "sharded": ["diffusion_pytorch_model.fp16.safetensors"]},
    "plain": {"diffusers": ["diffusion_pytorch_model.safetensors"], "transformers": ["model.safetensors"],
              "sharded": ["diffusion_pytorch_model.safetensors"]},
    "sharded": {"diffusers": ["diffusion_pytorch_model.safetensors"], "transformers": ["model.safetensors"],
                "sharded": SHARDS + ["diffusion_pytorch_model.safetensors.index.json"]},
}


def expected_files(name, form):
    w = WEIGHTS[form]
    if name == "svd-xt":
        folders = {"unet": "sharded", "vae": "diffusers", "image_encoder": "transformers"}
        base = SVD_SMALL
    elif name == "sd15":
        folders = {"unet": "sharded", "vae": "diffusers", "text_encoder": "transformers",
                   "safety_checker": "transformers"}
        base = SD15_SMALL
    else:
        return sorted(["config.json"] + w["sharded"])
    return sorted(base + [f"{folder}/{f}" for folder, kind in folders.items() for f in w[kind]])


def files(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def published(config, scale="small"):
    return {k: v for k, v in checkpoints.scaled(config, scale).items() if not k.startswith("_")}


@pytest.mark.parametrize("name", list(REPOS))
@pytest.mark.parametrize("form", ["fp16", "plain", "sharded"])
def test_cache_layout_and_files(hf_cache, name, form):
    from huggingface_hub import snapshot_download

    snapshot = build(name, hf_cache, form=form, scale="small")
    assert snapshot_download(REPOS[name], local_files_only=True) == str(snapshot)
    assert files(snapshot) == expected_files(name, form)
    repo = hf_cache / f"models--{REPOS[name].replace('/', '--')}"
    assert (repo / "refs" / "main").read_text() == snapshot.name and len(snapshot.name) == 40
    for link in (p for p in snapshot.rglob("*") if p.is_file()):
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve().parent == (repo / "blobs").resolve()
    weights = [p for p in snapshot.rglob("*.safetensors")]
    dtypes = {t.dtype for p in weights for t in load_file(p).values() if t.is_floating_point()}
    assert dtypes == {torch.float16}


def test_plain_folder_and_dtype(tmp_path):
    folder = build("motion-v152", tmp_path, form="plain", scale="small", dtype=torch.float32, hub_cache=False)
    assert folder == tmp_path / "animatediff-motion-adapter-v1-5-2" and not folder.is_symlink()
    assert files(folder) == expected_files("motion-v152", "plain")
    assert {t.dtype for t in load_file(folder / "diffusion_pytorch_model.safetensors").values()} == {torch.float32}
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no staging folder left behind


@pytest.mark.parametrize("form", ["fp16", "plain", "sharded"])
def test_diffusers_loads_each_form(tmp_path, form):
    from diffusers import AnimateDiffPipeline, MotionAdapter, StableDiffusionPipeline, StableVideoDiffusionPipeline

    kw = dict(variant="fp16") if form == "fp16" else {}
    svd = StableVideoDiffusionPipeline.from_pretrained(build("svd-xt", tmp_path, form=form, scale="small"),
                                                       torch_dtype=torch.float32, **kw)
    assert {k: svd.unet.config[k] for k in published(checkpoints.SVD_XT_UNET)} == published(checkpoints.SVD_XT_UNET)
    assert svd.vae_scale_factor == 8 and svd.image_encoder.config.projection_dim == 1024
    sd_path = build("sd15", tmp_path, form=form, scale="small")
    sd = StableDiffusionPipeline.from_pretrained(sd_path, torch_dtype=torch.float32, **kw)
    assert {k: sd.unet.config[k] for k in published(checkpoints.SD15_UNET)} == published(checkpoints.SD15_UNET)
    assert type(sd.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    assert sd.text_encoder.config.hidden_size == sd.unet.config.cross_attention_dim == 768
    assert sd.text_encoder.config.vocab_size == len(sd.tokenizer)
    adapter = MotionAdapter.from_pretrained(build("motion-v152", tmp_path, form=form, scale="small"),
                                            torch_dtype=torch.float32, **kw)
    assert {k: adapter.config[k] for k in published(checkpoints.MOTION_V152)} == published(checkpoints.MOTION_V152)
    # AnimateDiffPipeline has no safety_checker component: diffusers skips the model_index entry silently.
    anim = AnimateDiffPipeline.from_pretrained(sd_path, motion_adapter=adapter, torch_dtype=torch.float32, **kw)
    assert type(anim.unet).__name__ == "UNetMotionModel" and "safety_checker" not in anim.components
    latents = torch.randn(1, 4, 2, 8, 8)
    text = torch.randn(2, 77, 768)  # one per frame: this diffusers repeats the prompt in the pipeline, not the UNet
    with torch.no_grad():
        out = anim.unet(latents, 10, encoder_hidden_states=text).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_fp16_form_needs_the_variant(tmp_path):
    from diffusers import MotionAdapter

    path = build("motion-v152", tmp_path, form="fp16", scale="small")
    with pytest.raises(OSError):
        MotionAdapter.from_pretrained(path)  # users must pass variant="fp16", as with the real repo's fp16-only files


def test_published_configs_match_the_reference_data():
    data = os.path.join(os.path.dirname(__file__), "data", "svd_xt_unet.json")
    with open(data) as f:
        reference = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    assert published(checkpoints.SVD_XT_UNET, "full") == reference


def test_tokenizer_loads(tmp_path):
    from transformers import CLIPTokenizer

    path = build("sd15", tmp_path, form="plain", scale="small", hub_cache=False)
    assert len(CLIPTokenizer.from_pretrained(path / "tokenizer")("a red circle").input_ids) > 2


def test_deterministic_by_seed(tmp_path):
    a = build("svd-xt", tmp_path / "a", form="sharded", scale="small", seed=3)
    b = build("svd-xt", tmp_path / "b", form="sharded", scale="small", seed=3)
    c = build("svd-xt", tmp_path / "c", form="sharded", scale="small", seed=4)
    assert files(a) == files(b) and a.name == b.name != c.name
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files(a))
    assert (a / "unet" / SHARDS[0]).read_bytes() != (c / "unet" / SHARDS[0]).read_bytes()


def test_special_parameters_keep_their_init():
    """SVD's time_mixer mix_factor is 0.5 at init (sigmoid 0.62 spatial): zeros or random values would change the
    temporal mixing the real model does; norm scales are ones; motion positional encodings are the sinusoids."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as root:
        unet = load_file(build("svd-xt", Path(root), form="plain", scale="small", dtype=torch.float32,
                               hub_cache=False) / "unet" / "diffusion_pytorch_model.safetensors")
        mix = [v for k, v in unet.items() if k.endswith("mix_factor")]
        assert mix and all(v.item() == 0.5 for v in mix)
        assert all((v == 1).all() for k, v in unet.items() if k.endswith("norm1.weight"))
        w = unet["conv_in.weight"]
        assert abs(w.std().item() * (w[0].numel() ** 0.5) - 1) < 0.1
        adapter = load_file(build("motion-v152", Path(root), form="plain", scale="small", dtype=torch.float32,
                                  hub_cache=False) / "diffusion_pytorch_model.safetensors")
        pe = [v for k, v in adapter.items() if k.endswith("pos_embed.pe")]
        assert pe and pe[0][0, 0, 0].item() == 0 and pe[0][0, 0, 1].item() == 1  # sin(0), cos(0) at position 0


@pytest.mark.parametrize("bad, named", [(dict(name="sd21"), "'sd21'"), (dict(form="bf16"), "'bf16'"),
                                        (dict(scale="tiny"), "'tiny'"), (dict(dtype=torch.int8), "torch.int8")])
def test_bad_arguments_name_the_value(tmp_path, bad, named):
    args = dict(name="sd15", form="plain", scale="small", dtype=torch.float16) | bad
    with pytest.raises(ValueError, match=named):
        build(args.pop("name"), tmp_path, **args)
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli(tmp_path, capsys):
    assert checkpoints.main(["motion-v152", "--root", str(tmp_path), "--scale", "small", "--form", "plain"]) == 0
    out = capsys.readouterr().out
    assert "models--guoyww--animatediff-motion-adapter-v1-5-2" in out and "MiB" in out
    assert checkpoints.main(["motion-v152", "--root", str(tmp_path), "--form", "int4"]) == 2
    assert "'int4'" in capsys.readouterr().err
