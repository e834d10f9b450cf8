"""Export for serving: `rectrain export retrieval` (a two-tower checkpoint -> item vectors, a
TorchScript query tower, FAISS indexes, measured recall) and the query side `rectrain retrieve`
uses. Modules: checkpoint_model (DCP -> unsharded CPU model), items, users, query_encoder,
faiss_index, serving (an export loaded for queries), measure, retrieval (the export itself)."""

import json
from pathlib import Path


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON, atomically (a reader never sees half a manifest)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
