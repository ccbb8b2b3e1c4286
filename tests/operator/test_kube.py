"""The reconciler's own API client against kmock: errors keep the real HTTP status and say
what the answer was, JSON (a Kubernetes Status) or not."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import kmock
import kopf
import pytest
from operator_harness import NS

from socks5_operator.kube import BODY_EXCERPT, KubeClient, KubeError


@pytest.fixture
async def client(cluster: kmock.KubernetesEmulator) -> AsyncIterator[KubeClient]:
    client = KubeClient()
    client.use(kopf.ConnectionInfo(server=str(cluster.url)))
    try:
        yield client
    finally:
        await client.close()


def _secret(size: int) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "big", "namespace": NS},
            "data": {"policy.yaml": base64.b64encode(b"#" * size).decode()}}


# The body is over 1 MiB: aiohttp warns about sending it in one piece.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_a_plain_text_error_keeps_its_status_and_text(client: KubeClient) -> None:
    """kmock, like a proxy in front of an API server, refuses a body over 1 MiB with a 413
    in plain text: the error says 413 and why, not `HTTP 0 ... JSONDecodeError`."""
    with pytest.raises(KubeError) as caught:
        await client.put_secret(_secret(900_000), exists=False)
    assert caught.value.status == 413
    message = str(caught.value)
    assert message.startswith(f"HTTP 413: POST api/v1/namespaces/{NS}/secrets: ")
    assert "Maximum request body size 1048576 exceeded" in message
    assert "JSONDecodeError" not in message


async def test_a_long_error_body_is_cut(cluster: kmock.KubernetesEmulator,
                                        client: KubeClient) -> None:
    cluster[f"get /api/v1/namespaces/{NS}/secrets/pw"] << 502 << (
        b"<html>\n  <body>Bad gateway</body>\n" + b"x" * 5000 + b"</html>")
    with pytest.raises(KubeError) as caught:
        await client.get_secret(NS, "pw")
    assert caught.value.status == 502
    message = str(caught.value)
    assert f"GET api/v1/namespaces/{NS}/secrets/pw: <html> <body>Bad gateway</body> xxx" \
        in message
    assert message.endswith("x…") and len(message) < BODY_EXCERPT + 100


async def test_a_kubernetes_status_gives_its_message(cluster: kmock.KubernetesEmulator,
                                                     client: KubeClient) -> None:
    cluster[f"post /api/v1/namespaces/{NS}/secrets"] << 422 << {
        "kind": "Status", "status": "Failure", "reason": "Invalid", "code": 422,
        "message": 'Secret "big" is invalid: data: Too long: must have at most 1048576 bytes'}
    with pytest.raises(KubeError) as caught:
        await client.put_secret(_secret(10), exists=False)
    assert caught.value.status == 422
    assert str(caught.value) == (
        f"HTTP 422: POST api/v1/namespaces/{NS}/secrets: Secret \"big\" is invalid: data: "
        "Too long: must have at most 1048576 bytes")
