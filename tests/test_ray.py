"""Scale-out on Ray: the server as a Ray Serve deployment and offline generation with Ray Data, on a local
single-node cluster this test starts (1 CPU per replica or actor); and the resumable offline path without Ray."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from cbart.runtime.generator import Seq2SeqRuntime
from cbart.serving.config import ServerConfig
from cbart.serving.offline import OfflineJob, generate_file
from conftest import tiny_inflight_export

ray = pytest.importorskip("ray", reason="Ray is the `ray` extra: pip install 'cbart[ray]'")

INPUTS = [[0, *range(5 + n, 9 + 2 * n), 2] for n in range(7)]
SETTINGS = {"max_new_tokens": 8}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tiny_inflight_export(tmp_path_factory.mktemp("ray"), 31)[1]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


def write_inputs(path: Path) -> None:
    path.write_text("".join(json.dumps({"id": f"doc-{n}", "source": ids}) + "\n" for n, ids in enumerate(INPUTS)))


def expected(export_dir: Path) -> dict[str, list[int]]:
    runtime = Seq2SeqRuntime.from_dir(export_dir)
    return {f"doc-{n}": runtime.generate([ids], **SETTINGS).sequences[0] for n, ids in enumerate(INPUTS)}


def read_output(path: Path) -> dict[str, list[int]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len({row["id"] for row in rows})  # no id written twice
    return {row["id"]: row["generated"] for row in rows}


def test_offline_generation_resumes_where_it_stopped(export_dir, tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_inputs(source)
    want = expected(export_dir)
    first_two = "".join(json.dumps({"id": f"doc-{n}", "generated": want[f"doc-{n}"]}) + "\n" for n in range(2))
    out.write_text(first_two + '{"id": "doc-2", "gener')  # a run that crashed mid-line
    job = OfflineJob(export_dir, source, out, parameters=SETTINGS, batch_size=3)
    assert generate_file(job, progress=False) == len(INPUTS) - 2
    assert read_output(out) == want
    assert generate_file(job, progress=False) == 0  # nothing left to do


def test_ray_data_actor_pool_generates_every_row(export_dir, tmp_path, local_ray):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_inputs(source)
    job = OfflineJob(export_dir, source, out, parameters=SETTINGS, batch_size=2, threads=1)
    assert generate_file(job, ray_actors=2, progress=False) == len(INPUTS)
    assert read_output(out) == expected(export_dir)


def test_ray_serve_deployment_serves_the_same_ids(export_dir, local_ray):
    from cbart.serving.ray_deployment import RayServeOptions, deployment
    from ray import serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = deployment(ServerConfig(export_dir, threads=1), RayServeOptions(replicas=1))
        serve.run(app, name="cbart", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while httpx.get(f"{base}/health", timeout=10).status_code != 200:
            assert time.time() < deadline, "replica did not become ready"
            time.sleep(0.2)
        want = expected(export_dir)
        for n, ids in enumerate(INPUTS[:3]):
            response = httpx.post(f"{base}/v1/generate", json={"inputs": ids, "parameters": SETTINGS}, timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["sequences"] == [want[f"doc-{n}"]]
        bad = httpx.post(f"{base}/v1/generate", json={"inputs": [0, 500, 2]}, timeout=60)
        assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]
    finally:
        serve.shutdown()
