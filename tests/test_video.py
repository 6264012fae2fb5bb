"""Video input: `maskrcnn predict clip.mp4` writes an annotated video and one JSON line per processed frame."""

from __future__ import annotations

import json
from fractions import Fraction

import av
import numpy as np
import pytest

from maskrcnn.api import load_model
from maskrcnn.cli import main

FRAMES, HEIGHT, WIDTH, FPS = 10, 72, 95, 10


def write_clip(path, frames=FRAMES):
    """Write a tiny synthetic video: a bright square moving over a dark background."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH + 1, HEIGHT, "yuv420p"
        for i in range(frames):
            image = np.full((HEIGHT, WIDTH + 1, 3), 30, dtype=np.uint8)
            image[20:44, 5 + 6 * i : 29 + 6 * i] = (240, 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_frames(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate


def test_predict_on_a_video_every_second_frame(checkpoint, tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    write_clip(clip)
    out = tmp_path / "out"
    assert main(["predict", str(clip), "--weights", str(checkpoint), "--out", str(out), "--every", "2",
                 "--score-threshold", "0.0"]) == 0
    captured = capsys.readouterr()
    assert "5 frame(s) in" in captured.out and "frames/s" in captured.out
    assert "frame" in captured.err  # the progress bar
    lines = [json.loads(line) for line in (out / "clip.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == [0, 2, 4, 6, 8]
    assert [r["time"] for r in lines] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    # The JSON lines hold what the model finds on the same decoded frames.
    decoded, _ = read_frames(clip)
    model = load_model(None, weights=checkpoint)
    expected = model.predict(decoded[4], score_threshold=0.0)[0]
    record = lines[2]["detections"]
    assert len(record) == len(expected["boxes"]) > 0
    assert record[0]["box"] == pytest.approx(expected["boxes"][0].tolist(), abs=0.01)
    assert set(record[0]) == {"box", "label", "category_id", "name", "score", "mask"}
    frames, rate = read_frames(out / "clip.mp4")
    assert len(frames) == 5 and frames[0].shape == (HEIGHT, WIDTH + 1, 3)
    assert rate == Fraction(FPS, 2)
    assert not list(out.glob("*.tmp"))


def test_images_and_videos_together_and_a_broken_video(checkpoint, tmp_path, capsys):
    from PIL import Image

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_clip(inputs / "a.mp4", frames=3)
    (inputs / "broken.mp4").write_bytes(b"not a video at all")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(inputs / "b.png")
    out = tmp_path / "out"
    assert main(["predict", str(inputs), "--weights", str(checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "skipped: video" in err and "broken.mp4" in err
    assert (out / "a.mp4").exists() and len((out / "a.jsonl").read_text().splitlines()) == 3
    assert (out / "b.png").exists() and (out / "predictions.json").exists()
    assert not (out / "broken.mp4").exists() and not list(out.glob("*.tmp"))


def test_every_must_be_positive(checkpoint, tmp_path, capsys):
    clip = tmp_path / "c.mp4"
    write_clip(clip, frames=1)
    assert main(["predict", str(clip), "--weights", str(checkpoint), "--every", "0"]) == 2
    assert "--every 0 must be at least 1" in capsys.readouterr().err


def write_lossless_clip(path, frames):
    """Write `frames` (H x W x 3 uint8) as FFV1 in Matroska: lossless, so any decoder gives these arrays back."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "bgr0"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2
def test_each_processed_frame_gets_the_detections_of_that_frame(checkpoint, tmp_path):
    """The frames are known without decoding anything (a lossless clip of arrays made here, each different:
    a square moving over seeded noise): frames 0, 3 and 6 of 8 at --every 3, at 0.0, 0.3 and 0.6 s, and
    each line holds what the model finds on that very array (every box, score, label, and the RLE mask
    decoded by pycocotools). A dropped, repeated or misnumbered frame gives another frame's detections."""
    from pycocotools import mask as mask_utils

    frames = []
    for i in range(8):
        image = np.random.default_rng(i).integers(0, 60, (HEIGHT, WIDTH + 1, 3), dtype=np.uint8)
        image[20:44, 5 + 7 * i : 29 + 7 * i] = (240, 200, 40)
        frames.append(image)
    clip = tmp_path / "clip.mkv"
    write_lossless_clip(clip, frames)
    out = tmp_path / "out"
    assert main(["predict", str(clip), "--weights", str(checkpoint), "--out", str(out), "--every", "3",
                 "--score-threshold", "0.0"]) == 0
    lines = [json.loads(line) for line in (out / "clip.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == [0, 3, 6]
    assert [r["time"] for r in lines] == pytest.approx([0.0, 0.3, 0.6], abs=1e-4)
    model = load_model(None, weights=checkpoint)
    for record in lines:
        expected = model.predict(frames[record["frame"]], score_threshold=0.0)[0]
        detections = record["detections"]
        assert len(detections) == len(expected["boxes"]) > 0, record["frame"]
        for det, box, score, label, mask in zip(detections, expected["boxes"], expected["scores"], expected["labels"],
                                                expected["masks"]):
            assert det["box"] == pytest.approx(box.tolist(), abs=0.01), record["frame"]
            assert det["score"] == pytest.approx(float(score), abs=1e-5) and det["label"] == int(label)
            decoded = mask_utils.decode({"size": det["mask"]["size"], "counts": det["mask"]["counts"].encode()})
            assert np.array_equal(decoded.astype(bool), mask.numpy()), record["frame"]
    written, rate = read_frames(out / "clip.mp4")
    assert len(written) == 3 and rate == Fraction(FPS, 3)
