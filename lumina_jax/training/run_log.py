"""What a run reports, from process 0: metrics.jsonl, appended so that a resumed run continues the same file,
and TensorBoard event files beside it (`tensorboard --logdir WORKDIR`) with the same scalars and the samples.

In a bucket (gs://...), where an object cannot be appended to, metrics.jsonl is uploaded whole at each record
(the object is replaced at once: a reader sees the old lines or the new ones), and so is the event file, written
in a local temporary folder (at each record as far as tensorboardX's writing thread has gone, whole at close).
tensorboardX would upload it itself, through google-cloud-storage rather than the file system the rest of the run
uses, and again from its finalizer after close, retrying for minutes once the bucket is out of reach."""

import json
import os
import shutil
import tempfile
from pathlib import Path

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
            self.workdir = epath.Path(workdir)
            self.events = Path(tempfile.mkdtemp(prefix="lumina-jax-events-")) if is_remote(workdir) else None
            self.board = SummaryWriter(os.fspath(self.events or workdir))

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
        self._flush_board()

    def samples(self, step: int, files: list[epath.Path]) -> None:
        """The step's sample images as TensorBoard images "samples/I", I the prompt's index (2 digits)."""
        if not self.active:
            return
        for index, file in enumerate(files):
            with file.open("rb") as f, Image.open(f) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.board.add_image(f"samples/{index:02d}", pixels, step, dataformats="HWC")
        self._flush_board()

    def _flush_board(self) -> None:
        self.board.flush()
        self._upload_events()

    def _upload_events(self) -> None:
        if self.events is not None:  # each event file uploaded whole
            for file in self.events.iterdir():
                (self.workdir / file.name).write_bytes(file.read_bytes())

    def close(self) -> None:
        if self.active:
            if self.file is not None:
                self.file.close()
            self.board.close()
            self._upload_events()
            if self.events is not None:
                shutil.rmtree(self.events)
