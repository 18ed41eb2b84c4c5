"""``manifest.json``: the contract between the exporter and every runtime (Python and C++).

An export directory is self-describing: graphs (or engines), tokenizer files and this manifest,
which lists every file with its sha256, each graph's inputs/outputs with dtypes and symbolic
shapes, the model's dimensions, special token ids and generation defaults. A runtime needs
nothing but the directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_NAME = "cbart-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ExportDirectoryError(RuntimeError):
    """An export directory is missing, tampered with, or from an unknown format version."""


# The named contract: the graphs of an export directory and the tensors the runtimes bind, by name. The exporter
# writes these names, every backend binds by them, and the C++ runtime mirrors them (runtime/cpp/src/contract.*).
ENCODER, AUTOENCODER, CROSS_KV, DECODER_STEP = "encoder", "autoencoder", "cross_kv", "decoder_step"
STEP_INPUT_IDS, STEP_ENCODER_MASK, STEP_LOGITS = "input_ids", "encoder_attention_mask", "logits"
PAST, PRESENT, CROSS = "past", "present", "cross"


def cache_names(prefix: str, layers: int) -> list[str]:
    """``prefix_key_0, prefix_value_0, prefix_key_1, ...``: the per-layer cache tensors (``PAST``, ``PRESENT``
    or ``CROSS``) of a decoder step, in the order the step takes or returns them."""
    return [f"{prefix}_{kind}_{layer}" for layer in range(layers) for kind in ("key", "value")]


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[str | int]


@dataclass
class GraphSpec:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        return cls(
            file=data["file"],
            inputs=[TensorSpec(**spec) for spec in data["inputs"]],
            outputs=[TensorSpec(**spec) for spec in data["outputs"]],
        )


@dataclass
class ModelDims:
    architecture: str
    encoder_layers: int
    decoder_layers: int
    decoder_attention_heads: int
    head_dim: int
    base_width: int
    latent_width: int
    latent_sizes: list[int]
    autoencoder_variant: str | None
    vocab_size: int
    max_source_positions: int
    max_target_positions: int


@dataclass
class SpecialTokens:
    bos: int
    pad: int
    eos: int
    decoder_start: int
    forced_bos: int | None = None
    forced_eos: int | None = None


@dataclass
class DraftSpec:
    """A speculative pair's draft decoder (``cbart export FULL --draft DRAFT``).

    ``directory`` (relative to the full model's export) holds the draft's own graphs and manifest,
    without an encoder graph: the draft reads the full model's encoder output, which the pair shares.
    """

    directory: str
    precision: str
    architecture: str


@dataclass
class Manifest:
    model: ModelDims
    tokens: SpecialTokens
    graphs: dict[str, GraphSpec]
    files: dict[str, dict[str, Any]]
    generation: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    backend: str = "onnx"
    tokenizer_dir: str | None = "tokenizer"
    torch_graphs: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    lm_head_screen: dict[str, Any] = field(default_factory=dict)
    draft: DraftSpec | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def cache_names(self, prefix: str) -> list[str]:
        """This export's ``PAST``, ``PRESENT`` or ``CROSS`` tensor names."""
        return cache_names(prefix, self.model.decoder_layers)

    @property
    def last_position_logits(self) -> bool:
        """Whether the decoder step returns logits at the last new position only ([rows, 1, vocab]): a
        speculative pair's draft, which only proposes from the last position it was fed."""
        return self.graphs[DECODER_STEP].outputs[0].shape[1] == 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            model=ModelDims(**data["model"]),
            tokens=SpecialTokens(**data["tokens"]),
            graphs={name: GraphSpec.from_dict(spec) for name, spec in data["graphs"].items()},
            files=data["files"],
            generation=data.get("generation", {}),
            precision=data.get("precision", "fp32"),
            backend=data.get("backend", "onnx"),
            tokenizer_dir=data.get("tokenizer_dir"),
            torch_graphs=data.get("torch_graphs", {}),
            versions=data.get("versions", {}),
            engine=data.get("engine", {}),
            verification=data.get("verification", {}),
            lm_head_screen=data.get("lm_head_screen", {}),
            draft=DraftSpec(**data["draft"]) if data.get("draft") else None,
            format=data["format"],
            format_version=data["format_version"],
        )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``directory`` except the manifest itself."""
    return {
        path.relative_to(directory).as_posix(): {"sha256": sha256_of(path), "bytes": path.stat().st_size}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def read_manifest(directory: str | Path, check_files: bool = True) -> Manifest:
    """Read and validate ``DIR/manifest.json``; with ``check_files`` every file's sha256 is checked."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportDirectoryError(
            f"{directory} has no {MANIFEST}; is it a directory written by `cbart export`? "
            "(exports are written to a temporary directory and only renamed into place when complete)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ExportDirectoryError(f"{path} is not valid JSON ({error}); re-run `cbart export`") from error
    if data.get("format") != FORMAT_NAME:
        raise ExportDirectoryError(f"{path} is not a cbart export manifest (format {data.get('format')!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportDirectoryError(
            f"{directory} uses export format version {version}, but this runtime reads version {FORMAT_VERSION}; "
            "re-export the model with this cbart version or install the cbart version that wrote it"
        )
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError) as error:
        raise ExportDirectoryError(f"{path} is incomplete or malformed: {error!r}") from error
    check_contract(directory, manifest)
    if check_files:
        verify_files(directory, manifest)
    return manifest


def contract_names(manifest: Manifest) -> dict[str, tuple[list[str], list[str]]]:
    """The tensors the runtimes bind by name: graph -> (inputs, outputs) that graph must have."""
    return {
        CROSS_KV: ([], manifest.cache_names(CROSS)),
        DECODER_STEP: (
            [STEP_INPUT_IDS, STEP_ENCODER_MASK, *manifest.cache_names(PAST), *manifest.cache_names(CROSS)],
            [STEP_LOGITS, *manifest.cache_names(PRESENT)],
        ),
    }


def check_contract(directory: Path, manifest: Manifest) -> None:
    """Refuse, naming the tensor, a graph that lacks a name the runtimes bind (e.g. written by another exporter)."""
    for graph, (inputs, outputs) in contract_names(manifest).items():
        if graph not in manifest.graphs:
            raise ExportDirectoryError(f"{directory} has no {graph} graph in its manifest; re-run `cbart export`")
        spec = manifest.graphs[graph]
        for kind, wanted, present in (("input", inputs, spec.inputs), ("output", outputs, spec.outputs)):
            missing = [name for name in wanted if name not in {tensor.name for tensor in present}]
            if missing:
                raise ExportDirectoryError(
                    f"{graph} in {directory} has no {kind} {missing[0]!r}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + f"; the runtimes bind {kind}s by name ({', '.join(wanted[:3])}, ...). Re-export with "
                    "`cbart export`"
                )


def verify_files(directory: Path, manifest: Manifest) -> None:
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ExportDirectoryError(f"{directory} is missing {name}, listed in its manifest; re-run `cbart export`")
        actual = sha256_of(path)
        if actual != entry["sha256"]:
            raise ExportDirectoryError(
                f"{name} in {directory} does not match its manifest (sha256 {actual[:12]}… != "
                f"{entry['sha256'][:12]}…): the file was modified or corrupted; re-run `cbart export`"
            )
