"""Regenerate the fenced package `jobwire.v1` (client/jobwire/v1) from protos/.

    python scripts/generate_protos.py          # write the generated code
    python scripts/generate_protos.py --check  # exit 1 if it is out of date (CI)

This is the only script that writes generated code; nothing else edits it.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
THIRD_PARTY = ROOT / "third_party"
OUTPUT_ROOT = ROOT / "client"
PACKAGE_DIR = Path("jobwire") / "v1"
WELL_KNOWN = Path(grpc_tools.__file__).parent / "_proto"
BIN_DIR = Path(sys.executable).parent  # where mypy-protobuf installed its protoc plugins

INIT_TEXT = '"""Generated gRPC code for jobwire.v1. Do not edit: run scripts/generate_protos.py."""\n'


def generate(out_root: Path) -> None:
    """Run protoc with the Python, gRPC and mypy plugins into out_root."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{THIRD_PARTY}",
        f"-I{WELL_KNOWN}",
        f"--plugin=protoc-gen-mypy={BIN_DIR / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN_DIR / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out_root / PACKAGE_DIR / "__init__.py").write_text(INIT_TEXT)
    (out_root / PACKAGE_DIR / "py.typed").write_text("")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in code is stale")
    options = parser.parse_args()
    target = OUTPUT_ROOT / PACKAGE_DIR
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / PACKAGE_DIR
        if options.check:
            names = sorted(p.name for p in fresh.iterdir())
            existing = (
                sorted(p.name for p in target.iterdir() if p.name != "__pycache__") if target.exists() else []
            )
            _, mismatch, errors = filecmp.cmpfiles(fresh, target, names, shallow=False)
            if names != existing or mismatch or errors:
                print(
                    f"generated code in {target.relative_to(ROOT)} is stale: run scripts/generate_protos.py",
                    file=sys.stderr,
                )
                return 1
            print("generated code is up to date")
            return 0
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(fresh, target)
    print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
