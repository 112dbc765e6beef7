"""Writes a real-English-text corpus for benchmark prompts: the plain-text pydoc pages of a fixed
list of standard-library modules (~1.4 MB), so every machine has the same text without a network.

    python scripts/make_corpus.py /tmp/corpus.txt

Deterministic for a given Python minor version (the stdlib's docstrings change between versions):
the FILE and DATA sections of each page (install path; reprs of module globals, os.environ among
them) are left out, and so are object addresses in default-value reprs.
"""

import argparse
import importlib
import pydoc
import re

MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "email.message", "functools", "http.client", "inspect", "itertools", "json",
    "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "string",
    "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile",
)
# The FILE (install path) and DATA (module globals' reprs: os.environ!) sections of a pydoc page,
# each up to the next heading (an unindented line) or the end of the page.
_MACHINE_SECTIONS = re.compile(r"^(?:FILE|DATA)\n(?:[ \t]*\n|[ \t]+.*\n?)*", re.MULTILINE)
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # reprs of default values: differ per process


def render_corpus() -> str:
    """The pydoc pages of MODULES, joined by blank lines."""
    pages = []
    for name in MODULES:
        page = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        pages.append(_ADDRESS.sub("", _MACHINE_SECTIONS.sub("", page)))
    return "\n\n".join(pages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the text file to write")
    args = parser.parse_args()
    text = render_corpus()
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {len(text.encode())} bytes ({len(MODULES)} modules) to {args.out}")


if __name__ == "__main__":
    main()
