"""Saved files are byte-reproducible: equal tensors and metadata give equal bytes in any process."""

import hashlib
import subprocess
import sys

import torch
from safetensors.torch import load

from meerkat_hf.hub.safetensors_bytes import save_safetensors

_SCRIPT = """
import hashlib, sys, torch
from meerkat_hf.hub.safetensors_bytes import save_safetensors
meta = {f"key{i}": str(i) for i in range(12)}
blob = save_safetensors({"values": torch.arange(5, dtype=torch.float32), "delta": torch.ones(3)}, metadata=meta)
sys.stdout.write(hashlib.sha256(blob).hexdigest())
"""


def test_bytes_are_identical_across_processes():
    # safetensors orders `__metadata__` by a per-process random hash seed: 12 keys in the same
    # order in three processes by chance has probability < 1e-16.
    digests = {subprocess.run([sys.executable, "-c", _SCRIPT], check=True, capture_output=True, text=True).stdout
               for _ in range(3)}
    assert len(digests) == 1


def test_canonical_file_loads_back_unchanged():
    tensors = {"b": torch.randn(3, 4), "a": torch.arange(7, dtype=torch.int64), "c": torch.zeros(0)}
    blob = save_safetensors(tensors, metadata={"z": "1", "format": "pt"})
    header_len = int.from_bytes(blob[:8], "little")
    assert header_len % 8 == 0 and blob[8:8 + header_len].rstrip().endswith(b"}")
    loaded = load(blob)
    assert sorted(loaded) == ["a", "b", "c"]
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    assert hashlib.sha256(blob).digest() == hashlib.sha256(save_safetensors(dict(reversed(tensors.items())),
                                                                              metadata={"format": "pt", "z": "1"})).digest()
