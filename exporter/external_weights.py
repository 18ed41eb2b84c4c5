"""Weights outside the graphs: one copy of each tensor on disk, memory-mapped by ONNX Runtime.

A graph whose weights live inside its ``.onnx`` file is parsed into memory, copied into tensors, and
(for MatMul-like kernels) prepacked: up to three copies at load and two at rest for a weight that a
non-packing node (``Gather``) also reads. A replica's resident memory decides how many fit on a machine,
so the export's last pass moves every large initializer into ``<graph>.onnx.data`` instead:

* **Memory-mapped, not copied.** ONNX Runtime maps external data on the CPU. A weight that a kernel
  prepacks is unmapped once packed; one read by a ``Gather`` (a token embedding) keeps only the pages
  of the rows it read resident.
* **One copy across graphs.** A tensor whose bytes another graph (or the screened LM head's
  ``lm_head_rows.npy``) already holds points at those bytes: BART's tied token embedding is stored
  once for the encoder, the decoder step and the screen, not three times.
* **Shared mappings.** A tensor that only ``Gather`` nodes of several graphs read (and the screen's rows)
  is listed in the manifest (``SharedWeight``): the runtime maps it once for all of them. Separate
  mappings of the same bytes would each count in full, since the kernel maps page-cache folios (up to
  megabytes) at a time, so a few hundred gathered rows make a whole embedding resident.
* **Gathers get their own alias.** ONNX Runtime releases an original only when *every* consumer
  prepacked it, and a ``Gather`` never does: the screened head's outlier-row ``Gather`` would keep the
  whole fp32 LM head resident beside its packed copy. A second initializer over the same bytes
  gives the ``Gather`` a mapping of its own, in which only the rows it reads become resident.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from cbart.runtime.manifest import SharedWeight
from onnx import numpy_helper

MIN_EXTERNAL_BYTES = 128 * 1024
"""Smaller initializers stay inside the graph: a mapping costs at least a page."""
ALIGNMENT = 4096
"""Every tensor starts on its own page, so one tensor's reads never make another's pages resident."""
GATHER_ALIAS_SUFFIX = ".gather"


@dataclass(frozen=True)
class Location:
    """Where a tensor's bytes are: a file of the export directory, relative to it."""

    file: str
    offset: int
    length: int


def _key(tensor: onnx.TensorProto, data: bytes) -> tuple[int, tuple[int, ...], str]:
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest()


def _point_at(tensor: onnx.TensorProto, location: Location) -> None:
    """Make ``tensor`` read its data from ``location`` (ONNX's external-data fields)."""
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)  # typed-data fields, whichever the exporter used
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location.file), ("offset", location.offset), ("length", location.length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def _npy_locations(directory: Path, files: tuple[str, ...]) -> dict[tuple[int, tuple[int, ...], str], Location]:
    """The data regions of ``.npy`` files already in the export, by the key a matching initializer would have."""
    known = {}
    for name in files:
        if not (directory / name).is_file():
            continue
        array = np.load(directory / name, mmap_mode="r")
        like = onnx.TensorProto(data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        known[_key(like, array.tobytes())] = Location(name, int(array.offset), int(array.nbytes))
    return known


def nested_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every subgraph in it (``If`` branches, loop bodies), outermost first."""
    found = [graph]
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                found.extend(nested_graphs(subgraph))
    return found


def alias_gathered_weights(model: onnx.ModelProto) -> list[str]:
    """Give the ``Gather`` consumers of a weight that other nodes also read their own initializer.

    Returns the weights aliased. Only main-graph initializers are considered; a subgraph's node reads
    them by name from the outer scope, so the alias lives in the main graph too.
    """
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for graph in nested_graphs(model.graph):
        for node in graph.node:
            for name in set(node.input) & initializers.keys():
                consumers.setdefault(name, []).append(node)
    aliased = []
    for name, nodes in consumers.items():
        gathers = [node for node in nodes if node.op_type == "Gather" and node.input[0] == name]
        if not gathers or len(gathers) == len(nodes):
            continue
        alias = onnx.TensorProto()
        alias.CopyFrom(initializers[name])
        alias.name = name + GATHER_ALIAS_SUFFIX
        model.graph.initializer.append(alias)
        for node in gathers:
            node.input[0] = alias.name
        aliased.append(name)
    return aliased


def _gather_only(model: onnx.ModelProto) -> set[str]:
    """Main-graph initializers that only ``Gather`` nodes read, as their data input."""
    readers: dict[str, set[tuple[str, bool]]] = {}
    for graph in nested_graphs(model.graph):
        for node in graph.node:
            for position, name in enumerate(node.input):
                readers.setdefault(name, set()).add((node.op_type, position == 0))
    return {
        tensor.name
        for tensor in model.graph.initializer
        if readers.get(tensor.name) and readers[tensor.name] <= {("Gather", True)}
    }


def externalize_weights(
    directory: Path, graph_files: dict[str, str], reusable: tuple[str, ...] = (), min_bytes: int | None = None
) -> list[SharedWeight]:
    """Rewrite each graph (name -> file in ``directory``) with its initializers of ``min_bytes`` or more external.

    Graphs are processed in order, so a later graph points at an earlier one's copy; ``reusable`` names
    ``.npy`` files whose data a matching initializer points at instead of copying; ``min_bytes`` defaults to
    ``MIN_EXTERNAL_BYTES``, read when called (tests lower it to move a tiny model's weights out). Returns the
    tensors that ``Gather``-only initializers of more than one graph, or of a graph and a ``reusable`` file,
    share.
    """
    min_bytes = MIN_EXTERNAL_BYTES if min_bytes is None else min_bytes
    known = _npy_locations(directory, reusable)
    readers: dict[Location, dict[str, list[str]]] = {}
    kinds: dict[Location, onnx.TensorProto] = {}
    for graph_name, file in graph_files.items():
        path = directory / file
        model = onnx.load(str(path))  # with its external data, if the exporter already wrote some
        data_file = f"{file}.data"
        staged = directory / f"{data_file}.tmp"
        placed: dict[str, Location] = {}
        with staged.open("wb") as sink:
            for graph in nested_graphs(model.graph):
                for tensor in graph.initializer:
                    data = numpy_helper.to_array(tensor).tobytes()
                    if len(data) < min_bytes:
                        continue
                    key = _key(tensor, data)
                    if key not in known:
                        sink.write(b"\0" * (-sink.tell() % ALIGNMENT))
                        known[key] = Location(data_file, sink.tell(), len(data))
                        sink.write(data)
                    _point_at(tensor, known[key])
                    placed[tensor.name] = known[key]
        alias_gathered_weights(model)
        for name in _gather_only(model):
            location = placed.get(name.removesuffix(GATHER_ALIAS_SUFFIX))
            if location is not None:
                readers.setdefault(location, {}).setdefault(graph_name, []).append(name)
                kinds[location] = next(t for t in model.graph.initializer if t.name == name)
        if staged.stat().st_size:
            os.replace(staged, directory / data_file)
        else:
            staged.unlink()
            (directory / data_file).unlink(missing_ok=True)
        onnx.save(model, str(path))
    return [
        SharedWeight(
            location.file,
            location.offset,
            onnx.helper.tensor_dtype_to_np_dtype(kinds[location].data_type).name,
            list(kinds[location].dims),
            initializers,
        )
        for location, initializers in readers.items()
        if sum(map(len, initializers.values())) > 1 or location.file in reusable
    ]
