"""What a run reports, from process 0: metrics.jsonl, appended so that a resumed run continues the same file,
and TensorBoard event files beside it (`tensorboard --logdir WORKDIR`) with the same scalars and the samples.

In a bucket (gs://...), where an object cannot be appended to, metrics.jsonl is uploaded whole at each record
(the object is replaced at once: a reader sees the old lines or the new ones), as tensorboardX uploads its
event file whole at each flush."""

import json
import os

import jax
import numpy as np
from etils import epath
from PIL import Image

from lumina_jax.buckets import is_remote


class RunLog:
    def __init__(self, workdir: str | os.PathLike):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter  # here: only process 0 writes events

            self.path = epath.Path(workdir) / "metrics.jsonl"
            if is_remote(self.path):
                self.file, self.lines = None, self.path.read_text() if self.path.exists() else ""
            else:
                self.file = open(self.path, "a")
            self.board = SummaryWriter(os.fspath(workdir))

    def metrics(self, record: dict) -> None:
        """One line of metrics.jsonl, and each number but the step as a TensorBoard scalar "train/NAME"."""
        if not self.active:
            return
        line = json.dumps(record) + "\n"
        if self.file is None:
            self.lines += line
            self.path.write_text(self.lines)
        else:
            self.file.write(line)
            self.file.flush()
        for name, value in record.items():
            if name != "step":
                self.board.add_scalar(f"train/{name}", value, record["step"])
        self.board.flush()

    def samples(self, step: int, files: list[epath.Path]) -> None:
        """The step's sample images as TensorBoard images "samples/I", I the prompt's index (2 digits)."""
        if not self.active:
            return
        for index, file in enumerate(files):
            with file.open("rb") as f, Image.open(f) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.board.add_image(f"samples/{index:02d}", pixels, step, dataformats="HWC")
        self.board.flush()

    def close(self) -> None:
        if self.active:
            if self.file is not None:
                self.file.close()
            self.board.close()
