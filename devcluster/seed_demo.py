"""Seed an S3 store (the local cluster's MinIO by default) with the quickstart's tiny backbone and data.

    python -m devcluster.seed_demo [--dir .kubetune] [--bucket kubetune-demo]

Builds the assets locally (devcluster/tiny.py: random-weight Llama-architecture model, locally trained
tokenizer, synthetic instruction data; no downloads) once into <dir>/demo-assets/, then uploads
them to the layout the examples expect:

    s3://<bucket>/models/tiny-llama/...     s3://<bucket>/data/train.jsonl, data/validation.jsonl
    s3://<bucket>/data/preference-train.jsonl, data/preference-validation.jsonl   (examples/dpo.yaml)
    s3://<bucket>/data/conversations.jsonl                                      (examples/conversation.yaml)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devcluster import REPO, tiny

BUCKET = "kubetune-demo"


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def build_assets(root: Path) -> Path:
    """The tiny backbone and dataset, built once and reused."""
    if not (root / "backbone" / "config.json").exists():
        tiny.build_tiny_backbone(root / "backbone")
        tiny.write_dataset(root / "data" / "train.jsonl", 256, seed=0)
        tiny.write_dataset(root / "data" / "validation.jsonl", 32, seed=1)
    extra: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "preference-train.jsonl": lambda: tiny.make_preference_rows(256, seed=0),
        "preference-validation.jsonl": lambda: tiny.make_preference_rows(32, seed=1),
        "conversations.jsonl": lambda: tiny.make_conversation_rows(256, seed=2),
    }
    for name, rows in extra.items():
        if not (root / "data" / name).exists():
            tiny.write_rows(root / "data" / name, rows())
    return root


def seed(endpoint: str, access_key: str, secret_key: str, assets: Path, bucket: str = BUCKET) -> list[str]:
    """Upload the assets (plain HTTP endpoint host:port); return the object keys."""
    from minio import Minio

    client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=False)
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    keys = []
    for local, prefix in ((assets / "backbone", "models/tiny-llama"), (assets / "data", "data")):
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(local).as_posix()}"
            client.fput_object(bucket, key, str(path))
            keys.append(key)
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=REPO / ".kubetune", help="local cluster directory")
    parser.add_argument("--bucket", default=BUCKET)
    args = parser.parse_args()
    env = read_env(args.dir / "minio.env")
    assets = build_assets(args.dir / "demo-assets")
    keys = seed(env["MINIO_ENDPOINT"], env["MINIO_ACCESS_KEY"], env["MINIO_SECRET_KEY"], assets, args.bucket)
    print(f"seeded s3://{args.bucket}/ with {len(keys)} objects (models/tiny-llama/, data/)")


if __name__ == "__main__":
    main()
