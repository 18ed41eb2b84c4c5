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
from cbart.runtime.backends.base import Backend, EncodedBatch, SharedEncoderBackend
from cbart.runtime.manifest import Manifest, read_manifest
from cbart.runtime.search import GenerationSettings, beam_search, greedy_or_sample
from cbart.runtime.speculative import (
    DraftLength,
    SpeculationStats,
    VerifyingSession,
    speculative_greedy,
    speculative_sample,
)
from cbart.runtime.tokenizer import TextTokenizer

BACKENDS = ("onnxruntime", "tensorrt", "torch")
Inputs = str | Sequence[str] | Sequence[Sequence[int]] | np.ndarray


@dataclass
class GenerationOutput:
    """Token ids per returned sequence (``num_return_sequences`` consecutive rows per input) and texts."""

    sequences: list[list[int]]
    texts: list[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    speculation: SpeculationStats | None = None
    processors: list[str] = field(default_factory=list)  # the logits processors applied, in order


def load_backend(
    directory: Path, manifest: Manifest, backend: str, device: str, threads: int | None, cuda_graphs: bool = False
) -> Backend:
    if cuda_graphs and backend != "tensorrt":
        raise ValueError(f"cuda_graphs applies to the tensorrt backend only, not {backend!r}; drop cuda_graphs=True")
    if backend == "onnxruntime":
        if manifest.backend != "onnx":
            raise ValueError(f"{directory} holds {manifest.backend} engines; load it with backend='tensorrt'")
        from cbart.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(directory, manifest, device, threads)
    if backend == "tensorrt":
        from cbart.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(directory, manifest, device, cuda_graphs)
    if backend == "torch":
        from cbart.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(directory, manifest, device, threads)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


class Seq2SeqRuntime:
    """Generate with an exported compressed (or plain) BART.

    >>> runtime = Seq2SeqRuntime.from_dir("bart-384-onnx")               # doctest: +SKIP
    >>> runtime.generate("A long article ...", num_beams=4).texts        # doctest: +SKIP
    """

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        backend: Backend,
        tokenizer: TextTokenizer | None,
        draft: Backend | None = None,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.draft = draft

    @classmethod
    def from_dir(
        cls,
        directory: str | Path,
        backend: str = "onnxruntime",
        device: str | None = None,
        threads: int | None = None,
        check_files: bool = True,
        cuda_graphs: bool = False,
    ) -> Seq2SeqRuntime:
        """Load an export directory; ``check_files`` verifies every file's sha256 first.

        ``device`` defaults to ``"cuda"`` for the tensorrt backend and ``"cpu"`` for the others.

        ``cuda_graphs`` (TensorRT only) captures each decoder step position once per request shape
        and replays it for later requests of that shape, removing per-kernel launch overhead; its
        buffers are per shape, so such a runtime serves one request at a time.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        directory = Path(directory)
        device = device or ("cuda" if backend == "tensorrt" else "cpu")
        manifest = read_manifest(directory, check_files=check_files)
        tokenizer_dir = directory / manifest.tokenizer_dir if manifest.tokenizer_dir else None
        tokenizer = TextTokenizer(tokenizer_dir) if tokenizer_dir and tokenizer_dir.is_dir() else None
        loaded = load_backend(directory, manifest, backend, device, threads, cuda_graphs)
        draft = None
        if manifest.draft is not None:
            if backend == "tensorrt":
                raise ValueError(f"{directory} is a speculative pair; load it with backend='onnxruntime' or 'torch'")
            draft_dir = directory / manifest.draft.directory
            draft_manifest = read_manifest(draft_dir, check_files=check_files)
            draft = load_backend(draft_dir, draft_manifest, backend, device, threads)
        return cls(directory, manifest, loaded, tokenizer, draft)

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

    def token_ids(self, inputs: Inputs, truncation: bool = True) -> tuple[list[list[int]], bool]:
        """``inputs`` as checked token-id lists, truncated as ``generate()`` truncates them, and whether they
        were texts. Raises ``ValueError`` naming the problem (empty, out of vocabulary, too long)."""
        sequences, texts = self._to_ids(inputs)
        return self._checked(sequences, truncation), texts

    def _checked(self, sequences: list[list[int]], truncation: bool) -> list[list[int]]:
        """Refuse empty and out-of-vocabulary inputs; truncate over-long ones (warning the caller of
        ``generate``/``encode``, three frames up) or refuse them with ``truncation=False``."""
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
            warnings.warn(f"truncating {len(too_long)} input(s) to the model's maximum of {limit} tokens", stacklevel=4)
            eos = self.manifest.tokens.eos
            sequences = [ids if len(ids) <= limit else [*ids[: limit - 1], eos] for ids in sequences]
        return sequences

    def _pad(self, sequences: list[list[int]], truncation: bool) -> tuple[np.ndarray, np.ndarray]:
        sequences = self._checked(sequences, truncation)
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
        return self._encode(input_ids, mask, with_draft=self.draft is not None)

    def _encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, with_draft: bool) -> EncodedBatch:
        """One encoder pass; with ``with_draft``, a speculative pair's draft reads the same encoder output."""
        if not with_draft:
            return self.backend.encode(input_ids, attention_mask)
        full, draft = self.backend, self.draft
        assert isinstance(full, SharedEncoderBackend) and isinstance(draft, SharedEncoderBackend)
        states = full.encoder_states(input_ids, attention_mask)
        encoded = full.encode_states(states, input_ids, attention_mask)
        encoded.draft = draft.encode_states(states, input_ids, attention_mask)
        return encoded

    def settings(self, **overrides: Any) -> GenerationSettings:
        """transformers' resolution: the export's generation defaults (the checkpoint's generation config),
        updated by the explicit arguments. Then, as in ``generate()``, ``max_new_tokens`` -- explicit or a
        default -- takes precedence over ``max_length``, and ``min_new_tokens`` over ``min_length``.
        """
        tokens = self.manifest.tokens
        chosen = {key: value for key, value in overrides.items() if value is not None}
        known = {f.name for f in fields(GenerationSettings)} | {"max_new_tokens"}
        unknown = sorted(set(chosen) - known)
        if unknown:
            raise TypeError(f"unknown generation argument(s): {', '.join(unknown)}")
        merged: dict[str, Any] = {  # the export's defaults (the checkpoint's generation config); none hard-coded
            "eos_token_id": tokens.eos,
            "pad_token_id": tokens.pad,
            "decoder_start_token_id": tokens.decoder_start,
            "forced_bos_token_id": tokens.forced_bos,
            "forced_eos_token_id": tokens.forced_eos,
        }
        merged.update(self.manifest.generation.to_dict())
        merged.update(chosen)
        max_new_tokens = merged.pop("max_new_tokens", None)
        if max_new_tokens is not None:
            merged["max_length"] = max_new_tokens + 1  # the decoder start token counts, as in generate()
        if "max_length" not in merged:
            raise ValueError(
                f"{self.directory}'s manifest carries no max_length (it was written by an older cbart); pass "
                "max_new_tokens or max_length, or re-export"
            )
        if merged.get("min_new_tokens") is not None:
            merged["min_length"] = 0  # generate() replaces min_length with min_new_tokens + 1
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
        speculative: bool | int = False,
        **generation: Any,
    ) -> GenerationOutput:
        """Generate for a batch of texts or token-id sequences (mixed lengths are padded inside).

        Generation arguments follow transformers: ``max_new_tokens``/``max_length``,
        ``min_new_tokens``/``min_length``, ``num_beams``, ``length_penalty``, ``early_stopping``,
        ``no_repeat_ngram_size``, ``repetition_penalty``, ``do_sample``, ``top_k``, ``top_p``,
        ``temperature``, ``seed``, ``num_return_sequences``. ``on_token`` (greedy and sampling)
        receives each step's new tokens, one per row.

        ``speculative`` (a pair export; greedy or sampling): the draft decoder proposes and the full
        decoder verifies -- greedy gives the same token ids as plain greedy decoding with the full model,
        sampling draws from the same distribution as plain sampling with it. ``True`` adapts the number
        of proposals per verification (see ``DraftLength``); an int fixes it.
        """
        settings = self.settings(**generation)
        draft_length = self._draft_length(speculative, settings)
        texts_in = False
        started = time.perf_counter()
        if encoded is None:
            if inputs is None:
                raise ValueError("pass inputs (texts or token ids) or encoded=runtime.encode(...)")
            sequences, texts_in = self._to_ids(inputs)
            input_ids, mask = self._pad(sequences, truncation)
            encoded = self._encode(input_ids, mask, with_draft=draft_length is not None)
        encoded_at = time.perf_counter()
        rows = settings.num_beams if settings.num_beams > 1 else settings.num_return_sequences
        session = self.backend.start(encoded, rows, settings.max_length)
        speculation = None
        if draft_length is not None:
            output, speculation = self._speculate(session, encoded, rows, settings, draft_length, on_token)
        elif settings.num_beams > 1:
            output = beam_search(session, encoded.sources, settings)
        else:
            output = greedy_or_sample(session, encoded.sources * rows, settings, on_token)
        finished = time.perf_counter()
        ids = output.tolist()
        texts = self.tokenizer.decode(ids) if texts_in and self.tokenizer is not None else None
        timings = {"encode_s": encoded_at - started, "decode_s": finished - encoded_at, "total_s": finished - started}
        processors = [processor.name for processor in settings.processors]
        return GenerationOutput(ids, texts, timings, speculation, processors)

    def _draft_length(self, speculative: bool | int, settings: GenerationSettings) -> DraftLength | None:
        if speculative is False:
            return None
        if self.draft is None:
            raise ValueError(
                f"{self.directory} has no draft decoder; speculative decoding needs a pair export: "
                "cbart export FULL_CKPT --draft COMPRESSED_CKPT --out DIR"
            )
        if settings.num_beams > 1:
            raise ValueError("speculative decoding is greedy search or sampling; drop num_beams > 1, or speculative")
        if speculative is True:
            return DraftLength()
        return DraftLength(start=int(speculative), maximum=max(int(speculative), 1), adaptive=False)

    def _speculate(
        self,
        session: Any,
        encoded: EncodedBatch,
        rows_per_source: int,
        settings: GenerationSettings,
        draft_length: DraftLength,
        on_token: Callable[[np.ndarray], None] | None,
    ) -> tuple[np.ndarray, SpeculationStats]:
        assert self.draft is not None
        if encoded.draft is None:
            raise ValueError("encoded has no draft encoding; make it with this pair runtime's encode()")
        draft = self.draft.start(encoded.draft, rows_per_source, settings.max_length)
        if not (isinstance(session, VerifyingSession) and isinstance(draft, VerifyingSession)):
            raise ValueError(f"the {type(session).__name__} backend cannot verify several tokens per step")
        speculate = speculative_sample if settings.do_sample else speculative_greedy
        return speculate(session, draft, encoded.sources * rows_per_source, settings, draft_length, on_token)

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
