"""A model folder's sampling.json: the guidance and shared noise a model is sampled with when the user gives none."""

import json
import shutil

import pytest

from asyncvid.errors import UsageError
from asyncvid.models import sampling_defaults
from asyncvid.pipelines import recommended_sampling
from asyncvid.training.animatediff import GUIDANCE, SHARED_NOISE


def test_a_folder_without_sampling_json_gets_diffusers_defaults(tmp_path):
    assert sampling_defaults.read(tmp_path) == {}
    assert sampling_defaults.recommended(tmp_path) == sampling_defaults.Recommended(7.5, 0.0)
    sampling_defaults.write(tmp_path, guidance_scale=3)
    assert sampling_defaults.recommended(tmp_path) == sampling_defaults.Recommended(3.0, 0.0)
    sampling_defaults.write(tmp_path, shared_noise=0.25)
    assert sampling_defaults.recommended(tmp_path) == sampling_defaults.Recommended(7.5, 0.25)


@pytest.mark.parametrize("text, shown", [
    ("{not json", "not valid JSON"),
    ('{"guidance": 2}', "guidance_scale"),
    ('[2.5]', "guidance_scale"),
    ('{"guidance_scale": -1}', "-1"),
    ('{"guidance_scale": "high"}', "'high'"),
    ('{"shared_noise": 1}', "[0, 1)"),
    ('{"shared_noise": -0.1}', "-0.1"),
    ('{"shared_noise": true}', "True"),
])
def test_a_malformed_sampling_json_is_one_error_naming_the_file(tmp_path, text, shown):
    (tmp_path / "sampling.json").write_text(text)
    with pytest.raises(UsageError, match="sampling.json") as err:
        sampling_defaults.recommended(tmp_path)
    assert shown in str(err.value) and "\n" not in str(err.value)


def test_the_embedded_model_recommends_the_recipes_settings(asyncvid_home):
    # export writes the training recipe's GUIDANCE and SHARED_NOISE; the shipped folder must be the exported one.
    assert recommended_sampling("tiny-animatediff") == sampling_defaults.Recommended(GUIDANCE, SHARED_NOISE)
    # SVD's guidance is a per-frame ramp and its noise is drawn by the pipeline: it recommends nothing
    assert recommended_sampling("tiny-svd") == sampling_defaults.Recommended()


def test_generate_uses_the_folders_settings_unless_given(tmp_path, asyncvid_home):
    from typer.testing import CliRunner

    from asyncvid.cli.app import app
    from asyncvid.pipelines.embedded import EMBEDDED

    model = shutil.copytree(EMBEDDED["tiny-animatediff"].source, tmp_path / "model")
    sampling_defaults.write(model, guidance_scale=1.5, shared_noise=0.25)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    for i, (extra, expected) in enumerate((([], (1.5, 0.25)), (["--guidance", "4"], (4.0, 0.25)),
                                           (["--shared-noise", "0"], (1.5, 0.0)))):
        out = tmp_path / f"out{i}"
        result = CliRunner().invoke(app, ["generate", str(prompts), "--model", str(model), "--steps", "1",
                                          "--frames", "2", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        [sidecar] = out.glob("*.json")
        meta = json.loads(sidecar.read_text())
        assert (meta["guidance_scale"], meta["shared_noise"]) == expected
