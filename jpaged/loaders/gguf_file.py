"""A small GGUF (v2/v3) reader: metadata and tensor views over a read-only memory map.

The gguf package's own reader builds a numpy view per array element and takes seconds on a
49k-token vocabulary; this one reads metadata with `struct` and leaves tensor data mapped.
"""

import dataclasses
import struct

import numpy as np

from jpaged.loaders.errors import ModelLoadError

# GGUF metadata value type -> struct format (8 is a string, 9 an array).
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"
}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GgufTensor:
    name: str
    dims: tuple[int, ...]  # numpy order (llama.cpp's ne reversed): [out, in] for a weight
    qtype: "gguf.constants.GGMLQuantizationType"  # noqa: F821 (gguf is imported when a file is read)
    data: np.ndarray  # u8[*dims[:-1], bytes per row], a view into the file


@dataclasses.dataclass(frozen=True)
class GgufFile:
    path: str
    metadata: dict  # key -> int | float | bool | str | list
    tensors: dict[str, GgufTensor]


def read_gguf(path: str) -> GgufFile:
    """Parses the header of `path`; ModelLoadError if it is not a complete GGUF v2/v3 file."""
    try:
        blob = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} could not be opened: {e}") from e
    try:
        return _parse(path, blob)
    except (struct.error, UnicodeDecodeError, ValueError, KeyError, IndexError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from e


def _parse(path: str, blob: np.memmap) -> GgufFile:
    buf = memoryview(blob)
    if bytes(buf[:4]) != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (its first bytes are {bytes(buf[:4])!r}, not b'GGUF')")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
    pos = 24
    metadata = {}
    for _ in range(kv_count):
        key, pos = _read_string(buf, pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = _read_value(buf, pos + 4, value_type)
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # only GGUF users need gguf

    infos = []
    for _ in range(tensor_count):
        name, pos = _read_string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        ne = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, ne, GGMLQuantizationType(qtype), offset))
    alignment = metadata.get("general.alignment", 32)
    data_start = -(-pos // alignment) * alignment
    tensors = {}
    for name, ne, qtype, offset in infos:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = ne[0] // block_size * type_size
        rows = int(np.prod(ne[1:], dtype=np.int64))
        start = data_start + offset
        if start + rows * row_bytes > blob.size:
            raise ModelLoadError(
                f"{path} is truncated: tensor {name} needs bytes up to {start + rows * row_bytes}, "
                f"the file has {blob.size}"
            )
        data = blob[start : start + rows * row_bytes].reshape(*ne[:0:-1], row_bytes)
        tensors[name] = GgufTensor(name=name, dims=tuple(ne[::-1]), qtype=qtype, data=data)
    return GgufFile(path=path, metadata=metadata, tensors=tensors)


def _read_string(buf, pos):
    (length,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + length
    if end > len(buf):
        raise ValueError(f"a string at byte {pos} runs past the end of the file")
    return bytes(buf[pos + 8 : end]).decode("utf-8"), end


def _read_value(buf, pos, value_type):
    if value_type == _STRING:
        return _read_string(buf, pos)
    if value_type == _ARRAY:
        element_type, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if element_type in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[element_type]
            values = list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos))
            return values, pos + count * struct.calcsize(fmt)
        values = []
        for _ in range(count):
            value, pos = _read_value(buf, pos, element_type)
            values.append(value)
        return values, pos
    fmt = _SCALAR_FORMATS[value_type]  # KeyError (-> corrupt file) for unknown types
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
