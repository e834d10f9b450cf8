"""Export for serving: `rectrain export retrieval` (a two-tower checkpoint -> item vectors, a
TorchScript query tower, FAISS indexes, measured recall) and the query side `rectrain retrieve`
uses. Modules: checkpoint_model (DCP -> unsharded CPU model), items, users, query_encoder,
faiss_index, serving (an export loaded for queries), measure, retrieval (the export itself)."""
