"""A model folder's sampling.json: the guidance a model is sampled with when the user gives none."""

import json
import shutil

import pytest

from asyncvid.errors import UsageError
from asyncvid.models import sampling_defaults
from asyncvid.pipelines import recommended_guidance
from asyncvid.training.animatediff import GUIDANCE


def test_a_folder_without_sampling_json_gets_diffusers_default(tmp_path):
    assert sampling_defaults.read(tmp_path) == {}
    assert sampling_defaults.guidance(tmp_path) == 7.5
    sampling_defaults.write(tmp_path, guidance_scale=3)
    assert sampling_defaults.guidance(tmp_path) == 3.0


@pytest.mark.parametrize("text, shown", [
    ("{not json", "not valid JSON"),
    ('{"guidance": 2}', "guidance_scale"),
    ('[2.5]', "guidance_scale"),
    ('{"guidance_scale": -1}', "-1"),
    ('{"guidance_scale": "high"}', "'high'"),
])
def test_a_malformed_sampling_json_is_one_error_naming_the_file(tmp_path, text, shown):
    (tmp_path / "sampling.json").write_text(text)
    with pytest.raises(UsageError, match="sampling.json") as err:
        sampling_defaults.guidance(tmp_path)
    assert shown in str(err.value) and "\n" not in str(err.value)


def test_the_embedded_model_recommends_the_recipes_guidance(asyncvid_home):
    # export writes the training recipe's GUIDANCE; the shipped folder must be the exported one.
    assert recommended_guidance("tiny-animatediff") == GUIDANCE
    assert recommended_guidance("tiny-svd") == 7.5  # SVD's guidance is a per-frame ramp; it recommends nothing


def test_generate_uses_the_folders_guidance_unless_given(tmp_path, asyncvid_home):
    from typer.testing import CliRunner

    from asyncvid.cli.app import app
    from asyncvid.pipelines.embedded import EMBEDDED

    model = shutil.copytree(EMBEDDED["tiny-animatediff"].source, tmp_path / "model")
    sampling_defaults.write(model, guidance_scale=1.5)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    for extra, expected in (([], 1.5), (["--guidance", "4"], 4.0)):
        out = tmp_path / f"out{expected}"
        result = CliRunner().invoke(app, ["generate", str(prompts), "--model", str(model), "--steps", "1",
                                          "--frames", "2", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        [sidecar] = out.glob("*.json")
        assert json.loads(sidecar.read_text())["guidance_scale"] == expected
