"""Calibration images: training images, never the test split, fed to ONNX Runtime's calibrator."""

from __future__ import annotations

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from torch.utils.data import Dataset

from cascadec.errors import UserError

CALIBRATION_BATCH = 32


def sample_images(dataset: Dataset, count: int, *, seed: int = 0) -> np.ndarray:
    """``count`` images (N x C x H x W float32), a seeded random subset of ``dataset``: the first N
    of a sorted data set would calibrate on a few classes only."""
    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise UserError("no training images to calibrate INT8 with")
    n = min(int(count), total)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    return np.stack([np.asarray(dataset[int(i)][0], dtype=np.float32) for i in picks])


class ImageReader(CalibrationDataReader):
    """Batches of ``images`` under the graph's input name, as ``quantize_static`` reads them."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int = CALIBRATION_BATCH) -> None:
        self.images = images
        self.input_name = input_name
        self.batch = batch
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._at >= len(self.images):
            return None
        chunk = self.images[self._at : self._at + self.batch]
        self._at += self.batch
        return {self.input_name: np.ascontiguousarray(chunk)}

    def rewind(self) -> None:
        self._at = 0
