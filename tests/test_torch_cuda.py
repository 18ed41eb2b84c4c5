"""The PyTorch backend on CUDA: graphs traced with ``--torch-device cuda`` give ``model.generate()``'s ids on
the GPU. Needs a CUDA GPU (``python -m pytest -m gpu``); skipped, saying so, where none is visible.
"""

from __future__ import annotations

import json

import pytest
import torch
from cbart.compression import save_checkpoint
from cbart.exporter.export import ExportOptions, export_onnx
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.runtime.manifest import ExportDirectoryError
from conftest import random_batch, tiny_compressed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tests skipped: no CUDA GPU is visible"),
]
SETTINGS = [
    {"num_beams": 1, "do_sample": False, "max_new_tokens": 20},
    {"num_beams": 4, "max_new_tokens": 15, "length_penalty": 2.0, "no_repeat_ngram_size": 3},
]


@pytest.fixture(scope="module", params=["paper", "token"])
def cuda_export(request, tmp_path_factory):
    model = tiny_compressed(request.param, seed=3)
    root = tmp_path_factory.mktemp(f"cuda-{request.param}")
    save_checkpoint(model, root / "ckpt")
    options = ExportOptions(with_torch=True, torch_device="cuda", verify=False, progress=False)
    export_onnx(root / "ckpt", root / "onnx", options, log=lambda *_: None)
    return model.to("cuda"), root / "onnx"


@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "beam4"])
def test_cuda_traced_graphs_equal_pytorch_on_cuda(cuda_export, settings):
    model, directory = cuda_export
    assert json.loads((directory / "manifest.json").read_text())["torch_device"] == "cuda"
    runtime = Seq2SeqRuntime.from_dir(directory, backend="torch", device="cuda")
    ids, mask = random_batch([12, 5, 9], seed=1)
    sequences = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]
    with torch.no_grad():
        expected = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), **settings).tolist()
    assert runtime.generate(sequences, **settings).sequences == expected


def test_cuda_traced_graphs_refuse_the_cpu(cuda_export):
    _, directory = cuda_export
    with pytest.raises(ExportDirectoryError, match="traced for cuda .* --torch-device cpu"):
        Seq2SeqRuntime.from_dir(directory, backend="torch", device="cpu")
