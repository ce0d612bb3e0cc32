""".npz archives, read and written without pickle: the one reader every .npz input
goes through (galleries, embedding outputs, job chunks, calibrations in galleries)
and the streaming writer and member reader of the embedding jobs (members larger
than memory are written and read piece by piece)."""

from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np


def read_npz(path, error=ValueError, names=None, what=".npz file") -> dict:
    """The members of an `.npz` (all, or those of `names` it has) as numpy arrays,
    never unpickling.

    Any way the file can be wrong (not a zip, truncated, a CRC error, a pickled
    or object member, a lone `.npy`) raises `error`: "PATH: not a valid `what`
    (the problem)". A missing file stays a FileNotFoundError.
    """
    path = os.fspath(path)

    def invalid(reason):
        return error(f"{path}: not a valid {what} ({reason}).")

    if os.path.isdir(path):
        raise invalid("it is a folder")
    member = None  # the member being read, for the message
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise invalid("it is a single .npy array, not an .npz archive")
        arrays = {}
        with data:
            wanted = data.files if names is None else [n for n in names if n in data.files]
            for member in wanted:
                arrays[member] = data[member]
        return arrays
    except (FileNotFoundError, error):
        raise
    except MemoryError:
        raise invalid(f"member {member!r} is larger than the memory available") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as failure:
        reason = str(failure) or type(failure).__name__
        if "pickle" in reason:
            reason = (
                f"member {member!r} holds pickled objects"
                if member is not None
                else "not an .npz archive (numpy would need pickle to read it)"
            ) + ", which are never loaded"
        elif isinstance(failure, EOFError) or "No data left" in reason:
            reason = "the file is empty"
        elif member is not None:
            reason = f"member {member!r}: {reason}"
        raise invalid(reason) from None


class NpzStreamWriter:
    """Writes an `.npz` (the layout `np.savez` makes) whose members arrive in pieces,
    so no member has to be in memory at once."""

    def __init__(self, file):
        self._zip = zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def write(self, name: str, array) -> None:
        array = np.asarray(array)
        self.write_pieces(name, array.dtype, array.shape, [array])

    def write_pieces(self, name: str, dtype, shape, pieces) -> None:
        """Member `name` of `shape` and `dtype` from pieces along the first axis."""
        dtype = np.dtype(dtype)
        header = {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": tuple(shape),
        }
        rows = 0
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for piece in pieces:
                piece = np.ascontiguousarray(piece, dtype=dtype)
                rows += piece.shape[0] if piece.ndim else 1
                f.write(piece.tobytes())
        if shape and rows != shape[0]:
            raise RuntimeError(f"member {name}: wrote {rows} rows, the header says {shape[0]}")

    def close(self):
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NpyMemberReader:
    """Reads one member of an `.npz` sequentially, `read(rows)` at a time (never pickle);
    a member that is missing, damaged, pickled or truncated raises `error`."""

    def __init__(self, archive: zipfile.ZipFile, name: str, where: str, error=ValueError):
        self._error = error
        try:
            self._file = archive.open(f"{name}.npy")
            version = np.lib.format.read_magic(self._file)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            self.shape, fortran, self.dtype = read_header(self._file)
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as failure:
            raise self._error(f"{where}: cannot read member {name!r} ({failure}).") from None
        if fortran or self.dtype.hasobject:
            raise self._error(f"{where}: member {name!r} is not a plain C-ordered array.")
        self._row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        self._where, self._name = where, name

    def read(self, rows: int) -> np.ndarray:
        data = self._file.read(rows * self._row_bytes)
        if len(data) != rows * self._row_bytes:
            raise self._error(f"{self._where}: member {self._name!r} ends early (truncated).")
        return np.frombuffer(data, dtype=self.dtype).reshape((rows, *self.shape[1:]))

    def close(self):
        self._file.close()
