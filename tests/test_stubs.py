"""The committed gRPC stubs are exactly what scripts/generate_stubs.py makes from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "socks5_analytics" / "stubs"


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): path.read_text()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_stubs_match_the_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_stubs.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh, committed = _tree(tmp_path), _tree(COMMITTED)
    assert sorted(fresh) == sorted(committed), "stub files differ: regenerate them"
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} is stale: run scripts/generate_stubs.py"


def test_stubs_import_and_describe_the_service() -> None:
    from socks5_analytics.stubs.traffic.v1 import ingest_pb2, ingest_pb2_grpc

    service = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]
    assert service.full_name == "traffic.v1.IngestService"
    assert hasattr(ingest_pb2_grpc, "IngestServiceStub")
    method = service.methods_by_name["Stream"]
    assert method.client_streaming and method.server_streaming
