"""Build the operator and trainer images from the repository's Dockerfiles (`make images`).

    python -m devcluster.images build [--only operator|trainer] [--push REGISTRY | --push-local]
    python -m devcluster.images base        bootstrap (or re-import) the Debian base image only
    python -m devcluster.images list        the images, their tags and OCI archives

No registry is reachable from this machine, so the base image is made from Debian packages:
`debootstrap --variant=minbase` with python3 and a venv at /usr/local, which makes Debian's CPython
3.11 behave like the official python:3.11-slim-bookworm image (interpreter and site-packages
under /usr/local). The Dockerfiles stay standard (`docker build` works elsewhere); here they get
`--build-arg BASE_IMAGE=<that base>`. buildah builds with `--layers`, so an unchanged second build
takes seconds; the dependency layers are reused until pyproject.toml or constraints.txt change.

Each image is tagged `kubetune/<name>:<version>` (the version is kubetune_contract.__version__), labelled
with the OCI annotations source, version and revision, and saved as an OCI archive under
`.kubetune/images/<name>.oci.tar` (rewritten only when the image changed). `--push` copies them
to a plain-HTTP registry; `--push-local` to the running local cluster's loopback registry
(`make cluster-up` starts it), when one runs.

Build containers get the host's CA bundle mounted read-only for pip; it is never baked into an
image. Debian's buildah, podman, skopeo, runc and debootstrap are installed with apt-get when
missing; containers run with runc and the rlimits this machine permits (hack/containers.conf).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from devcluster import HACK, REPO
from devcluster.tools import cache_root

ARCHIVE_DIR = REPO / ".kubetune" / "images"
CONTAINERS_CONF = HACK / "containers.conf"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SOURCE_URL = "https://github.com/kubetune/kubetune"

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ["python3", "python3-venv", "ca-certificates"]
# Bump when the way the base is made changes: the cached rootfs archive is keyed on it.
BASE_RECIPE = 2

# command -> Debian package
TOOLS = {"buildah": "buildah", "podman": "podman", "skopeo": "skopeo", "runc": "runc",
         "conmon": "conmon", "debootstrap": "debootstrap"}


@dataclass(frozen=True)
class Image:
    name: str
    dockerfile: Path
    description: str

    def tag(self, version: str) -> str:
        return f"localhost/kubetune/{self.name}:{version}"

    @property
    def archive(self) -> Path:
        return ARCHIVE_DIR / f"{self.name}.oci.tar"


IMAGES = {
    "operator": Image("operator", REPO / "Dockerfile", "KubeTune operator"),
    "trainer": Image("trainer", REPO / "trainer_image" / "Dockerfile", "KubeTune LoRA / 8-bit / QLoRA trainer"),
}


def log(message: str) -> None:
    print(f"images: {message}", file=sys.stderr, flush=True)


def version() -> str:
    """The project version: kubetune_contract.__version__, its one source."""
    sys.path.insert(0, str(REPO / "contract"))
    from kubetune_contract import __version__

    return __version__


def revision() -> str:
    result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def container_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF), "BUILDAH_FORMAT": "oci"}


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        args, check=True, text=True, env=container_env(), **kwargs)
    return done


def ensure_tools() -> None:
    """apt-get install the container tools this machine lacks (idempotent: nothing when all are there)."""
    missing = sorted({package for command, package in TOOLS.items() if shutil.which(command) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"images: missing {', '.join(missing)}; install them (apt-get install {' '.join(missing)})")
    log(f"installing {' '.join(missing)} with apt-get")
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=apt_env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=apt_env)


def image_id(reference: str) -> str | None:
    result = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", reference],
                            capture_output=True, text=True, env=container_env())
    return result.stdout.strip() if result.returncode == 0 else None


def _base_key() -> str:
    recipe = json.dumps([BASE_RECIPE, DEBIAN_SUITE, DEBIAN_MIRROR, BASE_PACKAGES])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _bootstrap_rootfs(archive: Path) -> None:
    """debootstrap a minimal Debian with python3, make /usr/local a venv and tar the tree to ``archive``."""
    with tempfile.TemporaryDirectory(prefix="kubetune-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"bootstrapping Debian {DEBIAN_SUITE} (minbase + {', '.join(BASE_PACKAGES)}); about a minute")
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                        DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR], check=True, stdout=subprocess.DEVNULL)
        # /usr/local as a venv: `python` and `pip` on PATH, `pip install --prefix=/install` trees that
        # copy onto /usr/local land in its site-packages, as in the official python images.
        subprocess.run(["chroot", str(rootfs), "python3", "-m", "venv", "/usr/local"], check=True)
        # pip only, as in python:3.12+ images: a setuptools here would leave a second, stale
        # setuptools-*.dist-info next to the one an image installs with `pip install --prefix`.
        subprocess.run(["chroot", str(rootfs), "/usr/local/bin/python", "-m", "pip", "uninstall", "--quiet", "--yes",
                        "setuptools"], check=True)
        for path in ["var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale",
                     "usr/share/info"]:
            target = rootfs / path
            if target.is_dir():
                shutil.rmtree(target)
                target.mkdir()
        partial = archive.with_suffix(".partial")
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
        partial.rename(archive)


def base_image() -> str:
    """The base image's name: the recipe's key in the tag, so a changed recipe makes a new base."""
    return f"localhost/kubetune/python:3.11-{DEBIAN_SUITE}-{_base_key()}"


def ensure_base() -> str:
    """The base image in local storage: imported from the cached rootfs archive, bootstrapped when absent."""
    base = base_image()
    if image_id(base):
        return base
    cache = cache_root() / "images"
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"debian-{DEBIAN_SUITE}-python3-{_base_key()}.tar"
    if not archive.exists():
        _bootstrap_rootfs(archive)
    log(f"importing {archive.name} as {base}")
    run(["podman", "import",
         "--change", "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
         "--change", "ENV LANG=C.UTF-8",
         "--change", 'CMD ["python3"]',
         str(archive), base], stdout=subprocess.DEVNULL)
    return base


def build(image: Image, base: str, ver: str, rev: str) -> str:
    """buildah build with cached layers; returns the image ID."""
    annotations = {
        "org.opencontainers.image.source": SOURCE_URL,
        "org.opencontainers.image.version": ver,
        "org.opencontainers.image.revision": rev,
        "org.opencontainers.image.title": f"kubetune-{image.name}",
        "org.opencontainers.image.description": image.description,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    metadata: list[str] = []
    for key, value in annotations.items():
        metadata += ["--label", f"{key}={value}", "--annotation", f"{key}={value}"]
    log(f"building {image.tag(ver)} from {image.dockerfile.relative_to(REPO)}")
    run(["buildah", "build", "--layers", "--pull-never", "--format", "oci",
         "--build-arg", f"BASE_IMAGE={base}",
         "--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
         *metadata,
         "--tag", image.tag(ver), "--file", str(image.dockerfile), str(REPO)])
    built = image_id(image.tag(ver))
    if built is None:
        raise SystemExit(f"images: {image.tag(ver)} is missing after its build")
    return built


def save(image: Image, ver: str, built: str) -> None:
    """Write the OCI archive unless the one there already holds this image."""
    stamp = image.archive.with_suffix(".id")
    if image.archive.exists() and stamp.exists() and stamp.read_text().strip() == built:
        log(f"{image.archive.relative_to(REPO)} is up to date")
        return
    ARCHIVE_DIR.mkdir(parents=True, exist_ok=True)
    partial = image.archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    log(f"saving {image.archive.relative_to(REPO)}")
    run(["skopeo", "copy", "--quiet", f"containers-storage:{image.tag(ver)}",
         f"oci-archive:{partial}:kubetune/{image.name}:{ver}"])
    partial.rename(image.archive)
    stamp.write_text(built + "\n")


def push(image: Image, ver: str, registry: str) -> str:
    """Copy the image's OCI archive (compressed once, when saved) to a plain-HTTP registry on this
    machine; layers the registry has are skipped. Returns the image's reference there."""
    reference = f"{registry}/kubetune/{image.name}:{ver}"
    log(f"pushing {reference}")
    run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci-archive:{image.archive}",
         f"docker://{reference}"])
    return reference


TEST_DOUBLE_DOCKERFILE = REPO / "tests" / "e2e" / "fake_trainer.Dockerfile"
TEST_DOUBLE_PATH = "/opt/kubetune-test/fake_trainer.py"  # in the TEST DOUBLE image


def build_test_double(registry: str) -> str:
    """The e2e tests' TEST DOUBLE trainer (tests/e2e/fake_trainer.py) in an image FROM the operator
    image (Python and PyYAML, non-root), built with cached layers and pushed to ``registry``: its
    reference there. Never shipped: the e2e tests and the operator benchmark run it on a real node."""
    ensure_tools()
    ver = version()
    local = f"localhost/kubetune/trainer-test-double:{ver}"
    run(["buildah", "build", "--layers", "--pull-never", "--format", "oci", "--quiet",
         "--build-arg", f"BASE_IMAGE={IMAGES['operator'].tag(ver)}", "--tag", local,
         "--file", str(TEST_DOUBLE_DOCKERFILE), str(TEST_DOUBLE_DOCKERFILE.parent)], capture_output=True)
    reference = f"{registry}/kubetune/trainer-test-double:{ver}"
    run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"containers-storage:{local}",
         f"docker://{reference}"], capture_output=True)
    return reference

def local_registry() -> str | None:
    """host:port of the running local cluster's loopback registry (devcluster/cluster.py), if one is up."""
    state_path = Path(os.environ.get("KUBETUNE_CLUSTER_DIR", REPO / ".kubetune")) / "cluster.json"
    try:
        state = json.loads(state_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    registry = state.get("registry")
    return str(registry) if state.get("ready") and registry else None


def build_all(names: list[str], registry: str | None = None) -> dict[str, str]:
    """Build (and save, and push) the named images; returns name -> local tag."""
    ensure_tools()
    base = ensure_base()
    ver, rev = version(), revision()
    tags = {}
    for name in names:
        image = IMAGES[name]
        built = build(image, base, ver, rev)
        save(image, ver, built)
        if registry:
            push(image, ver, registry)
        tags[name] = image.tag(ver)
    return tags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build, tag, label and save the images")
    build_cmd.add_argument("--only", choices=sorted(IMAGES), action="append", help="build only this image")
    build_cmd.add_argument("--push", metavar="REGISTRY", help="also push to this plain-HTTP registry (host:port)")
    build_cmd.add_argument("--push-local", action="store_true",
                           help="also push to the running local cluster's loopback registry, if one is up")
    commands.add_parser("base", help="make the Debian base image only")
    commands.add_parser("list", help="print the images, tags and archives as JSON")
    args = parser.parse_args(argv)

    if args.command == "base":
        ensure_tools()
        print(ensure_base())
    elif args.command == "build":
        registry = args.push
        if args.push_local:
            registry = local_registry()
            if registry is None:
                log("no local cluster is up: nothing pushed (`make cluster-up` starts its registry)")
        tags = build_all(args.only or list(IMAGES), registry)
        for name, tag in tags.items():
            print(f"{name}\t{tag}\t{IMAGES[name].archive}")
    else:
        ver = version()
        listing = {name: {"tag": image.tag(ver), "id": image_id(image.tag(ver)), "archive": str(image.archive)}
                   for name, image in IMAGES.items()}
        print(json.dumps(listing, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
