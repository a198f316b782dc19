"""Generates the gRPC stubs from Tollgate's .proto files when the package is
built (wheel or editable install), so they always match the server they are
built next to and are never edited or committed."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PROTOS = ("common", "quota", "admin")


class ProtoStubs(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "tollgate-proto-stubs"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        from grpc_tools import protoc

        root = Path(self.root)
        # From an sdist the protos sit in the package; in the repository,
        # two levels up.
        protos = next(
            (p for p in (root / "proto", root.parent.parent / "proto") if (p / "tollgate/v1").is_dir()),
            None,
        )
        if protos is None:
            raise RuntimeError(f"no proto/tollgate/v1 next to {root} or two levels up")
        out = root / "src"
        well_known = importlib.resources.files("grpc_tools") / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{protos}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(str(protos / f"tollgate/v1/{name}.proto") for name in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"grpc_tools.protoc failed: {' '.join(args)}")
        # Ignored by git: named, so that the wheel includes them whatever
        # ignore file the build reads.
        build_data["artifacts"].append("src/tollgate/v1/*_pb2*.py*")
