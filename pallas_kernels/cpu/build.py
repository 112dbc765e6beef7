"""Builds the C++ CPU kernels into one shared library: `python -m pallas_kernels.cpu.build`.

The library holds the paged attention (ragged_paged_attention.cc), the packed-weight matmul
(packed_matmul.cc), the greedy token of an lm_head (greedy_lm_head.cc), the sampler's draw
(sampling.cc) and an allocation nothing writes (uninitialized.cc). Its file name carries a key
hashed from the sources, the jaxlib version, the compiler and its flags and the host CPU (the
flags include -march=native), so a stale build is never loaded. It goes next to the source when
that directory is writable (an editable install), else under the user cache directory
($XDG_CACHE_HOME or ~/.cache, then jpaged/cpu_kernels). The compiler is $CXX, else c++ or g++
from PATH.
"""

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jaxlib

SOURCE_DIR = Path(__file__).parent
SOURCES = (SOURCE_DIR / "ragged_paged_attention.cc", SOURCE_DIR / "packed_matmul.cc",
           SOURCE_DIR / "greedy_lm_head.cc", SOURCE_DIR / "sampling.cc", SOURCE_DIR / "uninitialized.cc")
HEADERS = (SOURCE_DIR / "ffi_helpers.h", SOURCE_DIR / "packed_matmul.h", SOURCE_DIR / "vector_math.h")
FLAGS = ("-std=c++17", "-O3", "-march=native", "-fPIC", "-shared")
LIBRARY_STEM = "cpu_kernels"


class BuildError(RuntimeError):
    """The kernel library could not be built; the message says why."""


def find_compiler() -> str:
    """The C++ compiler command: $CXX, else c++ or g++ from PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return name
    raise BuildError("no C++ compiler found (set $CXX, or install g++)")


def _cpu_signature() -> str:
    """The CPU's model and feature flags, since -march=native ties the build to them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def build_key(compiler: str) -> str:
    """Hash of everything that changes the built library."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    parts = [*(path.read_bytes() for path in SOURCES + HEADERS), jaxlib.__version__.encode(),
             compiler.encode(), version.encode(), " ".join(FLAGS).encode(), platform.machine().encode(),
             _cpu_signature().encode()]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def candidate_dirs() -> list[Path]:
    """Where a built library may live, in lookup order."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [SOURCE_DIR, cache_home / "jpaged" / "cpu_kernels"]


def library_name(key: str) -> str:
    return f"{LIBRARY_STEM}-{key}.so"


def find_library(key: str) -> Path | None:
    """An already built library for this key, if any."""
    for directory in candidate_dirs():
        path = directory / library_name(key)
        if path.is_file():
            return path
    return None


def _writable_dir() -> Path:
    for directory in candidate_dirs():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory
    raise BuildError(f"no writable directory for the library among {candidate_dirs()}")


def build(verbose: bool = False) -> Path:
    """Returns the library's path, compiling it first when no build for this key exists.

    Raises BuildError with the compiler's message when compilation fails.
    """
    compiler = find_compiler()
    key = build_key(compiler)
    found = find_library(key)
    if found is not None:
        return found
    directory = _writable_dir()
    target = directory / library_name(key)
    # Compile to a temporary name, then rename: concurrent builds never see a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".building-", dir=directory)
    os.close(fd)
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", tmp]
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
        os.replace(tmp, target)
        if directory == SOURCE_DIR:  # an editable install: drop builds of older sources
            for stale in directory.glob(f"{LIBRARY_STEM}-*.so"):
                if stale != target:
                    stale.unlink(missing_ok=True)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args()
    try:
        path = build(verbose=not args.quiet)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
