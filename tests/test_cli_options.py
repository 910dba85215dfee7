"""CLI options beyond the basics: schedulers, help text, and sequential sampling under a launcher."""

from typer.testing import CliRunner

from asyncvid.cli.app import app


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def test_help_shows_the_defaults_in_brackets():
    result = invoke("generate", "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Frames per video [default: the model's]" in result.output


def test_svd_refuses_a_discrete_timestep_scheduler_in_one_line(red_circle, tmp_path):
    result = invoke("i2v", red_circle, "--steps", "2", "--frames", "4", "--scheduler", "dpm-solver", "--out", tmp_path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "continuous" in lines[0] and "--scheduler euler" in lines[0], result.stderr
    assert not any(tmp_path.iterdir())


def test_sequential_sampling_under_a_multi_process_launcher_is_refused(tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("generate", prompts, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "add --sampler asyncdiff (stages + stride - 1 = 2)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_devices_without_a_parallel_sampler_is_refused(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    result = invoke("generate", prompts, "--devices", "2", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --devices 2 needs a parallel sampler or groups; add --sampler asyncdiff, or "
                                     "--data-parallel 2 for 2 videos at once, or drop --devices")
