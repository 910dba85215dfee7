"""`python -m asyncvid.training vae-steady` (round 43): a trained VAE's decoder fine-tuned to draw a clip's
background at one brightness, its encoder (so the UNet's latents) unchanged."""

import json

import torch
from typer.testing import CliRunner

from asyncvid.training.steady_decoder import steady_decoder_loss_fn, unsteadiness


def _clips(offsets: torch.Tensor) -> torch.Tensor:
    """Errors of 2 clips x len(offsets) frames: frame f's pixels all off by offsets[f]."""
    return offsets[None, :, None, None, None].expand(2, len(offsets), 3, 8, 8).clone()


def test_unsteadiness_charges_the_background_changing_between_frames_only():
    """A frame-to-frame change of the background's error costs its variance over the clip's frames; a constant
    offset costs nothing (the evaluator reads changes), and neither does an error off the background mask."""
    background = torch.ones(2, 1, 1, 8, 8)
    offsets = torch.tensor([0.0, 0.02, -0.01, 0.03])
    assert torch.isclose(unsteadiness(_clips(offsets), background), offsets.var(unbiased=False))
    assert unsteadiness(_clips(torch.full((4,), 0.05)), background) < 1e-12
    on_object = torch.zeros(2, 4, 3, 8, 8)
    on_object[..., :4, :] = _clips(offsets)[..., :4, :]  # the changing error only on the top half
    background[..., :4, :] = 0  # which the object covers in some frame
    assert unsteadiness(on_object, background) < 1e-12


def test_the_loss_adds_the_steadiness_term_by_its_weight():
    """The same batch (same generator state) costs steadiness x unsteadiness more than without it."""
    from asyncvid.training.vae import build_vae

    vae = build_vae(3)
    losses = []
    for weight in (0.0, 1000.0, 2000.0):
        loss = steady_decoder_loss_fn(vae, steadiness=weight, latent_noise=0.05, clips_per_caption=1)
        with torch.no_grad():
            losses.append(float(loss(vae, 2, torch.Generator().manual_seed(0))))
    assert losses[1] > losses[0]
    assert abs((losses[2] - losses[0]) - 2 * (losses[1] - losses[0])) < 1e-4 * losses[2]


def test_vae_steady_writes_the_folder_with_only_the_decoder_changed(tmp_path, monkeypatch):
    """`vae-steady --init-from FOLDER --dest NEW` trains the decoder alone and writes FOLDER again at NEW: the
    encoder and every other file byte for byte, the decoder changed, the round trip's flicker logged before and
    after; an existing --dest, a folder without a VAE, or --anneal over --steps exit 2 before any training."""
    from diffusers import AutoencoderKL

    from asyncvid.training import cli, steady_decoder
    from asyncvid.training.vae import build_vae

    held_out = steady_decoder.heldout_images()[:4]  # the round trip's flicker on 4 of the 144 clips: seconds, not a minute
    monkeypatch.setattr(steady_decoder, "heldout_images", lambda: held_out)
    build_vae(3).to(torch.float16).save_pretrained(tmp_path / "trained" / "vae")  # as shipped folders store it
    (tmp_path / "trained" / "model_index.json").write_text('{"_class_name": "StableVideoDiffusionPipeline"}')
    args = ["vae-steady", "--init-from", str(tmp_path / "trained"), "--dest", str(tmp_path / "new"),
            "--workdir", str(tmp_path / "w"), "--steps", "2", "--anneal", "1", "--batch", "1", "--clips", "1",
            "--threads", "1"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    index = "model_index.json"
    assert (tmp_path / "new" / index).read_bytes() == (tmp_path / "trained" / index).read_bytes()
    before = AutoencoderKL.from_pretrained(tmp_path / "trained" / "vae").state_dict()
    after = AutoencoderKL.from_pretrained(tmp_path / "new" / "vae").state_dict()
    kept = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert not torch.equal(before["decoder.conv_in.weight"], after["decoder.conv_in.weight"])
    log = json.loads((tmp_path / "w" / "vae-steady" / "train_log.json").read_text())
    assert log["steps"] == 2 and set(log["round_trip_flicker"]) == {"before", "after"}
    assert log["steadiness"] == 3000.0 and log["latent_noise"] == 0.05
    for changed, message in (({}, "exists; name a new folder"),
                             ({2: str(tmp_path / "novae"), 4: str(tmp_path / "x")}, "no vae/config.json there"),
                             ({4: str(tmp_path / "y"), 10: "3"}, "--anneal 3 must be between 0 and --steps (2)")):
        (tmp_path / "novae").mkdir(exist_ok=True)
        refused = CliRunner().invoke(cli.app, [changed.get(i, a) for i, a in enumerate(args)])
        assert refused.exit_code == 2 and message in " ".join(refused.output.replace("│", " ").split())
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
