"""Regenerate the Python stubs of the ``cnp.v1`` API (``make proto``).

The ``.proto`` sources live in ``proto/cnp/v1``; protoc runs with ``proto/`` as the import
root, so the generated modules import each other as ``cnp.v1.<name>_pb2`` (the package
``cnp.v1`` is installed from that directory). ``google/longrunning/operations.proto`` is
shipped by googleapis-common-protos under another file name (``operations_proto.proto``),
so it is staged into a temporary include directory under its import path.

``--image FILE`` writes the API as a descriptor set with its imports and source info, the
image ``buf lint``, ``buf breaking`` and ``buf generate`` read (tests/test_api_toolchain.py):
the same protoc and includes as the stubs, so no Buf Schema Registry or network is needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """The API's .proto sources under the import root ``root``, sorted."""
    return sorted((Path(root) / "cnp" / "v1").glob("*.proto"))


@contextmanager
def _include_args(root: Path) -> Iterator[list[str]]:
    """protoc's -I flags: the API, the well-known types and googleapis-common-protos."""
    well_known = _package_dir("grpc_tools") / "_proto"
    longrunning = _package_dir("google.longrunning")
    common = longrunning.parent.parent  # the directory holding google/api, google/rpc
    with tempfile.TemporaryDirectory() as staged:
        target = Path(staged) / "google" / "longrunning" / "operations.proto"
        target.parent.mkdir(parents=True)
        shutil.copyfile(longrunning / "operations_proto.proto", target)
        yield [f"-I{root}", f"-I{well_known}", f"-I{staged}", f"-I{common}"]


def _protoc(*args: str, root: Path = PROTO_ROOT) -> None:
    from grpc_tools import protoc

    sources = [str(p.relative_to(root)) for p in proto_files(root)]
    with _include_args(root) as includes:
        code = protoc.main(["grpc_tools.protoc", *includes, *args, *sources])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")


def generate(out_dir: Path | None = None) -> list[Path]:
    """Run protoc on ``cnp/v1/*.proto``; write ``cnp/v1/*_pb2*.py`` under ``out_dir``.

    ``out_dir`` defaults to ``proto/`` (in place). Returns the generated files.
    """
    out = Path(out_dir) if out_dir is not None else PROTO_ROOT
    (out / "cnp" / "v1").mkdir(parents=True, exist_ok=True)
    _protoc(f"--python_out={out}", f"--grpc_python_out={out}")
    return sorted((out / "cnp" / "v1").glob("*_pb2*.py"))


def build_image(path: Path, root: Path = PROTO_ROOT) -> Path:
    """Write the API's descriptor set (imports and source info included) to ``path``.

    ``root``: the import root holding ``cnp/v1/*.proto`` (another one checks a variant).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _protoc(
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={path}",
        root=Path(root),
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output root (default: proto/)")
    parser.add_argument(
        "--image",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the API's descriptor set (a Buf image) to FILE instead of the stubs",
    )
    args = parser.parse_args(argv)
    paths = [build_image(args.image)] if args.image else generate(args.out)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
