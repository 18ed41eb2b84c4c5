"""``cbart export``: checkpoint -> verified export directory (ONNX graphs or TensorRT engines).

Everything is written into a temporary directory next to the destination and renamed into place
only after the graphs were verified, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from cbart.compression.checkpoint import atomic_directory, is_compressed_checkpoint, load_compressed_model
from cbart.exporter.disk_space import export_need, space_problems
from cbart.exporter.external_weights import externalize_weights
from cbart.exporter.lm_head_screen import BITS, BLOCK_SIZE, add_screened_lm_head
from cbart.exporter.onnx_export import export_graph, export_torchscript, graph_definitions
from cbart.exporter.options import ExportError, ExportOptions, check_combination
from cbart.exporter.variants import convert_to_fp16, optimize_graph, quantize_int8
from cbart.exporter.verify import VerificationReport, verify_directory, verify_engines
from cbart.runtime.lm_head_screen import BOUNDS_FILE, HIDDEN, RESIDUAL, ROWS_FILE, SWITCH
from cbart.runtime.manifest import (
    DECODER_STEP,
    ENCODER,
    GENERATION_FIELDS,
    MANIFEST,
    GenerationDefaults,
    GraphSpec,
    LmHeadScreenSpec,
    Manifest,
    ModelDims,
    SpecialTokens,
    TensorSpec,
    file_entries,
)
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BartForConditionalGeneration, GenerationConfig

if TYPE_CHECKING:
    from cbart.exporter.engine_profiles import EngineLimits as EngineLimitsLike
else:
    EngineLimitsLike = Any

TOKEN_FIELDS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
)
"""Carried in the manifest's ``tokens`` section (see ``special_tokens``)."""
NO_OUTPUT_EFFECT = (
    "transformers_version",
    "_from_model_config",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "use_cache",
    "cache_implementation",
    "cache_config",
    "compile_config",
    "disable_compile",
    "low_memory",
)
"""Fields that change what ``generate()`` returns besides the ids, or how fast, but never the ids."""


@dataclass
class ExportResult:
    directory: Path
    manifest: Manifest
    report: VerificationReport | None
    fused: dict[str, dict[str, int]] = field(default_factory=dict)


def load_model(checkpoint: str | Path) -> BartForConditionalGeneration:
    """A compressed checkpoint, or a plain BART directory (exported the same way, without autoencoder).

    Generation settings the runtimes would not honour are refused here, before any export work.
    """
    model = _load_model(checkpoint)
    special_tokens(model)
    generation_defaults(model)
    return model


def _load_model(checkpoint: str | Path) -> BartForConditionalGeneration:
    path = Path(checkpoint)
    if is_compressed_checkpoint(path):
        return load_compressed_model(path)  # type: ignore[return-value]
    config_file = path / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "bart":
        return BartForConditionalGeneration.from_pretrained(path).eval()
    raise ExportError(
        f"{checkpoint} is neither a compressed BART checkpoint nor a BART directory (config.json with "
        "model_type 'compressed_bart' or 'bart'); train one with `cbart train` or pass a save_pretrained() directory"
    )


def model_dims(model: BartForConditionalGeneration) -> ModelDims:
    config = model.config
    compressed = config.model_type == "compressed_bart"
    max_source = config.max_position_embeddings
    if compressed and config.autoencoder_variant == "paper":
        max_source = min(max_source, config.autoencoder_max_positions)
    return ModelDims(
        architecture=config.model_type,
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        decoder_attention_heads=config.decoder_attention_heads,
        head_dim=config.d_model // config.decoder_attention_heads,
        base_width=config.encoder_d_model if compressed else config.d_model,
        latent_width=config.d_model,
        latent_sizes=list(config.latent_sizes) if compressed else [],
        autoencoder_variant=config.autoencoder_variant if compressed else None,
        vocab_size=config.vocab_size,
        max_source_positions=max_source,
        max_target_positions=config.max_position_embeddings,
    )


def special_tokens(model: BartForConditionalGeneration) -> SpecialTokens:
    generation = model.generation_config
    config = model.config

    def pick(name: str) -> int | None:
        """``generate()`` reads the generation config first, the model config second."""
        value = getattr(generation, name, None)
        value = getattr(config, name, None) if value is None else value
        if isinstance(value, list):
            if len(value) != 1:
                raise ExportError(
                    f"the checkpoint's generation config sets {name}={value}; cbart's runtimes take one token "
                    f"there: set {name} to a single id in its generation_config.json and re-export"
                )
            value = value[0]
        return value

    return SpecialTokens(
        bos=pick("bos_token_id"),
        pad=pick("pad_token_id"),
        eos=pick("eos_token_id"),
        decoder_start=pick("decoder_start_token_id"),
        forced_bos=pick("forced_bos_token_id"),
        forced_eos=pick("forced_eos_token_id"),
    )


def generation_defaults(model: BartForConditionalGeneration) -> dict[str, Any]:
    """The checkpoint's generation defaults the runtimes honour; refuse, by name, any set field they do not.

    A fine-tuned checkpoint's ``generation_config.json`` may set any of ``generate()``'s fields; an export that
    silently dropped one would generate differently from ``model.generate()``.
    """
    generation = model.generation_config
    effective = GenerationConfig._get_default_generation_params()  # what generate() uses for unset fields
    changed = {
        name: value
        for name, value in generation.to_diff_dict().items()
        if value is not None and value != effective.get(name)
    }
    unsupported = sorted(set(changed) - {*GENERATION_FIELDS, *TOKEN_FIELDS, *NO_OUTPUT_EFFECT})
    if unsupported:
        settings = ", ".join(f"{name}={changed[name]!r}" for name in unsupported)
        raise ExportError(
            f"the checkpoint's generation config sets {settings}, which cbart's runtimes do not implement, so the "
            "export would generate differently from model.generate(). Remove "
            + ("it" if len(unsupported) == 1 else "them")
            + " from the checkpoint's generation_config.json (or set the default) and re-export; the runtimes "
            f"honour {', '.join(GENERATION_FIELDS)}"
        )
    # Resolved as generate() resolves them, so the runtimes hard-code no default of their own.
    resolved = {name: getattr(generation, name, None) for name in GENERATION_FIELDS}
    resolved = {name: effective.get(name) if value is None else value for name, value in resolved.items()}
    return {name: value for name, value in resolved.items() if value is not None}


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    import cbart

    return {
        "cbart": cbart.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _copy_tokenizer(checkpoint: str | Path, tokenizer: str | None, destination: Path) -> bool:
    source = tokenizer or str(checkpoint)
    try:
        loaded = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        if tokenizer is not None:
            raise ExportError(f"could not load the tokenizer from {tokenizer}") from None
        return False
    loaded.save_pretrained(destination)
    return (destination / "tokenizer.json").is_file()


def write_onnx(
    model: BartForConditionalGeneration,
    checkpoint: str | Path,
    tmp: Path,
    options: ExportOptions,
    log: Callable[..., None],
    fused_attention: bool,
    screen_lm_head: bool,
    draft: bool = False,
) -> tuple[Manifest, dict[str, dict[str, int]]]:
    """The ONNX pipeline into ``tmp``: export each graph, run its variant passes, move the weights out of the
    graphs (``exporter.external_weights``), then write the manifest.

    ``draft``: a speculative pair's draft -- no encoder graph and no tokenizer (the pair shares the full model's).
    """
    graphs: dict[str, GraphSpec] = {}
    torch_graphs: dict[str, str] = {}
    fused: dict[str, dict[str, int]] = {}
    dims = model_dims(model)
    definitions = graph_definitions(
        model, options.fuse_encoder, fused_attention, last_logits_only=draft, per_row_positions=options.inflight
    )
    if draft:
        definitions = [definition for definition in definitions if definition.name != ENCODER]
    for definition in tqdm(
        definitions, desc="exporting draft graphs" if draft else "exporting graphs", disable=not options.progress
    ):
        graphs[definition.name] = export_graph(definition, tmp, options.opset)
        if options.with_torch:
            torch_graphs[definition.name] = export_torchscript(definition, tmp, options.torch_device)
        fusions = apply_variant_passes(
            model, dims, definition.name, graphs[definition.name], tmp, options, screen_lm_head
        )
        if fusions is not None:
            fused[definition.name] = fusions
    shared = externalize_weights(tmp, {name: spec.file for name, spec in graphs.items()}, reusable=(ROWS_FILE,))
    has_tokenizer = not draft and _copy_tokenizer(checkpoint, options.tokenizer, tmp / "tokenizer")
    if not has_tokenizer:
        shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
    manifest = onnx_manifest(model, graphs, options, has_tokenizer, torch_graphs, screen_lm_head)
    manifest.shared_weights = shared
    write_manifest(tmp, manifest)
    return manifest, fused


def apply_variant_passes(
    model: BartForConditionalGeneration,
    dims: ModelDims,
    name: str,
    spec: GraphSpec,
    directory: Path,
    options: ExportOptions,
    screen_lm_head: bool,
) -> dict[str, int] | None:
    """The variant passes on one exported graph, in this order, each its own function: ONNX Runtime's fusions
    (``--optimize``), fp16, int8, the screened LM head (decoder step). Returns what the fusions fused."""
    path = directory / spec.file
    fused = None
    if options.optimize:
        is_encoder = name == ENCODER
        heads = model.config.encoder_attention_heads if is_encoder else model.config.decoder_attention_heads
        width = dims.base_width if is_encoder else dims.latent_width
        fused = optimize_graph(path, heads, width, fuse_attention=is_encoder)
    if options.dtype == "fp16":
        convert_to_fp16(path)
    if options.quantize == "int8":
        quantize_int8(path)
    if screen_lm_head and name == DECODER_STEP:
        add_screened_lm_head(path)
        spec.inputs.append(TensorSpec(SWITCH, "bool", []))
        positions = spec.outputs[0].shape[1]  # the logits' ("target_length", or 1 for a draft)
        for output in (HIDDEN, RESIDUAL):
            spec.outputs.append(TensorSpec(output, "float32", ["decoder_batch", positions, dims.latent_width]))
    return fused


def onnx_manifest(
    model: BartForConditionalGeneration,
    graphs: dict[str, GraphSpec],
    options: ExportOptions,
    has_tokenizer: bool,
    torch_graphs: dict[str, str],
    screen_lm_head: bool,
) -> Manifest:
    """What the runtimes read about an ONNX export (file hashes are added by ``write_manifest``)."""
    return Manifest(
        model=model_dims(model),
        tokens=special_tokens(model),
        graphs=graphs,
        files={},
        generation=GenerationDefaults(**generation_defaults(model)),
        precision=options.precision,
        backend="onnx",
        tokenizer_dir="tokenizer" if has_tokenizer else None,
        torch_graphs=torch_graphs,
        torch_device=options.torch_device if torch_graphs else None,
        versions=versions(),
        lm_head_screen=LmHeadScreenSpec(ROWS_FILE, BOUNDS_FILE, BITS, BLOCK_SIZE) if screen_lm_head else None,
    )


def write_manifest(directory: Path, manifest: Manifest) -> None:
    manifest.files = file_entries(directory)
    (directory / MANIFEST).write_text(manifest.to_json())


def listed(failures: list[str], shown: int = 12) -> str:
    """The first ``shown`` failures, one per line, and how many more there are."""
    more = f"\n  ... and {len(failures) - shown} more" if len(failures) > shown else ""
    return "\n  ".join(failures[:shown]) + more


def verify_export(
    model: BartForConditionalGeneration,
    directory: Path,
    manifest: Manifest,
    options: ExportOptions,
    log: Callable[..., None],
) -> VerificationReport:
    log("verifying against PyTorch ...")
    report = verify_directory(model, directory, options.threads)
    if not report.passed:
        raise ExportError("export verification failed, nothing was written:\n  " + listed(report.failures()))
    manifest.verification = report.summary()
    write_manifest(directory, manifest)
    return report


def verify_engine_export(
    model: BartForConditionalGeneration, directory: Path, manifest: Manifest, log: Callable[..., None]
) -> VerificationReport:
    """The engines against PyTorch, as the ONNX graphs were; the manifest then records the engines' numbers."""
    log("verifying the TensorRT engines against PyTorch ...")
    report = verify_engines(model, directory)
    if not report.passed:
        raise ExportError("TensorRT engine verification failed, nothing was written:\n  " + listed(report.failures()))
    manifest.verification = report.summary()
    write_manifest(directory, manifest)
    return report


def check_destination(out: Path, options: ExportOptions) -> None:
    if out.exists() and not options.overwrite:
        raise ExportError(f"{out} already exists; choose another --out or pass --overwrite")


def check_free_space(out: Path, model: torch.nn.Module, options: ExportOptions, engines: bool) -> None:
    """Fail before writing when the disk cannot hold the export (see ``exporter.disk_space``)."""
    parameter_bytes = sum(p.numel() * 4 for p in model.parameters())
    need = export_need(parameter_bytes, options.quantize == "int8", options.with_torch, engines)
    problems = space_problems(out, need)
    if problems:
        raise ExportError("; ".join(problems) + ". Nothing was written.")


def export_onnx(
    checkpoint: str | Path, out: str | Path, options: ExportOptions | None = None, log: Callable[..., None] = print
) -> ExportResult:
    """Export, optimise/convert/quantise, verify and write ``out`` atomically."""
    options = options or ExportOptions()
    out = Path(out)
    check_destination(out, options)
    model = load_model(checkpoint)
    check_free_space(out, model, options, engines=False)
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        manifest, fused = write_onnx(
            model, checkpoint, tmp, options, log, options.attention != "plain", options.screens_lm_head
        )
        report = verify_export(model, tmp, manifest, options, log) if options.verify else None
        result.update(manifest=manifest, report=report, fused=fused)

    atomic_directory(out, write)
    return ExportResult(out, result["manifest"], result["report"], result["fused"])


def source_positions(config: Any) -> int:
    """The longest source the model reads: its position table, or the ``paper`` autoencoder's BatchNorm size."""
    positions = int(config.max_position_embeddings)
    if getattr(config, "autoencoder_variant", None) == "paper":
        positions = min(positions, int(config.autoencoder_max_positions))
    return positions


def export_tensorrt(
    checkpoint: str | Path,
    out: str | Path,
    limits: EngineLimitsLike,
    options: ExportOptions | None = None,
    log: Callable[..., None] = print,
) -> ExportResult:
    """fp32 ONNX graphs (verified on ONNX Runtime), then one TensorRT engine per graph.

    Fails before touching the disk on options TensorRT cannot use or when TensorRT or a GPU is missing.
    """
    from cbart.runtime.trt_support import TensorRTUnavailable, require_tensorrt

    options = options or ExportOptions()
    out = Path(out)
    check_combination(options, "trt")
    try:
        require_tensorrt()
    except TensorRTUnavailable as error:
        raise ExportError(f"cannot build TensorRT engines: {error}. Nothing was written.") from error
    check_destination(out, options)
    from cbart.exporter.tensorrt_build import build_engine, engine_metadata

    model = load_model(checkpoint)
    positions = source_positions(model.config)
    clamped = limits.within_model(positions)
    if clamped is not limits:
        log(
            f"--max-source-length {limits.max_source_length} exceeds the model's {positions} source positions: "
            f"the engines' profiles stop at {positions}"
        )
        limits = clamped
    check_free_space(out, model, options, engines=True)
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        staging = tmp / "onnx"
        staging.mkdir()
        manifest, _ = write_onnx(model, checkpoint, staging, options, log, fused_attention=False, screen_lm_head=False)
        report = verify_export(model, staging, manifest, options, log) if options.verify else None
        timing_cache = Path(options.timing_cache) if options.timing_cache else tmp / "timing.cache"
        for name, spec in tqdm(manifest.graphs.items(), desc="building TensorRT engines", disable=not options.progress):
            engine = tmp / f"{name}.plan"
            build_engine(staging / spec.file, engine, spec, limits, timing_cache)
            spec.file = engine.name
        for kept in ("tokenizer", "torch"):  # the TorchScript graphs (--with-torch) are the runtime's reference
            if (staging / kept).is_dir():
                shutil.move(staging / kept, tmp / kept)
        shutil.rmtree(staging)
        manifest.backend = "tensorrt"
        manifest.precision = "fp16" if limits.fp16 else "bf16" if limits.bf16 else "fp32"
        manifest.engine = engine_metadata(limits)
        write_manifest(tmp, manifest)
        if options.verify:
            report = verify_engine_export(model, tmp, manifest, log)
        result.update(manifest=manifest, report=report)

    atomic_directory(out, write)
    return ExportResult(out, result["manifest"], result["report"])
