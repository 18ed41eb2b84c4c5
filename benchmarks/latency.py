"""Latency comparison, side by side in one run (``cbart bench`` / ``python -m cbart.benchmarks.latency``).

Every (system, model) pair runs in a fresh process per round, rounds interleaved (A B A B ...),
so machine drift hits all systems alike; results are medians with min/max. Each process warms up
once, then times a 1-token generation (encoder + first step) and an N-token one; the per-token
decode time is ``(T(N) - T(1)) / (N - 1)``. The memory-bandwidth floor of a batch-1 decode step is
the bytes it must read (for cbart and cbart-cpp fp32, whose greedy search reads the screened LM
head: those bytes) divided by the best streaming bandwidth any probe reached in any round of the same run
(``benchmarks.bandwidth``): no system can beat it, so a figure above 100% of the floor is a bug. A system this
machine cannot run at all (``cbart-trt`` without TensorRT or a GPU) is listed as skipped on every
cell, with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cbart.benchmarks.bandwidth import BandwidthProbes
from cbart.benchmarks.machine import machine
from cbart.benchmarks.models import ModelSpec, checkpoint, decoder_step_bytes, onnx_export, tensorrt_export
from cbart.benchmarks.plotting import pyplot

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Cell:
    batch: int
    source: int
    beams: int
    new_tokens: int

    @property
    def label(self) -> str:
        search = "greedy" if self.beams == 1 else f"beam {self.beams}"
        return f"batch {self.batch}, src {self.source}, {search}, {self.new_tokens} new"


@dataclass(frozen=True)
class Engine:
    """One column of the comparison: a system running one model at one precision."""

    system: str
    model: ModelSpec
    precision: str = "fp32"

    @property
    def label(self) -> str:
        names = {
            "transformers": "transformers (PyTorch)",
            "cbart": "cbart ONNX Runtime",
            "cbart-cpp": "cbart C++ ONNX Runtime",
            "cbart-torch": "cbart PyTorch reference",
            "cbart-trt": "cbart TensorRT",
            "optimum": "Optimum ORTModelForSeq2SeqLM",
            "ctranslate2": "CTranslate2",
            "openvino": "OpenVINO (optimum-intel)",
            "ort-beamsearch": "ONNX Runtime BeamSearch op",
        }
        return f"{names.get(self.system, self.system)} {self.precision} / {self.model.name}"


@dataclass
class Result:
    engine: str
    system: str
    model: str
    precision: str
    cell: dict[str, int]
    median_s: float
    min_s: float
    max_s: float
    encoder_s: float
    per_token_ms: float
    tokens_per_s: float
    peak_rss_mib: float
    gpu_peak_mib: float | None = None
    floor_ms: float | None = None
    percent_of_floor: float | None = None
    rounds: list[dict[str, list[float]]] = field(default_factory=list)
    ids_agreement: float | None = None
    """Share of new-token ids equal to transformers' on the same model and cell (None: transformers not run)."""


PEERS = ("optimum", "ctranslate2", "openvino", "ort-beamsearch")
PEER_PRECISIONS = {"openvino": ("fp32", "int8", "default"), "ort-beamsearch": ("fp32",)}
"""Peers with precisions of their own (the others take fp32 and int8 where they have it)."""
SHORTEST_CALL = {"ort-beamsearch": 2}
"""New tokens in a system's shortest generation, where it cannot stop after one: its "encoder + first token"
column then holds that many tokens, and its decode ms/token counts the tokens after them."""


def peer_pythons(values: list[str]) -> dict[str, str]:
    """``--peer-python`` values, ``PATH`` (every peer) or ``PEER=PATH`` (one peer), as peer -> interpreter; peers
    keep their own environments because their pins clash (optimum-intel and optimum-onnx want other optimums)."""
    pythons = {"*": sys.executable}
    for value in values:
        peer, separator, path = value.rpartition("=")
        if separator and peer not in PEERS:
            raise SystemExit(f"--peer-python {value}: {peer!r} is not a peer; peers are {', '.join(PEERS)}")
        pythons[peer if separator else "*"] = path
    return pythons


def interpreter(engine: Engine, pythons: dict[str, str]) -> str:
    """The Python that runs ``engine``: its peer environment, or this one for cbart's own systems."""
    return pythons.get(engine.system, pythons["*"]) if engine.system in PEERS else sys.executable


class SystemUnavailable(RuntimeError):
    """This machine cannot run the system at all (e.g. TensorRT without a GPU): every cell is skipped."""


def prepare(engine: Engine, cache: Path, pythons: dict[str, str], cells: list[Cell]) -> Path:
    if engine.system == "cbart-trt":
        from cbart.runtime.trt_support import TensorRTUnavailable

        try:
            return tensorrt_export(engine.model, cache, engine.precision, cells)
        except TensorRTUnavailable as error:
            raise SystemUnavailable(str(error)) from error
    if engine.system == "transformers":
        return checkpoint(engine.model, cache)
    if engine.system == "cbart-torch" and engine.precision != "fp32":
        raise ValueError("cbart-torch (the PyTorch reference backend) runs fp32 only")
    if engine.system in ("cbart", "cbart-cpp", "cbart-torch"):
        return onnx_export(engine.model, cache, engine.precision, with_torch=engine.system == "cbart-torch")
    if engine.model.latent is not None:
        raise ValueError(f"{engine.system} runs the full model only (it cannot load the compressed architecture)")
    source = checkpoint(engine.model, cache)
    bin_dir = Path(interpreter(engine, pythons)).parent
    if engine.system == "openvino":  # :fp32 and :default share fp32 weights; :int8 compresses them (NNCF)
        weights = "int8" if engine.precision == "int8" else "fp32"
        target = cache / f"full-openvino-{weights}"
        command = [
            str(bin_dir / "optimum-cli"), "export", "openvino", "--model", str(source),
            "--task", "text2text-generation-with-past", "--weight-format", weights, str(target),
        ]  # fmt: skip
    elif engine.system == "ort-beamsearch":
        target = cache / "full-ort-beamsearch"
        command = [interpreter(engine, pythons), "-m", "cbart.benchmarks.ort_beamsearch", "--model", str(source)]
        command += ["--output", str(target)]
    elif engine.system == "optimum":
        target = cache / "full-optimum"
        command = [
            str(bin_dir / "optimum-cli"),
            "export",
            "onnx",
            "--model",
            str(source),
            "--task",
            "text2text-generation-with-past",
            str(target),
        ]
    elif engine.system == "ctranslate2":
        target = cache / "full-ctranslate2"
        command = [
            str(bin_dir / "ct2-transformers-converter"),
            "--model",
            str(ctranslate2_source(source, cache)),
            "--output_dir",
            str(target),
        ]
    else:
        raise ValueError(f"unknown system {engine.system!r}")
    if not target.is_dir():
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"preparing {engine.system} failed:\n{completed.stderr[-3000:]}")
    return target


def ctranslate2_source(full: Path, cache: Path) -> Path:
    """CTranslate2's converter wants BART's legacy config flags and a tokenizer of exactly vocab_size entries."""
    import shutil

    from transformers import BartTokenizer

    target = cache / "full-ct2-source"
    if (target / "config.json").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for file in full.iterdir():
        if file.name != "config.json":
            shutil.copy2(file, target / file.name)
    config = json.loads((full / "config.json").read_text())
    config.update(normalize_before=False, normalize_embedding=True, add_final_layer_norm=False)
    (target / "config.json").write_text(json.dumps(config))
    tokenizer_dir = Path(os.environ.get("CBART_SHARED_DATA", ROOT.parent / "shared" / "data")) / "tokenizer" / "bart"
    BartTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(target)
    return target


def run_worker(
    engine: Engine, path: Path, cell: Cell, threads: int, repeats: int, python: str, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One fresh worker process for one engine and cell; ``extra``: more worker options."""
    command = [
        python,
        "-m",
        "cbart.benchmarks.worker",
        "--system",
        engine.system,
        "--path",
        str(path),
        "--batch",
        str(cell.batch),
        "--source",
        str(cell.source),
        "--beams",
        str(cell.beams),
        "--new-tokens",
        str(cell.new_tokens),
        "--threads",
        str(threads),
        "--repeats",
        str(repeats),
        *extra,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": str(ROOT),
        "TRANSFORMERS_VERBOSITY": "error",
        "CBART_PRECISION": engine.precision,
    }
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{engine.label} failed on {cell.label}:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def summarise(engine: Engine, cell: Cell, rounds: list[dict], bandwidth: float) -> Result:
    rounds = [{key: value for key, value in r.items() if key != "ids"} for r in rounds]
    full = [t for r in rounds for t in r["tn"]]
    first = [t for r in rounds for t in r["t1"]]
    median, encoder = statistics.median(full), statistics.median(first)
    per_token = (median - encoder) / max(cell.new_tokens - SHORTEST_CALL.get(engine.system, 1), 1)
    result = Result(
        engine=engine.label,
        system=engine.system,
        model=engine.model.name,
        precision=engine.precision,
        cell=asdict(cell),
        median_s=median,
        min_s=min(full),
        max_s=max(full),
        encoder_s=encoder,
        per_token_ms=1000 * per_token,
        tokens_per_s=cell.batch * cell.new_tokens / median,
        peak_rss_mib=max(r["peak_rss_mib"] for r in rounds),
        gpu_peak_mib=max((r["gpu_peak_mib"] for r in rounds if r.get("gpu_peak_mib") is not None), default=None),
        rounds=rounds,
    )
    if cell.batch == 1 and cell.beams == 1:
        weight_bytes = 1.0 if engine.precision == "int8" else 4.0
        # the Python and C++ runtimes' greedy search reads the screened LM head of fp32 exports
        screened = engine.system in ("cbart", "cbart-cpp") and engine.precision == "fp32"
        step_bytes = decoder_step_bytes(engine.model.latent, cell.source, weight_bytes, screened_lm_head=screened)
        floor = step_bytes / (bandwidth * 1e9)
        result.floor_ms = 1000 * floor
        result.percent_of_floor = 100 * floor / per_token if per_token > 0 else None
    return result


def ids_agreement(ids: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions (over every row) where ``ids`` equal ``reference``; a missing position disagrees."""
    agree = total = 0
    for row, expected in zip(ids, reference, strict=True):
        width = max(len(row), len(expected))
        agree += sum(a == b for a, b in zip(row, expected, strict=False))
        total += width
    return agree / max(total, 1)


def compare_ids(cell_results: dict[Engine, Result], rounds: dict[Engine, list[dict]]) -> None:
    """Each result's new-token ids (last round) against transformers' on the same model, where it ran."""
    for engine, result in cell_results.items():
        reference = Engine("transformers", engine.model, "fp32")
        if reference in cell_results and rounds[engine] and "ids" in rounds[engine][-1]:
            result.ids_agreement = ids_agreement(rounds[engine][-1]["ids"], rounds[reference][-1]["ids"])


def floor_violations(results: list[Result]) -> list[str]:
    """Results faster than the floor: impossible, so each is reported as a bug to find, not a footnote."""
    return [
        f"BUG: {r.engine} on {Cell(**r.cell).label} reached {r.percent_of_floor:.0f}% of the bandwidth floor; the "
        "floor's bandwidth or the step's byte count is wrong"
        for r in results
        if r.percent_of_floor is not None and r.percent_of_floor > 100
    ]


def markdown(results: list[Result], baseline_system: str = "transformers") -> str:
    lines = []
    for cell_label in dict.fromkeys(Cell(**r.cell).label for r in results):
        rows = [r for r in results if Cell(**r.cell).label == cell_label]
        baseline = next((r for r in rows if r.system == baseline_system and r.model == "full"), None)
        lines += [
            f"\n**{cell_label}**\n",
            "| engine | median s (min-max) | encoder+1st s | decode ms/token | tokens/s | peak RSS MiB "
            "| floor ms/token (% achieved) | speedup vs transformers full | ids = transformers |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            floor = f"{r.floor_ms:.1f} ({r.percent_of_floor:.0f}%)" if r.floor_ms and r.percent_of_floor else "-"
            # T(N) - T(1) below zero means the run-to-run noise of the encoder exceeded the whole decode
            per_token = f"{r.per_token_ms:.1f}" if r.per_token_ms > 0 else "noise > decode"
            speedup = f"{baseline.median_s / r.median_s:.2f}x" if baseline else "-"
            memory = f"{r.peak_rss_mib:.0f}" + (f" (GPU {r.gpu_peak_mib:.0f})" if r.gpu_peak_mib is not None else "")
            same = "-" if r.ids_agreement is None else f"{100 * r.ids_agreement:.0f}%"
            lines.append(
                f"| {r.engine} | {r.median_s:.3f} ({r.min_s:.3f}-{r.max_s:.3f}) | {r.encoder_s:.3f} | "
                f"{per_token} | {r.tokens_per_s:.1f} | {memory} | {floor} | {speedup} | {same} |"
            )
    shortest = {r.engine.split(" / ")[0]: SHORTEST_CALL[r.system] for r in results if r.system in SHORTEST_CALL}
    lines += [
        f"\n{name}: its encoder+1st column is {tokens} new tokens (its shortest call)"
        for name, tokens in shortest.items()
    ]
    return "\n".join(lines)


def plot(results: list[Result], directory: Path, stem: str) -> list[Path]:
    """Per-token latency vs latent size per engine, and speedup vs transformers on the full model."""
    plt = pyplot()
    if plt is None or not results:
        return []
    written = []
    first = Cell(**results[0].cell) if results else None
    reference = next((Cell(**r.cell) for r in results if r.cell["batch"] == 1 and r.cell["beams"] == 1), first)
    cell_results = [r for r in results if reference and Cell(**r.cell) == reference]
    figure, axes = plt.subplots(1, 2, figsize=(14, max(4.5, 0.32 * len(cell_results) + 1)))
    for key in dict.fromkeys((r.system, r.precision) for r in cell_results):
        points = sorted(
            ((768 if r.model == "full" else int(r.model.split("-")[1])), r.per_token_ms)
            for r in cell_results
            if (r.system, r.precision) == key
        )
        axes[0].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{key[0]} {key[1]}")
    axes[0].set_xlabel("decoder width (768 = full bart-base)")
    axes[0].set_ylabel("decode ms / token")
    axes[0].set_title(reference.label if reference else "")
    axes[0].legend()
    baseline = next((r for r in cell_results if r.system == "transformers" and r.model == "full"), None)
    if baseline:
        labels = [r.engine.replace(" ONNX Runtime", "").replace(" (PyTorch)", "") for r in cell_results]
        axes[1].barh(labels, [baseline.median_s / r.median_s for r in cell_results])
        axes[1].axvline(1.0, color="grey", linewidth=0.8)
        axes[1].set_xlabel("speedup vs transformers full (end to end)")
    figure.tight_layout()
    path = directory / f"{stem}.png"
    figure.savefig(path, dpi=110)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cbart bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="batch 1, source 512, greedy: full vs compressed-384")
    parser.add_argument("--models", default="full,504,384,256,128", help="'full' and/or latent sizes")
    parser.add_argument("--systems", default="transformers,cbart:fp32,cbart:int8")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--sources", default="128,512,1024")
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None, help="fresh processes per engine (3; --quick: 2)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default=None, help="output file stem (default: latency-quick or latency)")
    parser.add_argument(
        "--replot", type=Path, default=None, help="redraw the table and plots of a results JSON and exit"
    )
    parser.add_argument(
        "--peers",
        default="",
        help="peer systems on the full model: optimum, ctranslate2[:int8], openvino[:fp32|:int8|:default]",
    )
    parser.add_argument(
        "--peer-python",
        action="append",
        default=[],
        metavar="[PEER=]PYTHON",
        help="interpreter of a peer's environment (repeatable; PATH alone: every peer). Their pins clash with "
        "ours and each other's: see benchmarks/peers.md",
    )
    args = parser.parse_args(argv)
    if args.replot is not None:
        payload = json.loads(args.replot.read_text())
        results = [Result(**row) for row in payload["results"]]
        payload["table"] = markdown(results) + "".join(f"\n\n{line}" for line in payload.get("skipped", []))
        args.replot.write_text(json.dumps(payload, indent=2))
        for path in plot(results, args.replot.parent, args.replot.stem):
            print(f"plot: {path}")
        return 0
    if args.quick:
        args.models, args.batches, args.sources, args.beams = "full,384", "1", "512", "1"
    args.rounds = args.rounds or (2 if args.quick else 3)
    models = [ModelSpec(None if m == "full" else int(m)) for m in args.models.split(",")]
    engines = []
    for system in args.systems.split(","):
        name, _, precision = system.partition(":")
        engines += [Engine(name, model, precision or "fp32") for model in models]
    pythons = peer_pythons(args.peer_python)
    for peer in filter(None, args.peers.split(",")):
        name, _, precision = peer.partition(":")
        if name not in PEERS:
            raise SystemExit(f"--peers {peer}: unknown peer {name!r}; peers are {', '.join(PEERS)}")
        if precision and name in PEER_PRECISIONS and precision not in PEER_PRECISIONS[name]:
            raise SystemExit(f"--peers {peer}: {name} runs {', '.join(PEER_PRECISIONS[name])}")
        engines.append(Engine(name, ModelSpec(None), precision or "fp32"))
    cells = [
        Cell(b, s, k, args.new_tokens)
        for b in map(int, args.batches.split(","))
        for s in map(int, args.sources.split(","))
        for k in map(int, args.beams.split(","))
    ]
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"preparing {len(engines)} engines (random-weight bart-base shapes, cached in {args.cache}) ...")
    paths: dict[Engine, Path] = {}
    unavailable: dict[Engine, str] = {}
    for engine in engines:
        try:
            paths[engine] = prepare(engine, args.cache, pythons, cells)
        except SystemUnavailable as error:
            unavailable[engine] = str(error)
            print(f"  {engine.label}: skipped on every cell ({error})", flush=True)
    probes = BandwidthProbes(args.threads)
    bandwidths: dict[str, float] = {}
    measured: list[tuple[Cell, dict[Engine, list[dict]], dict[Engine, str]]] = []
    for cell in cells:
        rounds: dict[Engine, list[dict]] = {engine: [] for engine in engines}
        failed: dict[Engine, str] = dict(unavailable)
        for round_index in range(args.rounds):
            for name, gb_s in probes.measure().items():  # every round: the best reading of each probe is kept
                bandwidths[name] = max(bandwidths.get(name, 0.0), gb_s)
            for engine in engines:
                if engine in failed:
                    continue
                print(f"  round {round_index + 1}/{args.rounds} {cell.label}: {engine.label}", flush=True)
                try:
                    python = interpreter(engine, pythons)
                    rounds[engine].append(run_worker(engine, paths[engine], cell, args.threads, args.repeats, python))
                except RuntimeError as error:
                    failed[engine] = str(error).splitlines()[-1]
        measured.append((cell, rounds, failed))
    del probes
    bandwidth = max(bandwidths.values())
    probe_text = ", ".join(f"{name} {gb_s:.1f}" for name, gb_s in bandwidths.items())
    print(f"streaming bandwidth with {args.threads} threads, best per probe (GB/s): {probe_text}")
    results: list[Result] = []
    skipped: list[str] = []
    for cell, rounds, failed in measured:
        cell_results = {
            engine: summarise(engine, cell, rounds[engine], bandwidth) for engine in engines if engine not in failed
        }
        compare_ids(cell_results, rounds)
        results += cell_results.values()
        skipped += [f"{engine.label} on {cell.label}: skipped ({reason})" for engine, reason in failed.items()]
    skipped += floor_violations(results)
    table = markdown(results) + "".join(f"\n\n{line}" for line in skipped)
    print(table)
    stem = args.name or ("latency-quick" if args.quick else "latency")
    args.results.mkdir(parents=True, exist_ok=True)
    command = "cbart bench " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {
        "date": datetime.date.today().isoformat(),
        "command": command.strip(),
        "threads": args.threads,
        "bandwidth_gb_s": bandwidth,
        "bandwidth_probes_gb_s": bandwidths,
        "machine": f"{os.cpu_count()} CPUs",
        "cpu": machine(),
        "results": [asdict(r) for r in results],
        "skipped": skipped,
        "table": table,
    }
    (args.results / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    for path in plot(results, args.results, stem):
        print(f"plot: {path}")
    print(f"results: {args.results / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
