"""``manifest.json``: the contract between the exporter and every runtime (Python and C++).

An export directory is self-describing: graphs (or engines), tokenizer files and this manifest,
which lists every file with its sha256, each graph's inputs/outputs with dtypes and symbolic
shapes, the model's dimensions, special token ids and generation defaults. A runtime needs
nothing but the directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
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
# Exports made with ``--inflight`` also take each row's positions and which cache entries it may attend to, so
# rows of different requests (different lengths) can share one step: in-flight batching (runtime/inflight.py).
STEP_POSITIONS, STEP_SELF_MASK = "positions", "self_attention_mask"


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
class GenerationDefaults:
    """The checkpoint's generation settings the runtimes honour, resolved as ``generate()`` resolves them
    (``exporter.export.generation_defaults``). Unset (None) fields are not written."""

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    num_beams: int | None = None
    num_return_sequences: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None
    no_repeat_ngram_size: int | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if value is not None}


GENERATION_FIELDS = tuple(spec.name for spec in fields(GenerationDefaults))


@dataclass
class LmHeadScreenSpec:
    """The screened LM head's files (``runtime/lm_head_screen.py``) and how its 8-bit copy was made."""

    rows: str
    bounds: str
    bits: int
    block_size: int


@dataclass
class EngineSpec:
    """TensorRT engines: what the runtime checks before loading them, and the limits of their profiles."""

    tensorrt_version: str
    compute_capability: str
    limits: dict[str, Any]
    profiles: dict[str, list[Any]]


@dataclass
class SharedWeight:
    """A tensor that several readers map once (``exporter.external_weights``): initializers of different
    graphs, read only by ``Gather`` nodes, that hold the same bytes -- BART's tied token embedding in the
    encoder and the decoder step, and the screened LM head's rows. The ONNX Runtime backend maps it once and
    hands the one mapping to every session (``SessionOptions.add_initializer``)."""

    file: str
    offset: int
    dtype: str
    shape: list[int]
    initializers: dict[str, list[str]]  # graph name -> its initializers over these bytes


@dataclass
class VerificationSummary:
    """What the export's own verification measured (``exporter.verify``)."""

    passed: bool
    outputs: dict[str, dict[str, float]]
    greedy_identical: str
    token_agreement: float
    onnx_checker: str = "not run"  # exports written before the checker joined the verification lack it
    speculative_identical: str | None = None
    draft_acceptance: float | None = None


@dataclass
class Manifest:
    model: ModelDims
    tokens: SpecialTokens
    graphs: dict[str, GraphSpec]
    files: dict[str, dict[str, Any]]
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    precision: str = "fp32"
    backend: str = "onnx"
    tokenizer_dir: str | None = "tokenizer"
    torch_graphs: dict[str, str] = field(default_factory=dict)
    torch_device: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    engine: EngineSpec | None = None
    verification: VerificationSummary | None = None
    lm_head_screen: LmHeadScreenSpec | None = None
    draft: DraftSpec | None = None
    shared_weights: list[SharedWeight] = field(default_factory=list)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["generation"] = self.generation.to_dict()
        return json.dumps(data, indent=2, sort_keys=False)

    def cache_names(self, prefix: str) -> list[str]:
        """This export's ``PAST``, ``PRESENT`` or ``CROSS`` tensor names."""
        return cache_names(prefix, self.model.decoder_layers)

    @property
    def last_position_logits(self) -> bool:
        """Whether the decoder step returns logits at the last new position only ([rows, 1, vocab]): a
        speculative pair's draft, which only proposes from the last position it was fed."""
        return self.graphs[DECODER_STEP].outputs[0].shape[1] == 1

    @property
    def per_row_positions(self) -> bool:
        """Whether the decoder step takes ``STEP_POSITIONS`` and ``STEP_SELF_MASK`` (an ``--inflight`` export)."""
        return any(tensor.name == STEP_POSITIONS for tensor in self.graphs[DECODER_STEP].inputs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            model=ModelDims(**data["model"]),
            tokens=SpecialTokens(**data["tokens"]),
            graphs={name: GraphSpec.from_dict(spec) for name, spec in data["graphs"].items()},
            files=data["files"],
            generation=GenerationDefaults(**data.get("generation", {})),
            precision=data.get("precision", "fp32"),
            backend=data.get("backend", "onnx"),
            tokenizer_dir=data.get("tokenizer_dir"),
            torch_graphs=data.get("torch_graphs", {}),
            torch_device=data.get("torch_device", "cpu" if data.get("torch_graphs") else None),
            versions=data.get("versions", {}),
            engine=EngineSpec(**data["engine"]) if data.get("engine") else None,
            verification=VerificationSummary(**data["verification"]) if data.get("verification") else None,
            lm_head_screen=LmHeadScreenSpec(**data["lm_head_screen"]) if data.get("lm_head_screen") else None,
            draft=DraftSpec(**data["draft"]) if data.get("draft") else None,
            shared_weights=[SharedWeight(**weight) for weight in data.get("shared_weights", [])],
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
