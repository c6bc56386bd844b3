"""The app on Flower's deployment runtime: a real SuperLink and real SuperNodes on 127.0.0.1.

The slow tests start ``flower-superlink`` and ``flower-supernode`` processes through
:class:`flwr_distreal.run.deploy.LocalDeployment` (private temporary folder, free ports, private
``FLWR_HOME``, runtime dependency installation off) and submit the app with ``flwr run``; at the
end every process that carries the deployment's tag (SuperLink, SuperNodes, SuperExecs,
ServerApp, ClientApps) is stopped by PID and checked gone. The fast tests check that the
certificates, keys and CLI configuration the module writes are what Flower 1.41 reads.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("cryptography")

from flwr_distreal.run.deploy import (
    LocalDeployment,
    make_node_key_pair,
    make_tls_certificates,
    write_connection_config,
)
from flwr_distreal.run.processes import tagged_pids  # noqa: E402

#: Seconds a 2-round run may take (far more than it needs on 2 idle cores).
RUN_TIMEOUT_S = 480
#: Flower's exit code of a SuperNode that cannot connect (``ExitCode.SUPERNODE_CONNECTION_ERROR``);
#: it is logged (the process itself exits with status 1).
SUPERNODE_CONNECTION_ERROR = 305

needs_proc = pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="finding the processes Flower starts needs /proc (Linux)"
)


def _processes_using(path: Path) -> list[int]:
    """Live processes whose command line mentions ``path`` (the deployment's folder)."""
    needle = str(path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _assert_all_gone(dep: LocalDeployment) -> None:
    survivors = dep.stop()
    assert survivors == [], f"processes left running: {survivors}"
    assert tagged_pids(dep.tag) == []
    assert _processes_using(dep.root) == []
    assert all(not n.running for n in dep.supernodes)
    assert dep.superlink is not None and dep.superlink.poll() is not None


# -- certificates, keys, CLI config (fast) ------------------------------------------------------


def test_tls_certificates_verify_for_loopback(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store

    files = make_tls_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    store = Store([ca])
    import ipaddress

    for subject in (x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")):
        chain = PolicyBuilder().store(store).build_server_verifier(subject).verify(server, [])
        assert chain[-1] == ca
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600
    assert not list(tmp_path.glob("ca.key*")), "the CA's private key must not be written"

    import ssl

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)  # what uvicorn does with --ssl-*


def test_node_key_pair_is_what_flower_accepts(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    private, public = make_node_key_pair(tmp_path, "node-a")
    assert (private.name, public.name) == ("node-a", "node-a.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_ssh_private_key(private.read_bytes(), None)  # as flower-supernode loads it
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    # as `flwr supernode register` loads it: the same public key
    assert try_load_public_key(public) == public_key_to_bytes(key.public_key())


def test_connection_config_is_read_by_flower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    write_connection_config(tmp_path / "home", "tls-dep", "127.0.0.1:9093", tmp_path / "ca.crt")
    conn = read_superlink_connection("tls-dep")
    assert (conn.address, conn.root_certificates, conn.insecure) == ("127.0.0.1:9093", str(tmp_path / "ca.crt"), False)
    write_connection_config(tmp_path / "home", "plain", "127.0.0.1:9094")
    conn = read_superlink_connection(None)  # the default connection
    assert (conn.name, conn.address, conn.insecure, conn.root_certificates) == ("plain", "127.0.0.1:9094", True, None)


def test_auth_needs_tls() -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        LocalDeployment(2, auth=True)
    with pytest.raises(ValueError, match="1 node configs for 2 SuperNodes"):
        LocalDeployment(2, node_configs=["partition-id=0"])


# -- real processes (slow) -------------------------------------------------------------------------


@pytest.fixture
def deployment_factory(tmp_path: Path) -> Iterator:
    """Deployments in the test's tmp_path (pytest keeps the last runs' folders: logs,
    certificates, database for a failed test)."""
    made: list[LocalDeployment] = []

    def make(*args, **kwargs) -> LocalDeployment:
        made.append(LocalDeployment(*args, root=tmp_path / f"dep{len(made)}", **kwargs))
        return made[-1]

    yield make
    for dep in made:  # a failed test still stops everything it started
        dep.stop()


@needs_proc
@pytest.mark.slow
def test_deployment_runs_two_rounds(deployment_factory, tmp_path: Path) -> None:
    """SuperLink + 2 SuperNodes (insecure), `flwr run` with deployment=true: both nodes train
    in both rounds, the run finishes as completed, and every process is gone afterwards."""
    out = tmp_path / "out"
    dep = deployment_factory(2)
    dep.start()
    assert len(dep.supernodes) == 2 and all(n.running for n in dep.supernodes)
    assert "--insecure" in dep.supernodes[0].args
    assert dep.supernodes[1].node_config == {"partition-id": 1, "num-partitions": 2}
    assert tagged_pids(dep.tag), "no process found with the deployment's tag: cleanup would miss it"

    start = time.monotonic()
    result = dep.run({"deployment": True, "rounds": 2, "output-dir": str(out)}, timeout=RUN_TIMEOUT_S)
    elapsed = time.monotonic() - start
    log = result.log_path.read_text(errors="replace") if result.log_path else ""
    assert result.ok, f"{result.status}: {result.details}\n{log[-3000:]}"

    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 3, lines
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    assert [r["round"] for r in rows] == ["1", "2"]
    assert [int(r["received"]) for r in rows] == [2, 2], rows
    assert all(int(r["failures"]) == 0 for r in rows), rows
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    assert float(rows[1]["wall_time"]) <= elapsed + 1

    # each SuperNode ran its ClientApp in Flower's default subprocess isolation
    for node in dep.supernodes:
        assert "Start `flwr-clientapp` process" in node.log_path.read_text(errors="replace"), node.name
    _assert_all_gone(dep)


@needs_proc
@pytest.mark.slow
def test_tls_auth_admits_registered_and_refuses_unregistered(deployment_factory) -> None:
    """TLS (throw-away CA) + SuperNode authentication: registered SuperNodes connect, the
    Control API answers over TLS, and a SuperNode whose key was not registered is refused."""
    dep = deployment_factory(1, tls=True, auth=True)
    dep.start()
    (member,) = dep.supernodes
    assert member.node_id is not None and member.connected_id() == member.node_id
    assert {"--root-certificates", "--auth-supernode-private-key"} <= set(member.args)
    assert "--insecure" not in member.args

    intruder = dep.add_supernode(
        {"partition-id": 0, "num-partitions": 1}, register=False, name="intruder", wait=False,
        extra_args=["--max-retries", "0"],
    )
    # while the intruder starts: `flwr supernode ls` over TLS sees the registered SuperNode online
    nodes = dep.nodes()
    assert [(int(n["node-id"]), n["status"]) for n in nodes] == [(member.node_id, "online")]

    assert intruder.process is not None
    code = intruder.process.wait(timeout=120)
    text = intruder.log_path.read_text(errors="replace")
    assert code != 0, text
    assert f"Exit Code: {SUPERNODE_CONNECTION_ERROR}" in text and "Failed to activate SuperNode" in text, text
    assert intruder.connected_id() is None
    assert "No SuperNode found with the given public key" in (dep.logs / "superlink.log").read_text(errors="replace")
    _assert_all_gone(dep)


@needs_proc
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FLWR_DISTREAL_DEPLOY_TLS_RUN") != "1",
    reason="a second full run (about as long as the insecure one); set FLWR_DISTREAL_DEPLOY_TLS_RUN=1",
)
def test_tls_auth_deployment_runs(deployment_factory, tmp_path: Path) -> None:
    """The full run over TLS with SuperNode authentication (the ServerApp's SuperExec reaches the
    Runtime API over TLS too)."""
    out = tmp_path / "out"
    dep = deployment_factory(2, tls=True, auth=True)
    result = dep.run({"deployment": True, "rounds": 1, "output-dir": str(out)}, timeout=RUN_TIMEOUT_S)
    assert result.ok, f"{result.status}: {result.details}"
    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 2 and dict(zip(lines[0].split(","), lines[1].split(",")))["received"] == "2", lines
    _assert_all_gone(dep)
