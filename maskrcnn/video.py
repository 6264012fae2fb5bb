"""Video input for `maskrcnn predict`: decode frames (PyAV), run the model, write an annotated video and
one JSON line of detections per processed frame."""

from __future__ import annotations

import json
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from maskrcnn.errors import UserError

VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}


class VideoReadError(UserError):
    """A video file that is missing, unreadable or has no video stream."""


def is_video(path: Path) -> bool:
    """Return whether `path` names a video file (by its suffix)."""
    return path.suffix.lower() in VIDEO_SUFFIXES


def frame_record(output: dict[str, Any], index: int, seconds: float, ids: list[int]) -> dict[str, Any]:
    """Return one JSON line: the frame's index and time, and its detections (xyxy boxes, COCO RLE masks)."""
    from maskrcnn.serve.records import detection_records

    return {"frame": index, "time": round(seconds, 4), "detections": detection_records(output, ids)}


def _even(image: np.ndarray) -> np.ndarray:
    """Return the image padded by a pixel where a side is odd (H.264 4:2:0 needs even sides)."""
    h, w = image.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return image
    return np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def predict_video(model: Any, path: Path, out_dir: Path, score_threshold: float, every: int = 1,
                  ids: list[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run `model` on every `every`-th frame of the video at `path`; return a summary.

    Writes `out_dir/<stem>.mp4` (the processed frames with masks and boxes drawn, at fps / every) and
    `out_dir/<stem>.jsonl` (one line per processed frame). Both are written under temporary names and
    renamed when complete.
    """
    import av
    from tqdm import tqdm

    from maskrcnn.structures.detections import detections_to_cpu
    from maskrcnn.visualize import draw_instances

    if every < 1:
        raise UserError(f"--every {every} must be at least 1")
    if not path.is_file():
        raise VideoReadError(f"video '{path}' does not exist")
    try:
        source = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise VideoReadError(f"video '{path}' cannot be read ({e}); is it a video file?") from None
    ids = ids or list(range(1, len(model.class_names) + 1))
    video_out, lines_out = out_dir / f"{path.stem}.mp4", out_dir / f"{path.stem}.jsonl"
    video_tmp, lines_tmp = (p.with_name(p.name + ".tmp") for p in (video_out, lines_out))
    processed, start = 0, time.perf_counter()
    try:
        if not source.streams.video:
            raise VideoReadError(f"'{path}' has no video stream")
        stream = source.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        total = stream.frames // every + (1 if stream.frames % every else 0) if stream.frames else None
        sink = av.open(str(video_tmp), mode="w", format="mp4")
        encoder = None
        bar = tqdm(total=total, desc=path.name, unit="frame", disable=not progress, file=sys.stderr)
        with open(lines_tmp, "w") as lines:
            try:
                for index, frame in enumerate(source.decode(stream)):
                    if index % every:
                        continue
                    image = frame.to_ndarray(format="rgb24")
                    output = model.predict(image, score_threshold=score_threshold)[0]
                    output = detections_to_cpu(output)
                    seconds = float(frame.time) if frame.time is not None else index / float(rate)
                    lines.write(json.dumps(frame_record(output, index, seconds, ids)) + "\n")
                    picture = _even(np.asarray(draw_instances(image, output, model.class_names, score_threshold)))
                    if encoder is None:
                        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
                        encoder = sink.add_stream(codec, rate=Fraction(rate) / every)
                        encoder.width, encoder.height = picture.shape[1], picture.shape[0]
                        encoder.pix_fmt = "yuv420p"
                    for packet in encoder.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                        sink.mux(packet)
                    processed += 1
                    bar.update(1)
                    bar.set_postfix_str(f"{processed / (time.perf_counter() - start):.2f} frames/s")
            except av.error.FFmpegError as e:
                raise VideoReadError(f"video '{path}' is corrupt after frame {processed * every} ({e})") from None
            finally:
                bar.close()
            if encoder is not None:
                for packet in encoder.encode():
                    sink.mux(packet)
            sink.close()
        if processed == 0:
            raise VideoReadError(f"video '{path}' has no frames that could be decoded")
        video_tmp.replace(video_out)
        lines_tmp.replace(lines_out)
    finally:
        source.close()
        for tmp in (video_tmp, lines_tmp):
            tmp.unlink(missing_ok=True)
    elapsed = time.perf_counter() - start
    return {"frames": processed, "seconds": elapsed, "fps": processed / elapsed if elapsed else 0.0,
            "video": video_out, "jsonl": lines_out}
