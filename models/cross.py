"""DCN-v2 cross layers (Wang et al., 2021, "DCN V2: Improved Deep & Cross Network").

Every layer maps the input x_0 [B, N] and the previous layer's output x_l [B, N] to
x_{l+1} [B, N]:

- full rank      x_{l+1} = x_0 ⊙ (W x_l + b) + x_l                           W: [N, N], b: [N]
- low rank       x_{l+1} = x_0 ⊙ (U (Vᵀ x_l) + b) + x_l                      V, U: [N, r]
- mixture of K low-rank experts (the paper's "DCN-Mix"):
                 x_{l+1} = Σ_k G_k(x_l) · x_0 ⊙ (U_k tanh(C_k tanh(V_kᵀ x_l)) + b) + x_l
                 G(x_l) = softmax(W_g x_l) over the K experts      V_k, U_k: [N, r], C_k: [r, r],
                                                                   W_g: [K, N] (no bias)
  i.e. g = tanh, C_k is always present, and the bias b is one per layer, shared by the experts
  as in the paper (Σ_k G_k = 1, so a per-expert bias would only add K-1 redundant vectors).

All weights live in ``nn.Linear`` modules. DistributedModelParallel materializes a meta-device
model with ``to_empty()`` and then calls ``reset_parameters()`` on the modules that have it,
so every weight here gets PyTorch's Linear initialization (uniform in ±1/sqrt(fan_in)), and
nothing is left as uninitialized memory (unlike TorchRec's ``LowRankCrossNet``, whose
``ParameterList`` weights have no ``reset_parameters``).
"""

from __future__ import annotations

import torch
from torch import nn


class FullRankCrossLayer(nn.Module):
    """x_0, x_l [B, N] -> x_0 ⊙ (W x_l + b) + x_l [B, N]; ``self.linear`` holds W [N, N] and b [N]."""

    def __init__(self, in_features: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, in_features, device=device)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class LowRankCrossLayer(nn.Module):
    """x_0, x_l [B, N] -> x_0 ⊙ (U (Vᵀ x_l) + b) + x_l [B, N], 2Nr weights instead of N².

    ``self.v.weight`` is Vᵀ [r, N] (no bias); ``self.u.weight`` is U [N, r] and ``self.u.bias`` b [N].
    """

    def __init__(self, in_features: int, rank: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.v = nn.Linear(in_features, rank, bias=False, device=device)
        self.u = nn.Linear(rank, in_features, device=device)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.u(self.v(x)) + x


class MixtureCrossLayer(nn.Module):
    """x_0, x_l [B, N] -> Σ_k G_k(x_l) · x_0 ⊙ (U_k tanh(C_k tanh(V_kᵀ x_l)) + b) + x_l [B, N].

    The K experts' weights are stored side by side so that a layer is three matmuls and a
    batched one, whatever K:

    - ``self.v``:    Linear(N, K·r, no bias); weight rows [k·r, (k+1)·r) are V_kᵀ [r, N]
    - ``self.c``:    Linear(r, K·r, no bias); weight rows [k·r, (k+1)·r) are C_k [r, r]
    - ``self.u``:    Linear(K·r, N);          weight columns [k·r, (k+1)·r) are U_k [N, r]; bias b
    - ``self.gate``: Linear(N, K, no bias);   G(x_l) = softmax(gate(x_l)) [B, K]

    Since Σ_k G_k = 1, Σ_k G_k (U_k h_k + b) = U [G_1 h_1, ..., G_K h_K] + b: the gate-weighted
    expert codes go through ``self.u`` once. :meth:`expert` returns (V_k, C_k, U_k) for reading.
    """

    def __init__(self, in_features: int, rank: int, num_experts: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.rank = rank
        self.num_experts = num_experts
        self.v = nn.Linear(in_features, num_experts * rank, bias=False, device=device)
        self.c = nn.Linear(rank, num_experts * rank, bias=False, device=device)
        self.u = nn.Linear(num_experts * rank, in_features, device=device)
        self.gate = nn.Linear(in_features, num_experts, bias=False, device=device)

    def expert(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(V_k [N, r], C_k [r, r], U_k [N, r]) of expert k (views of the stored weights)."""
        rows = slice(k * self.rank, (k + 1) * self.rank)
        return self.v.weight[rows].t(), self.c.weight[rows], self.u.weight[:, rows]

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """x_l [B, N] -> G(x_l) [B, K]: non-negative, summing to 1 over the experts."""
        return torch.softmax(self.gate(x), dim=-1)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        h = torch.tanh(self.v(x)).view(batch, self.num_experts, self.rank)  # [B, K, r]: tanh(V_kᵀ x_l)
        c = self.c.weight.view(self.num_experts, self.rank, self.rank)  # [K, r, r]: C_k
        h = torch.tanh(torch.einsum("bkr,ksr->bks", h, c))  # [B, K, r]: tanh(C_k h_k)
        g = self.gate_weights(x)  # [B, K]
        mixed = (h * g.unsqueeze(-1)).reshape(batch, self.num_experts * self.rank)  # [B, K·r]
        return x0 * self.u(mixed) + x


class CrossNet(nn.Module):
    """x_0 [B, N] -> x_L [B, N]: `num_layers` cross layers, each fed x_0 and the previous output.

    ``low_rank = 0`` gives full-rank layers; ``low_rank = r > 0`` low-rank ones (rank r);
    ``num_experts = K > 1`` (needs ``low_rank > 0``) a mixture of K rank-r experts per layer.
    """

    def __init__(self, in_features: int, num_layers: int, low_rank: int = 0, num_experts: int = 1,
                 device: torch.device | None = None) -> None:
        super().__init__()
        if in_features < 1 or num_layers < 1 or low_rank < 0 or num_experts < 1:
            raise ValueError(f"CrossNet needs in_features >= 1, num_layers >= 1, low_rank >= 0, num_experts >= 1; "
                             f"got {in_features}, {num_layers}, {low_rank}, {num_experts}")
        if num_experts > 1 and low_rank == 0:
            raise ValueError("a mixture of cross experts needs low_rank > 0 (each expert is low rank)")
        self.in_features = in_features
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            if num_experts > 1:
                layers.append(MixtureCrossLayer(in_features, low_rank, num_experts, device=device))
            elif low_rank > 0:
                layers.append(LowRankCrossLayer(in_features, low_rank, device=device))
            else:
                layers.append(FullRankCrossLayer(in_features, device=device))
        self.layers = nn.ModuleList(layers)

    @property
    def out_features(self) -> int:
        return self.in_features

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x
