"""Released weights: sha256 checks against the bundle's ``large_files.yml`` and safe loading.

A bundle that is shared lists its released weight files in ``<bundle>/large_files.yml`` in the MONAI
model-zoo format, so ``python -m monai.bundle download_large_files --bundle_path <bundle>`` can fetch them::

    large_files:
      - path: "models/G_HP.pt"
        url: "https://.../G_HP.pt"
        hash_val: "<64 hex digits>"
        hash_type: "sha256"

This module reads and checks that file, refuses any listed weight file whose sha256 does not match (the error
names the file, the expected and the actual hash), and loads checkpoints only with
``torch.load(..., weights_only=True)`` (no pickled code is ever executed). Command line::

    python -m cmb_synthesis.training.weights --bundle_dir bundles/cmb_synthesis            # verify
    python -m cmb_synthesis.training.weights --bundle_dir bundles/cmb_synthesis --update   # rewrite from models/
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cmb_synthesis.data.io import atomic_output

PathLike = str | os.PathLike

__all__ = [
    "LARGE_FILES_NAME",
    "DEFAULT_PATTERNS",
    "DEFAULT_EXCLUDE",
    "WeightsHashError",
    "sha256_file",
    "find_large_files",
    "read_large_files",
    "verify_file",
    "verify_bundle",
    "expected_hash_for",
    "update_large_files",
    "load_weights",
    "load_network_weights",
    "main",
]

LARGE_FILES_NAME = "large_files.yml"
#: weight files that ``--update`` lists (relative to ``models/``)
DEFAULT_PATTERNS: tuple[str, ...] = ("*.pt", "*.pth", "*.ts", "*.onnx", "*.npz")
#: training checkpoints (resume state) are not released weights
DEFAULT_EXCLUDE: tuple[str, ...] = ("*checkpoint*", ".*")
_HASH_LEN = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}


class WeightsHashError(ValueError):
    """A weight file's hash does not match the value listed for it (a ``ValueError``)."""


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Return the lowercase hex sha256 of the file at ``path`` (read in chunks of ``chunk_size`` bytes).

    Raises:
        FileNotFoundError: ``path`` is not a file.
    """
    return _hash_file(path, "sha256", chunk_size)


def _hash_file(path: PathLike, hash_type: str, chunk_size: int = 1 << 20) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file does not exist")
    h = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def find_large_files(start: PathLike, max_levels: int = 3) -> Path | None:
    """Return the ``large_files.yml`` of the bundle holding ``start`` (a file or folder), or ``None``.

    Looks in ``start`` (if a folder) and up to ``max_levels`` parent folders, so both
    ``<bundle>/models/G_HP.pt`` and ``<bundle>`` find ``<bundle>/large_files.yml``.
    """
    p = Path(start).resolve()
    folder = p if p.is_dir() else p.parent
    for _ in range(max_levels + 1):
        for name in (LARGE_FILES_NAME, "large_files.yaml", "large_files.json"):
            cand = folder / name
            if cand.is_file():
                return cand
        if folder.parent == folder:
            break
        folder = folder.parent
    return None


def read_large_files(path: PathLike) -> list[dict[str, Any]]:
    """Read and validate a model-zoo ``large_files.yml`` (or a bundle folder containing one).

    Returns:
        the entries, each a dict with ``path`` (relative to the bundle folder), ``hash_val`` (lowercase hex),
        ``hash_type`` (``md5``/``sha1``/``sha256``/``sha512``, default ``sha256``) and ``url`` (may be empty).

    Raises:
        FileNotFoundError: no such file (or the folder has no ``large_files.yml``).
        ValueError: not YAML/JSON, no ``large_files`` list, or an entry misses ``path``/``hash_val``, has an
            unknown hash type, a malformed hash, an absolute path or one that leaves the bundle folder.
    """
    path = Path(path)
    if path.is_dir():
        found = find_large_files(path, max_levels=0)
        if found is None:
            raise FileNotFoundError(f"{path / LARGE_FILES_NAME}: no large_files.yml in bundle folder {path}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"{path}: large files list does not exist")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML/JSON ({e})") from e
    if not isinstance(content, Mapping) or not isinstance(content.get("large_files"), list):
        raise ValueError(f"{path}: expected a mapping with a 'large_files' list")
    entries = []
    for n, item in enumerate(content["large_files"]):
        where = f"{path}: large_files[{n}]"
        if not isinstance(item, Mapping) or not item.get("path"):
            raise ValueError(f"{where}: entry needs a 'path'")
        rel = str(item["path"])
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"{where}: path '{rel}' must be relative to the bundle folder and stay inside it")
        hash_type = str(item.get("hash_type") or "sha256").lower()
        if hash_type not in _HASH_LEN:
            raise ValueError(f"{where}: unsupported hash_type '{hash_type}' (use one of {sorted(_HASH_LEN)})")
        hash_val = str(item.get("hash_val") or "").lower()
        if len(hash_val) != _HASH_LEN[hash_type] or any(c not in "0123456789abcdef" for c in hash_val):
            raise ValueError(f"{where}: '{rel}' has no valid {hash_type} hash_val (got '{item.get('hash_val')}')")
        entries.append({"path": rel, "url": str(item.get("url") or ""), "hash_val": hash_val, "hash_type": hash_type})
    return entries


def verify_file(path: PathLike, expected: str, hash_type: str = "sha256") -> str:
    """Check that the file at ``path`` has hash ``expected``; return the hash.

    Raises:
        FileNotFoundError: the file does not exist.
        WeightsHashError: the hash differs; the message names the file, the expected and the actual hash.
    """
    actual = _hash_file(path, hash_type.lower())
    if actual != str(expected).lower():
        raise WeightsHashError(
            f"{path}: {hash_type} mismatch, refusing to use these weights: expected {str(expected).lower()}, "
            f"actual {actual}. Download the released file again, or if you trained it yourself run "
            f"'python -m cmb_synthesis.training.weights --bundle_dir <bundle> --update'."
        )
    return actual


def verify_bundle(bundle_dir: PathLike, missing_ok: bool = False) -> list[Path]:
    """Verify every file listed in ``bundle_dir/large_files.yml``; return the verified paths.

    Bundle configs can call it before loading weights, e.g.
    ``"$cmb_synthesis.training.weights.verify_bundle(@bundle_root)"``.

    Args:
        bundle_dir: the bundle folder (holding ``large_files.yml``).
        missing_ok: skip listed files that are not present (instead of raising ``FileNotFoundError``).

    Raises:
        FileNotFoundError: no ``large_files.yml``, or a listed file is missing and ``missing_ok`` is False.
        WeightsHashError: a listed file's hash does not match.
    """
    bundle_dir = Path(bundle_dir)
    verified = []
    for entry in read_large_files(bundle_dir):
        target = bundle_dir / entry["path"]
        if not target.is_file():
            if missing_ok:
                continue
            raise FileNotFoundError(
                f"{target}: listed in {bundle_dir / LARGE_FILES_NAME} but missing "
                f"(python -m monai.bundle download_large_files --bundle_path {bundle_dir})"
            )
        verify_file(target, entry["hash_val"], entry["hash_type"])
        verified.append(target)
    return verified


def expected_hash_for(path: PathLike, large_files: PathLike | None = None) -> tuple[str, str] | None:
    """Return ``(hash_val, hash_type)`` listed for weight file ``path``, or ``None`` if it is not listed.

    ``large_files`` is the list to use; by default the bundle's (see :func:`find_large_files`). Entries are
    matched by resolved path (entry paths are relative to the folder of the ``large_files.yml``).
    """
    lf = Path(large_files) if large_files is not None else find_large_files(path)
    if lf is None:
        return None
    if lf.is_dir():
        lf = lf / LARGE_FILES_NAME
    target = Path(path).resolve()
    for entry in read_large_files(lf):
        if (lf.parent / entry["path"]).resolve() == target:
            return entry["hash_val"], entry["hash_type"]
    return None


def _list_weight_files(models_dir: Path, patterns: Sequence[str], exclude: Sequence[str]) -> list[Path]:
    files = []
    for f in sorted(models_dir.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(models_dir).as_posix()
        if any(fnmatch.fnmatch(f.name, p) or fnmatch.fnmatch(rel, p) for p in exclude):
            continue
        if any(fnmatch.fnmatch(f.name, p) for p in patterns):
            files.append(f)
    return files


def update_large_files(
    bundle_dir: PathLike,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    url_base: str | None = None,
) -> Path:
    """(Re)write ``bundle_dir/large_files.yml`` from the weight files in ``bundle_dir/models/``.

    Each file matching ``patterns`` and none of ``exclude`` is listed with its sha256. URLs are kept from the
    existing list for unchanged paths; new entries get ``url_base + <file name>`` (or an empty URL until the
    weights are published). The file is written atomically.

    Raises:
        FileNotFoundError: ``bundle_dir/models`` does not exist.
        ValueError: no weight files found.
    """
    bundle_dir = Path(bundle_dir)
    models_dir = bundle_dir / "models"
    if not models_dir.is_dir():
        raise FileNotFoundError(f"{models_dir}: bundle has no models/ folder")
    files = _list_weight_files(models_dir, patterns, exclude)
    if not files:
        raise ValueError(f"{models_dir}: no weight files matching {list(patterns)} (excluding {list(exclude)})")
    old_urls: dict[str, str] = {}
    lf_path = bundle_dir / LARGE_FILES_NAME
    if lf_path.is_file():
        try:
            old_urls = {e["path"]: e["url"] for e in read_large_files(lf_path)}
        except ValueError:
            old_urls = {}
    entries = []
    for f in files:
        rel = f.relative_to(bundle_dir).as_posix()
        url = old_urls.get(rel) or (url_base.rstrip("/") + "/" + f.name if url_base else "")
        entries.append({"path": rel, "url": url, "hash_val": sha256_file(f), "hash_type": "sha256"})
    text = (
        "# Released weights of this bundle (MONAI model-zoo format). Weights whose sha256 differs are refused.\n"
        "# Regenerate: python -m cmb_synthesis.training.weights --bundle_dir <bundle> --update\n"
        + yaml.safe_dump({"large_files": entries}, sort_keys=False)
    )
    with atomic_output(lf_path) as tmp:
        tmp.write_text(text)
    return lf_path


def load_weights(
    path: PathLike,
    expected_sha256: str | None = None,
    map_location: Any = "cpu",
    large_files: PathLike | None | bool = True,
) -> Any:
    """Load a checkpoint with ``torch.load(path, weights_only=True)`` after checking its hash.

    Args:
        path: the ``.pt`` file (a state dict or a dict of state dicts).
        expected_sha256: the sha256 it must have. If ``None`` and ``large_files`` is true, the hash listed for
            this file in its bundle's ``large_files.yml`` is used (if the file is listed there).
        map_location: passed to ``torch.load`` (e.g. ``"cpu"`` or ``"cuda:0"``).
        large_files: ``True`` to look up the bundle's list, a path to use that list, ``False``/``None`` to
            check only ``expected_sha256``.

    Raises:
        FileNotFoundError: no such file.
        WeightsHashError: the hash does not match.
        ValueError: the file is not a loadable weights-only checkpoint (e.g. it pickles code).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file does not exist")
    if expected_sha256 is not None:
        verify_file(path, expected_sha256, "sha256")
    elif large_files:
        listed = expected_hash_for(path, None if large_files is True else large_files)  # type: ignore[arg-type]
        if listed is not None:
            verify_file(path, *listed)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError for unsafe or corrupt files
        raise ValueError(f"{path}: not a weights-only PyTorch checkpoint ({type(e).__name__}: {e})") from e


def load_network_weights(
    network: Any,
    path: PathLike,
    key: str | None = None,
    expected_sha256: str | None = None,
    map_location: Any = "cpu",
    strict: bool = True,
) -> Any:
    """Load ``path`` (checked as in :func:`load_weights`) into ``network`` and return the network.

    ``key`` selects one state dict of a nested checkpoint (e.g. ``"G_HP"`` of a CycleGAN checkpoint holding
    ``{"G_HP": ..., "G_PH": ..., "optimizer_G": ...}``). A ``module.`` prefix (DDP) is stripped.
    """
    state = load_weights(path, expected_sha256=expected_sha256, map_location=map_location)
    if key:
        if not isinstance(state, Mapping) or key not in state:
            keys = list(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"{path}: checkpoint has no entry '{key}' (has {keys})")
        state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    if state and all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module.") :]: v for k, v in state.items()}
    target = network.module if hasattr(network, "module") else network
    target.load_state_dict(state, strict=strict)
    return network


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: verify (default) or rewrite (``--update``) ``<bundle_dir>/large_files.yml``; return exit status."""
    parser = argparse.ArgumentParser(prog="python -m cmb_synthesis.training.weights", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle_dir", required=True, help="bundle folder holding models/ and large_files.yml")
    parser.add_argument("--update", action="store_true", help="rewrite large_files.yml from the files in models/")
    parser.add_argument("--url_base", default=None, help="with --update: URL prefix for newly listed files")
    parser.add_argument("--pattern", action="append", default=None, help="file-name glob to list (repeatable)")
    parser.add_argument("--exclude", action="append", default=None, help="file-name glob to skip (repeatable)")
    parser.add_argument("--missing_ok", action="store_true", help="verify: skip listed files that are absent")
    args = parser.parse_args(argv)
    try:
        if args.update:
            out = update_large_files(
                args.bundle_dir,
                patterns=tuple(args.pattern) if args.pattern else DEFAULT_PATTERNS,
                exclude=tuple(args.exclude) if args.exclude else DEFAULT_EXCLUDE,
                url_base=args.url_base,
            )
            for entry in read_large_files(out):
                print(f"listed {entry['path']} sha256={entry['hash_val']}")
            print(f"wrote {out}")
        else:
            verified = verify_bundle(args.bundle_dir, missing_ok=args.missing_ok)
            for p in verified:
                print(f"OK {p}")
            print(f"{len(verified)} file(s) verified against {Path(args.bundle_dir) / LARGE_FILES_NAME}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
