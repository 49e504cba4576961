"""Cost of file containment: per file, the stat and read the file source does through the watched directory's
descriptor (a walk of the relative path with O_NOFOLLOW on each component) versus the same stat and read by a
plain path string (the kernel resolves the path, following any symlink), at several directory depths, in the
same run and interleaved round by round.

    python bench/file_fdwalk.py [--files 2000] [--rounds 9]

Prints µs per file (median of the rounds) for stat alone and for stat + read + JSON decode, and the difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bridge.sources.file._state import PathFilter, Tree, decode, read_content

_DEPTHS = (0, 1, 3)


def _make(root: Path, depth: int, files: int) -> list[str]:
    sub = "/".join(f"level{i}" for i in range(depth))
    (root / sub).mkdir(parents=True, exist_ok=True)
    rels = []
    for i in range(files):
        rel = f"{sub}/f{i}.json" if sub else f"f{i}.json"
        (root / rel).write_text(f'{{"n": {i}, "note": "a small file"}}')
        rels.append(rel)
    return rels


def _contained(tree: Tree, rels: list[str], read: bool) -> float:
    started = time.perf_counter()
    for rel in rels:
        version = tree.stat(rel)
        if read and version is not None:
            read_content(tree.dir, rel, "json", 1 << 20, version)
    return (time.perf_counter() - started) / len(rels) * 1e6


def _by_path(root: Path, rels: list[str], read: bool) -> float:
    started = time.perf_counter()
    for rel in rels:
        path = os.path.join(root, rel)
        st = os.lstat(path)
        if read:
            with open(path, "rb") as fh:
                os.fstat(fh.fileno())
                data = fh.read(st.st_size + 1)  # as read_content does
                os.fstat(fh.fileno())
            decode(path, data, "json")
    return (time.perf_counter() - started) / len(rels) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for depth in _DEPTHS:
            root = Path(tmp) / f"depth{depth}"
            root.mkdir()
            rels = _make(root, depth, args.files)
            tree = Tree(root, True, PathFilter(["*.json"], [], None))
            try:
                runs: dict[str, list[float]] = {"stat path": [], "stat fd": [], "read path": [], "read fd": []}
                for _ in range(args.rounds):
                    runs["stat path"].append(_by_path(root, rels, read=False))
                    runs["stat fd"].append(_contained(tree, rels, read=False))
                    runs["read path"].append(_by_path(root, rels, read=True))
                    runs["read fd"].append(_contained(tree, rels, read=True))
            finally:
                tree.close()
            m = {k: statistics.median(v) for k, v in runs.items()}
            print(
                f"depth {depth}: stat {m['stat path']:.1f} µs by path, {m['stat fd']:.1f} µs contained "
                f"(+{m['stat fd'] - m['stat path']:.1f}); stat+read {m['read path']:.1f} µs by path, "
                f"{m['read fd']:.1f} µs contained (+{m['read fd'] - m['read path']:.1f})"
            )


if __name__ == "__main__":
    main()
