"""Real DICOM peers for the tests: Orthanc (research PACS), dcmtk storescp/storescu, test TLS.

Everything listens on 127.0.0.1 on free ports, keeps its files under the test's tmp_path and
is waited for by polling (REST or C-ECHO), never by fixed sleeps. Import the fixtures
explicitly: ``from tests.support.pacs import orthanc, storescp, tls_files``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.forward import sender_only

ORTHANC_BINARY = "/usr/sbin/Orthanc"
LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """An ephemeral TCP port that is free right now on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``condition`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# TLS material


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throw-away CA, a server certificate for 127.0.0.1 and a client cert."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self, require_client_cert: bool = True) -> ssl.SSLContext:
        """SSL context for a pynetdicom SCP using the server certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_cert))
        ctx.load_cert_chain(str(self.server_cert), str(self.server_key))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
        return ctx


def make_tls_files(directory: Path) -> TlsFiles:
    """Issue a CA, a server cert (localhost / 127.0.0.1) and a client cert with trustme."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("localhost", LOCALHOST)
    client = ca.issue_cert("defacegate-client")
    files = TlsFiles(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    ca.cert_pem.write_to_path(str(files.ca_cert))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    return files


# ---------------------------------------------------------------------------------------------
# C-ECHO probe (readiness of any DICOM peer)


def c_echo(
    port: int,
    called_aet: str,
    calling_aet: str = "PROBE",
    host: str = LOCALHOST,
    tls: TlsFiles | None = None,
    timeout: float = 5.0,
) -> int | None:
    """Send one C-ECHO; the response status, or None if no association was established."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    tls_args = None
    if tls is not None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_cert))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(tls.client_cert), str(tls.client_key))
        tls_args = (ctx, None)
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls_args)  # type: ignore[arg-type]
    if not assoc.is_established:
        return None
    sender_only(assoc)  # pynetdicom's reactor could otherwise take the response (forward.py)
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


# ---------------------------------------------------------------------------------------------
# Orthanc

# Orthanc calls ReceivedInstanceFilter for every C-STORE, before it decides about duplicates.
_COUNT_STORES_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  if origin["RequestOrigin"] == "DicomProtocol" then
    print("defacegate-rig C-STORE " .. dicom["SOPInstanceUID"])
  end
  return true
end
"""
_STORE_LINE = re.compile(r"defacegate-rig C-STORE ([0-9.]+)")


@dataclass
class Orthanc:
    """A real Orthanc (Debian package) with its own JSON config and storage under ``root``.

    ``start()``/``stop()`` may be called repeatedly; storage survives a restart, so a test can
    take the destination down, bring it back, or restart it with a different ``config``.
    """

    root: Path
    aet: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    config: dict[str, Any] = field(default_factory=dict)
    tls: TlsFiles | None = None
    #: Log every received C-STORE (duplicates included) so tests can count deliveries.
    count_stores: bool = True
    #: dcmtk (inside Orthanc) keeps Nagle on unless TCP_NODELAY=1 is in its environment;
    #: then every C-STORE response waits for a delayed ACK (~19 instead of ~80 instances/s).
    tcp_nodelay: bool = True
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    def allow_modality(self, aet: str, host: str = LOCALHOST, port: int = 104) -> None:
        """Declare a modality (needed when ``DicomAlwaysAllowStore`` is false)."""
        self.config.setdefault("DicomModalities", {})[aet.lower()] = [aet, host, port]

    def _write_config(self) -> Path:
        cfg: dict[str, Any] = {
            "Name": "defacegate-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpThreadsCount": 4,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            "DicomThreadsCount": 4,
            "OverwriteInstances": True,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "StableAge": 1,
        }
        if self.tls is not None:
            cfg.update(
                {
                    "DicomTlsEnabled": True,
                    "DicomTlsCertificate": str(self.tls.server_cert),
                    "DicomTlsPrivateKey": str(self.tls.server_key),
                    "DicomTlsTrustedCertificates": str(self.tls.ca_cert),
                    "DicomTlsRemoteCertificateRequired": True,
                }
            )
        if self.count_stores:
            script = self.root / "count_stores.lua"
            script.write_text(_COUNT_STORES_LUA)
            cfg["LuaScripts"] = [str(script)]
        cfg.update(self.config)
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(cfg, indent=2))
        return path

    def start(self, timeout: float = 20.0) -> Orthanc:
        """Start Orthanc and wait until its REST API answers."""
        if self.process is not None:
            raise RuntimeError("Orthanc is already running")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        log = (self.root / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [ORTHANC_BINARY, str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env={**os.environ, "TCP_NODELAY": "1" if self.tcp_nodelay else "0"},
        )
        log.close()

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited early; see {self.root / 'orthanc.log'}")
            try:
                self.get("/system")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False
            return True

        try:
            wait_for(ready, timeout, "Orthanc REST API")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, graceful: bool = False) -> None:
        """Stop Orthanc: SIGKILL by default (its SQLite index is crash-safe and a graceful
        shutdown takes ~3 s), or SIGTERM with ``graceful``."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if graceful:
            proc.terminate()
            try:
                proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
        proc.wait(timeout=10)

    def restart(self, **config: Any) -> Orthanc:
        """Stop, update the config with ``config``, start again (storage is kept)."""
        self.stop()
        self.config.update(config)
        return self.start()

    # REST helpers -----------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as rsp:
            return bytes(rsp.read())

    def get_json(self, path: str) -> Any:
        return json.loads(self.get(path))

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return list(self.get_json("/instances"))

    def instance_count(self) -> int:
        return int(self.get_json("/statistics")["CountInstances"])

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file, byte for byte."""
        return self.get(f"/instances/{orthanc_id}/file")

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        return dict(self.get_json(f"/instances/{orthanc_id}/simplified-tags"))

    def files(self) -> list[bytes]:
        return [self.instance_file(i) for i in self.instances()]

    def received_stores(self) -> collections.Counter[str]:
        """How many times each SOP Instance UID was received by C-STORE (all runs of this
        Orthanc, duplicates included): shows whether a series was forwarded more than once."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return collections.Counter(m.group(1) for m in _STORE_LINE.finditer(text))

    def wait_for_instances(self, count: int, timeout: float) -> None:
        wait_for(lambda: self.instance_count() >= count, timeout, f"{count} instances in Orthanc")

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# dcmtk storescp / storescu


@dataclass
class StoreSCP:
    """dcmtk ``storescp`` writing every received instance to ``out_dir`` (TCP_NODELAY on)."""

    root: Path
    aet: str = "STORESCP"
    port: int = field(default_factory=free_port)
    tls: TlsFiles | None = None
    extra_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def out_dir(self) -> Path:
        return self.root / "received"

    def start(self, timeout: float = 15.0) -> StoreSCP:
        """Start storescp and wait until it answers a C-ECHO."""
        if self.process is not None:
            raise RuntimeError("storescp is already running")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        args = ["storescp", "--aetitle", self.aet, "--output-directory", str(self.out_dir)]
        args += ["--max-pdu", "131072", *self.extra_args]
        if self.tls is not None:
            args += ["+tls", str(self.tls.server_key), str(self.tls.server_cert)]
            args += ["+cf", str(self.tls.ca_cert), "--require-peer-cert"]
        args.append(str(self.port))
        log = (self.root / "storescp.log").open("ab")
        self.process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        log.close()

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"storescp exited early; see {self.root / 'storescp.log'}")
            return c_echo(self.port, self.aet, tls=self.tls, timeout=2.0) == 0

        try:
            wait_for(ready, timeout, "storescp C-ECHO", interval=0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def received(self) -> list[Path]:
        """Completely written files (storescp writes each file before it answers)."""
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def __enter__(self) -> StoreSCP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def storescu(
    paths: Sequence[Path],
    port: int,
    called_aet: str,
    calling_aet: str = "STORESCU",
    host: str = LOCALHOST,
    tls: TlsFiles | None = None,
    timeout: float = 600.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Send files (or directories, recursively) with dcmtk ``storescu`` over one association."""
    args = ["storescu", "--aetitle", calling_aet, "--call", called_aet]
    args += ["--scan-directories", "--recurse", "--max-pdu", "131072"]
    if tls is not None:
        args += ["+tls", str(tls.client_key), str(tls.client_cert), "+cf", str(tls.ca_cert)]
    args += [host, str(port), *(str(p) for p in paths)]
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


# ---------------------------------------------------------------------------------------------
# pytest fixtures


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A running Orthanc (AE ``ORTHANC``) accepting stores from any calling AE."""
    pacs = Orthanc(tmp_path / "orthanc")
    with contextlib.ExitStack() as stack:
        stack.callback(pacs.stop)
        pacs.start()
        yield pacs


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """A running dcmtk storescp (AE ``STORESCP``)."""
    scp = StoreSCP(tmp_path / "storescp")
    with contextlib.ExitStack() as stack:
        stack.callback(scp.stop)
        scp.start()
        yield scp
