"""The adherence evaluator reads colour, shape and direction right on ground-truth clips and wrong on others."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asyncvid.eval.adherence import implied_direction, read_video, score_image_video, score_video, summarize
from asyncvid.eval.clips import COLOURS, Caption, all_captions, render
from asyncvid.eval.masks import object_masks
from asyncvid.evaluate import score_folder
from asyncvid.video.writers import write_json_atomic, write_mp4

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.mark.parametrize("num_frames", [8, 16])
def test_ground_truth_clips_score_full_marks(num_frames):
    scores = [score_video(render(c, seed, num_frames), c.text) for seed in range(2) for c in all_captions()]
    summary = summarize(scores)
    assert summary == {"videos": len(scores), "colour": 100.0, "shape": 100.0, "direction": 100.0, "smooth": 100.0,
                       "steady": 100.0, "calm": 100.0, "one_colour": 100.0, "worst_flicker": summary["worst_flicker"]}
    assert summary["worst_flicker"] < 1.0


def test_a_clip_of_something_else_scores_zero_on_what_differs():
    clip = render(Caption("blue", "triangle", "up"), 0)
    s = score_video(clip, "a red circle moving down")
    assert (s["colour"], s["shape"], s["direction"]) == (0.0, 0.0, 0.0)
    assert s["seen"]["colour"] == "blue" and s["seen"]["direction"] == "up"


def test_a_colour_that_flashes_for_a_few_frames_keeps_the_clip_colour_but_not_one_colour():
    """A red disc drawn pink in frames 2-4 (what tiny-svd r7 does to samples/red_circle.png) is still a red clip by
    the majority, but not one colour throughout; the same clip left red is, and so is a clip pink throughout (the
    colour score charges that, not this one)."""
    clip = render(Caption("red", "circle", "left"), 0)
    flashed = clip.copy()
    for i in (2, 3, 4):
        flashed[i][object_masks(clip[i])[0]] = COLOURS["pink"]
    s = score_video(flashed, "a red circle moving left")
    assert (s["colour"], s["one_colour"]) == (1.0, 0.0)
    assert s["seen"]["colour_frames"] == round(1 - 3 / len(clip), 3)
    assert score_image_video(flashed, clip[0])["one_colour"] == 0.0
    assert score_video(clip, "a red circle moving left")["one_colour"] == 1.0
    pink = clip.copy()
    for i in range(len(pink)):
        pink[i][object_masks(clip[i])[0]] = COLOURS["pink"]
    s = score_video(pink, "a red circle moving left")
    assert (s["colour"], s["one_colour"]) == (0.0, 1.0)
    assert summarize([score_video(flashed, "a red circle moving left"), s])["one_colour"] == 50.0


def test_still_or_empty_videos_have_no_direction():
    clip = render(Caption("red", "circle", "left"), 0)
    assert read_video(np.repeat(clip[:1], 8, axis=0)).direction is None
    empty = read_video(np.full((8, 64, 64, 3), 128, np.uint8))
    assert (empty.colour, empty.direction, empty.present) == (None, None, 0.0)


def test_image_to_video_scores_motion_implied_by_the_first_frame():
    for c in all_captions()[::5]:
        clip = render(c, 1, 8)
        assert implied_direction(clip[0]) == c.direction
        s = score_image_video(clip, clip[0])
        assert (s["colour"], s["shape"], s["direction"]) == (1.0, 1.0, 1.0)
        assert score_image_video(clip[::-1], clip[0])["direction"] == 0.0  # played backwards: wrong way


def test_sample_image_implies_motion_to_the_right():
    from PIL import Image
    assert implied_direction(np.asarray(Image.open(SAMPLES / "red_circle.png").convert("RGB"))) == "right"


def test_score_folder_reads_mp4_outputs_and_their_sidecars(tmp_path):
    for i, c in enumerate(all_captions()[:3]):
        write_mp4(render(c, i), 8, tmp_path / f"{i:03d}.mp4")
        write_json_atomic({"output": f"{i:03d}.mp4", "task": "text-to-video", "prompt": c.text},
                          tmp_path / f"{i:03d}.json")
    (tmp_path / "notes.json").write_text(json.dumps({"other": 1}))  # not a sidecar: ignored
    scores, summary = score_folder(tmp_path)
    assert [s["output"] for s in scores] == ["000.mp4", "001.mp4", "002.mp4"]
    assert {k: summary[k] for k in ("videos", "colour", "shape", "direction")} == \
        {"videos": 3, "colour": 100.0, "shape": 100.0, "direction": 100.0}


def test_evaluate_pools_several_folders_and_refuses_one_without_outputs(tmp_path):
    """`python -m asyncvid.evaluate A B` prints each folder and their pooled score; a folder without outputs stops it
    before anything is written."""
    from typer.testing import CliRunner

    from asyncvid.evaluate import app

    right, wrong = all_captions()[0], all_captions()[1]  # the second folder's videos show another caption's clip
    for folder, caption in (("a", right), ("b", right)):
        (tmp_path / folder).mkdir()
        write_mp4(render(right if folder == "a" else wrong, 0), 8, tmp_path / folder / "000.mp4")
        write_json_atomic({"output": "000.mp4", "task": "text-to-video", "prompt": caption.text},
                          tmp_path / folder / "000.json")
    report = tmp_path / "scores.json"
    result = CliRunner().invoke(app, [str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(report)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("2 videos:") and "all 2 folders" in lines[-1]
    saved = json.loads(report.read_text())
    assert saved["folders"][str(tmp_path / "a")]["colour"] == 100.0
    assert (saved["summary"]["videos"], saved["summary"]["colour"], saved["summary"]["direction"]) == (2, 100.0, 50.0)
    assert saved["summary"] == summarize(saved["videos"])
    (tmp_path / "empty").mkdir()
    report.unlink()
    result = CliRunner().invoke(app, [str(tmp_path / "a"), str(tmp_path / "empty"), "--json", str(report)])
    assert result.exit_code == 2 and "no outputs with sidecars" in result.output
    assert not report.exists()


def test_evaluate_verbose_shows_what_each_video_was_scored_against(tmp_path, monkeypatch):
    """Text-to-video against its prompt, image-to-video against its input image (found beside the output when the
    recorded path is not there), and the summary says which kind it scored."""
    from typer.testing import CliRunner

    from asyncvid.evaluate import app

    caption = all_captions()[0]
    clip = render(caption, 0)
    (tmp_path / "t2v").mkdir()
    write_mp4(clip, 8, tmp_path / "t2v" / "000.mp4")
    write_json_atomic({"output": "000.mp4", "task": "text-to-video", "prompt": caption.text}, tmp_path / "t2v" / "000.json")
    (tmp_path / "i2v").mkdir()
    write_mp4(clip, 8, tmp_path / "i2v" / "000.mp4")
    Image.fromarray(clip[0]).save(tmp_path / "i2v" / "first.png")
    write_json_atomic({"output": "000.mp4", "task": "image-to-video", "image": "elsewhere/first.png"},
                      tmp_path / "i2v" / "000.json")
    for folder, summary in (("t2v", "1 videos: colour"), ("i2v", "1 image-to-video clip: colour kept")):
        result = CliRunner().invoke(app, [str(tmp_path / folder), "--verbose"])
        assert result.exit_code == 0, result.output
        first, last = result.output.strip().splitlines()
        assert "wanted" in first and last.startswith(summary), result.output
