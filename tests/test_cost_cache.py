"""Measured unit times are kept per machine and shape, so reruns pick the same AsyncDiff split."""

import contextlib

import pytest
import torch

from asyncvid.asyncdiff.cost_cache import cache_dir, cached, key


def test_measured_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCVID_HOME", str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        return [0.5, 1.5]

    name = key({"block_out_channels": [32, 64]}, [[1, 4, 8, 8]], torch.device("cpu"), torch.float32)
    assert cached(name, measure) == [0.5, 1.5]
    assert cached(name, lambda: [9.0, 9.0]) == [0.5, 1.5] and len(calls) == 1
    assert (cache_dir() / f"{name}.json").is_file()


def test_key_depends_on_shape_and_config():
    cpu, f32 = torch.device("cpu"), torch.float32
    base = key({"a": 1}, [[1, 4, 8, 8]], cpu, f32)
    assert base == key({"a": 1, "_diffusers_version": "x"}, [[1, 4, 8, 8]], cpu, f32)
    assert base != key({"a": 1}, [[1, 4, 16, 16]], cpu, f32)
    assert base != key({"a": 2}, [[1, 4, 8, 8]], cpu, f32)
    assert base != key({"a": 1}, [[1, 4, 8, 8]], cpu, torch.float16)


def test_unreadable_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCVID_HOME", str(tmp_path))
    (cache_dir()).mkdir(parents=True)
    (cache_dir() / "k.json").write_text("not json")
    assert cached("k", lambda: [2.0]) == [2.0]
    assert cached("k", lambda: [3.0]) == [2.0]


def test_a_filled_cache_builds_and_runs_nothing(tmp_path, monkeypatch):
    """Measured costs come from the cache before any model is built: a rerun (and --parallel auto, which forks its
    workers only when this process has run no tensor work) allocates nothing for measuring."""

    from asyncvid.asyncdiff import timing
    from asyncvid.pipelines import adapter_for, resolve_model, units_for

    folder = resolve_model("tiny-animatediff")
    unet = adapter_for(folder).unet_skeleton(folder, None)
    family = units_for(unet)
    shape = {"frames": 4, "height": 64, "width": 64}
    monkeypatch.setenv("ASYNCVID_HOME", str(tmp_path))
    first = timing.measure_unit_costs(unet, family, shape, torch.device("cpu"), torch.float32)
    built = []
    monkeypatch.setattr(type(unet), "from_config", classmethod(lambda cls, *a, **k: built.append(1)))
    monkeypatch.setattr(timing, "measure_times", lambda *a, **k: built.append(2))
    monkeypatch.setattr(timing, "fake_profile", lambda *a, **k: built.append(3))
    assert timing.measure_unit_costs(unet, family, shape, torch.device("cpu"), torch.float32) == first
    assert built == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_units_time_in_the_runs_dtype_with_one_units_weights_at_a_time(dtype, monkeypatch):
    """The stand-in weights are views of one buffer in the run's dtype (accelerate would cast them to the skeleton's
    float32, and a bfloat16 run then failed on mixed dtypes), and no more than one unit's exist at once."""
    from asyncvid.asyncdiff import timing
    from asyncvid.pipelines import adapter_for, resolve_model, units_for

    folder = resolve_model("tiny-svd")
    unet = adapter_for(folder).unet_skeleton(folder)
    family = units_for(unet)
    held = []
    real = timing.stand_in_weights

    def watching(model, modules, arena):
        with real(model, modules, arena):
            params = [p for p in model.parameters() if not p.is_meta]
            assert all(p.dtype == dtype for p in params)
            held.append(sum(p.numel() for p in params))
            yield

    monkeypatch.setattr(timing, "stand_in_weights", contextlib.contextmanager(watching))
    times = timing.time_units(unet, family, {"frames": 2, "height": 64, "width": 64}, torch.device("cpu"), dtype)
    assert len(times) == len(family.build_program(unet).units) and all(t > 0 for t in times)
    total = sum(p.numel() for p in unet.parameters())
    assert max(held) < 0.5 * total  # the shared modules and one unit, never the model
