"""MoELayer: top-k mixture of experts with compiled routing, dispatch, expert MLPs and combine.

Semantics (see docs/moe.md):

* router: ``logits = x @ router.weight^T`` (no bias); scores are ``softmax`` (default) or
  ``sigmoid`` of the logits; the top-k experts per token are chosen by score (+ the optional
  ``selection_bias`` buffer, DeepSeek-V3 style; grouped top-k with ``num_groups`` /
  ``topk_groups``); ties go to the lower expert index (``torch.topk`` order). The k weights are the
  chosen scores, divided by their sum when ``norm_topk_prob`` and multiplied by
  ``routed_scaling_factor``.
* experts: SwiGLU ``down(act(gate(x)) * up(x))`` by default (``gated=False``: ``down(act(up(x)))``),
  weights ``w1 [E, 2F, H]`` (gate rows then up rows, the HF fused layout) and ``w2 [E, H, F]``.
  :meth:`MoELayer.sparsify_experts` prunes them into ``sparse_experts`` (one sparse linear per
  expert matrix, see ``moe_experts.py``); ``w1`` / ``w2`` are then None until
  :meth:`MoELayer.densify_experts`.
* dropless by default; with ``capacity_factor`` each expert takes at most
  ``ceil(capacity_factor * T * k / E)`` (token, slot) pairs in slot-major token order
  (Switch / GShard); dropped pairs contribute zero (the token keeps only its residual path).
* optional shared expert (Qwen2-MoE style): ``out += sigmoid(shared_gate(x)) * shared_mlp(x)``
  (without ``shared_expert_gate`` the sigmoid factor is omitted).
* losses after each forward: ``aux_loss`` is the Switch load-balancing loss in HF's
  ``load_balancing_loss_func`` convention for one layer,
  ``E * sum_{j, e} mean_t[onehot(topk_indices[t, j])_e] * mean_t[probs[t, e]]``, with ``probs``
  the full softmax (sigmoid) scores and the assignments taken before capacity dropping; it equals
  ``top_k`` for a perfectly uniform router. ``z_loss`` is the ST-MoE router z-loss
  ``mean_t logsumexp(logits_t)^2``. Neither is scaled by a coefficient: add
  ``coef * layer.aux_loss`` to your objective.
* router jitter (training only): the router input is multiplied by ``U(1 - j, 1 + j)`` noise
  (Switch Transformer); the experts see the clean input.
* expert parallelism: ``process_group=pg`` keeps experts ``[rank * E / W, (rank + 1) * E / W)`` on
  each rank and exchanges token rows with ``all_to_all`` (forward and backward); the router and
  the shared expert are replicated (their gradients are per-rank partial sums, reduce them as for
  data parallelism). Device-agnostic: on CUDA, use an NCCL group (rows and counts stay on the GPU;
  only the [world, local experts] count table is copied to the host for the split sizes).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._stored import check_loaded_shapes
from .moe_experts import SparseExperts

_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def _torch_act(name):
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[name]


class _SharedExpert(nn.Module):
    """Dense (gated) MLP applied to every token."""

    def __init__(self, hidden_size, ffn_size, activation, gated, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gated = gated
        self.activation = activation
        self.gate_proj = nn.Linear(hidden_size, ffn_size, **kw) if gated else None
        self.up_proj = nn.Linear(hidden_size, ffn_size, **kw)
        self.down_proj = nn.Linear(ffn_size, hidden_size, **kw)

    def forward(self, x):
        act = _torch_act(self.activation)
        if self.gated:
            return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(act(self.up_proj(x)))


class _AllToAll(torch.autograd.Function):
    """Rows exchange with ``all_to_all_single``; the backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        import torch.distributed as dist

        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits), x.shape[1]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), grad.shape[1]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


class MoELayer(nn.Module):
    """Top-k mixture-of-experts layer (see the module docstring for the exact semantics).

    Args:
        hidden_size, ffn_size: H and the expert intermediate size F.
        num_experts, top_k: E and k (1 <= k <= E).
        activation: ``"silu"`` (default), ``"gelu"``, ``"gelu_tanh"`` or ``"relu"``.
        gated: SwiGLU-style gate * up experts (default) or a plain two-layer MLP.
        norm_topk_prob: renormalize the k selected scores to sum to 1 (Mixtral: True).
        scoring: ``"softmax"`` or ``"sigmoid"``.
        num_groups, topk_groups: grouped top-k (DeepSeek); 1, 1 is plain top-k.
        selection_bias: keep a ``selection_bias`` buffer [E] added to scores for selection only.
        routed_scaling_factor: multiplies the routing weights.
        shared_expert_size: F of an always-on shared expert (0: none);
        shared_expert_gate: scale the shared expert by ``sigmoid(Linear(H, 1)(x))``.
        router_jitter: multiplicative uniform noise on the router input in training.
        capacity_factor: None (dropless) or the Switch capacity factor.
        process_group: a ``torch.distributed`` group for expert parallelism.
    """

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int = 8, top_k: int = 2, *,
                 activation: str = "silu", gated: bool = True, norm_topk_prob: bool = True,
                 scoring: str = "softmax", num_groups: int = 1, topk_groups: int = 1,
                 selection_bias: bool = False, routed_scaling_factor: float = 1.0,
                 shared_expert_size: int = 0, shared_expert_gate: bool = False,
                 router_jitter: float = 0.0, capacity_factor: Optional[float] = None,
                 process_group=None, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if hidden_size < 1 or ffn_size < 1:
            raise ValueError(f"hidden_size and ffn_size must be >= 1, got {hidden_size}, {ffn_size}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
        self.hidden_size = hidden_size
        self.ffn_size = ffn_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.activation = activation
        self.gated = gated
        self.norm_topk_prob = norm_topk_prob
        self.scoring = scoring
        self.num_groups = num_groups
        self.topk_groups = topk_groups
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.router_jitter = float(router_jitter)
        self.capacity_factor = capacity_factor
        self.process_group = process_group
        world, rank = 1, 0
        if process_group is not None:
            import torch.distributed as dist

            world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
            if num_experts % world != 0:
                raise ValueError(f"num_experts ({num_experts}) must be a multiple of the process "
                                 f"group size ({world})")
        self.world_size, self.rank = world, rank
        self.num_local_experts = num_experts // world
        self.expert_offset = rank * self.num_local_experts

        kw = dict(dtype=dtype, device=device)
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **kw)
        self.router_logits_tap: Optional[nn.Module] = None  # set by from_hf (see there)
        f1 = 2 * ffn_size if gated else ffn_size
        self.w1 = nn.Parameter(torch.empty(self.num_local_experts, f1, hidden_size, **kw))
        self.w2 = nn.Parameter(torch.empty(self.num_local_experts, hidden_size, ffn_size, **kw))
        self.sparse_experts: Optional[SparseExperts] = None
        if selection_bias:
            self.register_buffer("selection_bias", torch.zeros(num_experts, **kw))
        else:
            self.selection_bias = None
        self.shared_expert = (_SharedExpert(hidden_size, shared_expert_size, activation, gated, **kw)
                              if shared_expert_size > 0 else None)
        self.shared_expert_gate = (nn.Linear(hidden_size, 1, bias=False, **kw)
                                   if shared_expert_size > 0 and shared_expert_gate else None)
        self._router_logits = None
        self._topk_indices = None
        self.reset_parameters()

    def reset_parameters(self):
        """nn.Linear's default init for every expert projection (dense experts only)."""
        if self.w1 is None:
            raise RuntimeError("reset_parameters needs dense experts: call densify_experts() "
                               "first")
        with torch.no_grad():
            b1 = 1.0 / math.sqrt(self.hidden_size)
            b2 = 1.0 / math.sqrt(self.ffn_size)
            self.w1.uniform_(-b1, b1)
            self.w2.uniform_(-b2, b2)

    # ---- forward ------------------------------------------------------------------------------
    def capacity(self, tokens: int) -> int:
        """Pairs each expert may take (-1: dropless)."""
        if self.capacity_factor is None:
            return -1
        return int(math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts))

    def route(self, x2: torch.Tensor):
        """Router logits, (topk_weights, topk_indices) for tokens ``x2 [T, H]``."""
        router_in = x2
        if self.training and self.router_jitter > 0:
            noise = torch.empty_like(x2).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
            router_in = x2 * noise
        logits = F.linear(router_in.to(self.router.weight.dtype), self.router.weight)
        weights, indices = ops.moe_route(logits, self.top_k, self.scoring, self.norm_topk_prob,
                                         self.selection_bias, self.num_groups, self.topk_groups)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return logits, weights, indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features, this layer expects "
                             f"hidden_size={self.hidden_size} (x shape {list(x.shape)})")
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        logits, weights, indices = self.route(x2)
        self._router_logits, self._topk_indices = logits, indices
        if self.router_logits_tap is not None:
            self.router_logits_tap(logits)
        row_token, offsets, inverse = ops.moe_permute(indices, self.num_experts,
                                                      self.capacity(x2.shape[0]))
        if self.process_group is None:
            y = self._run_experts(x2, row_token, offsets)
        else:
            y = self._expert_parallel(x2, row_token, offsets)
        out = ops.moe_combine(y, weights, inverse)
        if self.shared_expert is not None:
            shared = self.shared_expert(x2.to(self.shared_expert.up_proj.weight.dtype))
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(
                    x2.to(self.shared_expert_gate.weight.dtype))) * shared
            out = out + shared.to(out.dtype)
        return out.to(x.dtype).reshape(shape)

    def _run_experts(self, x2, row_token, offsets):
        """The local experts over the permuted rows: the grouped kernels on dense experts, each
        expert's sparse products on pruned ones."""
        if self.sparse_experts is None:
            return ops.moe_expert_mlp(x2, row_token, offsets, self.w1, self.w2, self.activation,
                                      self.gated)
        xc = x2 if x2.dtype == torch.float64 else x2.float()
        return self.sparse_experts(xc, row_token, offsets, _torch_act(self.activation),
                                   self.gated)

    # ---- sparse experts -----------------------------------------------------------------------
    def sparsify_experts(self, sparsity: Optional[float] = None, pattern: str = "unstructured",
                         method: str = "magnitude",
                         generator: Optional[torch.Generator] = None) -> "MoELayer":
        """Prunes every local expert's ``w1`` and ``w2`` matrix on its own (the arguments of
        ``SparseLinear.from_dense``) into ``sparse_experts``; ``w1`` / ``w2`` become None.
        Returns ``self``."""
        if self.sparse_experts is not None:
            raise RuntimeError("the experts are sparse already: densify_experts() first to "
                               "prune them again")
        self.sparse_experts = SparseExperts.from_dense(self.w1, self.w2, sparsity, pattern,
                                                       method, generator).train(self.training)
        self.w1 = None
        self.w2 = None
        return self

    def densify_experts(self) -> "MoELayer":
        """Dense ``w1`` / ``w2`` again from ``sparse_experts`` (pruned weights stay zero)."""
        if self.sparse_experts is not None:
            w1, w2 = self.sparse_experts.to_dense()
            self.w1, self.w2 = nn.Parameter(w1), nn.Parameter(w2)
            self.sparse_experts = None
        return self

    def _expert_parallel(self, x2, row_token, offsets):
        """Sends each kept row to the rank owning its expert, runs the local experts, sends back."""
        import torch.distributed as dist

        W, El, group = self.world_size, self.num_local_experts, self.process_group
        P = row_token.shape[0]
        kept = int(offsets[-1])
        xc = x2 if x2.dtype == torch.float64 else x2.float()
        send = xc.index_select(0, row_token[:kept])
        counts = (offsets[1:] - offsets[:-1]).contiguous()       # [E] rows per global expert
        recv_counts = torch.empty_like(counts)                    # [W * El]: source-major
        dist.all_to_all_single(recv_counts, counts, group=group)
        send_splits = counts.view(W, El).sum(1).tolist()
        # Split sizes are host lists for all_to_all_single anyway (NCCL or Gloo): one device->host
        # copy of the [W, El] counts, then the regrouping indices are built on the host and moved
        # to the rows' device once.
        rc = recv_counts.view(W, El).cpu()
        recv_splits = rc.sum(1).tolist()
        recv = _AllToAll.apply(send, recv_splits, send_splits, group)   # [R, H] source-major
        # Regroup the received rows expert-major (expert, then source rank) for the local experts.
        starts = torch.cumsum(rc.reshape(-1), 0) - rc.reshape(-1)
        starts = starts.view(W, El)
        order = [torch.arange(int(starts[s, e]), int(starts[s, e] + rc[s, e]))
                 for e in range(El) for s in range(W)]
        order = torch.cat(order) if order else torch.zeros(0, dtype=torch.int64)
        local_offsets = torch.zeros(El + 1, dtype=torch.int64)
        local_offsets[1:] = torch.cumsum(rc.sum(0), 0)
        order = order.to(recv.device)
        local_offsets = local_offsets.to(recv.device)
        y_local = self._run_experts(recv, order, local_offsets)
        inv_order = torch.empty_like(order)
        inv_order[order] = torch.arange(order.shape[0], device=order.device)
        y_src = y_local.index_select(0, inv_order)
        y = _AllToAll.apply(y_src, send_splits, recv_splits, group)     # [kept, H]
        if P > kept:
            y = torch.cat([y, y.new_zeros((P - kept, y.shape[1]))])
        return y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Every expert, router and shared-expert tensor is checked before any is copied, so a
        # checkpoint of another configuration raises naming the tensor and leaves the layer as it
        # was (PyTorch's own size check runs per tensor, after earlier ones were copied).
        check_loaded_shapes(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- losses -------------------------------------------------------------------------------
    @property
    def aux_loss(self) -> Optional[torch.Tensor]:
        """Switch load-balancing loss of the last forward (HF convention; see module docstring)."""
        if self._router_logits is None:
            return None
        logits, idx = self._router_logits, self._topk_indices
        probs = torch.softmax(logits.float(), -1) if self.scoring == "softmax" \
            else torch.sigmoid(logits.float())
        if logits.shape[0] == 0:
            return probs.sum() * 0
        onehot = F.one_hot(idx, self.num_experts).float()          # [T, k, E]
        tokens_per_expert = onehot.mean(0)                          # [k, E]
        prob_per_expert = probs.mean(0)                             # [E]
        return (tokens_per_expert * prob_per_expert).sum() * self.num_experts

    @property
    def z_loss(self) -> Optional[torch.Tensor]:
        """ST-MoE router z-loss of the last forward: mean over tokens of logsumexp(logits)^2."""
        if self._router_logits is None:
            return None
        logits = self._router_logits.float()
        if logits.shape[0] == 0:
            return logits.sum() * 0
        return torch.logsumexp(logits, -1).pow(2).mean()

    # ---- HF import ----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, block: nn.Module) -> "MoELayer":
        """A layer equal to a transformers Mixtral or Qwen2-MoE sparse MoE block (eval semantics).

        Reads the installed version's layout: fused 3-D expert parameters (``gate_up_proj``,
        ``down_proj``; transposed or interleaved variants) or a ``ModuleList`` of per-expert MLPs
        (``w1``/``w3``/``w2`` or ``gate_proj``/``up_proj``/``down_proj``); the router as a
        ``gate`` with a ``weight`` [E, H].
        """
        gate = block.gate
        router_weight = gate.weight.detach()
        E, H = router_weight.shape
        top_k = getattr(block, "top_k", None) or getattr(gate, "top_k", None)
        if top_k is None:
            raise ValueError("cannot find top_k on the block or its gate")
        norm = getattr(gate, "norm_topk_prob", None)
        if norm is None:
            norm = getattr(block, "norm_topk_prob", None)
        if norm is None:
            norm = True  # Mixtral always renormalizes
        w1, w2, act = _hf_expert_weights(block.experts, E, H)
        F_ = w2.shape[2]
        shared = getattr(block, "shared_expert", None)
        shared_gate = getattr(block, "shared_expert_gate", None)
        shared_size = shared.down_proj.weight.shape[1] if shared is not None else 0
        layer = cls(H, F_, E, int(top_k), activation=act, norm_topk_prob=bool(norm),
                    shared_expert_size=shared_size, shared_expert_gate=shared_gate is not None,
                    router_jitter=float(getattr(block, "jitter_noise", 0.0) or 0.0),
                    dtype=w1.dtype, device=w1.device)
        layer.router_logits_tap = _router_logits_tap(gate)
        with torch.no_grad():
            layer.router.weight.copy_(router_weight)
            layer.w1.copy_(w1)
            layer.w2.copy_(w2)
            if shared is not None:
                layer.shared_expert.gate_proj.weight.copy_(shared.gate_proj.weight)
                layer.shared_expert.up_proj.weight.copy_(shared.up_proj.weight)
                layer.shared_expert.down_proj.weight.copy_(shared.down_proj.weight)
            if shared_gate is not None:
                layer.shared_expert_gate.weight.copy_(shared_gate.weight)
        return layer

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}, "
                f"gated={self.gated}, norm_topk_prob={self.norm_topk_prob}, scoring={self.scoring!r}, "
                f"capacity_factor={self.capacity_factor}, local_experts={self.num_local_experts}, "
                f"dtype={self.router.weight.dtype}")


def _router_logits_tap(gate: nn.Module) -> Optional[nn.Module]:
    """A parameter-free module of the HF router's own class whose forward hands the router logits
    through, or None when the router is a plain ``nn.Linear`` (older transformers return the
    logits from the block instead). Hugging Face models collect ``output_router_logits`` with
    forward hooks on modules of the router class (the load-balancing loss reads them); calling
    this tap with our logits lets those hooks see them."""
    router_cls = type(gate)
    if router_cls is nn.Linear or not issubclass(router_cls, nn.Module):
        return None
    tap_cls = type(f"{router_cls.__name__}LogitsTap", (router_cls,), {
        "__init__": lambda self: nn.Module.__init__(self),
        "forward": lambda self, logits: (logits, None, None),
        "__doc__": "The router logits of a sparse_ext MoELayer, as the HF router returns them.",
    })
    tap = tap_cls()
    # A model that already ran with output_router_logits has its hooks on the replaced router:
    # the tap shares the router's hook tables, so those hooks (and any added later) see it.
    for table in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        if hasattr(gate, table):
            setattr(tap, table, getattr(gate, table))
    return tap


def _hf_activation_name(module_or_fn, config=None) -> str:
    name = getattr(config, "hidden_act", None) if config is not None else None
    if isinstance(name, str):
        mapping = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu",
                   "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                   "gelu_fast": "gelu_tanh"}
        if name in mapping:
            return mapping[name]
        raise ValueError(f"unsupported HF activation {name!r}")
    cls_name = type(module_or_fn).__name__.lower()
    if "silu" in cls_name or "swish" in cls_name:
        return "silu"
    if "tanh" in cls_name or "new" in cls_name or "fast" in cls_name:
        return "gelu_tanh"
    if "gelu" in cls_name:
        return "gelu"
    if "relu" in cls_name:
        return "relu"
    raise ValueError(f"unsupported HF activation {type(module_or_fn).__name__}")


def _hf_expert_weights(experts, E, H):
    """(w1 [E, 2F, H], w2 [E, H, F], activation) from any HF experts container."""
    if hasattr(experts, "gate_up_proj") and isinstance(experts.gate_up_proj, torch.Tensor):
        gu = experts.gate_up_proj.detach()
        down = experts.down_proj.detach()
        if getattr(experts, "is_transposed", False) or (gu.shape[1] == H and gu.shape[2] != H):
            gu = gu.transpose(1, 2)      # [E, H, 2F] -> [E, 2F, H]
            down = down.transpose(1, 2)  # [E, F, H] -> [E, H, F]
        if not getattr(experts, "is_concatenated", True):
            gu = torch.cat([gu[:, 0::2], gu[:, 1::2]], dim=1)  # interleaved -> [gate; up]
        if gu.shape[0] != E or gu.shape[2] != H or down.shape[1] != H \
                or gu.shape[1] != 2 * down.shape[2]:
            raise ValueError(f"unexpected HF expert shapes gate_up_proj {tuple(gu.shape)}, "
                             f"down_proj {tuple(down.shape)}")
        act = _hf_activation_name(getattr(experts, "act_fn", None), getattr(experts, "config", None))
        return gu.contiguous(), down.contiguous(), act
    if isinstance(experts, nn.ModuleList):
        w1s, w2s = [], []
        for mlp in experts:
            if hasattr(mlp, "w1"):          # older Mixtral: w1 gate, w3 up, w2 down
                g, u, d = mlp.w1.weight, mlp.w3.weight, mlp.w2.weight
            else:                           # older Qwen2-MoE: gate_proj, up_proj, down_proj
                g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            w1s.append(torch.cat([g, u], 0).detach())
            w2s.append(d.detach())
        first = experts[0]
        act = _hf_activation_name(getattr(first, "act_fn", None), getattr(first, "config", None))
        return torch.stack(w1s), torch.stack(w2s), act
    raise TypeError(f"unsupported HF experts container {type(experts).__name__}")
