"""The export package format, shared by the writer and the loader: file names, tensor specs, the
manifest's hashes, the one error type."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from dllm.runtime import RequestError

FORMATS = ("torchscript", "aoti")
MANIFEST = "manifest.txt"
DTYPES = {"int64": torch.int64, "float32": torch.float32, "bool": torch.bool, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "float64": torch.float64,
          "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32}     # the last three: quantized weights


class PackageError(RequestError):
    """An export package that is missing, damaged or inconsistent; one line says what is wrong."""


def spec(name: str, dtype, shape) -> str:
    """One input as 'name dtype d0 d1 ...' (a state.txt line; what a program records it expects)."""
    return " ".join([name, str(dtype).replace("torch.", ""), *map(str, shape)])


def state_lines(state: dict[str, torch.Tensor]) -> str:
    return "".join(spec(n, t.dtype, t.shape) + "\n" for n, t in state.items())


def fill_specs(prompt_bucket: int) -> list[str]:
    return [spec("padded", "int64", [1, prompt_bucket]), spec("n_pad", "int64", [1])]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_files(folder: Path) -> list[str]:
    """Every file of a package but the manifest, as sorted posix paths relative to the folder."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def format_files(plan: dict) -> list[str]:
    """The files a package of plan.json's format must hold (beside plan.json and the manifest)."""
    if plan["format"] == "aoti":
        return ["state.txt", "weights.safetensors"] + [f"aoti/{k}.pt2" for k in ["fill", *plan["kinds"]]]
    return ["steps.pt"]


# The package rule both loaders hold (load.py here, cpp/dllm_run.cpp), checked before anything is read:
# a package is plain files and folders, no symbolic link anywhere; manifest.txt lists every other file
# once as "<64 hex sha256>  <relative path>" with LF line ends (a CR is refused as such); the names stay
# inside the package; the hashes match; plan.json's format names files that are all there.
SYMLINK = "is a symbolic link; a package holds plain files only, export it again"
CRLF = "ends with a carriage return (CRLF); manifest.txt has LF line ends, export it again"


def write_manifest(folder: Path) -> None:
    (folder / MANIFEST).write_text("".join(f"{sha256(folder / f)}  {f}\n" for f in package_files(folder)))


