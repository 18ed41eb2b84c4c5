"""PyTorch reference backend: the same split graphs, traced to TorchScript by ``cbart export --with-torch``.

It runs exactly the modules the ONNX graphs were exported from, in fp32, on CPU or CUDA, behind the
same API -- the yardstick for the other backends, with no dependency on the training code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from cbart.runtime.backends.base import EncodedBatch, uniform_positions
from cbart.runtime.manifest import AUTOENCODER, CROSS_KV, DECODER_STEP, ENCODER, ExportDirectoryError, Manifest


class TorchBackend:
    def __init__(self, directory: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None) -> None:
        if not manifest.torch_graphs:
            raise ExportDirectoryError(
                f"{directory} has no TorchScript graphs for the PyTorch backend; "
                "export with `cbart export --with-torch`"
            )
        if torch.device(device).type != manifest.torch_device:
            raise ExportDirectoryError(
                f"{directory}'s TorchScript graphs were traced for {manifest.torch_device} and cannot run on "
                f"{device} (tracing records the device of the tensors a graph creates); re-export with "
                f"`cbart export --with-torch --torch-device {torch.device(device).type}`"
            )
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was requested but no CUDA GPU is visible; use device='cpu'")
        if threads:
            torch.set_num_threads(threads)
        self.manifest = manifest
        self.device = torch.device(device)
        self.graphs = {
            name: torch.jit.load(str(directory / file), map_location=self.device)
            for name, file in manifest.torch_graphs.items()
        }
        dims = manifest.model
        self.cache_shape = (dims.decoder_attention_heads, 0, dims.head_dim)
        self.layers = dims.decoder_layers

    @torch.inference_mode()
    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncodedBatch:
        return self.encode_states(self.encoder_states(input_ids, attention_mask), input_ids, attention_mask)

    @torch.inference_mode()
    def encoder_states(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> torch.Tensor:
        ids = torch.from_numpy(input_ids).to(self.device)
        mask = torch.from_numpy(attention_mask).to(self.device)
        return self.graphs[ENCODER](ids, mask)

    @torch.inference_mode()
    def encode_states(self, states: torch.Tensor, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncodedBatch:
        if AUTOENCODER in self.graphs:
            states = self.graphs[AUTOENCODER](states)
        cross = list(self.graphs[CROSS_KV](states))
        return EncodedBatch(cross_kv=cross, attention_mask=attention_mask, input_ids=input_ids)

    def start(self, encoded: EncodedBatch, rows_per_source: int, max_length: int | None = None) -> TorchDecoderSession:
        return TorchDecoderSession(self, encoded, encoded.sources * rows_per_source)


class TorchDecoderSession:
    def __init__(self, backend: TorchBackend, encoded: EncodedBatch, rows: int) -> None:
        self.backend = backend
        self.cross: list[torch.Tensor] = encoded.cross_kv
        self.mask = torch.from_numpy(encoded.attention_mask).to(backend.device)
        empty = torch.zeros((rows, *backend.cache_shape), device=backend.device)
        self.past = [empty] * (2 * backend.layers)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self.step_all(tokens)[:, -1, :]

    @torch.inference_mode()
    def step_all(self, tokens: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(self.backend.device)
        rows = []
        if self.backend.manifest.per_row_positions:  # an --inflight export; here every row has the same length
            positions, self_mask = uniform_positions(len(tokens), self.past[0].shape[2], tokens.shape[1])
            rows = [torch.from_numpy(positions).to(ids.device), torch.from_numpy(self_mask).to(ids.device)]
        logits, *presents = self.backend.graphs[DECODER_STEP](ids, self.mask, *rows, *self.past, *self.cross)
        self.past = presents
        return logits.float().cpu().numpy()

    def reorder(self, rows: np.ndarray) -> None:
        index = torch.from_numpy(rows).to(self.backend.device)
        self.past = [value.index_select(0, index) for value in self.past]

    def truncate(self, length: int) -> None:
        """Drop cache positions from ``length`` on: views, no copy (the next step concatenates anyway)."""
        self.past = [value[:, :, :length] for value in self.past]
