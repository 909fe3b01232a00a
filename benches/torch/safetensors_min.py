"""The safetensors format's little-endian reader and writer for what the twin exchanges with
fnokern (F32, F64, I64 and C64 tensors), used where the `safetensors` package is not installed:
an 8-byte header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the bytes.
The format: https://github.com/huggingface/safetensors (README, "Format")."""

import json
import struct

import numpy as np
import torch

DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "C64": np.complex64}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def load_file(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {meta['dtype']}, not one of {sorted(DTYPES)}")
        a, b = meta["data_offsets"]
        arr = np.frombuffer(body[a:b], dtype=np.dtype(DTYPES[meta["dtype"]]).newbyteorder("<")).reshape(meta["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


def save_file(arrays, path):
    header, chunks, at = {}, [], 0
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in NAMES:
            raise ValueError(f"tensor {name} has dtype {arr.dtype}, not one of {sorted(DTYPES)}")
        data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [at, at + len(data)]}
        chunks.append(data)
        at += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(chunks))
