"""Tests for asyncvid.video: exact round trips, atomic writes, and one-line errors."""

import contextlib
import json
import os
import pty
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from asyncvid.errors import UsageError
from asyncvid.video.frames import Video
from asyncvid.video.writers import read_png_frames, write_gif, write_json_atomic, write_mp4, write_png_frames


def random_frames(num_frames=5, height=32, width=48, seed=0):
    """Noise frames: no two are equal, so no writer can merge them."""
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("fps", [8, 24, 30])
def test_mp4_round_trip_has_exact_frames_size_and_fps(tmp_path, fps):
    out = write_mp4(random_frames(7), fps, tmp_path / "a.mp4")
    assert out == tmp_path / "a.mp4"
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (48, 32)
        assert stream.average_rate == fps
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert len(decoded) == 7
    assert decoded[0].shape == (32, 48, 3)


def test_mp4_at_crf_0_is_close_to_the_input(tmp_path):
    # Smooth content: yuv420p subsampling is the only loss left at crf 0.
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    frames = np.stack([np.stack([np.tile(ramp, (32, 1))] * 3, axis=-1)] * 3)
    write_mp4(frames, 8, tmp_path / "a.mp4", crf=0)
    with av.open(str(tmp_path / "a.mp4")) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(first.astype(int) - frames[0]).max() <= 3


def test_gif_has_one_frame_per_input_frame_and_loops(tmp_path):
    write_gif(random_frames(6), 10, tmp_path / "a.gif")
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames == 6
        assert gif.size == (48, 32)
        assert gif.info["loop"] == 0
        assert gif.info["duration"] == 100


def test_png_round_trip_is_bit_exact(tmp_path):
    frames = random_frames(12)
    out = write_png_frames(frames, tmp_path / "clip")
    assert sorted(p.name for p in out.iterdir())[:2] == ["frame_0000.png", "frame_0001.png"]
    back = read_png_frames(out)
    assert back.dtype == np.uint8
    assert np.array_equal(back, frames)


def test_save_picks_the_format_from_the_suffix(tmp_path):
    video = Video(random_frames(3), fps=8)
    assert video.save(tmp_path / "a.mp4").read_bytes()[4:8] == b"ftyp"
    assert video.save(tmp_path / "a.GIF").read_bytes()[:6] == b"GIF89a"
    assert np.array_equal(read_png_frames(video.save(tmp_path / "frames")), video.frames)
    assert video.save(tmp_path / "b.mp4", format="png").is_dir()
    with pytest.raises(UsageError, match=r"a\.avi"):
        video.save(tmp_path / "a.avi")


@pytest.mark.parametrize("name", ["a.mp4", "a.gif", "a.json"])
def test_overwrite_false_refuses_an_existing_file_and_leaves_it_alone(tmp_path, name):
    target = tmp_path / name
    target.write_bytes(b"precious")
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        if name.endswith(".json"):
            write_json_atomic({"a": 1}, target, overwrite=False)
        else:
            Video(random_frames(2), fps=8).save(target)
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_overwrite_true_replaces_file_and_folder(tmp_path):
    video = Video(random_frames(2), fps=8)
    (tmp_path / "a.mp4").write_bytes(b"old")
    video.save(tmp_path / "a.mp4", overwrite=True)
    assert (tmp_path / "a.mp4").read_bytes()[4:8] == b"ftyp"
    write_png_frames(random_frames(4, seed=1), tmp_path / "clip")
    write_png_frames(video.frames, tmp_path / "clip", overwrite=True)
    assert np.array_equal(read_png_frames(tmp_path / "clip"), video.frames)  # no stale frame_0002/0003
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "clip"]


def test_failing_mp4_write_leaves_no_target_and_no_temp_file(tmp_path, monkeypatch):
    real, calls, seen = av.VideoFrame, [], []

    class FailingVideoFrame:
        """Fails on frame 50: past x264's 40-frame lookahead, so packets were already muxed."""

        @staticmethod
        def from_ndarray(array, format):
            calls.append(1)
            if len(calls) == 50:
                seen.extend(p.name for p in tmp_path.iterdir())
                raise RuntimeError("injected encoder failure")
            return real.from_ndarray(array, format=format)

    monkeypatch.setattr(av, "VideoFrame", FailingVideoFrame)
    with pytest.raises(RuntimeError, match="injected"):
        write_mp4(random_frames(60), 8, tmp_path / "a.mp4")
    assert len(seen) == 1 and seen[0].startswith(".a.tmp-") and seen[0].endswith(".mp4")  # a partial temp existed
    assert list(tmp_path.iterdir()) == []


def test_failing_png_overwrite_keeps_the_old_folder(tmp_path, monkeypatch):
    old = random_frames(3, seed=1)
    write_png_frames(old, tmp_path / "clip")
    real_save, calls = Image.Image.save, []

    def save_twice_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("injected disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_twice_then_fail)
    with pytest.raises(OSError, match="injected"):
        write_png_frames(random_frames(5), tmp_path / "clip", overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["clip"]
    assert np.array_equal(read_png_frames(tmp_path / "clip"), old)


def test_json_is_indented_utf8_with_a_trailing_newline(tmp_path):
    data = {"prompt": "café ☕", "b": [1, 2], "a": None}
    text = write_json_atomic(data, tmp_path / "a.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and "café ☕" in text and '\n  "prompt"' in text
    assert list(json.loads(text)) == ["prompt", "b", "a"]  # key order kept
    with pytest.raises(TypeError):
        write_json_atomic({"x": object()}, tmp_path / "b.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_missing_libx264_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(av, "codecs_available", set())
    with pytest.raises(RuntimeError, match="no libx264 encoder"):
        write_mp4(random_frames(2), 8, tmp_path / "a.mp4")
    assert list(tmp_path.iterdir()) == []


def test_odd_size_mp4_is_a_usage_error_naming_the_size(tmp_path):
    with pytest.raises(UsageError, match="31x48"):
        write_mp4(random_frames(2, height=31), 8, tmp_path / "a.mp4")
    assert list(tmp_path.iterdir()) == []


def test_missing_parent_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="nope.*does not exist"):
        write_mp4(random_frames(2), 8, tmp_path / "nope" / "a.mp4")
    with pytest.raises(UsageError, match="nope.*does not exist"):
        write_png_frames(random_frames(2), tmp_path / "nope" / "clip")
    assert not (tmp_path / "nope").exists()


def test_file_and_folder_do_not_replace_each_other(tmp_path):
    (tmp_path / "clip").mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        write_mp4(random_frames(2), 8, tmp_path / "clip", overwrite=True)


@pytest.mark.parametrize(
    ("frames", "fps", "match"),
    [
        (np.zeros((2, 4, 4, 3), dtype=np.float32), 8, "uint8 but are float32"),
        (np.zeros((4, 4, 3), dtype=np.uint8), 8, r"\(4, 4, 3\)"),
        (np.zeros((2, 4, 4, 4), dtype=np.uint8), 8, r"\(2, 4, 4, 4\)"),
        (np.zeros((0, 4, 4, 3), dtype=np.uint8), 8, r"\(0, 4, 4, 3\)"),
        (np.zeros((2, 4, 4, 3), dtype=np.uint8), 0, "fps must be an integer >= 1 but is 0"),
        (np.zeros((2, 4, 4, 3), dtype=np.uint8), 7.5, "but is 7.5"),
    ],
)
def test_video_validates_its_fields(frames, fps, match):
    with pytest.raises(ValueError, match=match):
        Video(frames, fps=fps)


def test_video_properties_repr_and_pil_frames():
    video = Video(random_frames(3, height=10, width=6), fps=8, metadata={"seed": 1})
    assert (video.num_frames, video.height, video.width) == (3, 10, 6)
    assert repr(video) == "Video(num_frames=3, height=10, width=6, fps=8)"
    images = video.pil_frames()
    assert len(images) == 3 and images[0].mode == "RGB" and images[0].size == (6, 10)
    assert np.array_equal(np.asarray(images[2]), video.frames[2])


def test_repr_html_embeds_an_mp4_even_for_odd_sizes():
    html = Video(random_frames(2, height=15, width=9), fps=8)._repr_html_()
    assert html.startswith("<video") and "data:video/mp4;base64," in html



CLIP = Path(__file__).parent / "data" / "blue-square-moving-up"  # the quick start's second video, as PNG frames
ENCODE_25 = """
import hashlib, sys
from asyncvid.video.writers import read_png_frames, write_mp4
digests = []
for i in range(25):
    frames = read_png_frames(sys.argv[1])
    write_mp4(frames, 8, sys.argv[2], overwrite=True)
    digests.append(hashlib.md5(open(sys.argv[2], "rb").read()).hexdigest())
print(*digests)
"""


def test_mp4_bytes_do_not_depend_on_where_buffers_land(tmp_path):
    """The same frames encode to the same bytes every time. x264's AVX-512 code did not: read and encoded 25 times in
    a fresh process on a terminal, these frames (whose MP4 differed between two CI runs) came out 2 or 3 ways, every
    time; where the buffers land in memory decides which encodes differ (with stdout a pipe it did not show)."""
    # A child on a terminal of its own, as a user runs it (pty.fork, like `script`): with stdout a pipe or a bare
    # pseudo-terminal the buffers landed elsewhere and the old encoder agreed with itself.
    pid, terminal = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-c", ENCODE_25, str(CLIP), str(tmp_path / "clip.mp4")])
    output = b""
    with contextlib.suppress(OSError):  # EIO once the child has exited and the terminal is drained
        while chunk := os.read(terminal, 4096):
            output += chunk
    os.close(terminal)
    assert os.waitpid(pid, 0)[1] == 0, output.decode()
    digests = output.decode().split()
    assert len(digests) == 25 and len(set(digests)) == 1, f"{len(set(digests))} different files from 25 encodes"
