"""Regenerate the Python stubs of the ``cnp.v1`` API (``make proto``).

The ``.proto`` sources live in ``proto/cnp/v1``; protoc runs with ``proto/`` as the import
root, so the generated modules import each other as ``cnp.v1.<name>_pb2`` (the package
``cnp.v1`` is installed from that directory). ``google/longrunning/operations.proto`` is
shipped by googleapis-common-protos under another file name (``operations_proto.proto``),
so it is staged into a temporary include directory under its import path.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
API_DIR = PROTO_ROOT / "cnp" / "v1"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"{name} is not installed (pip install grpcio-tools googleapis-common-protos)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def proto_files() -> list[Path]:
    """The API's .proto sources, sorted."""
    return sorted(API_DIR.glob("*.proto"))


def generate(out_dir: Path | None = None) -> list[Path]:
    """Run protoc on ``cnp/v1/*.proto``; write ``cnp/v1/*_pb2*.py`` under ``out_dir``.

    ``out_dir`` defaults to ``proto/`` (in place). Returns the generated files.
    """
    from grpc_tools import protoc

    out = Path(out_dir) if out_dir is not None else PROTO_ROOT
    (out / "cnp" / "v1").mkdir(parents=True, exist_ok=True)
    well_known = _package_dir("grpc_tools") / "_proto"
    longrunning = _package_dir("google.longrunning")
    common = longrunning.parent.parent  # the directory holding google/api, google/rpc
    with tempfile.TemporaryDirectory() as staged:
        target = Path(staged) / "google" / "longrunning" / "operations.proto"
        target.parent.mkdir(parents=True)
        shutil.copyfile(longrunning / "operations_proto.proto", target)
        sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"-I{staged}",
            f"-I{common}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *sources,
        ]
        code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return sorted((out / "cnp" / "v1").glob("*_pb2*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output root (default: proto/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
