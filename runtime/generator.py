"""``Seq2SeqRuntime``: generation through an export directory, with transformers' semantics."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import Backend, EncodedBatch
from runtime.manifest import Manifest, read_manifest
from runtime.search import GenerationSettings, beam_search, greedy_or_sample
from runtime.tokenizer import TextTokenizer

BACKENDS = ("onnxruntime", "tensorrt", "torch")
Inputs = str | Sequence[str] | Sequence[Sequence[int]] | np.ndarray


@dataclass
class GenerationOutput:
    """Token ids per returned sequence (``num_return_sequences`` consecutive rows per input) and texts."""

    sequences: list[list[int]]
    texts: list[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def load_backend(
    directory: Path, manifest: Manifest, backend: str, device: str, threads: int | None, cuda_graphs: bool = False
) -> Backend:
    if cuda_graphs and backend != "tensorrt":
        raise ValueError(f"cuda_graphs applies to the tensorrt backend only, not {backend!r}; drop cuda_graphs=True")
    if backend == "onnxruntime":
        if manifest.backend != "onnx":
            raise ValueError(f"{directory} holds {manifest.backend} engines; load it with backend='tensorrt'")
        from runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(directory, manifest, device, threads)
    if backend == "tensorrt":
        from runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(directory, manifest, device, cuda_graphs)
    if backend == "torch":
        from runtime.backends.torch_backend import TorchBackend

        return TorchBackend(directory, manifest, device, threads)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


class Seq2SeqRuntime:
    """Generate with an exported compressed (or plain) BART.

    >>> runtime = Seq2SeqRuntime.from_dir("bart-384-onnx")               # doctest: +SKIP
    >>> runtime.generate("A long article ...", num_beams=4).texts        # doctest: +SKIP
    """

    def __init__(self, directory: Path, manifest: Manifest, backend: Backend, tokenizer: TextTokenizer | None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(
        cls,
        directory: str | Path,
        backend: str = "onnxruntime",
        device: str = "cpu",
        threads: int | None = None,
        check_files: bool = True,
        cuda_graphs: bool = False,
    ) -> Seq2SeqRuntime:
        """Load an export directory; ``check_files`` verifies every file's sha256 first.

        ``cuda_graphs`` (TensorRT only) captures each decoder step position once per request shape
        and replays it for later requests of that shape, removing per-kernel launch overhead; its
        buffers are per shape, so such a runtime serves one request at a time.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        directory = Path(directory)
        manifest = read_manifest(directory, check_files=check_files)
        tokenizer_dir = directory / manifest.tokenizer_dir if manifest.tokenizer_dir else None
        tokenizer = TextTokenizer(tokenizer_dir) if tokenizer_dir and tokenizer_dir.is_dir() else None
        loaded = load_backend(directory, manifest, backend, device, threads, cuda_graphs)
        return cls(directory, manifest, loaded, tokenizer)

    # ----------------------------------------------------------------------------------- inputs
    def _to_ids(self, inputs: Inputs) -> tuple[list[list[int]], bool]:
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, np.ndarray):
            inputs = inputs.tolist()
        if len(inputs) == 0:
            raise ValueError("empty input: pass at least one text or one sequence of token ids")
        if all(isinstance(item, str) for item in inputs):
            if self.tokenizer is None:
                raise ValueError(f"{self.directory} has no tokenizer; pass token ids instead of text")
            return self.tokenizer.encode(list(inputs)), True  # type: ignore[arg-type]
        sequences = [[int(token) for token in item] for item in inputs]  # type: ignore[union-attr]
        return sequences, False

    def _pad(self, sequences: list[list[int]], truncation: bool) -> tuple[np.ndarray, np.ndarray]:
        limit = self.max_source_length
        if any(len(ids) == 0 for ids in sequences):
            raise ValueError("empty input: one of the inputs has no tokens")
        vocab = self.manifest.model.vocab_size
        bad = next((token for ids in sequences for token in ids if not 0 <= token < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        too_long = [len(ids) for ids in sequences if len(ids) > limit]
        if too_long:
            if not truncation:
                raise ValueError(
                    f"input of {max(too_long)} tokens exceeds the model's maximum of {limit}; "
                    "shorten it or call with truncation=True"
                )
            warnings.warn(f"truncating {len(too_long)} input(s) to the model's maximum of {limit} tokens", stacklevel=3)
            eos = self.manifest.tokens.eos
            sequences = [ids if len(ids) <= limit else [*ids[: limit - 1], eos] for ids in sequences]
        width = max(len(ids) for ids in sequences)
        input_ids = np.full((len(sequences), width), self.manifest.tokens.pad, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        return input_ids, mask

    @property
    def max_source_length(self) -> int:
        return self.manifest.model.max_source_positions

    # ------------------------------------------------------------------------------ generation
    def encode(self, inputs: Inputs, truncation: bool = True) -> EncodedBatch:
        """Run the encoder side once; pass the result to ``generate(encoded=...)`` as often as needed."""
        sequences, _ = self._to_ids(inputs)
        input_ids, mask = self._pad(sequences, truncation)
        return self.backend.encode(input_ids, mask)

    def settings(self, **overrides: Any) -> GenerationSettings:
        """transformers' resolution: explicit arguments, then the export's generation defaults."""
        defaults = dict(self.manifest.generation)
        tokens = self.manifest.tokens
        chosen = {key: value for key, value in overrides.items() if value is not None}
        max_new_tokens = chosen.pop("max_new_tokens", None)
        if max_new_tokens is not None:
            chosen["max_length"] = max_new_tokens + 1
        min_new_tokens = chosen.get("min_new_tokens")
        if min_new_tokens is not None and "min_length" not in chosen:
            chosen["min_length"] = 0
        known = {f.name for f in fields(GenerationSettings)}
        unknown = sorted(set(chosen) - known)
        if unknown:
            raise TypeError(f"unknown generation argument(s): {', '.join(unknown)}")
        merged: dict[str, Any] = {
            "max_length": 20,
            "eos_token_id": tokens.eos,
            "pad_token_id": tokens.pad,
            "decoder_start_token_id": tokens.decoder_start,
            "forced_bos_token_id": tokens.forced_bos,
            "forced_eos_token_id": tokens.forced_eos,
        }
        merged.update({key: value for key, value in defaults.items() if key in known and value is not None})
        merged.update(chosen)
        settings = GenerationSettings(**merged)
        settings.validate()
        return settings

    def generate(
        self,
        inputs: Inputs | None = None,
        *,
        encoded: EncodedBatch | None = None,
        truncation: bool = True,
        on_token: Callable[[np.ndarray], None] | None = None,
        **generation: Any,
    ) -> GenerationOutput:
        """Generate for a batch of texts or token-id sequences (mixed lengths are padded inside).

        Generation arguments follow transformers: ``max_new_tokens``/``max_length``,
        ``min_new_tokens``/``min_length``, ``num_beams``, ``length_penalty``, ``early_stopping``,
        ``no_repeat_ngram_size``, ``repetition_penalty``, ``do_sample``, ``top_k``, ``top_p``,
        ``temperature``, ``seed``, ``num_return_sequences``. ``on_token`` (greedy and sampling)
        receives each step's new tokens, one per row.
        """
        settings = self.settings(**generation)
        texts_in = False
        started = time.perf_counter()
        if encoded is None:
            if inputs is None:
                raise ValueError("pass inputs (texts or token ids) or encoded=runtime.encode(...)")
            sequences, texts_in = self._to_ids(inputs)
            input_ids, mask = self._pad(sequences, truncation)
            encoded = self.backend.encode(input_ids, mask)
        encoded_at = time.perf_counter()
        rows = settings.num_beams if settings.num_beams > 1 else settings.num_return_sequences
        session = self.backend.start(encoded, rows, settings.max_length)
        if settings.num_beams > 1:
            output = beam_search(session, encoded.sources, settings)
        else:
            output = greedy_or_sample(session, encoded.sources * rows, settings, on_token)
        finished = time.perf_counter()
        ids = output.tolist()
        texts = self.tokenizer.decode(ids) if texts_in and self.tokenizer is not None else None
        timings = {"encode_s": encoded_at - started, "decode_s": finished - encoded_at, "total_s": finished - started}
        return GenerationOutput(sequences=ids, texts=texts, timings=timings)

    def stream(self, inputs: Inputs, **generation: Any) -> Iterator[int]:
        """Yield the tokens of one greedy (or sampled) generation as they are produced."""
        if generation.get("num_beams", 1) not in (None, 1):
            raise ValueError("streaming works with greedy search or sampling (num_beams=1)")
        produced: list[int] = []
        done = threading.Event()
        error: list[BaseException] = []
        condition = threading.Condition()

        def on_token(tokens: np.ndarray) -> None:
            with condition:
                produced.append(int(tokens[0]))
                condition.notify()

        def worker() -> None:
            try:
                self.generate(inputs, on_token=on_token, **generation)
            except BaseException as exc:  # re-raised in the consumer
                error.append(exc)
            finally:
                with condition:
                    done.set()
                    condition.notify()

        sequences, _ = self._to_ids(inputs)
        if len(sequences) != 1:
            raise ValueError("stream() takes a single input")
        threading.Thread(target=worker, daemon=True).start()
        position = 0
        while True:
            with condition:
                while position >= len(produced) and not done.is_set():
                    condition.wait()
                pending = produced[position:]
                position = len(produced)
                finished = done.is_set() and position >= len(produced)
            for token in pending:
                if token == self.manifest.tokens.eos:
                    return
                yield token
            if finished:
                if error:
                    raise error[0]
                return
