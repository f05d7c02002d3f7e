"""An ONNX model's external data written as the graph is built: each initializer's bytes go to
``model.onnx.data`` when it is made, and the graph keeps only where they are (location, offset,
length). So no weight is held longer than its own making, and a streamed model's tables are
written a chunk of rows at a time, never whole; the in-memory path writes the same file the
same way (a test compares the bytes).

Initializers under INLINE_BELOW bytes (constants, shapes) stay inside the graph, about as
onnx.save_model(size_threshold=1024) keeps them. Tensors follow each other with no padding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mosaic_export.model.weights import Rows

INLINE_BELOW = 1024


class ExternalData:
    """Appends tensors to one data file; returns the TensorProtos that point into it."""

    def __init__(self, path: Path):
        self.path, self.location = Path(path), Path(path).name
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close(), the writer's owner
        self.offset = 0

    def close(self) -> None:
        self._file.close()

    def array(self, name: str, array: np.ndarray):
        """A tensor whose bytes are written now (inline when small)."""
        from onnx import numpy_helper

        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BELOW:
            return numpy_helper.from_array(array, name)
        self._file.write(memoryview(array).cast("B"))  # the array's own buffer: no copy
        return self._pointer(name, array.shape, array.dtype, array.nbytes)

    def rows_of(self, names: list[str], n: int, parts) -> list:
        """Tensors of n rows each, made together a chunk of rows at a time (``parts``: per chunk,
        one array per name, of that chunk's rows): each has its place in the file from the first
        chunk on, and every chunk's rows go to theirs (positional writes)."""
        protos, places, first = [], [], 0
        self._file.flush()  # positional writes below go around the buffer
        for arrays in parts:
            if not protos:  # each tensor's shape and type from its first chunk
                for name, a in zip(names, arrays, strict=True):
                    row = a[0].nbytes if len(a) else 0
                    places.append((self.offset, row))
                    protos.append(self._pointer(name, (n, *a.shape[1:]), a.dtype, n * row))
            for a, (start, row) in zip(arrays, places, strict=True):
                self._put(a, start + first * row)
            first += len(arrays[0])
        if first != n or not protos:
            raise ValueError(f"{', '.join(names)}: the chunks held {first} rows, expected {n}")
        self._file.seek(self.offset)
        return protos

    def rows(self, name: str, rows: Rows, dtype, transpose: bool = False):
        """A table written a chunk of rows at a time, in dtype; ``transpose``: stored as (columns,
        rows), each chunk's rows landing as a band of columns (positional writes)."""
        dtype = np.dtype(dtype)
        if not transpose:
            parts = ((chunk.detach().float().numpy().astype(dtype),) for chunk in rows.chunks())
            return self.rows_of([name], rows.shape[0], parts)[0]
        n, width = rows.shape
        start, first = self.offset, 0
        self._file.flush()  # positional writes below go around the buffer
        for chunk in rows.chunks():
            band = np.ascontiguousarray(chunk.detach().float().numpy().T, dtype=dtype)
            for j in range(width):  # row j of the stored matrix is column j of the table
                self._put(band[j], start + (j * n + first) * dtype.itemsize)
            first += band.shape[1]
        if first != n:
            raise ValueError(f"{name}: the chunks held {first} rows, expected {n}")
        self._file.seek(start + n * width * dtype.itemsize)
        return self._pointer(name, (width, n), dtype, n * width * dtype.itemsize, start)

    def _put(self, data: np.ndarray, offset: int) -> None:
        """data's bytes at offset (a short write, as on a full disk, is finished or raises)."""
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        while view:
            done = os.pwrite(self._file.fileno(), view, offset)
            view, offset = view[done:], offset + done

    def _pointer(self, name: str, shape, dtype: np.dtype, nbytes: int, start: int | None = None):
        from onnx import TensorProto, helper

        start = self.offset if start is None else start
        tensor = TensorProto(name=name, dims=list(shape), data_type=helper.np_dtype_to_tensor_dtype(dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", start), ("length", nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.offset = start + nbytes
        return tensor
