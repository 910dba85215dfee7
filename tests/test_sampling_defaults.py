"""A model folder's sampling.json: the guidance and shared noise a model is sampled with when the user gives none."""

import json
import shutil

import pytest

from asyncvid.errors import UsageError
from asyncvid.models import sampling_defaults
from asyncvid.pipelines import recommended_sampling
from asyncvid.training.animatediff import GUIDANCE, NOISE_MEAN, SHARED_GRID, SHARED_NOISE
from asyncvid.training.svd import MAX_GUIDANCE
from asyncvid.training.svd import NOISE_MEAN as SVD_NOISE_MEAN
from asyncvid.training.svd import SHARED_NOISE as SVD_SHARED_NOISE


def test_a_folder_without_sampling_json_gets_diffusers_defaults(tmp_path):
    assert sampling_defaults.read(tmp_path) == {}
    assert sampling_defaults.recommended(tmp_path) == sampling_defaults.Recommended(7.5, 0.0)
    sampling_defaults.write(tmp_path, guidance_scale=3)
    assert sampling_defaults.recommended(tmp_path) == sampling_defaults.Recommended(3.0, 0.0)
    sampling_defaults.write(tmp_path, shared_noise=0.25)
    assert sampling_defaults.recommended(tmp_path) == sampling_defaults.Recommended(7.5, 0.25)
    sampling_defaults.write(tmp_path, shared_noise=1)  # every frame the same noise
    assert sampling_defaults.recommended(tmp_path) == sampling_defaults.Recommended(7.5, 1.0)
    sampling_defaults.write(tmp_path, max_guidance_scale=2)
    assert sampling_defaults.recommended(tmp_path) == sampling_defaults.Recommended(7.5, 0.0, 2.0)
    sampling_defaults.write(tmp_path, noise_mean=0)
    assert sampling_defaults.recommended(tmp_path) == sampling_defaults.Recommended(noise_mean=0.0)
    sampling_defaults.write(tmp_path, shared_grid=4)
    assert sampling_defaults.recommended(tmp_path) == sampling_defaults.Recommended(shared_grid=4)
    assert type(sampling_defaults.recommended(tmp_path).shared_grid) is int  # a grid, not 4.0
    assert sampling_defaults.Recommended().max_guidance_scale == 3.0  # SVD's


@pytest.mark.parametrize("text, shown", [
    ("{not json", "not valid JSON"),
    ('{"guidance": 2}', "guidance_scale"),
    ('[2.5]', "guidance_scale"),
    ('{"guidance_scale": -1}', "-1"),
    ('{"guidance_scale": "high"}', "'high'"),
    ('{"shared_noise": 1.5}', "[0, 1]"),
    ('{"shared_noise": -0.1}', "-0.1"),
    ('{"shared_noise": true}', "True"),
    ('{"noise_mean": 2}', "[0, 1]"),
    ('{"noise_mean": "zero"}', "'zero'"),
    ('{"shared_grid": 0}', "got 0"),
    ('{"shared_grid": 2.5}', "2.5"),
    ('{"max_guidance_scale": -2}', "-2"),
    ('{"max_guidance_scale": null}', "None"),
])
def test_a_malformed_sampling_json_is_one_error_naming_the_file(tmp_path, text, shown):
    (tmp_path / "sampling.json").write_text(text)
    with pytest.raises(UsageError, match="sampling.json") as err:
        sampling_defaults.recommended(tmp_path)
    assert shown in str(err.value) and "\n" not in str(err.value)


def test_the_embedded_model_recommends_the_recipes_settings(asyncvid_home):
    # export writes the training recipe's GUIDANCE, SHARED_NOISE and NOISE_MEAN; the shipped folder must be the
    # exported one.
    assert recommended_sampling("tiny-animatediff") == sampling_defaults.Recommended(GUIDANCE, SHARED_NOISE,
                                                                                     noise_mean=NOISE_MEAN,
                                                                                     shared_grid=SHARED_GRID)
    # SVD's guidance is a per-frame ramp, from 1 to the recommended one at the last frame; its noise, one draw for
    # every frame with its mean at zero (round 42)
    assert recommended_sampling("tiny-svd") == sampling_defaults.Recommended(
        max_guidance_scale=MAX_GUIDANCE, shared_noise=SVD_SHARED_NOISE, noise_mean=SVD_NOISE_MEAN)


def test_generate_uses_the_folders_settings_unless_given(tmp_path, asyncvid_home):
    from typer.testing import CliRunner

    from asyncvid.cli.app import app
    from asyncvid.pipelines.embedded import EMBEDDED

    model = shutil.copytree(EMBEDDED["tiny-animatediff"].source, tmp_path / "model")
    sampling_defaults.write(model, guidance_scale=1.5, shared_noise=0.25, noise_mean=0, shared_grid=2)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    for i, (extra, expected) in enumerate((([], (1.5, 0.25, 0.0, 2)), (["--guidance", "4"], (4.0, 0.25, 0.0, 2)),
                                           (["--shared-noise", "0"], (1.5, 0.0, 0.0, 2)),
                                           (["--noise-mean", "1"], (1.5, 0.25, 1.0, 2)),
                                           (["--shared-grid", "1"], (1.5, 0.25, 0.0, 1)))):
        out = tmp_path / f"out{i}"
        result = CliRunner().invoke(app, ["generate", str(prompts), "--model", str(model), "--steps", "1",
                                          "--frames", "2", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        [sidecar] = out.glob("*.json")
        meta = json.loads(sidecar.read_text())
        assert (meta["guidance_scale"], meta["shared_noise"], meta["noise_mean"], meta["shared_grid"]) == expected


def test_i2v_and_the_library_use_the_folders_settings_unless_given(tmp_path, asyncvid_home, red_circle):
    from typer.testing import CliRunner

    from asyncvid.api import load
    from asyncvid.cli.app import app
    from asyncvid.pipelines.embedded import EMBEDDED

    model = shutil.copytree(EMBEDDED["tiny-svd"].source, tmp_path / "model")
    sampling_defaults.write(model, max_guidance_scale=1.5, shared_noise=0.25, noise_mean=0)
    image = red_circle
    for i, (extra, expected) in enumerate((([], (1.5, 0.25, 0.0)), (["--max-guidance", "4"], (4.0, 0.25, 0.0)),
                                           (["--shared-noise", "0"], (1.5, 0.0, 0.0)),
                                           (["--noise-mean", "1"], (1.5, 0.25, 1.0)))):
        out = tmp_path / f"out{i}"
        result = CliRunner().invoke(app, ["i2v", str(image), "--model", str(model), "--steps", "1", "--frames", "2",
                                          "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        [sidecar] = out.glob("*.json")
        meta = json.loads(sidecar.read_text())
        assert (meta["max_guidance_scale"], meta["shared_noise"], meta["noise_mean"]) == expected
    # A first-frame guidance above the folder's last-frame one: one line naming both, exit 2, nothing written.
    result = CliRunner().invoke(app, ["i2v", str(image), "--model", str(model), "--steps", "1", "--frames", "2",
                                      "--out", str(tmp_path / "bad"), "--min-guidance", "2"])
    assert result.exit_code == 2 and "min 2.0 and max 1.5" in result.output and not (tmp_path / "bad").exists()
    with load(str(model), threads=1) as pipe:
        video = pipe.image_to_video(image, num_frames=2, num_inference_steps=1)
        given = pipe.image_to_video(image, num_frames=2, num_inference_steps=1, shared_noise=1, noise_mean=1)
    assert (video.metadata["max_guidance_scale"], video.metadata["shared_noise"], video.metadata["noise_mean"]) == (
        1.5, 0.25, 0.0)
    assert (given.metadata["shared_noise"], given.metadata["noise_mean"]) == (1.0, 1.0)
