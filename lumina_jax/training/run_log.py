"""What a run reports, from process 0: metrics.jsonl, appended so that a resumed run continues the same file,
and TensorBoard event files beside it (`tensorboard --logdir WORKDIR`) with the same scalars and the samples."""

import json
from pathlib import Path

import jax
import numpy as np
from PIL import Image


class RunLog:
    def __init__(self, workdir: Path):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter  # here: only process 0 writes events

            self.file = open(workdir / "metrics.jsonl", "a")
            self.board = SummaryWriter(str(workdir))

    def metrics(self, record: dict) -> None:
        """One line of metrics.jsonl, and each number but the step as a TensorBoard scalar "train/NAME"."""
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for name, value in record.items():
            if name != "step":
                self.board.add_scalar(f"train/{name}", value, record["step"])
        self.board.flush()

    def samples(self, step: int, files: list[Path]) -> None:
        """The step's sample images as TensorBoard images "samples/I", I the prompt's index (2 digits)."""
        if not self.active:
            return
        for index, file in enumerate(files):
            with Image.open(file) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.board.add_image(f"samples/{index:02d}", pixels, step, dataformats="HWC")
        self.board.flush()

    def close(self) -> None:
        if self.active:
            self.file.close()
            self.board.close()
