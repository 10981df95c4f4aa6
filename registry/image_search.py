"""Find copies of query images with a registered descriptor model (``isc search``).

Pulls a pyfunc (default ``models:/isc-descriptor@champion``), describes the reference images once and
keeps them in a faiss index saved next to ``--index``:

    <index>             faiss IndexFlatIP over the reference descriptors [n_ref, 256] float32
    <index>.ids.txt     reference ids, one per line, in index row order
    <index>.meta.json   which model version built it (name/version/model id) and which references

The index is reloaded instead of rebuilt when the meta file names the same model version (an alias is
resolved to its version first, so moving ``@champion`` invalidates the index) and the same reference
files (ids, sizes, modification times). A local model folder is identified by the SHA-256 of its files
(weights, pyfunc artifacts, code), not by its path: another model copied to the same path rebuilds.
Queries are described with the same model, searched exactly
(GPU when faiss has one) and the top-k references per query are returned with their score, the inner
product of unit vectors (cosine similarity, higher = more similar; -squared L2 = 2 x score - 2).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from isc.contract import ModelRef, model_version_uri
from isc.errors import ConfigError
from isc.fileutil import atomic_path, check_outputs, special_file_kind
from isc.tracking import configure
from registry.model_logging import ISC_PACKAGE_DIR, MODEL_CODE_PATH

log = logging.getLogger(__name__)

INDEX_FORMAT = 1


@dataclass
class SearchResult:
    """Top-k matches: one row per (query, rank); ``table`` is the same as a DataFrame."""

    query_ids: list[str]
    reference_ids: list[str]
    ranks: list[int]
    scores: np.ndarray  # float32 [n_rows], cosine similarity
    index_reused: bool
    model: dict[str, str]

    @property
    def table(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"query_id": self.query_ids, "rank": self.ranks, "reference_id": self.reference_ids,
                             "score": self.scores})


def model_identity(model_uri: str) -> dict[str, str]:
    """``{"uri", "name", "version", "model_id"}`` of ``model_uri``, aliases resolved to their version.

    Non-registry URIs (``runs:/``, ``models:/m-...``, local paths) are identified by the URI itself.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException


    uri = model_uri.strip()
    if not uri.startswith("models:/"):
        local = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
        if local.exists():  # a path says nothing about what is there now: key on the content
            return {"uri": uri, "resolved_uri": uri, "content_sha256": model_content_hash(local)}
        return {"uri": uri, "resolved_uri": uri}
    ref = ModelRef.parse(uri)
    if not ref.is_registry:
        return {"uri": uri, "resolved_uri": uri}  # models:/m-<id>: already immutable
    configure(check=True)
    client = MlflowClient()
    try:
        if ref.kind == "alias":
            mv = client.get_model_version_by_alias(ref.name, ref.alias)
        else:
            mv = client.get_model_version(ref.name, ref.version)
    except MlflowException as exc:
        raise ConfigError("model", f"{model_uri}: not found in the model registry ({exc.message})") from exc
    return {
        "uri": uri,
        "name": mv.name,
        "version": str(mv.version),
        "model_id": str(getattr(mv, "model_id", "") or ""),
        "resolved_uri": model_version_uri(mv.name, mv.version),
    }


def model_content_hash(path: Path) -> str:
    """SHA-256 over the relative names and bytes of every file of a model folder (or of one file).

    ``__pycache__``/``*.pyc`` are skipped: loading the pyfunc compiles its bundled code in place.
    """
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        h.update(f"{f.relative_to(path) if f != path else f.name}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _same_model(meta_model: dict[str, str], ident: dict[str, str]) -> bool:
    return all(meta_model.get(k) == ident.get(k) for k in ("resolved_uri", "content_sha256"))


TRUST_HINT = ("loading an MLflow pyfunc runs the Python code it was saved with; pass --trust-model-code true "
              "only for a model whose code you trust")


def _pyfunc_flavor(model_uri: str, local: Path | None) -> dict[str, Any]:
    """The ``python_function`` section of the model's MLmodel file (only that file is read or fetched)."""
    import yaml

    try:
        if local is not None:
            flavors = (yaml.safe_load((local / "MLmodel").read_text()) or {}).get("flavors", {})
        else:
            import mlflow

            flavors = mlflow.models.get_model_info(model_uri).flavors
    except Exception as exc:  # noqa: BLE001 -- OSError, YAMLError, MlflowException...
        raise ConfigError("model", f"{model_uri}: cannot read its MLmodel file ({exc})") from exc
    flavor = (flavors or {}).get("python_function")
    if not isinstance(flavor, dict):
        raise ConfigError("model", f"{model_uri}: not an MLflow pyfunc model (no python_function flavor)")
    return flavor


def _foreign_code(folder: Path) -> list[str]:
    """Files of a local model folder that could run code and are not this checkout's own code."""

    foreign = []
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        rel = f.relative_to(folder)
        if f.suffix in (".pkl", ".pickle", ".cloudpickle", ".so"):
            foreign.append(str(rel))
        elif f.suffix == ".py":
            if rel.parts == (MODEL_CODE_PATH.name,):
                own = MODEL_CODE_PATH
            elif rel.parts[:2] == ("code", "isc"):
                own = ISC_PACKAGE_DIR.joinpath(*rel.parts[2:])
            else:
                own = None
            if own is None or not own.is_file() or own.read_bytes() != f.read_bytes():
                foreign.append(str(rel))
    return foreign


def check_model_code(model_uri: str, trust: bool = False) -> None:
    """Refuse, before anything is loaded, a pyfunc that is not one of this project's descriptor models.

    Checkpoints are read weights-only; a pyfunc cannot be: loading it imports its code, and a
    cloudpickled ``python_model`` runs arbitrary code on unpickling. Without ``trust`` a model must be
    a models-from-code ``descriptor_model.py`` pyfunc (what ``registry.model_logging`` logs); a local
    folder must moreover hold only this checkout's code (``descriptor_model.py`` and ``code/isc``).
    """
    if trust:
        return
    uri = model_uri.strip()
    local = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
    local = local if local.is_dir() else None
    flavor = _pyfunc_flavor(uri, local)
    code = str(flavor.get("model_code_path") or "")
    if "python_model" in flavor or Path(code).name != "descriptor_model.py":
        what = flavor.get("python_model") or code or flavor.get("loader_module") or "unknown"
        raise ConfigError("model", f"{model_uri} is not an isc descriptor model (its pyfunc is {what}); {TRUST_HINT}")
    if local is not None:
        foreign = _foreign_code(local)
        if foreign:
            raise ConfigError("model", f"{model_uri} holds code that is not this isc's ({', '.join(foreign[:5])}); "
                                       f"{TRUST_HINT}")


def load_descriptor_model(model_uri: str, trust: bool = False) -> tuple[Any, dict[str, str]]:
    """``(pyfunc, identity)``: the model is loaded through its resolved (version-pinned) URI, after
    :func:`check_model_code` (unless ``trust``)."""
    import mlflow

    ident = model_identity(model_uri)
    check_model_code(ident["resolved_uri"], trust)
    try:
        model = mlflow.pyfunc.load_model(ident["resolved_uri"])
    except Exception as exc:  # noqa: BLE001 -- MlflowException, OSError...
        raise ConfigError("model", f"{model_uri}: cannot load the model ({exc})") from exc
    return model, ident


def collect_images(sources: list[str | Path], param: str) -> list[tuple[str, Path]]:
    """``(id, path)`` from folders and/or image files (id = file stem), sorted by id, ids unique."""
    from isc.data.disc21 import list_images

    items: dict[str, Path] = {}
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            found = list_images(p)
        elif p.is_file():
            found = [(p.stem, p)]
        elif kind := special_file_kind(p):
            raise ConfigError(param, f"{src}: is a {kind}, not an image file or folder")
        else:
            raise ConfigError(param, f"{src}: no such image file or folder")
        for image_id, path in found:
            if image_id in items and items[image_id] != path:
                raise ConfigError(param, f"two images share the id '{image_id}': {items[image_id]} and {path}")
            items[image_id] = path
    if not items:
        raise ConfigError(param, f"no image found in {', '.join(map(str, sources))}")
    return sorted(items.items())


def is_search_index(index_path: Path) -> bool:
    """True when ``index_path`` is an index ``isc search`` wrote: a faiss file with its ``.ids.txt`` and a
    ``.meta.json`` of this format beside it (the only files ``--index`` may replace)."""
    ids_path, meta_path = _side_paths(index_path)
    try:
        meta = json.loads(meta_path.read_text())
        with open(index_path, "rb") as fh:
            magic = fh.read(4)
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and meta.get("format") == INDEX_FORMAT and ids_path.is_file()
            and magic.startswith(b"IxF"))


def check_output_paths(index_path: Path, output: str | Path | None, images: list[tuple[str, Path]],
                       overwrite: bool = False) -> None:
    """The project's output rule (:func:`isc.fileutil.check_outputs`) for the index set and the CSV.

    ``--index`` is a cache this command owns: an index it wrote is reused or rebuilt, but any other
    existing file there (or beside it) is refused, ``--overwrite`` or not -- it could be anything (a
    ground-truth CSV, another tool's index). An existing ``--output`` is replaced only with ``overwrite``;
    neither may be an input image or the other output.
    """

    ids_path, meta_path = _side_paths(index_path)
    index_files = {"index": index_path, "index ids": ids_path, "index meta": meta_path}
    inputs = {f"input image '{image_id}'": p for image_id, p in images}
    check_outputs(index_files, inputs, overwrite=True, param="index")
    present = [str(p) for p in index_files.values() if p.exists() or p.is_symlink()]
    if present and not is_search_index(index_path):
        raise ConfigError("index", f"{', '.join(present)} exist(s) but {index_path} is not an index written by "
                                   f"isc search (no {meta_path.name} of format {INDEX_FORMAT} beside a faiss "
                                   "file); it is never replaced: remove it or choose another --index")
    if output:
        check_outputs({"--output": output}, {**inputs, **index_files}, overwrite, param="output")


def _references_fingerprint(items: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for image_id, path in items:
        st = path.stat()
        h.update(f"{image_id}\t{path.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def describe(model: Any, items: list[tuple[str, Path]]) -> np.ndarray:
    """Descriptors [n, d] float32 of ``items`` with the pyfunc (its own post-processing included)."""
    import pandas as pd

    x = model.predict(pd.DataFrame({"path": [str(p) for _, p in items]}))
    x = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != len(items):
        raise ConfigError("model", f"expected [{len(items)}, d] descriptors from the model, got {x.shape}")
    return x


def _side_paths(index_path: Path) -> tuple[Path, Path]:
    return index_path.with_name(index_path.name + ".ids.txt"), index_path.with_name(index_path.name + ".meta.json")


def load_index(index_path: Path, ident: dict[str, str], references_fp: str) -> tuple[np.ndarray, list[str]] | None:
    """``(reference vectors, ids)`` from a saved index if it was built by this model on these files."""
    import faiss

    ids_path, meta_path = _side_paths(index_path)
    if not (index_path.is_file() and ids_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    built_by = meta.get("model", {})
    if meta.get("format") != INDEX_FORMAT or not _same_model(built_by, ident):
        log.info("index %s was built by %s (content %s); rebuilding for %s (content %s)", index_path,
                 built_by.get("resolved_uri"), str(built_by.get("content_sha256"))[:12],
                 ident["resolved_uri"], str(ident.get("content_sha256"))[:12])
        return None
    if meta.get("references_fingerprint") != references_fp:
        log.info("reference images changed since %s was built; rebuilding", index_path)
        return None
    index = faiss.read_index(str(index_path))
    ids = ids_path.read_text().splitlines()
    if index.ntotal != len(ids):
        return None
    return index.reconstruct_n(0, index.ntotal), ids


def save_index(index_path: Path, vectors: np.ndarray, ids: list[str], ident: dict[str, str], references_fp: str,
               references: list[str]) -> None:
    """Write the faiss index, ids and meta atomically (meta last: a torn set is never reused)."""
    import faiss

    ids_path, meta_path = _side_paths(index_path)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    with atomic_path(index_path) as tmp:
        faiss.write_index(index, str(tmp))
    with atomic_path(ids_path) as tmp:
        tmp.write_text("\n".join(ids) + "\n")
    meta = {"format": INDEX_FORMAT, "model": ident, "references_fingerprint": references_fp,
            "references": references, "n": len(ids), "dim": int(vectors.shape[1])}
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def search_images(
    model_uri: str,
    references: list[str | Path],
    queries: list[str | Path],
    index_path: str | Path,
    topk: int = 5,
    output: str | Path | None = None,
    overwrite: bool = False,
    trust_model_code: bool = False,
) -> SearchResult:
    """Top-``topk`` references for every query image (see module doc); writes the matching-track CSV
    ``query_id,reference_id,score`` to ``output`` when given (an existing one only with ``overwrite``)."""
    from isc.io import write_matches_csv
    from isc.knn import FlatIndex

    if topk <= 0:
        raise ConfigError("topk", f"must be > 0, got {topk}")
    ref_items = collect_images(list(references), "references")
    query_items = collect_images(list(queries), "queries")
    index_path = Path(index_path)
    check_output_paths(index_path, output, ref_items + query_items, overwrite)
    model, ident = load_descriptor_model(model_uri, trust_model_code)
    ref_fp = _references_fingerprint(ref_items)
    loaded = load_index(index_path, ident, ref_fp)
    reused = loaded is not None
    if loaded is None:
        log.info("describing %d reference images with %s", len(ref_items), ident["resolved_uri"])
        ref_vectors = describe(model, ref_items)
        ref_ids = [i for i, _ in ref_items]
        save_index(index_path, ref_vectors, ref_ids, ident, ref_fp, [str(r) for r in references])
    else:
        ref_vectors, ref_ids = loaded
        log.info("reusing index %s (%d references, %s)", index_path, len(ref_ids), ident["resolved_uri"])
    query_vectors = describe(model, query_items)
    scores, idx = FlatIndex(ref_vectors, metric="ip").search(query_vectors, topk, progress=True)
    qids, rids, ranks, flat = [], [], [], []
    for qi, (query_id, _) in enumerate(query_items):
        for rank in range(scores.shape[1]):
            if idx[qi, rank] < 0:
                continue
            qids.append(query_id)
            rids.append(ref_ids[int(idx[qi, rank])])
            ranks.append(rank + 1)
            flat.append(float(scores[qi, rank]))
    result = SearchResult(qids, rids, ranks, np.asarray(flat, dtype=np.float32), reused, ident)
    if output:
        write_matches_csv(output, qids, rids, flat)
    return result
