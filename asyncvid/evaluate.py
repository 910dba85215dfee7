"""Score videos for adherence: `python -m asyncvid.evaluate OUTPUT_FOLDER` reads each output and its sidecar
(the prompt, or the conditioning image) and prints colour, shape and direction scores (asyncvid.eval.adherence) and
how smoothly the object moves and how still the background stays (asyncvid.eval.temporal)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import av
import numpy as np
import typer
from PIL import Image

from asyncvid.errors import UsageError
from asyncvid.eval.adherence import SCORES, score_image_video, score_video, summarize
from asyncvid.video.writers import read_png_frames


def read_frames(path: Path) -> np.ndarray:
    """uint8 (frames, H, W, 3) from an MP4 or GIF file, or a folder of PNG frames."""
    path = Path(path)
    if path.is_dir():
        return read_png_frames(path)
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def score_output(sidecar: Path) -> dict:
    """The score of the output a sidecar describes (text-to-video: against its prompt; image-to-video: its image)."""
    meta = json.loads(sidecar.read_text())
    frames = read_frames(sidecar.parent / meta["output"])
    if meta.get("task") == "image-to-video":
        with Image.open(_input_image(sidecar, meta["image"])) as im:
            image = np.asarray(im.convert("RGB"))
        return {"output": meta["output"], "image": meta["image"], **score_image_video(frames, image)}
    return {"output": meta["output"], **score_video(frames, meta["prompt"])}


def _input_image(sidecar: Path, recorded: str) -> Path:
    """The conditioning image a sidecar names: as recorded (absolute, or relative to here), else beside the output."""
    for path in (Path(recorded), sidecar.parent / Path(recorded).name):
        if path.is_file():
            return path
    raise UsageError(f"'{sidecar}' was made from image '{recorded}', which is not here; run from the folder "
                     f"`asyncvid i2v` ran in, or copy the image beside the output")


def score_folder(folder: Path) -> tuple[list[dict], dict]:
    """Scores of every output in a folder that has a sidecar, and their summary (percentages)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"'{folder}' is not a folder; pass the --out folder of `asyncvid generate` or `asyncvid i2v`")
    sidecars = sorted(p for p in folder.glob("*.json") if "output" in json.loads(p.read_text()))
    if not sidecars:
        raise UsageError(f"no outputs with sidecars in '{folder}'; point at a folder written by `asyncvid generate`")
    scores = [score_output(p) for p in sidecars]
    return scores, summarize(scores)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    folders: Annotated[list[Path], typer.Argument(help="Output folders of `asyncvid generate` or `asyncvid i2v`; "
                                                       "several (e.g. one per seed) are also scored together.")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write per-video scores and the summary here.")] = None,
    verbose: Annotated[bool, typer.Option(help="Print every video's reading.")] = False,
):
    """Print the share of videos showing the asked colour, shape and direction, and moving smoothly."""
    try:  # every folder is read before anything is printed or written
        scored = [(folder, *score_folder(folder)) for folder in folders]
    except UsageError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    for folder, scores, summary in scored:
        if verbose:
            for s in scores:
                ok = "".join("x" if s.get(k) else "." for k in SCORES)
                wanted = s.get("want", s.get("prompt"))
                typer.echo(f"{ok}  {s['output']}  seen {s['seen']}  wanted {wanted}")
        typer.echo(_line(summary, scores) + (f"  {folder}" if len(folders) > 1 else ""))
    everything = [s for _, scores, _ in scored for s in scores]
    # One seed's 50 videos move by several points from seed to seed (docs/MODELS.md): pool seeds to compare models.
    pooled = summarize(everything)
    if len(folders) > 1:
        typer.echo(f"{_line(pooled, everything)}  all {len(folders)} folders")
    if json_out:
        per_folder = {str(folder): summary for folder, _, summary in scored}
        json_out.write_text(json.dumps({"summary": pooled, "folders": per_folder, "videos": everything}, indent=2)
                            + "\n")


def _line(summary: dict, scores: list[dict]) -> str:
    """Text-to-video is scored against the prompt; image-to-video against its input image, which names no
    direction: the clip should keep the image's colour and shape and move the way its first frame points."""
    kinds = {"image" in s for s in scores}
    if kinds == {True}:
        line = (f"{summary['videos']} image-to-video clip{'s' if summary['videos'] != 1 else ''}: colour kept {summary['colour']}%, shape kept "
                f"{summary['shape']}%, moving the way the first frame points {summary['direction']}%")
    else:
        what = "videos" if kinds == {False} else "videos (text- and image-to-video)"
        line = (f"{summary['videos']} {what}: colour {summary['colour']}%, shape {summary['shape']}%, "
                f"direction {summary['direction']}%")
    if "worst_flicker" in summary:  # asyncvid.eval.temporal
        line += (f"; smooth {summary['smooth']}%, steady {summary['steady']}%, calm background {summary['calm']}% "
                 f"(worst flicker {summary['worst_flicker']:g} levels)")
    if "one_colour" in summary:
        line += f"; one colour throughout {summary['one_colour']}%"
    return line


if __name__ == "__main__":
    app()
