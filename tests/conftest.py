"""Shared fixtures: a private model home for the session, the CPU thread count restored after each test, an empty
offline Hugging Face cache, the sample image, runs on real ranks batched by world size."""

from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="session", autouse=True)
def asyncvid_home(tmp_path_factory):
    """Embedded models are built once per session into a temp folder, never into ~/.cache.

    It is set in os.environ, so CLI subprocesses inherit it too.
    """
    home = tmp_path_factory.mktemp("asyncvid-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASYNCVID_HOME", str(home))
        mp.setenv("TRANSFORMERS_VERBOSITY", "error")  # what the CLI sets (setdefault) the first time it runs here
        # Ranks are forked from a server while the environment is the one it started with: start it now, before
        # any test patches the environment (those tests' ranks are spawned afresh instead).
        from asyncvid.runtime import launch

        launch.start_context()
        yield home


@pytest.fixture(autouse=True)
def _torch_threads():
    """Give every test the session's CPU thread count back: the CLI tests run in this process (CliRunner), and a
    different thread count changes float rounding, so a leaked `torch.set_num_threads` made a later test's frames
    differ from a notebook kernel's."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def one_launch_per_world():
    """`batch(target, names, world_of, *args)` -> `result(name)`: `target(rank, names_of_one_world, *args)` runs on
    real CPU ranks (one thread each) once per world size, at the first result asked of it, and returns a dict by
    name. Starting the ranks (imports, the process group) costs more than most of the tests' runs, and each run
    loads and splits its pipeline afresh all the same."""
    import torch

    from asyncvid.runtime import launch

    def batch(target, names, world_of, *args):
        done: dict[int, dict] = {}

        def result(name):
            world = world_of(name)
            if world not in done:
                same = [n for n in names if world_of(n) == world]
                done[world] = launch.run(target, world, torch.device("cpu"), same, *args, threads=1,
                                         oversubscribe=True)
            return done[world][name]

        return result

    return batch


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty, offline Hugging Face hub cache; returns its folder (a test may fill it with the cache layout).

    huggingface_hub reads HF_HUB_CACHE once, at import, into `huggingface_hub.constants`, so setting the
    environment is not enough in this process: the constants are patched as well.
    """
    import huggingface_hub.constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="session")
def red_circle() -> Path:
    """The sample conditioning image shipped in samples/."""
    path = SAMPLES / "red_circle.png"
    assert path.is_file(), f"missing sample image {path}"
    return path


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory) -> Path:
    """A LoRA for tiny-animatediff on the attention projections of every spatial and motion block (random, not zero,
    so it changes the video), saved as diffusers saves one: a folder with pytorch_lora_weights.safetensors."""
    import torch
    from diffusers import AnimateDiffPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from asyncvid.pipelines.embedded import materialize

    folder = tmp_path_factory.mktemp("lora")
    unet = AnimateDiffPipeline.from_pretrained(materialize("tiny-animatediff")).unet
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    AnimateDiffPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder
