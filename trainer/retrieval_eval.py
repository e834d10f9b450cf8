"""Retrieval evaluation over the full item catalog, exact across ranks, with the popularity
baseline on the same split.

1. Item vectors: the candidate tower runs over the catalog (`data.items_path`); each rank embeds
   its share and every rank gathers the whole [N, d] matrix, ordered by raw item id.
2. Users: each rank embeds its share of the eval users (one row per user: query features, the
   held-out `targets`, the `seen` items of the training period) and scores them against every
   item in chunks. Seen items are excluded from that user's ranking.
3. Per user and K: Recall@K = hits / targets (targets missing from the catalog or among the
   user's seen items count, as misses that no ranking can find; users without targets are left
   out and counted),
   NDCG@K with binary relevance (ideal DCG over min(K, targets)), HitRate@K = any hit, and the
   reciprocal rank of the best-ranked target over the whole catalog (MRR). Coverage@K is the
   share of the catalog that appears in some user's top K. Sums are all-reduced, so the numbers
   do not depend on the world size.
4. Popularity: the same protocol with every item scored by its training frequency (the model's
   exact streaming counts), so every report shows the lift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from data.parquet import ParquetStream
from data.schema import DataError
from trainer.distributed import all_gather_varlen, all_reduce_max
from trainer.loader import make_loader, padded_batches

# Scores of at most this many (user, item) pairs are held at once.
_SCORE_CHUNK = 1 << 24


@dataclass
class ItemVectors:
    """The catalog as the candidate tower sees it, on every rank."""

    raw_ids: torch.Tensor  # int64 [N], sorted
    rows: torch.Tensor  # int64 [N]: the embedding row (mapped id) of each item
    vectors: torch.Tensor  # float32 [N, d]

    def positions(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(catalog position of each raw id, whether it is in the catalog)."""
        if not len(self.raw_ids):
            return torch.zeros_like(raw), torch.zeros_like(raw, dtype=torch.bool)
        pos = torch.searchsorted(self.raw_ids, raw).clamp(max=len(self.raw_ids) - 1)
        return pos, self.raw_ids[pos] == raw


def _rows_of(values: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (values, lengths) of the rows where `keep` is true, from CSR (values, lengths)."""
    row = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    return values[keep[row]], lengths[keep]


def _run(model, stream: ParquetStream, device: torch.device, num_dense: int, max_batches: int = 0):
    """(batch, outputs, real-row mask) over the rank's share of `stream`, every rank the same
    number of steps (the sharded lookups are collectives)."""
    stream.set_epoch(0)
    steps = all_reduce_max(stream.remaining_batches(), device)
    if max_batches:
        steps = min(steps, max_batches)
    for batch in padded_batches(make_loader(stream, device), steps, stream):
        if batch.dense.shape[1] != num_dense:  # catalog rows carry no (query-side) dense columns
            batch.dense = torch.zeros(batch.batch_size, num_dense)
        batch = batch.to(device, non_blocking=True)
        _, (_, outputs, _, weights) = model(batch)
        yield batch, outputs, weights > 0


@torch.no_grad()
def embed_catalog(model, stream: ParquetStream, device: torch.device, num_dense: int,
                  raw_id_column: str) -> ItemVectors:
    """Candidate-tower vectors of every catalog item, gathered on every rank."""
    raws, rows, vecs = [], [], []
    for batch, outputs, mask in _run(model, stream, device, num_dense):
        values, lengths = (x.to(device) for x in batch.extras[raw_id_column])
        values, lengths = _rows_of(values, lengths, mask)
        if bool((lengths != 1).any()):
            raise DataError(f"{stream.uri}: column {raw_id_column!r} must hold exactly one id per catalog row "
                            f"(a null or a list was found); fix the catalog")
        raws.append(values)
        rows.append(outputs["item_ids"][mask])
        vecs.append(outputs["candidate"][mask].float())
    raw = all_gather_varlen(torch.cat(raws)) if raws else torch.zeros(0, dtype=torch.int64, device=device)
    row = all_gather_varlen(torch.cat(rows)) if rows else torch.zeros(0, dtype=torch.int64, device=device)
    vec = all_gather_varlen(torch.cat(vecs)) if vecs else torch.zeros(0, 1, device=device)
    order = torch.argsort(raw)
    raw, row, vec = raw[order], row[order], vec[order]
    dup = (raw[1:] == raw[:-1]).nonzero()
    if len(dup):
        raise DataError(f"{stream.uri}: item id {int(raw[int(dup[0])])} appears more than once in the catalog; "
                        f"give every item one row")
    return ItemVectors(raw, row, vec)


class _Totals:
    """Per-K sums of recall, NDCG and hits, reciprocal ranks, users and coverage of one scorer."""

    def __init__(self, ks: list[int], num_items: int, device: torch.device) -> None:
        self.ks = ks
        self.sums = torch.zeros(3 * len(ks) + 2, dtype=torch.float64, device=device)  # + rr, users
        self.covered = torch.zeros(len(ks), max(num_items, 1), dtype=torch.int32, device=device)

    def add(self, scores: torch.Tensor, relevant: torch.Tensor, num_targets: torch.Tensor) -> None:
        """scores [b, N] (seen items at -inf), relevant [b, N] bool, num_targets [b] (in the
        catalog or not)."""
        kmax = min(max(self.ks), scores.shape[1])
        top = scores.topk(kmax, dim=1).indices  # [b, kmax]
        valid_top = scores.gather(1, top) > float("-inf")  # a user with fewer unseen items than K
        hits = relevant.gather(1, top) & valid_top
        discount = 1.0 / torch.log2(torch.arange(kmax, device=scores.device, dtype=torch.float64) + 2.0)
        denom = num_targets.double().clamp(min=1)
        for i, k in enumerate(self.ks):
            h = hits[:, :k].double()
            n_hit = h.sum(dim=1)
            ideal = torch.cumsum(discount, 0)[(num_targets.clamp(min=1, max=min(k, kmax)) - 1)]
            self.sums[3 * i] += (n_hit / denom).sum()
            self.sums[3 * i + 1] += ((h * discount[: h.shape[1]]).sum(dim=1) / ideal).sum()
            self.sums[3 * i + 2] += (n_hit > 0).double().sum()
            shown = top[:, :k][valid_top[:, :k]]
            self.covered[i].index_fill_(0, shown, 1)
        # The best-ranked target's place in the whole catalog; equal scores rank the lower
        # catalog position first (the order popularity's tie-break uses too).
        best, best_pos = scores.masked_fill(~relevant, float("-inf")).max(dim=1)  # [b]
        positions = torch.arange(scores.shape[1], device=scores.device)
        ahead = (scores > best[:, None]) | ((scores == best[:, None]) & (positions[None, :] < best_pos[:, None]))
        rank = 1 + ahead.sum(dim=1)
        reachable = best > float("-inf")
        self.sums[-2] += torch.where(reachable, 1.0 / rank.double(), torch.zeros_like(best, dtype=torch.float64)).sum()
        self.sums[-1] += len(num_targets)

    def reduce(self) -> None:
        if dist.is_initialized():
            dist.all_reduce(self.sums)
            dist.all_reduce(self.covered, op=dist.ReduceOp.MAX)

    def metrics(self, num_items: int, prefix: str = "") -> dict[str, float]:
        users = max(float(self.sums[-1]), 1.0)
        out: dict[str, float] = {}
        for i, k in enumerate(self.ks):
            out[f"{prefix}recall@{k}"] = float(self.sums[3 * i]) / users
            out[f"{prefix}ndcg@{k}"] = float(self.sums[3 * i + 1]) / users
            out[f"{prefix}hit_rate@{k}"] = float(self.sums[3 * i + 2]) / users
            if not prefix:  # popularity shows the same few items to everybody: its coverage says nothing new
                out[f"coverage@{k}"] = float(self.covered[i].sum()) / max(num_items, 1)
        out[f"{prefix}mrr"] = float(self.sums[-2]) / users
        return out


@torch.no_grad()
def evaluate_retrieval(model, items: ItemVectors, popularity: torch.Tensor, stream: ParquetStream,
                       device: torch.device, ks: list[int], num_dense: int, targets_column: str,
                       seen_column: str, max_batches: int = 0) -> dict:
    """Full-catalog retrieval metrics of `model` (the DMP-wrapped TrainModule, in eval mode) on
    the eval users of `stream`, and the popularity baseline's (`popularity`: [N] scores aligned
    with `items`)."""
    num_items = len(items.raw_ids)
    model_totals = _Totals(ks, num_items, device)
    pop_totals = _Totals(ks, num_items, device)
    # Popularity ties (small integer counts) are broken by catalog position, lowest first: a
    # fraction below 1 never reorders different counts, and the ranking is the same on any device.
    order = torch.arange(num_items, 0, -1, device=device, dtype=torch.float64) / (2.0 * max(num_items, 1))
    popularity = popularity.double() + order
    # targets not in the catalog, all targets, targets among the user's seen items, users without targets
    counted = torch.zeros(4, dtype=torch.float64, device=device)
    for batch, outputs, mask in _run(model, stream, device, num_dense, max_batches):
        has_targets = batch.extras[targets_column][1].to(device) > 0
        counted[3] += float((mask & ~has_targets).sum())
        mask = mask & has_targets  # nothing to find: left out of every mean, and counted
        if not bool(mask.any()):
            continue
        query = outputs["query"][mask].float()
        t_values, t_lengths = (x.to(device) for x in _rows_of(*batch.extras[targets_column], mask))
        s_values, s_lengths = (x.to(device) for x in _rows_of(*batch.extras[seen_column], mask))
        t_pos, t_found = items.positions(t_values)
        s_pos, s_found = items.positions(s_values)
        counted[:2] += torch.tensor([float((~t_found).sum()), float(len(t_values))], dtype=torch.float64,
                                    device=device)
        t_row = torch.repeat_interleave(torch.arange(len(t_lengths), device=device), t_lengths)
        s_row = torch.repeat_interleave(torch.arange(len(s_lengths), device=device), s_lengths)
        step = max(1, _SCORE_CHUNK // max(num_items, 1))
        for lo in range(0, len(query), step):
            hi = min(lo + step, len(query))
            b = hi - lo
            relevant = torch.zeros(b, num_items, dtype=torch.bool, device=device)
            sel = t_found & (t_row >= lo) & (t_row < hi)
            relevant[t_row[sel] - lo, t_pos[sel]] = True
            seen = torch.zeros(b, num_items, dtype=torch.bool, device=device)
            sel = s_found & (s_row >= lo) & (s_row < hi)
            seen[s_row[sel] - lo, s_pos[sel]] = True
            n_targets = t_lengths[lo:hi]
            counted[2] += float((relevant & seen).sum())  # excluded as seen: cannot be found
            scores = (query[lo:hi] @ items.vectors.T).masked_fill(seen, float("-inf"))
            model_totals.add(scores, relevant, n_targets)
            pop = popularity[None, :].expand(b, -1).masked_fill(seen, float("-inf"))
            pop_totals.add(pop, relevant, n_targets)
    model_totals.reduce()
    pop_totals.reduce()
    if dist.is_initialized():
        dist.all_reduce(counted)
    return {**model_totals.metrics(num_items), **pop_totals.metrics(num_items, "popularity_"),
            "num_users": int(model_totals.sums[-1]), "num_items": num_items, "num_targets": int(counted[1]),
            "targets_not_in_catalog": int(counted[0]), "targets_in_seen": int(counted[2]),
            "users_without_targets": int(counted[3])}


class RetrievalEvaluator:
    """Evaluates a retrieval model: the catalog pass, then the users; keeps the last item
    vectors (for the embedding projector)."""

    def __init__(self, rec_model, task, eval_stream: ParquetStream, catalog_stream: ParquetStream,
                 device: torch.device, num_dense: int, raw_id_column: str, targets_column: str,
                 seen_column: str, title_column: str, max_batches: int = 0) -> None:
        self.rec_model = rec_model
        self.title_column = title_column
        self.task = task
        self.eval_stream = eval_stream
        self.catalog_stream = catalog_stream
        self.device = device
        self.num_dense = num_dense
        self.raw_id_column = raw_id_column
        self.targets_column = targets_column
        self.seen_column = seen_column
        self.max_batches = max_batches
        self.items: ItemVectors | None = None

    def __call__(self, model) -> dict:
        was_training = model.training
        model.eval()
        try:
            self.items = embed_catalog(model, self.catalog_stream, self.device, self.num_dense, self.raw_id_column)
            popularity = self.rec_model.item_counts.to(self.device)[self.items.rows]
            return evaluate_retrieval(model, self.items, popularity, self.eval_stream, self.device,
                                      list(self.task.top_k), self.num_dense, self.targets_column,
                                      self.seen_column, self.max_batches)
        finally:
            model.train(was_training)

    def report(self, logger, step: int) -> None:
        """After the final evaluation: the item vectors in TensorBoard's projector."""
        log_item_projector(logger, self.items, self.catalog_stream.uri, self.raw_id_column, self.title_column, step)


def log_item_projector(logger, items: ItemVectors | None, items_path: str, id_column: str, title_column: str,
                       step: int, sample: int = 1000, seed: int = 0) -> None:
    """A sample of item vectors in TensorBoard's projector, labelled with titles where the
    catalog has them (else ids). Rank 0 only (the logger is a no-op elsewhere)."""
    if items is None or not logger.enabled or not len(items.raw_ids):
        return
    from data.catalog import ItemCatalog

    g = torch.Generator().manual_seed(seed)
    n = len(items.raw_ids)
    pick = torch.randperm(n, generator=g)[: min(sample, n)].sort().values
    raw = items.raw_ids.cpu()[pick]
    catalog = ItemCatalog.read(items_path, [], title_column, id_column=id_column)
    labels = [str(int(r)) for r in raw]
    if catalog.titles is not None:
        at = torch.searchsorted(catalog.item_ids, raw).clamp(max=len(catalog) - 1)
        labels = [catalog.titles[int(i)] or label if int(catalog.item_ids[int(i)]) == int(r) else label
                  for i, r, label in zip(at, raw, labels)]
    logger.embedding("items", items.vectors.cpu()[pick], labels, step)
