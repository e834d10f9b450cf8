"""Pieces of in-batch sampled-softmax training that are not a tower: gathering candidates across
ranks (with gradients), exact streaming item frequencies for the logQ correction, and the
samplers of extra negatives.

Sampled softmax scores each query against a sample of candidates instead of the whole catalog;
popular items show up as negatives far more often than uniform sampling would, so their logits
are pushed down too hard. The logQ correction subtracts log(expected count of the candidate in
the sampled set) from each logit (Yi et al., 2019, "Sampling-bias-corrected neural modeling"),
which makes the sampled softmax an unbiased stand-in for the full one. With in-batch positives
(B per step, item j drawn with probability p_j = count_j / total) and M extra negatives (item j
drawn with probability s_j per draw) the expected count is B * p_j + M * s_j.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

POPULARITY_EXPONENT = 0.75  # word2vec's unigram^0.75: popular, but less skewed than the data


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _this_rank_first(rank: int, world: int) -> list[int]:
    """The order gathered blocks are returned in: this rank's, then the others by rank."""
    return [rank, *(r for r in range(world) if r != rank)]


def _max_rows(n: int, device: torch.device) -> int:
    """The largest row count over ranks (ranks may hold fewer rows: a last or padding batch)."""
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(rank_and_world()[1])]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.int64, device=device))
    return int(torch.cat(counts).max())


def _pad_rows(x: torch.Tensor, rows: int, value) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0], *x.shape[1:]), value)
    return torch.cat([x, pad])


class _AllGatherRows(torch.autograd.Function):
    """[m, d] (same m on every rank) -> [W, m, d] in rank order.

    Backward: rank r's loss L_r depends on every rank's rows, so the gradient of rank r's own
    rows is the sum over ranks of dL_r'/d(rows_r). An all-reduce of the full gradient followed by
    taking this rank's block gives exactly that, on every backend (gloo has no reduce-scatter).
    That is the gradient of sum_r L_r, the same convention as TorchRec's embedding backward; DDP
    then averages the dense parameters' gradients as for any other model.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rank = rank
        blocks = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(blocks, x.contiguous())
        return torch.stack(blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank]


def gather_rows(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows, with gradients flowing back to the rank that owns them.

    x [n, d], valid [n] bool -> (rows [W * m, d], valid [W * m]) where m is the largest n over
    ranks: THIS RANK'S block first (so local row i is gathered row i), then the other ranks' in
    rank order; each block is padded to m rows with zeros marked invalid. Without a process group
    or in a world of one: (x, valid) unchanged.
    """
    rank, world = rank_and_world()
    if world == 1:
        return x, valid
    m = _max_rows(x.shape[0], x.device)
    order = torch.tensor(_this_rank_first(rank, world), device=x.device)
    rows = _AllGatherRows.apply(_pad_rows(x, m, 0.0))[order].reshape(world * m, *x.shape[1:])
    return rows, gather_values(valid, False, m)


@torch.no_grad()
def gather_values(t: torch.Tensor, fill, rows: int | None = None) -> torch.Tensor:
    """t [n] (ids, flags; no gradient) -> [W * m] in gather_rows' order (this rank first),
    padded with `fill`. `rows` is m when the caller knows it (saves one collective)."""
    rank, world = rank_and_world()
    if world == 1:
        return t
    m = _max_rows(t.shape[0], t.device) if rows is None else rows
    blocks = [torch.empty(m, dtype=t.dtype, device=t.device) for _ in range(world)]
    dist.all_gather(blocks, _pad_rows(t, m, fill).contiguous())
    return torch.cat([blocks[r] for r in _this_rank_first(rank, world)])


class ItemFrequency(nn.Module):
    """Exact streaming counts of positive item ids, identical on every rank.

    `counts` int64 [num_items] is a persistent buffer: checkpoints keep it, and DMP's
    materialization from the meta device (zeros for buffers) or `reset_parameters` starts it at 0.
    Every rank must `update` with the same ids (the global batch's), which keeps the counts equal
    without any extra synchronisation.
    """

    def __init__(self, num_items: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(num_items, dtype=torch.int64, device=device))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.counts.zero_()

    @torch.no_grad()
    def update(self, global_ids: torch.Tensor) -> None:
        """Count every id >= 0 (negative ids mark rows without an item and are skipped)."""
        ids = global_ids[global_ids >= 0]
        self.counts.index_add_(0, ids, torch.ones_like(ids))

    @torch.no_grad()
    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        """p_j = count_j / total for ids [C] -> float64 [C] (0 before any update)."""
        total = self.counts.sum().clamp(min=1).to(torch.float64)
        return self.counts[ids.clamp(min=0)].to(torch.float64) / total

    @torch.no_grad()
    def log_expected(self, ids: torch.Tensor, batch_rows, extra: int = 0,
                     sampler_probs: torch.Tensor | None = None) -> torch.Tensor:
        """log(batch_rows * p_j + extra * s_j): the log expected count of each candidate in a
        candidate set of `batch_rows` in-batch positives and `extra` sampled negatives.

        ids [C] (negative: no item), batch_rows int or [] tensor, sampler_probs s [C] (per-draw
        probability of each candidate's item; needed when extra > 0) -> float32 [C]; 0 where the
        id is negative or the expected count is 0 (such columns are masked by the task anyway).
        """
        expected = self.probability(ids) * torch.as_tensor(batch_rows, dtype=torch.float64, device=ids.device)
        if extra:
            expected = expected + extra * sampler_probs.to(torch.float64)
        ok = (ids >= 0) & (expected > 0)
        return torch.where(ok, expected.clamp(min=1e-300).log(), torch.zeros_like(expected)).float()


class NegativeSampler(nn.Module):
    """Draws extra negatives from the catalog's rows: "uniform" (every row alike) or
    "popularity" (row r with weight (count of its item + 1) ** 0.75, so never-seen items keep a
    chance).

    row_items [N] int64: the mapped item id of each catalog row. Draws are reproducible: the
    generator of each call is seeded from (seed, rank, call number), and the call number is the
    persistent buffer `calls` (checkpointed with the model, equal on every rank), so a resumed
    run on the same kind of device draws what the uninterrupted one would have. Everything runs
    on the device of the item counts: no per-step copy of catalog-sized tensors.
    """

    KINDS = ("uniform", "popularity")

    def __init__(self, kind: str, row_items: torch.Tensor, num_items: int, seed: int = 0,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64, device=device))
        if kind not in self.KINDS:
            raise ValueError(f"config key 'model.arch.negative_sampler': got {kind!r}; use uniform or popularity")
        self.kind = kind
        self.row_items = row_items.to(torch.int64).cpu()
        self.num_items = num_items
        self.seed = seed
        # Catalog rows per item id (several under a hashing id policy): s_j sums over them.
        self._multiplicity = torch.bincount(self.row_items, minlength=num_items).to(torch.float64)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _catalog(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(row_items, multiplicity) on `device`, copied once."""
        if device not in self._on:
            self._on[device] = (self.row_items.to(device), self._multiplicity.to(device))
        return self._on[device]

    def items_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The mapped item id of catalog rows [m], on the rows' device."""
        return self._catalog(rows.device)[0][rows]

    def item_weights(self, frequency: ItemFrequency) -> torch.Tensor:
        """Unnormalised draw weight of one catalog row of each item id, float64 [num_items]."""
        if self.kind == "uniform":
            return torch.ones(self.num_items, dtype=torch.float64, device=frequency.counts.device)
        return (frequency.counts.to(torch.float64) + 1.0) ** POPULARITY_EXPONENT

    def probabilities(self, item_ids: torch.Tensor, frequency: ItemFrequency) -> torch.Tensor:
        """s_j: the per-draw probability of item j (summed over its catalog rows), float64 [C]
        for item ids [C]; 0 for negative ids (no item)."""
        _, multiplicity = self._catalog(frequency.counts.device)
        w = self.item_weights(frequency) * multiplicity
        ids = item_ids.to(w.device)
        s = w[ids.clamp(min=0)] / w.sum()
        return torch.where(ids >= 0, s, torch.zeros_like(s)).to(item_ids.device)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.calls.zero_()

    def generator(self, call: int, device: torch.device) -> torch.Generator:
        rank, _ = rank_and_world()
        # Distinct streams per rank and call; the odd multipliers keep (seed, rank, call) apart.
        return torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + rank * 7_919 + call * 104_729) % 2**63)

    def sample(self, m: int, frequency: ItemFrequency) -> torch.Tensor:
        """Catalog rows [m] int64 on the counts' device; advances `calls`."""
        device = frequency.counts.device
        g = self.generator(int(self.calls), device)
        with torch.no_grad():
            self.calls += 1
        row_items, _ = self._catalog(device)
        if self.kind == "uniform":
            return torch.randint(len(row_items), (m,), generator=g, device=device)
        return torch.multinomial(self.item_weights(frequency)[row_items], m, replacement=True, generator=g)
