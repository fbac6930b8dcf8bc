"""Byte-reproducible safetensors serialisation.

`safetensors.torch.save` writes the `__metadata__` map in the order of a Rust hash map, which
varies from process to process. Our files carry SHA-256 checksums (`meerkat_config.json`) and
must be identical whichever transport or replica wrote them, so the header is re-emitted with
sorted keys; tensors, offsets and the format are unchanged (the header is plain JSON padded with
spaces to a multiple of 8 bytes, as the format specifies), and `safetensors` loads the result.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save as _save

_HEADER_ALIGNMENT = 8


def save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """`safetensors.torch.save`, with a canonical (sorted, compact) header: equal inputs give equal bytes."""
    blob = _save(tensors, metadata=metadata)
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    canonical += b" " * (-len(canonical) % _HEADER_ALIGNMENT)
    return struct.pack("<Q", len(canonical)) + canonical + blob[8 + header_len:]
