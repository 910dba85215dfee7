"""Training: the loop resumes exactly where it stopped, and each model's loss runs on its real components."""

import hashlib
import math

import pytest
import torch

from asyncvid.training.loop import TrainConfig, train


def _toy():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _loss(model, batch, generator):
    x = torch.randn(batch, 4, generator=generator)
    return (model(x).squeeze(1) - x.sum(1)).square().mean()


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    straight = _toy()
    train(straight, _loss, TrainConfig(tmp_path / "a", steps=6, checkpoint_every=2, ema=0.5), name="toy")
    resumed = _toy()
    train(resumed, _loss, TrainConfig(tmp_path / "b", steps=3, checkpoint_every=2, ema=0.5), name="toy")
    resumed = _toy()  # a new process: fresh weights, state from the checkpoint
    log = train(resumed, _loss, TrainConfig(tmp_path / "b", steps=6, checkpoint_every=2, ema=0.5), name="toy")
    assert log["steps"] == 6
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_checkpoint_resumes_only_with_the_recipe_it_was_trained_with(tmp_path):
    """A run stopped half way and restarted with another loss setting (say --object-gain) is refused in one line
    naming both values, not resumed as a mix of two recipes; the same recipe, or a checkpoint from before recipes
    were kept, resumes."""
    from asyncvid.errors import UsageError

    recipe = (("object_gain", 1.0), ("shape_pairs", 0.0))
    train(_toy(), _loss, TrainConfig(tmp_path / "a", steps=1, recipe=recipe), name="toy")
    before = (tmp_path / "a" / "checkpoint.pt").read_bytes()
    other = (("object_gain", 2.0), ("shape_pairs", 0.0))
    with pytest.raises(UsageError, match=r"--object-gain 2.0: toy's checkpoint .* --object-gain 1.0; .*--fresh"):
        train(_toy(), _loss, TrainConfig(tmp_path / "a", steps=2, recipe=other), name="toy")
    assert (tmp_path / "a" / "checkpoint.pt").read_bytes() == before  # nothing trained
    assert train(_toy(), _loss, TrainConfig(tmp_path / "a", steps=2, recipe=recipe), name="toy")["steps"] == 2
    train(_toy(), _loss, TrainConfig(tmp_path / "old", steps=1), name="toy")  # kept no recipe
    assert train(_toy(), _loss, TrainConfig(tmp_path / "old", steps=2, recipe=other), name="toy")["steps"] == 2


def test_the_training_cli_refuses_another_recipe_with_exit_2(tmp_path, monkeypatch, capsys):
    """`python -m asyncvid.training svd` resumed with another --object-gain: one line on stderr, exit code 2."""
    import sys

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training import cli

    build_tiny_animatediff().vae.save_pretrained(tmp_path / "vae" / "final")
    args = ["svd", "--workdir", str(tmp_path), "--steps", "2", "--anneal", "0", "--batch", "1", "--clips", "1",
            "--minutes", "0.0001"]  # stopped by the limit after one step: a checkpoint to resume
    monkeypatch.setattr(sys, "argv", ["asyncvid.training", *args])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 0 and (tmp_path / "svd" / "checkpoint.pt").is_file()
    monkeypatch.setattr(sys, "argv", ["asyncvid.training", *args, "--object-gain", "3"])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "error: --object-gain 3.0:" in err and "--object-gain 0.0" in err, err


def test_training_gives_the_process_its_thread_count_back(tmp_path):
    # A leaked count changed float rounding for every later sampler in the process (a notebook-vs-CLI test failed).
    before = torch.get_num_threads()
    train(_toy(), _loss, TrainConfig(tmp_path, steps=1, threads=before + 1), name="toy")
    assert torch.get_num_threads() == before


def test_loss_goes_down_and_fresh_ignores_the_checkpoint(tmp_path):
    model = _toy()
    log = train(model, _loss, TrainConfig(tmp_path, steps=200, lr=1e-2, batch=32, ema=0.0), name="toy")
    assert log["final_loss"] < 0.5 * _loss(_toy(), 256, torch.Generator().manual_seed(1)).item()
    log = train(_toy(), _loss, TrainConfig(tmp_path, steps=2, resume=False), name="toy")
    assert log["steps"] == 2


def test_a_run_stopped_by_its_time_limit_says_how_to_finish_it(tmp_path, capsys):
    """The recipes are step counts; a run cut short by --minutes says so, and resuming it finishes the recipe."""
    from asyncvid.training.loop import finish

    class Saved(torch.nn.Module):
        def save_pretrained(self, folder):
            folder.mkdir(parents=True, exist_ok=True)

    log = train(_toy(), _loss, TrainConfig(tmp_path, steps=8, minutes=1e-9), name="toy")
    finish(Saved(), TrainConfig(tmp_path, steps=8, minutes=1e-9), log)
    assert log["steps"] < 8 and f"at step {log['steps']} of 8" in capsys.readouterr().err
    log = train(_toy(), _loss, TrainConfig(tmp_path, steps=8), name="toy")
    finish(Saved(), TrainConfig(tmp_path, steps=8), log)
    assert log["steps"] == 8 and "stopped by" not in capsys.readouterr().err


def test_lr_gains_scale_the_rate_of_the_parameters_they_name(tmp_path):
    """AnimateDiff's --motion-gain: Adam's first step moves every weight by about the rate whatever its gradient, so
    the named layer's weights move `gain` times as far as the rest."""
    moved = {}
    for gains in ((), (("2.", 3.0),)):  # "2." is the second Linear's weight and bias
        model = _toy()
        config = TrainConfig(tmp_path / str(len(gains)), steps=1, lr=1e-3, warmup=1, ema=0.0, lr_gains=gains)
        train(model, _loss, config, name="toy")
        with torch.no_grad():
            moved[gains] = [float((a - b).abs().mean()) for a, b in zip(model.parameters(), _toy().parameters())]
    plain, gained = moved[()], moved[(("2.", 3.0),)]
    assert gained[:2] == pytest.approx(plain[:2], rel=1e-3)  # the first Linear: as without gains
    assert gained[2:] == pytest.approx([3 * m for m in plain[2:]], rel=1e-2)
    with pytest.raises(ValueError, match="'motion' must be positive"):
        TrainConfig(tmp_path, lr_gains=(("motion", 0.0),))
    with pytest.raises(ValueError, match="other learning-rate gains.*--fresh"):  # resumed with another split
        train(_toy(), _loss, TrainConfig(tmp_path / "0", steps=2, lr_gains=(("2.", 3.0),)), name="toy")


def test_clip_stage_gains_split_motion_spatial_and_text_layers():
    """--spatial-gain (round 26): the motion modules, the text encoder and every other UNet layer each get their
    own rate; at gain 1 the split is r8's two groups, so older checkpoints resume."""
    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training.animatediff import UNetWithText, clip_stage_gains
    from asyncvid.training.loop import _gain_groups

    pipe = build_tiny_animatediff()
    model = UNetWithText(pipe.unet, pipe.text_encoder)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {gain: {names[id(p)] for p in params}
              for gain, params in _gain_groups(model, clip_stage_gains(3.0, 0.25)).items()}
    assert set(groups) == {3.0, 1.0, 0.25}
    assert groups[3.0] == {n for n in names.values() if "motion_modules" in n}
    assert groups[1.0] == {n for n in names.values() if n.startswith("text_encoder.")}
    assert groups[0.25] and all(n.startswith("unet.") and "motion_modules" not in n for n in groups[0.25])
    assert clip_stage_gains(3.0, 1.0) == (("motion_modules", 3.0),)


def test_config_rejects_empty_budgets(tmp_path):
    with pytest.raises(ValueError, match="must be positive"):
        TrainConfig(tmp_path, minutes=0)
    with pytest.raises(ValueError, match="anneal"):
        TrainConfig(tmp_path, steps=10, anneal=11)


def test_anneal_decays_the_learning_rate_to_zero_over_the_last_steps(tmp_path):
    config = TrainConfig(tmp_path, steps=100, lr=1.0, warmup=10, anneal=40)
    rates = [config.lr_at(step) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9:60] == [1.0] * 51  # warm-up, then constant
    assert rates[60:] == pytest.approx([(100 - s) / 40 for s in range(60, 100)])  # linear to 1/40 at the last step
    assert TrainConfig(tmp_path, steps=100, lr=1.0, warmup=10).lr_at(99) == 1.0  # anneal 0: constant
    # The decay happens in training: the last step's update is 1/anneal of a full one, so weights barely move.
    model = _toy()
    train(model, _loss, TrainConfig(tmp_path / "run", steps=5, lr=0.1, warmup=1, anneal=5, ema=0.0), name="toy")
    with torch.no_grad():
        moved = sum((a - b).abs().sum() for a, b in zip(model.parameters(), _toy().parameters()))
    ref = _toy()
    train(ref, _loss, TrainConfig(tmp_path / "ref", steps=5, lr=0.1, warmup=1, ema=0.0), name="toy")
    with torch.no_grad():
        moved_ref = sum((a - b).abs().sum() for a, b in zip(ref.parameters(), _toy().parameters()))
    assert moved < 0.8 * moved_ref


@pytest.mark.parametrize("family", ["animatediff", "svd"])
def test_unet_losses_run_on_the_tiny_pipelines(family):
    from asyncvid.pipelines.tiny_models import build_tiny_animatediff, build_tiny_svd
    from asyncvid.training.animatediff import animatediff_loss_fn
    from asyncvid.training.svd import svd_loss_fn
    from asyncvid.training.vae import vae_loss_fn

    torch.set_num_threads(1)
    pipe = build_tiny_animatediff() if family == "animatediff" else build_tiny_svd()
    make = animatediff_loss_fn if family == "animatediff" else svd_loss_fn
    if family == "animatediff":
        from asyncvid.training.animatediff import UNetWithText
        model = UNetWithText(pipe.unet, pipe.text_encoder).train()
    else:  # `svd --train-image-encoder`; the frozen tower's path runs in test_svd_object_gain_weighs_the_shape_more
        from asyncvid.training.svd import UNetWithImageEncoder
        model = UNetWithImageEncoder(pipe.unet, pipe.image_encoder).train()
    with torch.random.fork_rng():
        loss = make(pipe, clips_per_caption=1, num_frames=4)(model, 2, torch.Generator().manual_seed(0))
        loss.backward()
        vae_loss = vae_loss_fn(pipe.vae, temporal=family == "svd", clips_per_caption=1, num_frames=4)
        vae_loss(pipe.vae.train(), 2, torch.Generator().manual_seed(0)).backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.unet.parameters())
    encoder = pipe.text_encoder if family == "animatediff" else pipe.image_encoder  # trains with the UNet
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_svd_object_gain_weighs_the_shape_more():
    """`svd --object-gain`: the same draws give a larger loss, at most 1 + gain times the plain one (the weight is
    1 on the background and 1 + gain on the shape's latent pixels)."""
    from asyncvid.pipelines.tiny_models import build_tiny_svd
    from asyncvid.training.svd import svd_loss_fn

    torch.set_num_threads(1)
    pipe = build_tiny_svd()
    pipe.vae.register_to_config(scaling_factor=3.6)  # unit-variance latents, as training sets the factor
    with torch.random.fork_rng(), torch.no_grad():
        plain, weighted = (svd_loss_fn(pipe, clips_per_caption=1, num_frames=2, object_gain=gain)(
            pipe.unet, 2, torch.Generator().manual_seed(0)) for gain in (0.0, 4.0))
    assert plain < weighted < 5 * plain


def test_training_encodes_captions_as_the_pipeline_does():
    """A training text encoder sees the same token ids as in `AnimateDiffPipeline.encode_prompt`."""
    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training.animatediff import UNetWithText, caption_ids

    pipe = build_tiny_animatediff()
    texts = ["a red circle moving left", "a yellow triangle moving down", ""]
    trained = UNetWithText(pipe.unet, pipe.text_encoder).encode(caption_ids(pipe.tokenizer, texts))
    assert trained.requires_grad
    assert torch.equal(trained.detach(), pipe.encode_prompt(texts, "cpu", 1, False)[0])


def test_a_training_image_encoder_sees_first_frames_as_the_pipeline_does():
    """`svd --train-image-encoder` embeds the clips' first frames from tensors exactly as the pipeline's
    `_encode_image` does from the 8-bit images it is given (resized to 224 with antialiasing, CLIP-normalised)."""
    from PIL import Image

    from asyncvid.pipelines.tiny_models import build_tiny_svd
    from asyncvid.training.data import clip_set
    from asyncvid.training.svd import clip_pixels

    torch.set_num_threads(1)
    pipe = build_tiny_svd()
    _, clips = clip_set(1, 2, 0)
    first = clips[:6, 0] + 0.003  # off the 8-bit grid: the pipeline only ever sees rounded pixels
    images = [Image.fromarray(((f.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()) for f in first]
    with torch.no_grad():
        trained = pipe.image_encoder(clip_pixels(first, pipe.feature_extractor)).image_embeds[:, None]
        assert torch.allclose(trained, pipe._encode_image(images, "cpu", 1, False), atol=1e-6)


@pytest.mark.parametrize("schedule", ["v-zero-snr", None])
def test_export_ships_the_schedule_the_unet_was_trained_on(tmp_path, schedule):
    """`export` gives tiny-animatediff the DDIM schedule recorded in its training log (SD's when none is recorded),
    and the text encoder that trained with the UNet (the built one when it was frozen), and tiny-svd the CLIP vision
    tower that trained with its UNet (likewise); a card names the one background its UNet's clips were drawn on, if
    one; `stages` exports one model
    and leaves the other's folder alone; a VAE without a training log (brought from elsewhere) gets no card row; each
    folder's sampling.json is the shipped one."""
    import json
    import shutil

    from diffusers import AnimateDiffPipeline, DDIMScheduler, StableVideoDiffusionPipeline

    from asyncvid.pipelines.embedded import EMBEDDED
    from asyncvid.pipelines.tiny_models import build_tiny_animatediff, build_tiny_svd
    from asyncvid.training.animatediff import SCHEDULE
    from asyncvid.training.export import export_all

    ad, svd = build_tiny_animatediff(), build_tiny_svd()
    parts = {"vae": ad.vae, "animatediff": ad.unet, "svd": svd.unet}
    for stage, model in parts.items():
        model.save_pretrained(tmp_path / "train" / stage / "final")
        log = {"name": stage, "steps": 3, "minutes": 0.1, "final_loss": 0.5,
               "config": {"batch": 2, "lr": 1e-3, "seed": 0}}
        if stage == "animatediff" and schedule:  # a current log: its schedule, and a text encoder that trained
            log.update(schedule=SCHEDULE, train_text=True, background=0)  # and drawn on one tone (round 32)
            trained_text = build_tiny_animatediff().text_encoder
            trained_text.get_submodule("embeddings.token_embedding").weight.data.mul_(2)
            trained_text.save_pretrained(tmp_path / "train" / stage / "text_encoder")
        if stage == "svd" and schedule:  # and a CLIP vision tower that trained with the SVD UNet
            log.update(train_image_encoder=True)
            trained_tower = build_tiny_svd().image_encoder
            trained_tower.visual_projection.weight.data.mul_(2)
            trained_tower.save_pretrained(tmp_path / "train" / stage / "image_encoder")
        if stage != "vae" or schedule:  # without one, a VAE brought from elsewhere (no training log)
            (tmp_path / "train" / stage / "train_log.json").write_text(json.dumps(log))
    if schedule:  # exporting one model leaves the other's shipped folder as it was
        (tmp_path / "weights" / "tiny-svd").mkdir(parents=True)
        (tmp_path / "weights" / "tiny-svd" / "README.md").write_text("the shipped card")
        with pytest.raises(ValueError, match="unknown stage.*vae"):
            export_all(tmp_path / "train", tmp_path / "weights", stages=("animatediff", "vae"))
        assert not (tmp_path / "weights" / "tiny-animatediff").exists()
        export_all(tmp_path / "train", tmp_path / "weights", {"tiny-animatediff": {"text": "colour 90%"}},
                   stages=("animatediff",))
        assert (tmp_path / "weights" / "tiny-svd" / "README.md").read_text() == "the shipped card"
        shutil.rmtree(tmp_path / "weights" / "tiny-svd")
    export_all(tmp_path / "train", tmp_path / "weights", {"tiny-animatediff": {"text": "colour 90%"}})
    shipped = DDIMScheduler.from_pretrained(tmp_path / "weights" / "tiny-animatediff", subfolder="scheduler").config
    expected = SCHEDULE if schedule else {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}
    assert {k: shipped[k] for k in expected} == expected
    card = (tmp_path / "weights" / "tiny-animatediff" / "README.md").read_text()
    assert "colour 90%" in card and ("| vae | 3 |" in card) == bool(schedule)
    assert ("over the plain tone (235, 235, 220) (RGB), every clip" in card) == bool(schedule)
    svd_card = (tmp_path / "weights" / "tiny-svd" / "README.md").read_text()
    assert "over a plain, striped or graded background" in svd_card
    for name in ("tiny-animatediff", "tiny-svd"):  # the sampling settings export writes are the ones that ship
        written = json.loads((tmp_path / "weights" / name / "sampling.json").read_text())
        assert written == json.loads((EMBEDDED[name].source / "sampling.json").read_text()), name
    for name in ("tiny-animatediff", "tiny-svd"):  # no folder of the training machine is shipped
        for config in (tmp_path / "weights" / name).glob("*/config.json"):
            assert str(tmp_path) not in config.read_text(), config
    pipe = AnimateDiffPipeline.from_pretrained(tmp_path / "weights" / "tiny-animatediff")
    assert torch.equal(pipe.unet.conv_in.weight, ad.unet.conv_in.weight.half().float().to(pipe.unet.dtype))
    tokens = "embeddings.token_embedding"
    shipped_text = pipe.text_encoder.get_submodule(tokens).weight
    expected_text = (trained_text if schedule else ad.text_encoder).get_submodule(tokens).weight
    assert torch.equal(shipped_text, expected_text.half().to(shipped_text.dtype))
    shipped_tower = StableVideoDiffusionPipeline.from_pretrained(tmp_path / "weights" / "tiny-svd").image_encoder
    expected_tower = trained_tower if schedule else svd.image_encoder
    assert torch.equal(shipped_tower.visual_projection.weight,
                       expected_tower.visual_projection.weight.half().to(shipped_tower.dtype))


def _mean_clip_unet(pipe, cache_dir, frames: int, seen_t=None, offsets=None):
    """A UNet that predicts v = -(the mean latent clip of the caption it is given), the zero-loss prediction at the
    pure-noise step, plus `offsets` (one constant per frame); it reads the captions from the encoded clips in
    `cache_dir` and the frozen encoder's embeddings, as the loss uses them."""
    from types import SimpleNamespace

    captions, latents = torch.load(next(cache_dir.glob("latents-*.pt")), weights_only=False)
    texts = sorted({c.text for c in captions})
    means = [latents[[c.text == text for c in captions]].mean(0) for text in texts] + [latents.mean(0)]
    embeds = pipe.encode_prompt(texts + [""], "cpu", 1, False)[0]

    def unet(sample, t, encoder_hidden_states):
        if seen_t is not None:
            seen_t.append(t)
        rows = encoder_hidden_states[::frames]  # one row per clip (repeated per frame)
        which = [next(i for i, e in enumerate(embeds) if torch.equal(e, r)) for r in rows]
        v = torch.stack([-means[i] for i in which])
        return SimpleNamespace(sample=v if offsets is None else v + offsets[:, None, None])

    return unet


def test_mean_share_trains_pure_noise_against_each_captions_mean_clip(tmp_path):
    """With mean_share 1 every sample sits at the pure-noise step, where a model predicting v = -(its caption's mean
    latent clip) has zero loss; the same model is wrong on single clips (mean_share 0)."""
    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training.animatediff import animatediff_loss_fn

    torch.set_num_threads(1)
    pipe = build_tiny_animatediff()
    losses = {share: animatediff_loss_fn(pipe, clips_per_caption=2, num_frames=2, cache_dir=tmp_path,
                                         mean_share=share) for share in (1.0, 0.0)}
    seen_t = []
    unet = _mean_clip_unet(pipe, tmp_path, frames=2, seen_t=seen_t)

    assert float(losses[1.0](unet, 4, torch.Generator().manual_seed(0))) < 1e-10
    assert all(bool((t == 999).all()) for t in seen_t)
    assert float(losses[0.0](unet, 4, torch.Generator().manual_seed(0))) > 1e-3
    with pytest.raises(ValueError, match="needs a zero-terminal-SNR schedule"):
        animatediff_loss_fn(pipe, clips_per_caption=2, num_frames=2, cache_dir=tmp_path, mean_share=0.5,
                            schedule={"prediction_type": "epsilon", "rescale_betas_zero_snr": False})


def test_flicker_gain_charges_only_the_frames_disagreement_in_mean_error(tmp_path):
    """At the pure-noise step the target is -(the caption's mean clip): an error that is one constant per frame
    costs 1 + gain times as much when the frames' constants differ, and the same when they agree."""
    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training.animatediff import animatediff_loss_fn

    torch.set_num_threads(1)
    pipe = build_tiny_animatediff()
    losses = {gain: animatediff_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, mean_share=1.0,
                                        flicker_gain=gain) for gain in (0.0, 7.0)}

    def ratio(offsets):
        unet = _mean_clip_unet(pipe, tmp_path, frames=4, offsets=offsets)
        loss = {g: float(f(unet, 3, torch.Generator().manual_seed(0))) for g, f in losses.items()}
        return loss[7.0] / loss[0.0]

    assert ratio(torch.tensor([0.5, 0.5, 0.5, 0.5])) == pytest.approx(1.0)
    assert ratio(torch.tensor([1.0, -1.0, 1.0, -1.0])) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="flicker_gain"):
        animatediff_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, flicker_gain=-1.0)


def _zero_svd_latents(pipe, folder):
    """Encode 4-frame clips into `svd_loss_fn`'s cache in `folder`, then zero their latents (first frames and
    embeddings kept), so every x0 is 0 and a stub UNet can work out its target from its input."""
    from asyncvid.training.data import cache_name
    from asyncvid.training.svd import svd_loss_fn

    svd_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=folder)  # encodes the clips into the cache
    cache = folder / cache_name(pipe.vae, clips=1, frames=4, seed=0)
    latents, first, embeds = torch.load(cache, weights_only=False)
    torch.save((torch.zeros_like(latents), first, embeds), cache)


def test_svd_flicker_gain_charges_only_the_frames_disagreement_in_mean_x0_error(tmp_path):
    """`svd --flicker-gain G`: on clips whose latents are zero, a UNet whose v error is one constant per frame costs
    G x mean(c_out^2) x the constants' variance more than the plain loss (the disagreement in x0 terms), and
    nothing more when the frames' constants agree."""
    from types import SimpleNamespace

    from asyncvid.pipelines.tiny_models import build_tiny_svd
    from asyncvid.training.svd import svd_loss_fn

    torch.set_num_threads(1)
    pipe = build_tiny_svd()
    _zero_svd_latents(pipe, tmp_path)  # x0 = 0: the stub knows every target

    class PerFrameError(torch.nn.Module):  # the target, plus one v error per frame; records each sample's c_out
        def __init__(self, offsets):
            super().__init__()
            self.offsets, self.c_out = offsets.view(1, -1, 1, 1, 1), []

        def forward(self, x, t, **_):
            sigma = (4 * t).exp().view(-1, 1, 1, 1, 1)  # the loss feeds 0.25 log sigma
            noisy = x[:, :, : x.shape[2] // 2] * (sigma**2 + 1).sqrt()  # undo c_in
            c_out = -sigma / (sigma**2 + 1).sqrt()
            self.c_out.append(c_out.flatten())
            return SimpleNamespace(sample=-noisy / (sigma**2 + 1) / c_out + self.offsets)

    def losses(offsets):
        out = {}
        for gain in (0.0, 7.0):
            unet = PerFrameError(torch.tensor(offsets, dtype=torch.float64).float())
            loss = svd_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, flicker_gain=gain)
            out[gain] = float(loss(unet, 3, torch.Generator().manual_seed(0)))
        return out, unet.c_out[0]

    agree, _ = losses([0.5, 0.5, 0.5, 0.5])
    assert agree[7.0] == pytest.approx(agree[0.0], rel=1e-5)
    apart, c_out = losses([1.0, -1.0, 1.0, -1.0])
    assert apart[0.0] == pytest.approx(1.0, rel=1e-4)  # the plain loss: the v error's square
    assert apart[7.0] - apart[0.0] == pytest.approx(7 * float(c_out.square().mean()), rel=1e-4)
    with pytest.raises(ValueError, match="flicker_gain"):
        svd_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, flicker_gain=-1.0)


def test_svd_brightness_gain_charges_the_frames_disagreement_along_the_decoders_brightness(tmp_path):
    """`svd --brightness-gain G`: the readout is cached in SVD's (clips, frames, C, h, w) layout, a unit vector per
    frame. On zero latents, a UNet whose v error is a_f times that frame's readout costs G / (C h w) x mean(c_out^2)
    x the a_f's variance more than the plain loss; the same error orthogonal to the readout, or agreeing across
    frames, costs nothing more; `--brightness-below` charges only the samples whose sigma is below it."""
    from types import SimpleNamespace

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff, build_tiny_svd
    from asyncvid.training.data import cache_name
    from asyncvid.training.svd import svd_loss_fn

    torch.set_num_threads(1)
    pipe = build_tiny_svd()
    pipe.vae = build_tiny_animatediff().vae  # the frame-by-frame VAE the svd stage trains in
    _zero_svd_latents(pipe, tmp_path)
    svd_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, brightness_gain=1.0)  # the readout
    path = tmp_path / cache_name(pipe.vae, clips=1, frames=4, seed=0).replace("latents-", "brightness-")
    readout = torch.load(path, weights_only=False)
    latents = torch.load(tmp_path / path.name.replace("brightness-", "latents-"), weights_only=False)[0]
    assert readout.shape == latents.shape  # (clips, frames, C, h, w)
    assert torch.allclose(readout.flatten(2).norm(dim=2), torch.ones(readout.shape[:2]), atol=1e-5)
    # A known direction per frame, the same for every clip, and one orthogonal to it, in place of the decoder's
    generator = torch.Generator().manual_seed(1)
    along = torch.randn((1, *readout.shape[1:]), generator=generator)
    along /= along.flatten(2).norm(dim=2)[..., None, None, None]
    across = torch.randn(along.shape, generator=generator)
    across -= (across * along).sum(dim=(2, 3, 4), keepdim=True) * along
    torch.save(along.expand(readout.shape).clone(), path)

    class AlongError(torch.nn.Module):  # the target, plus a_f times a direction; records each sample's c_out
        def __init__(self, direction, amounts):
            super().__init__()
            self.direction, self.amounts, self.c_out = direction, torch.tensor(amounts).view(1, -1, 1, 1, 1), []

        def forward(self, x, t, **_):
            sigma = (4 * t).exp().view(-1, 1, 1, 1, 1)
            noisy = x[:, :, : x.shape[2] // 2] * (sigma**2 + 1).sqrt()
            c_out = -sigma / (sigma**2 + 1).sqrt()
            self.c_out.append(c_out.flatten())
            self.sigma = sigma.flatten()
            return SimpleNamespace(sample=-noisy / (sigma**2 + 1) / c_out + self.amounts * self.direction)

    def extra(direction, amounts, gain=7.0, below=None):
        out = []
        for g in (0.0, gain):
            unet = AlongError(direction, amounts)
            loss = svd_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, brightness_gain=g,
                               brightness_below=below if g else None)
            out.append(float(loss(unet, 3, torch.Generator().manual_seed(0))))
        return out[1] - out[0], unet.c_out[0], unet.sigma

    modes = readout[0, 0].numel()
    charged, c_out, sigma = extra(along, [1.0, -1.0, 1.0, -1.0])
    assert charged == pytest.approx(7 / modes * float(c_out.square().mean()), rel=1e-4)
    below = float(sigma.sort().values[1:].mean())  # between the samples' sigmas: some charged, some not
    kept = sigma < below
    assert 0 < int(kept.sum()) < len(sigma)
    expected = 7 / modes * float((c_out.square() * kept).mean())
    assert extra(along, [1.0, -1.0, 1.0, -1.0], below=below)[0] == pytest.approx(expected, rel=1e-4)
    assert extra(along, [0.5, 0.5, 0.5, 0.5])[0] == pytest.approx(0.0, abs=1e-6)
    assert extra(across, [1.0, -1.0, 1.0, -1.0])[0] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="brightness_gain"):
        svd_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, brightness_gain=-1.0)
    with pytest.raises(ValueError, match="brightness_below"):
        svd_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, brightness_gain=1.0,
                    brightness_below=0.0)


def test_svd_trains_on_the_noise_the_pipeline_samples_from(tmp_path):
    """`svd --shared-noise S --noise-mean M`: on clips whose latents are zero the UNet sees sigma x the noise. At
    mean 0 every frame's noise has a zero spatial mean per channel; at share 0.5 two frames' noise correlates by
    about 0.5; by default the frames' noise is independent, each with its own mean, as drawn."""
    from types import SimpleNamespace

    from asyncvid.pipelines.tiny_models import build_tiny_svd
    from asyncvid.training.svd import svd_loss_fn

    torch.set_num_threads(1)
    pipe = build_tiny_svd()
    _zero_svd_latents(pipe, tmp_path)

    def noise(**settings):  # (clips, frames, C, h, w): what the UNet was given, less its scales
        seen = []

        def unet(x, t, **_):
            sigma = (4 * t).exp().view(-1, 1, 1, 1, 1)
            seen.append(x[:, :, : x.shape[2] // 2] * (sigma**2 + 1).sqrt() / sigma)  # undo c_in and sigma
            return SimpleNamespace(sample=torch.zeros_like(seen[-1]))

        svd_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, **settings)(
            unet, 16, torch.Generator().manual_seed(0))
        return seen[0].double()

    def frame_correlation(n):
        a, b = n[:, 0].flatten(1), n[:, 1].flatten(1)
        return float(((a - a.mean(1, keepdim=True)) * (b - b.mean(1, keepdim=True))).mean() / (a.std() * b.std()))

    zero_mean = noise(noise_mean=0.0)
    assert zero_mean.mean(dim=(3, 4)).abs().max() < 1e-5
    half = noise(shared_noise=0.5, noise_mean=0.0)
    assert half.mean(dim=(3, 4)).abs().max() < 1e-5
    assert frame_correlation(half) == pytest.approx(0.5, abs=0.05)
    plain = noise()
    assert plain.mean(dim=(3, 4)).abs().max() > 0.1 and abs(frame_correlation(plain)) < 0.05
    with pytest.raises(ValueError, match="shared_noise"):
        svd_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, shared_noise=1.0)
    with pytest.raises(ValueError, match="noise_mean"):
        svd_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, noise_mean=-0.5)


def test_brightness_readout_is_the_direction_the_decoder_shows_as_background_brightness():
    """Each frame's readout is the unit gradient of its decoded background's mean brightness: a step along it
    changes that brightness by the gradient's norm, a step across it (same size) by second-order amounts only."""
    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training.data import brightness_readout

    torch.set_num_threads(1)
    vae = build_tiny_animatediff().vae
    latents = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # (clips, C, frames, h, w)
    background = torch.zeros(2, 64, 64, dtype=torch.bool)
    background[:, :, :40] = True  # the object's pixels, on the right, are not read
    readout = brightness_readout(vae, latents, background, chunk=1)
    assert readout.shape == latents.shape
    assert readout.transpose(1, 2).flatten(2).norm(dim=2) == pytest.approx(torch.ones(2, 3), abs=1e-5)
    assert brightness_readout(vae, latents).shape == latents.shape  # the evaluator's background, from the decoded clip

    def brightness(z):  # one frame (C, h, w), scaled
        with torch.no_grad():
            return float(vae.decode(z[None] / vae.config.scaling_factor).sample[..., :40].mean())

    z, r = latents[1, :, 2], readout[1, :, 2]
    across = torch.randn(r.shape, generator=torch.Generator().manual_seed(1))
    across = across - (across * r).sum() * r
    across = across / across.norm()
    eps = 1e-2
    along_step = (brightness(z + eps * r) - brightness(z - eps * r)) / (2 * eps)
    across_step = (brightness(z + eps * across) - brightness(z - eps * across)) / (2 * eps)
    assert along_step > 0
    assert abs(across_step) < 1e-2 * along_step


def test_brightness_gain_charges_only_the_frames_disagreement_along_the_readout(tmp_path):
    """A UNet that predicts the exact v target of its one clip per caption, plus one multiple of each frame's
    brightness readout per frame: that error costs 1 + gain times as much when the frames' multiples differ, the
    same when they agree; an error across the readout, one in a sample trained against its caption's mean clip
    (whose readout is not known), or one at a timestep not below `brightness_below`, costs the same either way.
    With `brightness_margin` 0 the same holds for the readout off every frame's object, and an error on the latent
    pixels some frame's object covers costs the same either way."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training.animatediff import SCHEDULE, animatediff_loss_fn
    from asyncvid.training.data import brightness_readout, object_mask, off_object

    torch.set_num_threads(1)
    pipe = build_tiny_animatediff()
    # A trained VAE's scaling factor gives its latents unit deviation, as `object_mask` reads them; the random one's
    # are at about 0.05.
    pipe.vae.register_to_config(scaling_factor=pipe.vae.config.scaling_factor * 20)
    settings = dict(clips_per_caption=1, num_frames=4, cache_dir=tmp_path)
    losses = {(share, gain): animatediff_loss_fn(pipe, mean_share=share, brightness_gain=gain, **settings)
              for share in (0.0, 1.0) for gain in (0.0, 7.0)}
    drawn = []  # the timesteps of the samples, recorded by the stub UNet
    captions, latents = torch.load(next(tmp_path.glob("latents-*.pt")), weights_only=False)
    readout = brightness_readout(pipe.vae, latents)
    assert torch.equal(readout, torch.load(next(tmp_path.glob("brightness-*.pt"))))  # cached for the next run
    texts = sorted(c.text for c in captions)
    embeds = pipe.encode_prompt(texts, "cpu", 1, False)[0]
    clip_of = [next(i for i, c in enumerate(captions) if c.text == text) for text in texts]
    alphas = DDPMScheduler.from_config(pipe.scheduler.config, **SCHEDULE).alphas_cumprod

    def ratio(multiples, direction, share=0.0, below=1.0, margin=None):
        def unet(sample, t, encoder_hidden_states):
            drawn.extend(t.tolist())
            rows = encoder_hidden_states[::4]  # one clip per caption: the caption tells the clip
            clips = [clip_of[next(i for i, e in enumerate(embeds) if torch.equal(e, r))] for r in rows]
            if share:  # at the pure-noise step v = -(the caption's mean clip), here its one clip
                v = -latents[clips]
            else:  # v = sqrt(a) noise - sqrt(1 - a) x0, with the noise read back from the sample
                a, x0 = alphas[t].view(-1, 1, 1, 1, 1), latents[clips]
                v = a.sqrt() * (sample - a.sqrt() * x0) / (1 - a).sqrt() - (1 - a).sqrt() * x0
            return SimpleNamespace(sample=v + multiples[:, None, None] * direction[clips])

        fns = losses if (below, margin) == (1.0, None) else {(share, g): animatediff_loss_fn(
            pipe, mean_share=share, brightness_gain=g, brightness_below=below, brightness_margin=margin, **settings)
            for g in (0.0, 7.0)}
        loss = {g: float(fns[share, g](unet, 3, torch.Generator().manual_seed(0))) for g in (0.0, 7.0)}
        return loss[7.0] / loss[0.0]

    across = torch.randn(readout.shape, generator=torch.Generator().manual_seed(1))
    across = across - (across * readout).sum(dim=(1, 3, 4), keepdim=True) * readout
    alternate = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert ratio(torch.full((4,), 0.5), readout) == pytest.approx(1.0, rel=1e-4)
    assert ratio(alternate, readout) == pytest.approx(8.0, rel=1e-4)
    assert ratio(alternate, across) == pytest.approx(1.0, rel=1e-4)
    t = sorted(set(drawn))  # the same batch's timesteps at every setting, 3 of them
    assert ratio(alternate, readout, share=1.0) == pytest.approx(1.0, rel=1e-4)
    steps = len(alphas)  # charged only strictly below the share's timestep
    assert ratio(alternate, readout, below=(t[-1] + 1) / steps) == pytest.approx(8.0, rel=1e-4)
    assert 1.0 + 1e-3 < ratio(alternate, readout, below=t[-1] / steps) < 8.0 - 1e-3
    assert ratio(alternate, readout, below=t[0] / steps) == pytest.approx(1.0, rel=1e-4)
    reached = object_mask(latents).amax(dim=2, keepdim=True)  # where any frame's object is
    assert 0 < float(reached.mean()) < 1
    assert ratio(alternate, readout * reached) > 1 + 1e-3  # the whole readout reaches the object's pixels
    assert ratio(alternate, readout * reached, margin=0) == pytest.approx(1.0, rel=1e-4)
    assert ratio(alternate, off_object(readout, latents), margin=0) == pytest.approx(8.0, rel=1e-4)
    wider = off_object(readout, latents, margin=1) != 0  # a margin keeps fewer pixels, a subset
    assert (wider <= (off_object(readout, latents) != 0)).all() and wider.sum() < (readout * (1 - reached) != 0).sum()
    with pytest.raises(ValueError, match="brightness_margin"):
        animatediff_loss_fn(pipe, brightness_gain=1.0, brightness_margin=-1, **settings)
    with pytest.raises(ValueError, match="brightness_gain"):
        animatediff_loss_fn(pipe, brightness_gain=-1.0, **settings)
    with pytest.raises(ValueError, match="brightness_below"):
        animatediff_loss_fn(pipe, brightness_gain=1.0, brightness_below=0.0, **settings)


def test_partial_captions_train_the_direction_word_alone_against_their_own_mean_clips(tmp_path):
    """The held-out split trains each colour-shape pair on one direction of each axis, so on full captions colour and
    shape tell the sign; captions without them do not. With partial_captions 1 every caption is partial, and at the
    pure-noise step a model predicting v = -(the mean of the clips its partial caption fits) has zero loss."""
    from types import SimpleNamespace

    from asyncvid.eval.clips import training_captions
    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training.animatediff import animatediff_loss_fn, partial_texts

    axis = {"left": "x", "right": "x", "up": "y", "down": "y"}
    signs = {}
    for c in training_captions():
        signs.setdefault((c.colour, c.shape, axis[c.direction]), set()).add(c.direction)
        signs.setdefault((c.shape, axis[c.direction]), set()).add(c.direction)
    assert all(len(s) == 1 for k, s in signs.items() if len(k) == 3)  # full captions: the sign is memorisable
    assert all(len(s) == 2 for k, s in signs.items() if len(k) == 2)  # without the colour: only the word tells

    torch.set_num_threads(1)
    pipe = build_tiny_animatediff()
    loss = animatediff_loss_fn(pipe, clips_per_caption=1, num_frames=2, cache_dir=tmp_path, mean_share=1.0,
                               partial_captions=1.0)
    captions, latents = torch.load(next(tmp_path.glob("latents-*.pt")), weights_only=False)
    texts = sorted({t for c in captions for t in partial_texts(c)})
    fits = {t: [t in partial_texts(c) for c in captions] for t in texts}
    means = [latents[fits[t]].mean(0) for t in texts] + [latents.mean(0)]
    embeds = pipe.encode_prompt(texts + [""], "cpu", 1, False)[0]
    seen = []

    def unet(sample, t, encoder_hidden_states):  # predicts v = -(mean clip) of the caption it is given
        which = [next(i for i, e in enumerate(embeds) if torch.equal(e, r)) for r in encoder_hidden_states[::2]]
        seen.extend(which)
        return SimpleNamespace(sample=torch.stack([-means[i] for i in which]))

    assert float(loss(unet, 32, torch.Generator().manual_seed(0))) < 1e-10
    full = {c.text for c in captions}
    assert not any(i < len(texts) and texts[i] in full for i in seen)  # no full caption when the share is 1
    kinds = {len(texts[i].split()) - (texts[i].split()[1] == "shape") for i in seen if i < len(texts)}
    assert kinds == {3, 4, 5}  # "a circle moving", "a red shape moving", "a shape moving" (+ the direction)
    with pytest.raises(ValueError, match="partial_captions must be in"):
        animatediff_loss_fn(pipe, clips_per_caption=1, num_frames=2, cache_dir=tmp_path, partial_captions=1.5)


def test_a_window_trains_on_consecutive_frames_of_one_clip(tmp_path):
    """window 2 of 4-frame clips: each sample the UNet sees is frames s, s + 1 of one cached clip (read back at a
    nearly clean step, a one-step schedule), every start occurs, and the caption's embedding is given per frame."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training.animatediff import animatediff_loss_fn

    torch.set_num_threads(1)
    pipe = build_tiny_animatediff()
    schedule = {"num_train_timesteps": 1, "prediction_type": "epsilon", "rescale_betas_zero_snr": False}
    loss = animatediff_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, schedule=schedule,
                               mean_share=0.0, window=2)
    _, latents = torch.load(next(tmp_path.glob("latents-*.pt")), weights_only=False)
    kept = float(DDPMScheduler.from_config(pipe.scheduler.config, **schedule).alphas_cumprod[0].sqrt())
    windows = torch.stack([latents[:, :, s:s + 2] for s in range(3)], dim=1)  # (clips, start, C, 2, h, w)
    seen = []

    def unet(sample, t, encoder_hidden_states):
        seen.append((sample, encoder_hidden_states))
        return SimpleNamespace(sample=torch.zeros_like(sample))

    for seed in range(4):
        loss(unet, 8, torch.Generator().manual_seed(seed))
    starts = set()
    for sample, hidden in seen:
        assert sample.shape[2] == 2 and torch.equal(hidden[0::2], hidden[1::2])
        error = (sample[:, None, None] / kept - windows[None]).abs().mean(dim=(3, 4, 5, 6)).flatten(1)
        best = error.min(dim=1)
        assert float(best.values.max()) < 0.1, best.values  # the noise at this step: about 0.03 x |N(0, 1)|
        starts.update((best.indices % 3).tolist())
    assert starts == {0, 1, 2}
    with pytest.raises(ValueError, match="window must be from 1 to num_frames"):
        animatediff_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, window=5)


def test_animatediff_trains_an_image_stage_first_and_starts_the_clips_from_it(tmp_path, monkeypatch):
    """With --image-steps, single frames train first (animatediff-image), and the clips' stage starts from its
    averaged weights; run again, the trained image stage is loaded, not retrained."""
    import json

    from diffusers import UNetMotionModel
    from typer.testing import CliRunner

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training import cli, image_stage

    build_tiny_animatediff().vae.save_pretrained(tmp_path / "vae" / "final")
    starts = []
    real_train = cli.train

    def train(model, loss, config, name):
        starts.append((name, {k: v.clone() for k, v in model.unet.state_dict().items()}))
        return real_train(model, loss, config, name=name)

    monkeypatch.setattr(cli, "train", train)
    monkeypatch.setattr(image_stage, "train", train)
    args = ["animatediff", "--workdir", str(tmp_path), "--steps", "2", "--anneal", "0", "--batch", "1", "--clips", "1",
            "--image-steps", "2", "--image-batch", "2", "--threads", "1"]
    first = CliRunner().invoke(cli.app, args)
    assert first.exit_code == 0, first.output
    image = UNetMotionModel.from_pretrained(tmp_path / "animatediff-image" / "final").state_dict()
    assert [name for name, _ in starts] == ["animatediff-image", "animatediff"]
    assert all(torch.equal(starts[1][1][k], image[k]) for k in image)
    assert not all(torch.equal(starts[0][1][k], image[k]) for k in image)  # the image stage did train
    log = json.loads((tmp_path / "animatediff" / "train_log.json").read_text())
    assert log["image_stage"] == {"steps": 2, "batch": 2, "lr": cli.IMAGE_LR}
    starts.clear()
    again = CliRunner().invoke(cli.app, [*args, "--steps", "3"])
    assert again.exit_code == 0 and "animatediff-image: trained already" in again.output, again.output
    assert [name for name, _ in starts] == ["animatediff"]
    assert all(torch.equal(starts[0][1][k], image[k]) for k in image)


def test_init_from_fine_tunes_an_exported_model_on_its_own_vae(tmp_path, monkeypatch):
    """`animatediff --init-from FOLDER --image-steps 0` starts the clips' stage from that pipeline folder's UNet and
    text encoder and encodes the clips with its VAE (the work folder needs no VAE stage), and logs where it started
    (round 32), and export ships that VAE; with an image stage asked for, or a folder without a UNet, it is refused,
    exit 2, before any work."""
    import json

    from diffusers import AutoencoderKL
    from typer.testing import CliRunner

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training import cli
    from asyncvid.training.export import export_all

    trained = build_tiny_animatediff(seed=3)  # not the weights the clips' stage would build (seed 0)
    trained.save_pretrained(tmp_path / "trained")
    starts = []
    real_train = cli.train

    def train(model, loss, config, name):
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_train(model, loss, config, name=name)

    monkeypatch.setattr(cli, "train", train)
    loss_settings, real_loss_fn = [], cli.animatediff_loss_fn

    def animatediff_loss_fn(pipe, **kw):
        loss_settings.append((kw["shared_noise"], kw.get("noise_mean", 1.0)))
        return real_loss_fn(pipe, **kw)

    monkeypatch.setattr(cli, "animatediff_loss_fn", animatediff_loss_fn)
    args = ["animatediff", "--workdir", str(tmp_path / "w"), "--steps", "1", "--anneal", "1", "--batch", "1",
            "--clips", "1", "--shared-noise", "0.5", "--noise-mean", "0", "--image-steps", "0", "--threads", "1",
            "--init-from", str(tmp_path / "trained")]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert loss_settings == [(0.5, 0.0)]  # round 38's recipe: trained on the noise it is sampled from
    expected = {**{f"unet.{k}": v for k, v in trained.unet.state_dict().items()},
                **{f"text_encoder.{k}": v for k, v in trained.text_encoder.state_dict().items()}}
    assert starts[0].keys() == expected.keys()
    assert all(torch.equal(starts[0][k], expected[k]) for k in expected)
    log = json.loads((tmp_path / "w" / "animatediff" / "train_log.json").read_text())
    assert log["init_from"] == str(tmp_path / "trained")
    assert (log["shared_noise"], log["noise_mean"]) == (0.5, 0.0)
    weights = (tmp_path / "trained" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert log["init_unet_sha256"] == hashlib.sha256(weights).hexdigest()  # which weights, not only where
    vae_sum = sum(float(p.detach().double().sum()) for p in trained.vae.parameters())
    assert [p.name for p in (tmp_path / "w" / "animatediff").glob(f"latents-*{vae_sum:.6e}.pt")]  # its VAE's
    # Exported, the fine-tune ships the VAE it trained in (the work folder has no VAE stage).
    export_all(tmp_path / "w", tmp_path / "out", stages=("animatediff",))
    shipped = AutoencoderKL.from_pretrained(tmp_path / "out" / "tiny-animatediff", subfolder="vae")
    assert torch.equal(shipped.decoder.conv_out.weight, trained.vae.decoder.conv_out.weight.half().to(shipped.dtype))
    card = " ".join((tmp_path / "out" / "tiny-animatediff" / "README.md").read_text().split())
    assert f"fine-tuned from the model then in `{tmp_path / 'trained'}` (UNet weights sha256 " in card  # its data
    assert hashlib.sha256(weights).hexdigest()[:12] in card  # is not all it saw
    assert '"noise_mean": 0.0' in card
    refused = CliRunner().invoke(cli.app, [*args[:-5], "2", *args[-4:], "--fresh"])
    assert refused.exit_code == 2 and "pass --image-steps 0" in refused.output, refused.output
    missing = CliRunner().invoke(cli.app, [*args[:-1], str(tmp_path / "nothing"), "--fresh"])
    assert missing.exit_code == 2 and "unet/config.json there" in missing.output, missing.output
    assert len(starts) == 1  # neither refusal trained


def test_svd_init_from_fine_tunes_an_exported_model_with_its_own_parts(tmp_path, monkeypatch):
    """`svd --init-from FOLDER` starts from that pipeline folder's UNet, encodes the clips with its VAE (the work
    folder needs no VAE stage) and conditions on its CLIP vision tower; it logs where it started, its
    --flicker-gain and the noise it trained on, and export ships that VAE and tower and recommends that noise (a
    stale VAE beside a later plain run is not read); a folder without a UNet is refused, exit 2, before any work."""
    import json
    import shutil

    from diffusers import AutoencoderKL
    from transformers import CLIPVisionModelWithProjection
    from typer.testing import CliRunner

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff, build_tiny_svd
    from asyncvid.training import cli
    from asyncvid.training.export import export_all, missing_parts

    torch.set_num_threads(1)
    trained = build_tiny_svd(seed=3)  # not the weights the stage would build (seed 0)
    trained.vae = build_tiny_animatediff(seed=3).vae  # tiny-svd decodes with the AnimateDiff VAE
    trained.save_pretrained(tmp_path / "trained")
    starts, gains = [], []
    real_train, real_loss_fn = cli.train, cli.svd_loss_fn

    def train(model, loss, config, name):
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_train(model, loss, config, name=name)

    def svd_loss_fn(pipe, **kw):
        gains.append((kw["flicker_gain"], kw["brightness_gain"], kw["brightness_below"], kw["shared_noise"],
                      kw["noise_mean"]))
        return real_loss_fn(pipe, **kw)

    monkeypatch.setattr(cli, "train", train)
    monkeypatch.setattr(cli, "svd_loss_fn", svd_loss_fn)
    args = ["svd", "--workdir", str(tmp_path / "w"), "--steps", "1", "--anneal", "1", "--batch", "1", "--clips", "1",
            "--threads", "1", "--shared-noise", "0.5", "--noise-mean", "0", "--flicker-gain", "3",
            "--brightness-gain", "5", "--brightness-below", "2", "--init-from", str(tmp_path / "trained")]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert gains == [(3.0, 5.0, 2.0, 0.5, 0.0)]
    assert starts[0].keys() == trained.unet.state_dict().keys()
    assert all(torch.equal(starts[0][k], v) for k, v in trained.unet.state_dict().items())
    log = json.loads((tmp_path / "w" / "svd" / "train_log.json").read_text())
    weights = (tmp_path / "trained" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (log["init_from"], log["flicker_gain"], log["brightness_gain"]) == (str(tmp_path / "trained"), 3.0, 5.0)
    assert (log["shared_noise"], log["noise_mean"], log["brightness_below"]) == (0.5, 0.0, 2.0)
    assert log["init_unet_sha256"] == hashlib.sha256(weights).hexdigest()
    vae_sum = sum(float(p.detach().double().sum()) for p in trained.vae.parameters())
    assert [p.name for p in (tmp_path / "w" / "svd").glob(f"latents-*{vae_sum:.6e}.pt")]  # its VAE's latents

    def shipped(part, cls):
        return cls.from_pretrained(tmp_path / "out" / "tiny-svd", subfolder=part)

    (tmp_path / "w" / "vae").mkdir()  # a VAE stage's log in the folder: not the VAE the fine-tune ships
    (tmp_path / "w" / "vae" / "train_log.json").write_text(json.dumps(
        {"steps": 7, "minutes": 0.1, "final_loss": 0.5, "config": {"batch": 2, "lr": 1e-3, "seed": 0}}))
    export_all(tmp_path / "w", tmp_path / "out", stages=("svd",))
    vae, tower = shipped("vae", AutoencoderKL), shipped("image_encoder", CLIPVisionModelWithProjection)
    assert torch.equal(vae.decoder.conv_out.weight, trained.vae.decoder.conv_out.weight.half())
    for name, weight in trained.image_encoder.state_dict().items():
        if weight.is_floating_point():
            assert torch.equal(tower.state_dict()[name], weight.half()), name
    card = " ".join((tmp_path / "out" / "tiny-svd" / "README.md").read_text().split())
    assert f"fine-tuned from the model then in `{tmp_path / 'trained'}`" in card and '"flicker_gain": 3.0' in card
    sampling = json.loads((tmp_path / "out" / "tiny-svd" / "sampling.json").read_text())
    # sampled from one noise, however it trained (round 41: trained at 0.5, it calms more clips sampled at 1)
    assert sampling == {"max_guidance_scale": 2.0, "shared_noise": 1.0, "noise_mean": 0.0}
    assert "| vae | 7 |" not in card and "| svd | 1 |" in card  # the VAE stage's row: not the VAE it ships
    (tmp_path / "w" / "svd" / "vae").rename(tmp_path / "aside")
    assert "svd --init-from FOLDER --fresh" in missing_parts(tmp_path / "w", "svd")  # not the VAE stage's command
    (tmp_path / "aside").rename(tmp_path / "w" / "svd" / "vae")
    # A plain run in the same folder later: its VAE is the work folder's VAE stage, not the fine-tune's copy.
    plain_vae = build_tiny_animatediff(seed=5).vae
    plain_vae.save_pretrained(tmp_path / "w" / "vae" / "final")
    again = CliRunner().invoke(cli.app, [*args[:-12], "--fresh"])
    assert again.exit_code == 0, again.output
    shutil.rmtree(tmp_path / "out")
    export_all(tmp_path / "w", tmp_path / "out", stages=("svd",))
    assert torch.equal(shipped("vae", AutoencoderKL).decoder.conv_out.weight, plain_vae.decoder.conv_out.weight.half())
    assert json.loads((tmp_path / "out" / "tiny-svd" / "sampling.json").read_text()) == sampling
    projection = shipped("image_encoder", CLIPVisionModelWithProjection).visual_projection.weight  # the built one
    assert not torch.equal(projection, trained.image_encoder.visual_projection.weight.half())
    missing = CliRunner().invoke(cli.app, [*args[:-1], str(tmp_path / "nothing"), "--fresh"])
    assert missing.exit_code == 2 and "unet/config.json there" in missing.output, missing.output
    for bound in (["--brightness-below", "2"], ["--brightness-gain", "5", "--brightness-below", "0"]):
        unbounded = CliRunner().invoke(cli.app, [*args[:-12], *bound, "--fresh"])  # no gain, or a sigma of 0
        assert unbounded.exit_code == 2 and "--brightness-below" in unbounded.output, unbounded.output
    shutil.rmtree(tmp_path / "trained" / "image_encoder")
    no_tower = CliRunner().invoke(cli.app, [*args, "--fresh"])
    assert no_tower.exit_code == 2 and "image_encoder/config.json there" in no_tower.output, no_tower.output
    one = CliRunner().invoke(cli.app, [*args[:-8], "--shared-noise", "1", "--fresh"])
    assert one.exit_code == 2 and "--shared-noise 1.0 must be in [0, 1)" in one.output, one.output
    assert len(starts) == 2  # the refusals trained nothing


def _spy_on_pair_losses(monkeypatch) -> list:
    """The (attribute, geometries) of every pair loss call the training CLI makes, recorded as it trains."""
    from asyncvid.training import image_stage

    calls = []
    real = image_stage.pair_loss_fn

    def pair_loss_fn(pipe, **kwargs):
        loss = real(pipe, **kwargs)
        return lambda model, batch, generator: calls.append((kwargs["attribute"], batch)) or loss(model, batch,
                                                                                                   generator)

    monkeypatch.setattr(image_stage, "pair_loss_fn", pair_loss_fn)
    return calls


def test_shape_pairs_join_the_image_stage_and_the_log(tmp_path, monkeypatch):
    """--shape-pairs trains the image stage on plain frames and shape pairs (their latents cached beside the
    clips'), and the training log records the weight."""
    import json

    from typer.testing import CliRunner

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training import cli, image_stage

    build_tiny_animatediff().vae.save_pretrained(tmp_path / "vae" / "final")
    monkeypatch.setattr(image_stage, "SHAPE_PAIR_GEOMETRIES", 6)
    calls = _spy_on_pair_losses(monkeypatch)
    args = ["animatediff", "--workdir", str(tmp_path), "--steps", "1", "--anneal", "0", "--batch", "1", "--clips", "1",
            "--image-steps", "2", "--image-batch", "8", "--threads", "1", "--shape-pairs", "4"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert calls == [("shape", 2)] * 2  # a quarter of the batch's geometries, two shapes each: half of its frames
    assert list((tmp_path / "animatediff").glob("latents-*shapes6*"))
    for stage in ("animatediff", "animatediff-image"):
        log = json.loads((tmp_path / stage / "train_log.json").read_text())
        assert (log["shape_pairs"], log["colour_pairs"]) == (4.0, 0.0)
    # The finished image stage is reused only with the weights it was trained with; another is refused, exit 2,
    # before the clips' stage writes anything.
    clips_log = (tmp_path / "animatediff" / "train_log.json").read_bytes()
    refused = CliRunner().invoke(cli.app, [*args[:-1], "0", "--steps", "2"])
    assert refused.exit_code == 2, refused.output
    assert "--shape-pairs 0" in refused.output and "--shape-pairs 4" in refused.output
    refused = CliRunner().invoke(cli.app, [*args, "--colour-pairs", "2", "--steps", "2"])
    assert refused.exit_code == 2, refused.output
    assert "--colour-pairs 2" in refused.output and "--colour-pairs 0" in refused.output
    assert (tmp_path / "animatediff" / "train_log.json").read_bytes() == clips_log
    reused = CliRunner().invoke(cli.app, [*args, "--steps", "2"])
    assert reused.exit_code == 0 and "trained already" in reused.output, reused.output
    assert calls == [("shape", 2)] * 2  # not trained again


def test_a_background_puts_every_training_clip_on_one_tone():
    """`background` renders every training clip on that plain tone, the captions unchanged (round 32); without it
    the clips' backgrounds vary."""
    from asyncvid.eval.clips import BACKGROUNDS
    from asyncvid.training.data import clip_set

    captions, varied = clip_set(1, 2, 0)
    again, toned = clip_set(1, 2, 0, background=4)
    assert again == captions
    corners = lambda clips: {tuple(c) for c in ((clips[:, :, :, 0, 0] + 1) * 127.5).round().flatten(0, 1).tolist()}
    assert corners(toned) == {tuple(float(v) for v in BACKGROUNDS[4])}
    assert len(corners(varied)) > 3


def test_the_training_cli_trains_both_stages_on_one_background_and_keeps_to_it(tmp_path, monkeypatch):
    """`animatediff --background K` encodes its clips and colour pairs on that tone (their own caches) for both
    stages and logs it; the finished image stage is reused only with the same background, another refused in one
    line, exit 2; an index outside BACKGROUNDS is refused before any work."""
    import json

    from typer.testing import CliRunner

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training import cli, image_stage

    build_tiny_animatediff().vae.save_pretrained(tmp_path / "vae" / "final")
    monkeypatch.setattr(image_stage, "COLOUR_PAIR_GEOMETRIES", 4)
    args = ["animatediff", "--workdir", str(tmp_path), "--steps", "1", "--anneal", "0", "--batch", "1", "--clips", "1",
            "--image-steps", "1", "--image-batch", "8", "--threads", "1", "--colour-pairs", "4", "--background", "4"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    caches = sorted(p.name.split("-")[1:3] for p in (tmp_path / "animatediff").glob("latents-*"))
    assert caches == [["background4", "clips1"], ["background4", "colours4"]]
    for stage in ("animatediff", "animatediff-image"):
        assert json.loads((tmp_path / stage / "train_log.json").read_text())["background"] == 4
    refused = CliRunner().invoke(cli.app, [*args[:-2], "--steps", "2"])
    assert refused.exit_code == 2, refused.output
    assert "--background unset" in refused.output and "--background 4" in refused.output
    outside = CliRunner().invoke(cli.app, [*args[:-1], "6"])
    assert outside.exit_code == 2 and "--background" in outside.output, outside.output


def test_colour_and_shape_pairs_share_the_pairs_half_of_the_batch(tmp_path, monkeypatch):
    """With --colour-pairs and --shape-pairs both, the image stage's pairs half is split between the two kinds
    (colour pairs cached under their own name) and the log records both weights."""
    import json

    from typer.testing import CliRunner

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training import cli, image_stage

    build_tiny_animatediff().vae.save_pretrained(tmp_path / "vae" / "final")
    monkeypatch.setattr(image_stage, "SHAPE_PAIR_GEOMETRIES", 3)
    monkeypatch.setattr(image_stage, "COLOUR_PAIR_GEOMETRIES", 2)
    calls = _spy_on_pair_losses(monkeypatch)
    args = ["animatediff", "--workdir", str(tmp_path), "--steps", "1", "--anneal", "0", "--batch", "1", "--clips", "1",
            "--image-steps", "1", "--image-batch", "16", "--threads", "1", "--shape-pairs", "4", "--colour-pairs", "2"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert calls == [("shape", 2), ("colour", 2)]  # 8 paired frames: 2 geometries of each kind, two frames each
    assert list((tmp_path / "animatediff").glob("latents-*colours2*"))
    log = json.loads((tmp_path / "animatediff-image" / "train_log.json").read_text())
    assert (log["shape_pairs"], log["colour_pairs"]) == (4.0, 2.0)


def test_train_all_refuses_an_anneal_longer_than_the_steps_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from asyncvid.training.cli import app

    result = CliRunner().invoke(app, ["all", "--workdir", str(tmp_path / "w"), "--steps", "500", "--anneal", "700"])
    assert result.exit_code == 2 and "--anneal 700" in result.output
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("reverse", [False, True])
def test_vae_round_trip_is_scored_on_what_the_decoder_returns(reverse):
    """A VAE that gives its input back keeps every held-out caption; one that plays the clip backwards keeps colour
    and shape and loses every direction. The shipped architecture maps 64x64 frames to 8x8x4 latents."""
    from types import SimpleNamespace

    from asyncvid.training.vae import build_vae, round_trip_scores

    identity = SimpleNamespace(
        encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=x)),
        decode=lambda z: SimpleNamespace(sample=z.flip(0) if reverse else z))
    scores = round_trip_scores(identity)
    assert (scores["colour"], scores["shape"], scores["direction"]) == (100.0, 100.0, 0.0 if reverse else 100.0)
    with torch.no_grad():
        assert build_vae(0).encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 4, 8, 8)


def test_vae_kl_weight_scales_the_kl_term():
    """`vae --kl-weight`: the loss grows by the weight times the posterior's mean KL."""
    from types import SimpleNamespace

    from asyncvid.training.vae import vae_loss_fn

    posterior = lambda x: SimpleNamespace(sample=lambda generator: x, kl=lambda: torch.full((len(x),), 2.0))  # noqa: E731
    model = SimpleNamespace(encode=lambda x: SimpleNamespace(latent_dist=posterior(x)),
                            decode=lambda z: SimpleNamespace(sample=z))
    losses = [float(vae_loss_fn(model, temporal=False, clips_per_caption=1, num_frames=2, kl_weight=w)(
        model, 4, torch.Generator().manual_seed(0))) for w in (0.0, 0.5)]
    assert losses[1] - losses[0] == pytest.approx(1.0)


def test_mean_latent_clips_are_the_average_of_the_encodings_decoded():
    """`mean_latent_scores` decodes the average of a caption's encoded clips (what the first zero-SNR sampling step
    predicts); of one clip, that is the round trip."""
    from types import SimpleNamespace

    from asyncvid.eval.clips import heldout_captions
    from asyncvid.training.data import clip_tensor
    from asyncvid.training.vae import mean_latent_scores, round_trip_scores

    decoded = []
    identity = SimpleNamespace(encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=x)),
                               decode=lambda z: decoded.append(z) or SimpleNamespace(sample=z))
    assert mean_latent_scores(identity, clips=1) == round_trip_scores(identity)
    decoded.clear()
    mean_latent_scores(identity, clips=2, num_frames=4)
    first = heldout_captions()[0]
    assert torch.allclose(decoded[0], (clip_tensor(first, 0, 4) + clip_tensor(first, 1, 4)) / 2)


def test_edge_loss_charges_blur_and_not_a_perfect_copy():
    """The VAE's edge term (neighbouring-pixel differences) is zero for an exact reconstruction and adds to the
    loss of a blurred one, on top of what its pixel terms already charge."""
    from types import SimpleNamespace

    from asyncvid.training.vae import vae_loss_fn

    def autoencoder(blur: bool):
        def decode(z):
            return SimpleNamespace(sample=torch.nn.functional.avg_pool2d(z, 3, 1, 1) if blur else z)
        posterior = lambda x: SimpleNamespace(sample=lambda generator: x, kl=lambda: torch.zeros(len(x)))  # noqa: E731
        return SimpleNamespace(encode=lambda x: SimpleNamespace(latent_dist=posterior(x)), decode=decode)

    def loss(model, edge_weight):
        return float(vae_loss_fn(model, temporal=False, clips_per_caption=1, num_frames=2, edge_weight=edge_weight)(
            model, 4, torch.Generator().manual_seed(0)))

    sharp, blurred = autoencoder(False), autoencoder(True)
    assert loss(sharp, 2.0) == loss(sharp, 0.0) == 0.0
    assert loss(blurred, 2.0) > loss(blurred, 0.0) > 0.0


def _alignment_cost(**align) -> float:
    """What an alignment option adds to the VAE loss of a model whose latents are all zero (they tell nothing)."""
    from types import SimpleNamespace

    from asyncvid.training.vae import vae_loss_fn

    posterior = SimpleNamespace(mean=torch.zeros(4, 4, 4, 4), sample=lambda generator: torch.zeros(4, 3, 32, 32),
                                kl=lambda: torch.zeros(4))
    model = SimpleNamespace(encode=lambda x: SimpleNamespace(latent_dist=posterior),
                            decode=lambda z: SimpleNamespace(sample=z))
    plain, aligned = (float(vae_loss_fn(model, temporal=False, clips_per_caption=1, num_frames=2, **options)(
        model, 4, torch.Generator().manual_seed(0))) for options in ({}, align))
    return aligned - plain


def test_shape_alignment_charges_latents_that_do_not_tell_the_shape_on_its_pixels():
    """`vae --shape-align`: the cross-entropy of the shape read along fixed directions is near zero for latents that
    step along their shape's direction on the shape's latent pixels, large for another shape's, blind to pixels off
    the shape, and log(3) (no information) for constant latents, which the loss adds at its weight."""
    from asyncvid.training.vae import SHAPE_LOGIT_SCALE, _label_error, shape_readout

    readout = shape_readout()
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1  # the shape covers the middle 2x2 of 4x4 latent pixels
    labels = torch.tensor([0, 2])
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    latents[:, :, 1:3, 1:3] = 3 * readout[labels][:, :, None, None]
    assert float(_label_error(latents, mask, labels, readout)) < 0.05
    assert float(_label_error(latents, mask, labels.flip(0), readout)) > 2 * SHAPE_LOGIT_SCALE
    off_shape = latents.clone()
    off_shape[:, :, 0] = 10.0
    assert torch.equal(_label_error(off_shape, mask, labels, readout), _label_error(latents, mask, labels, readout))
    assert float(_label_error(latents, torch.zeros_like(mask), labels, readout)) == 0.0

    assert _alignment_cost(shape_align=2.0) == pytest.approx(2 * math.log(3), rel=1e-5)


def test_colour_alignment_puts_the_colours_on_a_wheel_the_shape_readout_does_not_see():
    """`vae --colour-align`: 8 unit directions at equal angles in colour-wheel order (neighbours 45 degrees apart,
    opposite hues opposite), each moving every shape's logit alike, so it cannot undo the shape alignment; the loss
    reads each colour from its own direction, and adds log(8) at its weight for latents that tell no colour."""
    from asyncvid.eval.clips import COLOURS
    from asyncvid.training.vae import COLOUR_WHEEL, _label_error, colour_readout, shape_readout

    wheel, shapes = colour_readout(), shape_readout()
    assert COLOUR_WHEEL == tuple(COLOURS) and wheel.shape == (8, 4)
    cosines = wheel @ wheel.T
    assert torch.allclose(torch.diagonal(cosines), torch.ones(8), atol=1e-5)
    assert torch.allclose(torch.diagonal(cosines.roll(1, 1)), torch.full((8,), math.cos(math.pi / 4)), atol=1e-5)
    assert torch.allclose(torch.diagonal(cosines.roll(4, 1)), -torch.ones(8), atol=1e-5)
    moved = shapes @ wheel.T  # (shapes, colours): a colour's step in each shape's logit
    assert torch.allclose(moved, moved[:1].expand_as(moved), atol=1e-5)

    mask = torch.ones(8, 1, 8, 8)
    labels = torch.arange(8)
    latents = 4 * wheel[:, :, None, None].expand(8, 4, 1, 1)
    assert float(_label_error(latents, mask, labels, wheel)) < 0.1
    assert float(_label_error(latents, mask, labels.roll(1), wheel)) > 1.0  # each drawn as its neighbour

    assert _alignment_cost(colour_align=2.0) == pytest.approx(2 * math.log(8), rel=1e-5)


def test_latent_noise_makes_an_exact_copy_pay_and_is_off_by_default():
    """`vae --latent-noise`: the decoder sees latents with noise of that many standard deviations added, so an
    autoencoder that only copies its latents is charged for it; at 0 it is not."""
    from types import SimpleNamespace

    from asyncvid.training.vae import vae_loss_fn

    posterior = lambda x: SimpleNamespace(mean=x, sample=lambda generator: x, kl=lambda: torch.zeros(len(x)))  # noqa: E731
    copy = SimpleNamespace(encode=lambda x: SimpleNamespace(latent_dist=posterior(x)),
                           decode=lambda z: SimpleNamespace(sample=z))
    losses = [float(vae_loss_fn(copy, temporal=False, clips_per_caption=1, num_frames=2, latent_noise=n)(
        copy, 4, torch.Generator().manual_seed(0))) for n in (0.0, 0.3)]
    assert losses[0] == 0.0 < losses[1]


def test_vae_windows_follow_the_shape_and_whole_frames_stay_whole():
    """32x32 windows hold the shape (the loss is spent where it is scored); crop 64 trains on the frames as sampled,
    since the VAE's group norms and attention see a window differently from a whole frame."""
    from asyncvid.training.data import clip_set, object_weight
    from asyncvid.training.vae import _centres, _crop

    _, pool = clip_set(1, 2, 0)
    frames, centres = pool.flatten(0, 1)[:6], _centres(pool).flatten(0, 1)[:6]
    windows = _crop(frames, centres, torch.Generator().manual_seed(0), 32)
    assert windows.shape == (6, 3, 32, 32)
    assert all((object_weight(w[None]) > 1).sum() > 20 for w in windows)
    assert torch.equal(_crop(frames, centres, torch.Generator().manual_seed(0), 64), frames)


def test_vae_recipe_runs_its_phases_each_resuming_the_last(tmp_path, monkeypatch):
    """`vae` without budget options trains VAE_RECIPE's phases in order, one checkpoint carried through, each with
    its own shape alignment and latent noise (r5 adds the noise in its last phases): the run ends at the last
    phase's step count, on the last phase's settings, and its log lists the phases. A loss option given on the
    command line holds for every phase."""
    import json

    from asyncvid.training import cli

    monkeypatch.setattr(cli, "VAE_RECIPE", (dict(steps=2, anneal=0, lr=1e-3, crop=32, batch=2, shape_align=0.5),
                                            dict(steps=3, anneal=1, lr=3e-4, crop=64, batch=1, shape_align=0.5,
                                                 latent_noise=0.2)))
    monkeypatch.setattr(cli, "round_trip_scores", lambda vae: {"shape": 0.0})  # scored for real in the tests above
    monkeypatch.setattr(cli, "mean_latent_scores", lambda vae: {"colour": 0.0})
    monkeypatch.setattr(cli, "set_scaling_factor", lambda vae: 1.0)
    trained_on, loss_fn = [], cli.vae_loss_fn

    def recording(model, **kw):
        trained_on.append((kw["shape_align"], kw["latent_noise"]))
        return loss_fn(model, **kw)

    monkeypatch.setattr(cli, "vae_loss_fn", recording)
    cli.vae(workdir=tmp_path, clips=1)
    log = json.loads((tmp_path / "vae" / "train_log.json").read_text())
    assert log["steps"] == 3 and log["crop"] == 64 and log["config"]["lr"] == 3e-4
    assert [p["steps"] for p in log["phases"]] == [2, 3]
    assert len(torch.load(tmp_path / "vae" / "checkpoint.pt", weights_only=False)["losses"]) == 3
    assert trained_on == [(0.5, 0.0), (0.5, 0.2)]
    assert [(p["shape_align"], p["latent_noise"]) for p in log["phases"]] == trained_on
    assert (log["shape_align"], log["latent_noise"]) == (0.5, 0.2)
    trained_on.clear()
    cli.vae(workdir=tmp_path, clips=1, fresh=True, latent_noise=0.1)
    assert trained_on == [(0.5, 0.1), (0.5, 0.1)]
    trained_on.clear()
    cli.vae(workdir=tmp_path, clips=1, fresh=True, colour_align=0.3)
    assert trained_on == [(0.5, 0.0), (0.5, 0.2)]
    log = json.loads((tmp_path / "vae" / "train_log.json").read_text())
    assert [p["colour_align"] for p in log["phases"]] == [0.3, 0.3] and log["colour_align"] == 0.3


def test_a_continued_vae_logs_every_phase_with_the_loss_it_trained_on(tmp_path, monkeypatch):
    """A VAE trained by two commands (round 19's noise added to a finished VAE) lists both commands' phases, each
    with its own --shape-align and --latent-noise, so its model card tells the recipe; --fresh forgets the first."""
    import json

    from asyncvid.training import cli

    monkeypatch.setattr(cli, "VAE_RECIPE", (dict(steps=2, anneal=0, lr=1e-3, crop=32, batch=2),))
    for name in ("round_trip_scores", "mean_latent_scores", "set_scaling_factor"):  # scored for real above
        monkeypatch.setattr(cli, name, lambda vae: 1.0)
    cli.vae(workdir=tmp_path, clips=1, steps=2, shape_align=0.5)
    cli.vae(workdir=tmp_path, clips=1, steps=3, latent_noise=0.2)
    cli.vae(workdir=tmp_path, clips=1, steps=3, latent_noise=0.2)  # a rerun of a finished phase adds no entry
    log = json.loads((tmp_path / "vae" / "train_log.json").read_text())
    assert [(p["steps"], p["shape_align"], p["latent_noise"]) for p in log["phases"]] == [(2, 0.5, 0.0), (3, 0.0, 0.2)]
    cli.vae(workdir=tmp_path, clips=1, steps=1, fresh=True)
    log = json.loads((tmp_path / "vae" / "train_log.json").read_text())
    assert [p["steps"] for p in log["phases"]] == [1]


def test_a_checkpoint_of_another_architecture_says_to_start_fresh(tmp_path):
    """A work folder from an older recipe (another VAE architecture) gives one clear line, not a size-mismatch dump."""
    train(_toy(), _loss, TrainConfig(tmp_path, steps=1), name="toy")
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with pytest.raises(ValueError, match="different model.*--fresh"):
        train(wider, _loss, TrainConfig(tmp_path, steps=2), name="toy")


@pytest.mark.parametrize("args, message", [(["vae", "--steps", "10", "--anneal", "20"], "--anneal 20"),
                                           (["vae", "--crop", "30"], "--crop 30"),
                                           (["svd", "--steps", "10", "--anneal", "11"], "--anneal 11"),
                                           (["animatediff", "--image-steps", "-1"], "'--image-steps'"),
                                           (["animatediff", "--motion-gain", "0"], "'--motion-gain'"),
                                           (["animatediff", "--spatial-gain", "0"], "'--spatial-gain'"),
                                           (["animatediff", "--object-gain", "-1", "--steps", "1"], "'--object-gain'"),
                                           (["vae", "--shape-align", "-1", "--steps", "1"], "'--shape-align'"),
                                           (["vae", "--latent-noise", "-0.2", "--steps", "1"], "'--latent-noise'"),
                                           (["vae", "--kl-weight", "-1", "--steps", "1"], "'--kl-weight'"),
                                           (["svd", "--object-gain", "-2", "--steps", "1"], "'--object-gain'"),
                                           (["animatediff", "--brightness-below", "0.6"], "needs --brightness-gain"),
                                           (["animatediff", "--brightness-below", "0"], "'--brightness-below'"),
                                           (["animatediff", "--brightness-margin", "0"], "needs --brightness-gain"),
                                           (["animatediff", "--brightness-gain", "1", "--brightness-margin", "-1"],
                                            "'--brightness-margin'"),
                                           (["animatediff", "--noise-mean", "1.5"], "'--noise-mean'")])
def test_training_budgets_are_checked_before_anything_runs(tmp_path, args, message):
    from typer.testing import CliRunner

    from asyncvid.training.cli import app

    result = CliRunner().invoke(app, [*args, "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_shared_noise_trains_on_the_noise_the_pipeline_samples_from(tmp_path):
    """At the pure-noise step (mean_share 1) the UNet's input is the noise itself: with shared_noise its frames have
    one spatial mean and the rest correlates by the share, as pipelines/initial_noise.py draws it for sampling; with
    noise_mean 0 every frame's spatial mean is zero, shared or not (round 38)."""
    from types import SimpleNamespace

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training.animatediff import animatediff_loss_fn

    torch.set_num_threads(1)
    pipe = build_tiny_animatediff()
    seen = []

    def unet(sample, t, encoder_hidden_states):
        seen.append(sample)
        return SimpleNamespace(sample=torch.zeros_like(sample))

    for share, mean in ((0.0, 1.0), (0.5, 1.0), (0.5, 0.0), (0.0, 0.0)):
        seen.clear()
        loss = animatediff_loss_fn(pipe, clips_per_caption=1, num_frames=4, cache_dir=tmp_path, mean_share=1.0,
                                   shared_noise=share, noise_mean=mean)
        loss(unet, 64, torch.Generator().manual_seed(0))
        [noise] = seen  # (clips, C, frames, h, w)
        means = noise.mean((-2, -1))
        rest = noise - means[..., None, None]
        correlation = float((rest[:, :, 0] * rest[:, :, 3]).mean() / rest[:, :, 0].square().mean())
        assert abs(float(noise.std()) - 1) < 0.05
        if not mean:
            assert float(means.abs().max()) < 1e-5 and abs(correlation - share) < 0.05
        elif share:
            assert torch.allclose(means, means[:, :, :1].expand_as(means), atol=1e-3)
            assert abs(correlation - share) < 0.05
        else:
            assert float((means - means[:, :, :1]).abs().max()) > 0.1 and abs(correlation) < 0.05


def test_colour_pairs_pair_each_colour_with_its_nearest_hues():
    """A colour is paired with two others, never itself, and the warm hues a model trades (red, orange, yellow)
    with each other; a shape with every other shape."""
    from asyncvid.eval.clips import COLOURS
    from asyncvid.training.animatediff import _partners

    names = list(COLOURS)
    colour = {names[i]: {names[j] for j in row} for i, row in enumerate(_partners("colour").tolist())}
    assert all(len(partners) == 2 and name not in partners for name, partners in colour.items())
    assert colour["red"] == {"orange", "yellow"} and colour["orange"] == {"red", "yellow"}
    assert colour["cyan"] == {"green", "blue"}
    assert _partners("shape").tolist() == [[1, 2], [2, 0], [0, 1]]
    with pytest.raises(ValueError, match="'size'"):
        _partners("size")


@pytest.mark.parametrize("attribute", ["shape", "colour"])
def test_pairs_noise_two_frames_alike_and_train_their_difference(tmp_path, attribute):
    """Each pair is one geometry with two shapes (or colours), captioned "a <colour> <shape>", at one step with one
    noise: the inputs differ by sqrt(alpha) times the two latents' difference, and (the noise cancelling) the
    difference term charges the targets' difference, sqrt(1 - alpha) times the latents'."""
    from types import SimpleNamespace

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training.animatediff import _objective, pair_loss_fn

    torch.set_num_threads(1)
    pipe = build_tiny_animatediff()
    schedule, weight, _ = _objective(pipe, None, 5.0)
    seen, losses = [], {}

    def unet(sample, t, encoder_hidden_states):
        seen.append((sample, t, encoder_hidden_states))
        return SimpleNamespace(sample=torch.zeros_like(sample))

    for difference_weight in (0.0, 4.0):
        seen.clear()
        loss = pair_loss_fn(pipe, pairs=8, attribute=attribute, cache_dir=tmp_path,
                            difference_weight=difference_weight)
        losses[difference_weight] = float(loss(unet, 6, torch.Generator().manual_seed(0)))
    [(sample, t, hidden)] = seen
    assert sample.shape[0] == 12 and torch.equal(t[:6], t[6:]) and int(t.max()) < 999
    assert not torch.equal(hidden[:6], hidden[6:])  # the captions differ (in the shape or colour word)
    alpha = schedule.alphas_cumprod[t[:6]]
    latents_apart = (sample[:6] - sample[6:]) / alpha.sqrt()[:, None, None, None, None]
    targets_apart = (1 - alpha) * latents_apart.square().mean(dim=(1, 2, 3, 4))
    expected = 4.0 * float((weight[t[:6]] * targets_apart).mean())
    assert expected > 1e-4 and losses[4.0] - losses[0.0] == pytest.approx(expected, rel=1e-3)
    assert list(tmp_path.glob(f"latents-*{attribute}s8*"))  # encoded once, kept for the next run


def test_export_of_an_untrained_part_is_refused_before_anything_is_written(tmp_path):
    """`export` from a work folder without the stage's UNet, or without any VAE for it, is one line naming the
    missing folder and the command that trains it, exit 2, and the destination is left as it was."""
    from typer.testing import CliRunner

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training import cli

    args = ["export", "--workdir", str(tmp_path / "w"), "--dest", str(tmp_path / "out"), "--only", "animatediff"]
    empty = CliRunner().invoke(cli.app, args)
    assert empty.exit_code == 2 and "no trained animatediff UNet" in empty.output, empty.output
    build_tiny_animatediff(seed=0).unet.save_pretrained(tmp_path / "w" / "animatediff" / "final")
    no_vae = CliRunner().invoke(cli.app, args)
    assert no_vae.exit_code == 2 and "no VAE for animatediff" in no_vae.output, no_vae.output
    assert "python -m asyncvid.training vae" in " ".join(no_vae.output.split()), no_vae.output
    assert not (tmp_path / "out").exists()


def test_colour_pairs_differ_only_in_the_objects_colour():
    """`vae-invariance`'s pairs (round 36): one frame of a training clip and the same frame with the object in
    another colour, so whatever differs between their latents off the object is the colour leaking there."""
    from asyncvid.eval.clips import COLOURS
    from asyncvid.training.colour_invariance import COLOUR_WHEEL, colour_pair

    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        frames, _, first, second = colour_pair(generator)
        assert first != second
        a, b = (torch.from_numpy(f).float() for f in frames)
        differs = (a != b).any(-1)
        assert 0 < differs.float().mean() < 0.2  # the object, and nothing of the background
        # Where they differ, each pixel is the background blended with the object's colour by the same coverage:
        # the difference is that coverage times the difference of the two colours.
        colours = torch.tensor([COLOURS[COLOUR_WHEEL[i]] for i in (first, second)], dtype=torch.float32)
        step = colours[0] - colours[1]
        coverage = (a - b)[differs] @ step / step.square().sum()
        assert coverage.min() > 0 and coverage.max() <= 1.01
        assert ((a - b)[differs] - coverage[:, None] * step).abs().max() <= 1.5  # rounding to uint8


def test_colour_invariance_charges_the_pairs_latent_difference_off_the_object():
    """The invariance term is the pairs' squared latent difference away from the object: with its weight at 0 the
    loss is the rest, with a weight it is larger by what a random VAE leaks of the colour into the background."""
    from asyncvid.training.colour_invariance import background_code_spread, colour_invariance_loss_fn
    from asyncvid.training.vae import build_vae

    vae = build_vae(seed=0)
    vae.register_to_config(scaling_factor=20.0)  # a random encoder's latents are small: in units of their spread
    weights = dict(anchor=0.0, shape_align=0.0, colour_align=0.0, latent_noise=0.0)
    with torch.no_grad():
        losses = {w: float(colour_invariance_loss_fn(vae, invariance=w, **weights)(vae, 2, torch.Generator().manual_seed(1)))
                  for w in (0.0, 1.0, 2.0)}
    assert losses[1.0] > losses[0.0] * 1.01
    assert losses[2.0] - losses[0.0] == pytest.approx(2 * (losses[1.0] - losses[0.0]), rel=1e-3)
    assert background_code_spread(vae) > 0  # a random encoder's background follows the object's colour


def test_vae_invariance_writes_the_folder_with_only_its_vae_changed(tmp_path):
    """`vae-invariance --init-from FOLDER --dest NEW` fine-tunes FOLDER's VAE and writes FOLDER again at NEW with
    that VAE (its latent scale kept: the UNet's), the rest byte for byte, and logs the background code's spread
    before and after; an existing --dest or a folder without a VAE is refused, exit 2, before any training."""
    import json

    from diffusers import AutoencoderKL
    from typer.testing import CliRunner

    from asyncvid.pipelines.tiny_models import build_tiny_animatediff
    from asyncvid.training import cli

    build_tiny_animatediff(seed=3).save_pretrained(tmp_path / "trained")
    args = ["vae-invariance", "--init-from", str(tmp_path / "trained"), "--dest", str(tmp_path / "new"),
            "--workdir", str(tmp_path / "w"), "--steps", "2", "--anneal", "1", "--batch", "1", "--threads", "1"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "new" / unet).read_bytes() == (tmp_path / "trained" / unet).read_bytes()
    before = AutoencoderKL.from_pretrained(tmp_path / "trained" / "vae")
    after = AutoencoderKL.from_pretrained(tmp_path / "new" / "vae")
    assert after.config.scaling_factor == before.config.scaling_factor
    assert not torch.equal(after.encoder.conv_in.weight, before.encoder.conv_in.weight)
    log = json.loads((tmp_path / "w" / "vae-invariance" / "train_log.json").read_text())
    assert log["steps"] == 2 and set(log["background_code_spread"]) == {"before", "after"}
    again = CliRunner().invoke(cli.app, args)
    assert again.exit_code == 2 and "exists; name a new folder" in _unboxed(again.output), again.output
    (tmp_path / "novae").mkdir()
    missing = CliRunner().invoke(cli.app, [*args[:2], str(tmp_path / "novae"), *args[3:4], str(tmp_path / "x"),
                                           *args[5:]])
    assert missing.exit_code == 2 and "no vae/config.json there" in _unboxed(missing.output), missing.output
    assert not (tmp_path / "x").exists()


def _unboxed(output: str) -> str:
    """A CLI error as one line: typer draws it in a box, wrapped at the terminal's width."""
    return " ".join(output.replace("│", " ").split())
