"""Executed documentation: every shell block (```bash, ```sh, ```console) in README.md and docs/*.md is run
here on tiny data, or is marked in the page as not runnable here, with the reason, by an HTML comment right
above it:

    <!-- not-run: needs internet (downloads the COCO model) -->

The blocks of one page run in page order in one scratch folder (a later block may use what an earlier one
wrote, as a reader following the page would), which holds tiny stand-ins for the files the pages name (see
`workspace`). What else changes is the `SUBSTITUTIONS` table below, written once. Each block's exit status
must be 0; the files named by a `<!-- creates: A B -->` comment above it must exist afterwards; in a
```console block, the lines after a `$ ` command are output that must appear in order (`...` matches
anything, runs of spaces match any space). An unmarked block that fails fails the test.

A block over the doc test's budget is marked `<!-- slow: why -->`: `make test` leaves it out, and the `slow`
test (`make test-slow`, `make test-all`) runs its whole page, every runnable block in order.

`python tests/test_docs.py --list` prints which blocks run and which are marked, with the reasons.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = {"bash", "sh", "console"}
BLOCK_TIMEOUT_S = 300

TINY = "{tiny}"  # replaced by the tiny checkpoint's path

# (what, pattern, replacement, why): applied in order to each command line of a block (continuation lines
# joined) before it runs. A replacement may use {tiny}.
SUBSTITUTIONS: list[tuple[str, str, str, str]] = [
    ("make install", r"^make install\b.*$", ":",
     "the test runs inside the installed virtual environment already"),
    ("zoo names", r"--weights (?:maskrcnn_resnet50_fpn(?:_v2)?|keypointrcnn_resnet50_fpn|detectron2_[A-Za-z0-9_.-]*[A-Za-z0-9])\b"
     r"(?!\.(?:pth|pkl))", "--weights {tiny} --config {tiny_config}",
     "a model-zoo file needs the internet: the tiny shapes checkpoint, trained in a few seconds, and its config "
     "(a zoo name brings its config; a file given to train would otherwise get the own-data recipe) take its place"),
    ("the default model", r"^(\S*maskrcnn (?:predict|serve) (?!.*--(?:weights|config)\b).*?)(\s+#.*)?$",
     r"\1 --weights {tiny}\2",
     "predict without --weights or --config runs the COCO zoo model (internet): the tiny checkpoint instead"),
    ("W", r"--weights W\b", "--weights {tiny}", "W stands for your weights: the tiny checkpoint"),
    ("/tmp", r"/tmp/aug_data\b", "aug_data", "keep every file inside the test's scratch folder"),
    ("make-shapes sizes", r"^(.*\bmaskrcnn make-shapes\b.*?)(\s+#.*)?$", r"\1 --train 4 --val 2\2",
     "4 training and 2 validation images (argparse keeps the last --train / --val given)"),
    ("make-shapes test split", r"^(.*\bmaskrcnn make-shapes\b.*--test \d+.*?)(\s+#.*)?$", r"\1 --test 2\2",
     "2 test images"),
    ("solver.steps", r"\bsolver\.steps=\[\d+\]", "solver.steps=[2]", "a decay step inside the 3 iterations"),
    ("training budget", r"^(.*\bmaskrcnn(?:\.cli)? train\b.*?)(\s+#.*)?$", r"\1 solver.max_iter=3\2",
     "3 iterations of any training (a later KEY=VALUE wins; solver.max_minutes keeps max_iter as its cap)"),
]

# Files a page assumes you have: when a block names one that no earlier block of the page made, the
# stand-in is copied there first.
ASSUMED_FILES = {
    "runs/mine/checkpoints/model_final.pth": "tiny/checkpoints/model_final.pth",
    "runs/mine/config.yaml": "tiny/config.yaml",
    "model_final.pth": "tiny/checkpoints/model_final.pth",
}


@dataclass
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None = None  # the reason, for a block marked not runnable here
    slow: str | None = None  # why, for a block marked <!-- slow: ... --> (run by the `slow` test only)
    creates: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def page_paths() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def parse_blocks(path: Path) -> list[Block]:
    """Return the shell blocks of a Markdown page with the marker comments right above each."""
    lines = path.read_text(encoding="utf-8").split("\n")
    page = path.relative_to(ROOT).as_posix()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^( *)(`{3,})\s*([\w-]*)", lines[i])  # indented too: a block inside a list item
        if not fence:
            i += 1
            continue
        indent, ticks, lang = fence.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(ticks):
            end += 1
        if lang in SHELL_LANGUAGES:
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : end]]
            block = Block(page, i + 1, lang, "\n".join(body))
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("<!--"):
                marker = re.match(r"<!--\s*([\w-]+):\s*(.*?)\s*-->", lines[j].strip())
                if marker and marker.group(1) == "not-run":
                    block.not_run = marker.group(2)
                elif marker and marker.group(1) == "slow":
                    block.slow = marker.group(2)
                elif marker and marker.group(1) == "creates":
                    block.creates += marker.group(2).split()
                j -= 1
            blocks.append(block)
        i = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for path in page_paths() for b in parse_blocks(path)]


def logical_lines(text: str) -> list[str]:
    """Join backslash continuations into one line each."""
    return text.replace("\\\n", " ").split("\n")


def substitute(line: str, tiny: str) -> str:
    for _, pattern, replacement, _ in SUBSTITUTIONS:
        line = re.sub(pattern, replacement, line)
    return line.replace(TINY, tiny).replace("{tiny_config}", str(Path(tiny).parent.parent / "config.yaml"))


def console_commands(text: str) -> list[tuple[str, list[str]]]:
    """Split a console block into (command, expected output lines)."""
    pairs: list[tuple[str, list[str]]] = []
    for line in logical_lines(text):
        if line.startswith("$ "):
            pairs.append((line[2:], []))
        elif pairs:
            pairs[-1][1].append(line)
    return pairs


def output_mismatch(expected: list[str], output: str) -> str | None:
    """Return why `output` lacks the expected lines (in order), or None."""
    got = output.splitlines()
    at = 0
    for want in (w for w in expected if w.strip()):
        if want.strip() == "...":
            continue
        pattern = re.compile(".*".join(r"\s+".join(re.escape(word) for word in piece.split())
                                       for piece in want.strip().split("...")))
        while at < len(got) and not pattern.search(got[at]):
            at += 1
        if at == len(got):
            return f"expected output line not found (in order): {want.strip()!r}"
        at += 1
    return None


def run_block(block: Block, folder: Path, tiny: str, env: dict[str, str]) -> str | None:
    """Run one block in `folder`; return why it failed, or None."""
    for assumed, source in ASSUMED_FILES.items():
        target = folder / assumed
        if re.search(rf"(?<![\w/.-]){re.escape(assumed)}\b", block.text) and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / source, target)
    if block.lang == "console":
        steps = [(substitute(cmd, tiny), expected) for cmd, expected in console_commands(block.text)]
    else:
        steps = [("\n".join(substitute(line, tiny) for line in logical_lines(block.text)), [])]
    for script, expected in steps:
        try:
            done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=folder, env=env,
                                  capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"timed out after {BLOCK_TIMEOUT_S} s:\n{script}"
        output = done.stdout + done.stderr
        if done.returncode != 0:
            return f"exit status {done.returncode}:\n{script}\n--- output (last 3000 characters) ---\n{output[-3000:]}"
        if expected and (why := output_mismatch(expected, output)):
            return f"{why}\n{script}\n--- output ---\n{output[-3000:]}"
    missing = [f for f in block.creates if not (folder / f).exists()]
    if missing:
        return f"did not create {missing}"
    return None


# ---- the scratch folder -------------------------------------------------------------------------------


def doc_env(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": f"{folder / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "MASKRCNN_OFFLINE": "1",  # never the network
        "MASKRCNN_CACHE": str(folder / "cache"),
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONWARNINGS": "ignore",
    })
    return env


def build_base(base: Path) -> None:
    """Write the stand-ins every page's folder starts from, and train the tiny checkpoint (a few seconds)."""
    import av
    import numpy as np
    from PIL import Image

    from maskrcnn.data.shapes import make_shapes

    make_shapes(base, num_train=4, num_val=2, seed=0, image_size=64, max_shapes=2, shape_size=(14, 28))
    (base / ".venv").symlink_to(Path(sys.prefix))
    my = base / "my"
    my.mkdir()
    shutil.copy(base / "train.json", my / "train.json")
    shutil.copytree(base / "train", my / "train_images")
    shutil.copy(base / "val.json", my / "val.json")
    shutil.copytree(base / "val", my / "val_images")
    shutil.copy(base / "val.json", base / "big.json")
    shutil.copytree(base / "val", base / "big")
    images = sorted((base / "train").iterdir())
    first = Image.open(images[0]).convert("RGB")
    first.save(base / "photo.jpg")
    first.save(base / "image.png")
    first.resize((256, 256)).save(base / "big.tif")
    for folder in ("photos", "more"):
        (base / folder).mkdir()
    for k, image in enumerate(images[:2]):
        Image.open(image).convert("RGB").save(base / "photos" / f"p{k}.jpg")
    Image.open(images[2]).convert("RGB").save(base / "more" / "m0.jpg")
    with av.open(str(base / "clip.mp4"), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for k in range(4):
            frame = np.asarray(Image.open(images[k % len(images)]).convert("RGB").resize((64, 64)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    subprocess.run([str(base / ".venv" / "bin" / "maskrcnn"), "train", "--config", "shapes",
                    "data.train=[train.json:train]", "data.val=val.json:val", "output_dir=tiny",
                    "solver.max_iter=3", "solver.ims_per_batch=2", "model.box_head.score_thresh=0.0"],
                   cwd=base, env=doc_env(base), check=True, capture_output=True, text=True)


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("docs") / "base"
    build_base(folder)
    return folder


def pages_with(select) -> list[str]:
    return [path.relative_to(ROOT).as_posix() for path in page_paths()
            if any(b.not_run is None and select(b) for b in parse_blocks(path))]


def run_page(page: str, base: Path, tmp_path: Path, with_slow: bool) -> None:
    """Run the page's runnable shell blocks (the slow ones too if `with_slow`) in order in a copy of the
    scratch folder; every one must pass."""
    folder = tmp_path / "page"
    shutil.copytree(base, folder, symlinks=True)
    tiny = str(folder / "tiny" / "checkpoints" / "model_final.pth")
    failures = []
    for block in parse_blocks(ROOT / page):
        if block.not_run is not None or (block.slow and not with_slow):
            continue
        start = time.monotonic()
        why = run_block(block, folder, tiny, doc_env(folder))
        print(f"{block.name}: {'FAILED' if why else 'ok'} in {time.monotonic() - start:.1f} s")
        if why:
            failures.append(f"{block.name} ({block.lang} block, not marked <!-- not-run: ... -->): {why}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("page", pages_with(lambda b: not b.slow))
def test_page_shell_blocks_run(page, base, tmp_path):
    """The blocks not marked slow, in page order."""
    run_page(page, base, tmp_path, with_slow=False)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("page", pages_with(lambda b: bool(b.slow)))
def test_page_shell_blocks_run_with_slow(page, base, tmp_path):
    """Every runnable block of a page that has blocks marked <!-- slow: ... -->, in page order (a slow block
    may use what an earlier block wrote)."""
    run_page(page, base, tmp_path, with_slow=True)


def test_every_marked_block_says_why():
    """A not-run marker must give its reason; a block no page runs must be a shell block we recognise."""
    blocks = all_blocks()
    assert blocks, "no shell blocks found"
    empty = [b.name for b in blocks if b.not_run is not None and len(b.not_run.strip()) < 10]
    assert not empty, f"not-run markers without a reason: {empty}"
    lazy = [b.name for b in blocks if b.slow is not None and len(b.slow.strip()) < 10]
    assert not lazy, f"slow markers without a reason: {lazy}"


def test_runner_fails_an_unmarked_failing_block(tmp_path):
    """The runner reports a failing block, and a claimed output or file that does not appear."""
    env = doc_env(tmp_path)
    assert run_block(Block("x.md", 1, "bash", "false"), tmp_path, "t.pth", env).startswith("exit status 1")
    assert "expected output line not found" in run_block(
        Block("x.md", 1, "console", "$ echo hello world\nhello   there"), tmp_path, "t.pth", env)
    assert run_block(Block("x.md", 1, "console", "$ echo hello   world\n...\nhello ... world"),
                     tmp_path, "t.pth", env) is None
    assert "did not create" in run_block(Block("x.md", 1, "sh", "true", creates=["out.json"]),
                                         tmp_path, "t.pth", env)


def test_substitutions_are_what_the_table_says():
    tiny = "/t.pth"
    assert substitute(".venv/bin/maskrcnn predict photo.jpg  # masks", tiny) == \
        ".venv/bin/maskrcnn predict photo.jpg --weights /t.pth  # masks"
    assert substitute("maskrcnn predict a --weights maskrcnn_resnet50_fpn_v2", "/r/ckpt/t.pth") == \
        "maskrcnn predict a --weights /r/ckpt/t.pth --config /r/config.yaml"
    assert "maskrcnn_resnet50_fpn.pth" in substitute("maskrcnn predict a --config c --weights maskrcnn_resnet50_fpn.pth", tiny)
    assert substitute("maskrcnn train data.train=[a:b] solver.steps=[1500]", tiny) == \
        "maskrcnn train data.train=[a:b] solver.steps=[2] solver.max_iter=3"


def listing() -> str:
    """The executed and the not-runnable blocks, with the reasons and the substitutions."""
    blocks = all_blocks()
    out = ["Executed shell blocks (page:line (language) [slow: why]: first command):"]
    for b in blocks:
        if b.not_run is None:
            first = next((l for l in b.text.splitlines() if l.strip() and not l.startswith("#")), "")
            slow = f"  [slow: {b.slow}]" if b.slow else ""
            out.append(f"  {b.name} ({b.lang}){slow}: {first[:90]}")
    out.append("Not runnable here (page:line: reason):")
    out += [f"  {b.name}: {b.not_run}" for b in blocks if b.not_run is not None]
    out.append("Substitutions:")
    out += [f"  {what}: {why}" for what, _, _, why in SUBSTITUTIONS]
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:] == ["--list"]:
        print(listing())
    else:
        sys.exit("usage: python tests/test_docs.py --list   (pytest runs the tests)")
