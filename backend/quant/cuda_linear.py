"""The quantized linear layer on a CUDA GPU: the canonical format (format.py) repacked once at load
into the GPU layout (docs/CUDA.md) and run by the CUDA kernels (csrc/cuda/, backend/cuda_ops.py).

    linear = CudaPackedLinear(layer, bias, "cuda", torch.bfloat16)   # PackedLinear.from_canonical does this
    y = linear(x)     # x: [..., in] → [..., out] in x's dtype; up to 8 rows: the GEMV on the packed
                      # words; more rows: columns dequantized into a slice in the activations' dtype + cuBLAS
    q, k, v = gemv([q_proj, k_proj, v_proj], h)   # layers on one input (1-8 rows) as one GEMV launch
    stats = row_statistics(x)                     # or: o_proj.gemv(..., sumsq=stats) writes them for its y
    q, k, v = gemv(qkv, x, norm=RowNorm(input_layernorm.weight, eps, stats))   # RMSNorm inside the GEMV
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trimtab.backend import cuda_ops
from trimtab.backend.errors import TrimtabError
from trimtab.backend.quant.format import QuantizedLinear, packed_words
from trimtab.backend.quant.kernels import PackedLinear

CHUNK_ROWS = 32
TILE_COLUMNS = 128          # the GPU layout stores W tile by tile, 128 output columns each
GEMV_MAX_ROWS = 8           # the GEMV kernel's batch limit; above it, dequantize + matmul
SLICE_ELEMENTS = 64 << 20   # the largest dequantized column slice (128 MB in float16)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
RowNorm = cuda_ops.RowNorm  # an RMSNorm inside the GEMV (gemv's norm)


@dataclass(frozen=True)
class ChunkPlan:
    """Where each 32-row chunk of the GPU layout comes from and goes (host tensors)."""
    meta: torch.Tensor      # int32 [chunks, 4]: word row, width, group, 0
    repack: torch.Tensor    # int32 [chunks, 4]: canonical word row of its group, first row in the group, size, width
    xmap: torch.Tensor | None  # int32 [chunks * 32]: padded row → original input row (-1: padding); None: identity
    word_rows: int


def plan_chunks(layer: QuantizedLinear) -> ChunkPlan:
    sizes, widths = layer.group_sizes.tolist(), layer.group_bits.tolist()
    perm = None if layer.perm is None else layer.perm.cpu().to(torch.int64)
    meta, repack, rows = [], [], []
    word_row = canonical_row = quantized_row = 0
    for group, (size, bits) in enumerate(zip(sizes, widths)):
        for first in range(0, size, CHUNK_ROWS):
            meta.append([word_row, bits, group, 0])
            repack.append([canonical_row, first, size, bits])
            word_row += bits
        chunk_rows = -(-size // CHUNK_ROWS) * CHUNK_ROWS
        rows.append(torch.cat([torch.arange(quantized_row, quantized_row + size),
                               torch.full((chunk_rows - size,), -1, dtype=torch.int64)]))
        canonical_row += packed_words(size, bits)
        quantized_row += size
    identity = perm is None and all(size % CHUNK_ROWS == 0 for size in sizes)
    xmap = None
    if not identity:
        padded = torch.cat(rows)                                         # quantized row or -1
        original = padded if perm is None else torch.where(padded >= 0, perm[padded.clamp_min(0)], -1)
        xmap = original.to(torch.int32)
    return ChunkPlan(torch.tensor(meta, dtype=torch.int32), torch.tensor(repack, dtype=torch.int32), xmap, word_row)


class SplitKWorkspace:
    """One workspace (partial sums of column tiles that GEMV blocks share) and tile counters per GPU,
    shared by every layer (kernels on one stream run one at a time). Layers reserve what they need
    before they run (reserve_gemv), so a CUDA graph's capture never sees it move. A larger
    reservation replaces the pair but keeps the old one alive: a graph captured earlier still uses it.
    The workspace starts with every bit set (qgemv.cu's kUnwritten: a slot not yet written), and every
    GEMV leaves it so."""

    _per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
    _replaced: list[tuple[torch.Tensor, torch.Tensor]] = []

    @classmethod
    def reserve(cls, device: torch.device, floats: int, counters: int) -> None:
        workspace, tiles = cls._per_device.get(device, (None, None))
        if workspace is None or workspace.numel() < floats or tiles.numel() < counters:
            floats = max(floats, 0 if workspace is None else workspace.numel())
            counters = max(counters, 0 if tiles is None else tiles.numel())
            if workspace is not None:
                cls._replaced.append((workspace, tiles))
            unwritten = torch.full((floats,), -1, dtype=torch.int32, device=device).view(torch.float32)
            cls._per_device[device] = (unwritten,
                                       torch.zeros(counters, dtype=torch.int32, device=device))

    @classmethod
    def tensors(cls, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return cls._per_device[device]


class CudaPackedLinear(PackedLinear):
    """y = x Wᵀ + b on the GPU layout. Activations float16, bfloat16 or float32 (others computed in float16)."""

    # The GEMV's grid (docs/CUDA.md; bench/gpu_bench.py measures it): the (column tile, chunk) items
    # cut into this many equal blocks per multiprocessor, or into large_blocks_per_multiprocessor where
    # that still gives every block LARGE_LAYER_ITEMS items (3 chunks a warp: shallower rings, more of them).
    # A layer so large that those blocks would each take more than max_items_per_block items (an output
    # head: 128 k items for Llama-3's) gets more blocks than the GPU holds at once, so that the
    # multiprocessors that finish first take the rest: one wave of equal runs waits for the slowest.
    blocks_per_multiprocessor: int = 2
    large_blocks_per_multiprocessor: int = 4
    max_items_per_block: int = 40
    LARGE_LAYER_ITEMS = 24

    def __init__(self, layer: QuantizedLinear, bias: torch.Tensor | None, device, dtype: torch.dtype):
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.dtype = dtype if dtype in ACTIVATION_DTYPES else torch.float16
        tiles = -(-self.out_features // TILE_COLUMNS)
        plan = plan_chunks(layer)
        with torch.cuda.device(self.device):
            self.meta = plan.meta.to(self.device)                                        # int32 [chunks, 4]
            self.max_bits = int(plan.meta[:, 1].max())
            self.xmap = None if plan.xmap is None else plan.xmap.to(self.device)        # int32 [chunks * 32]
            self.words = cuda_ops.qrepack(layer.qweight.to(self.device).contiguous(), plan.repack.to(self.device),
                                          self.meta, plan.word_rows)                   # int32 [tiles, word_rows, 128]
            scale_min = torch.stack([layer.scales, layer.mins], dim=-1).to(self.device)  # half [groups, out, 2]
            scale_min = F.pad(scale_min, (0, 0, 0, tiles * TILE_COLUMNS - self.out_features))
            self.scale_min = scale_min.view(-1, tiles, TILE_COLUMNS, 2).transpose(0, 1).contiguous()
                                                                                        # half [tiles, groups, 128, 2]
            self.bias = None if bias is None else bias.to(device=self.device, dtype=torch.float32).contiguous()
            self.multiprocessors = cuda_ops.multiprocessor_count(self.words)
            self.blocks_per_multiprocessor = type(self).blocks_per_multiprocessor
            self.large_blocks_per_multiprocessor = type(self).large_blocks_per_multiprocessor
            self.max_items_per_block = type(self).max_items_per_block
            self.gemv_items = tiles * int(plan.meta.shape[0])                            # (tile, chunk) items
            self.gemv_layer = cuda_ops.GemvLayer(self.words, self.scale_min, self.meta, self.xmap, self.bias,
                                                 self.out_features, self.max_bits)
            self.reserved_launches: set[tuple] = set()   # reserve_gemv's groups led by this layer
            reserve_gemv([self])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] → [..., out]
        if x.device != self.device:
            raise TrimtabError(f"quantized layer on {self.device} got an input on {x.device}")
        if x.shape[-1] != self.in_features:
            raise TrimtabError(f"quantized layer takes {self.in_features} inputs, got shape {list(x.shape)}")
        rows = x.reshape(-1, self.in_features)
        if rows.dtype not in ACTIVATION_DTYPES:
            rows = rows.to(torch.float16)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        y = self.gemv(rows) if rows.shape[0] <= GEMV_MAX_ROWS else self.dequantized_matmul(rows)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def target_blocks(self) -> int:
        """The GEMV grid's target size (for a launch of several layers: its first layer's)."""
        large = self.large_blocks_per_multiprocessor * self.multiprocessors
        if self.gemv_items >= self.LARGE_LAYER_ITEMS * large:
            return max(large, -(-self.gemv_items // self.max_items_per_block))
        return self.blocks_per_multiprocessor * self.multiprocessors

    def gemv(self, rows: torch.Tensor, gate: torch.Tensor | None = None, residual: torch.Tensor | None = None,
             norm: RowNorm | None = None, sumsq: torch.Tensor | None = None) -> torch.Tensor:
        """rows: [1-8, in] float16/bfloat16/float32 → [rows, out]: residual + b + u Wᵀ, where u is rows,
        silu(gate)·rows given gate (rows' shape and strides) or RMSNorm(rows)·weight given norm; Σ y² per
        128 columns into sumsq (row_statistics' shape) — the decode step's fusions."""
        return gemv([self], rows, gate, residual, norm, sumsq)[0]

    def dequantized_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: [n, in] → [n, out]: W's columns dequantized a slice at a time, then cuBLAS."""
        y = torch.empty(rows.shape[0], self.out_features, dtype=rows.dtype, device=self.device)   # [n, out]
        for begin, end, wt in self._column_slices(rows.dtype):
            torch.mm(rows, wt[:, :end - begin], out=y[:, begin:end])   # cuBLAS writes the slice in place
        if self.bias is not None:
            y += self.bias.to(y.dtype)
        return y

    def dequantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids]: [n, in] in the original input order (a quantized head serving as the embedding).
        With W in one slice (up to 64M weights) this is free of host syncs, so a CUDA graph can hold it."""
        ids = ids.to(device=self.device, dtype=torch.int64).reshape(-1)
        slices = list(self._column_slices(self.dtype))
        if len(slices) == 1:
            return slices[0][2].index_select(1, ids).t()
        out = torch.empty(ids.numel(), self.in_features, dtype=self.dtype, device=self.device)
        for begin, end, wt in slices:
            inside = (ids >= begin) & (ids < end)
            out[inside] = wt[:, ids[inside] - begin].t()
        return out

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole W [out, in] in the original input order (tests, and small layers)."""
        return self.dequantized_rows(torch.arange(self.out_features, device=self.device)).to(dtype or self.dtype)

    def _column_slices(self, dtype: torch.dtype):
        """→ (begin, end, Wt [in, >= end - begin]) for consecutive column slices of W."""
        width = max(128, (SLICE_ELEMENTS // max(1, self.in_features)) // 128 * 128)
        for begin in range(0, self.out_features, width):
            end = min(self.out_features, begin + width)
            # rows 8 columns apart at least: 16-byte aligned for the dequantize kernel's stores
            wt = torch.empty(self.in_features, -(-(end - begin) // 8) * 8, dtype=dtype, device=self.device)
            cuda_ops.qdequantize_t(wt, self.words, self.scale_min, self.meta, self.xmap, self.out_features, begin, end)
            yield begin, end, wt


def shares_gemv(linears: Sequence) -> bool:
    """Whether these layers can run as one GEMV launch: quantized on one GPU, one input size, at most 8."""
    return (1 <= len(linears) <= cuda_ops.MAX_GEMV_LAYERS and all(isinstance(la, CudaPackedLinear) for la in linears)
            and len({(la.device, la.in_features) for la in linears}) == 1)


def routes_gemv(experts: Sequence) -> bool:
    """Whether a routed GEMV can choose among these experts: shares_gemv, and all of one shape."""
    return shares_gemv(experts) and len({la.out_features for la in experts}) == 1


def reserve_gemv(linears: Sequence[CudaPackedLinear], slots: int = 0) -> None:
    """Size the GPU's GEMV workspace and tile counters for these layers as one launch, 1-8 rows, or
    routed over `slots` slots; once per group and grid (reservations only grow), remembered by its first
    layer."""
    first = linears[0]
    key = (tuple(weakref.ref(la) for la in linears), slots, first.target_blocks())  # no cycle keeps layers alive
    if key in first.reserved_launches:
        return
    layers = [la.gemv_layer for la in linears]
    SplitKWorkspace.reserve(
        first.device,
        max(cuda_ops.qgemv_workspace(layers, rows, first.target_blocks(), slots)
            for rows in range(1, GEMV_MAX_ROWS + 1)),
        cuda_ops.qgemv_counters(layers, slots))
    first.reserved_launches.add(key)


def gemv(linears: Sequence[CudaPackedLinear], rows: torch.Tensor, gate: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, norm: RowNorm | None = None,
         sumsq: torch.Tensor | None = None) -> list[torch.Tensor]:
    """rows: [1-8, in] → [rows, out] for each layer (shares_gemv), one launch: residual + b + u Wᵀ with
    u = rows, silu(gate)·rows given gate (rows' shape and strides), or RMSNorm(rows)·norm.weight given
    norm (its statistics from row_statistics or a GEMV's sumsq); a residual, and sumsq (Σ y² per 128
    columns written for the next norm, row_statistics' shape), for one layer only."""
    if not shares_gemv(linears):
        raise TrimtabError(f"one GEMV launch runs 1 to {cuda_ops.MAX_GEMV_LAYERS} quantized layers of one input size "
                           f"on one GPU, got {len(linears)}")
    if (residual is not None or sumsq is not None) and len(linears) > 1:
        raise TrimtabError("a GEMV adds a residual, and writes Σ y², for a single layer's output only")
    if norm is not None:
        if gate is not None:
            raise TrimtabError("a GEMV's input is silu(gate)·x or RMSNorm(x), not both")
        _check_statistics(norm.sumsq, rows, "the norm's statistics")
        if norm.weight.shape != (rows.shape[-1],) or norm.weight.dtype != rows.dtype or not norm.weight.is_contiguous():
            raise TrimtabError(f"the norm's weight must be a contiguous [{rows.shape[-1]}] tensor of the input's "
                               f"dtype, got {list(norm.weight.shape)} {norm.weight.dtype}")
    if sumsq is not None:
        _check_statistics(sumsq, rows, "sumsq", linears[0].out_features)
    return _launch(linears, rows, gate, residual, norm=norm, sumsq=sumsq)


def statistics_shape(rows: int, features: int) -> tuple[int, int]:
    """The shape of a [rows, features] tensor's statistics (row_statistics): Σ x² per 128 columns."""
    return rows, -(-features // TILE_COLUMNS)


def row_statistics(x: torch.Tensor) -> torch.Tensor:
    """x: [rows, features] → float32 statistics_shape: Σ x² per 128 columns (zero-padded), what a GEMV's
    RowNorm takes (a GEMV given sumsq writes them for its own output)."""
    rows, features = x.shape
    padded = F.pad(x.float(), (0, -features % TILE_COLUMNS))
    return padded.square().view(rows, -1, TILE_COLUMNS).sum(dim=-1)


def _check_statistics(t: torch.Tensor, rows: torch.Tensor, name: str, features: int | None = None) -> None:
    """t must hold row_statistics of a [rows, features] tensor (features: rows' own by default)."""
    want = list(statistics_shape(rows.shape[0], rows.shape[-1] if features is None else features))
    if list(t.shape) != want or t.dtype != torch.float32 or not t.is_contiguous() or t.device != rows.device:
        raise TrimtabError(f"{name} must be a contiguous float32 {want} tensor on {rows.device} (Σ x² per "
                           f"{TILE_COLUMNS} columns), got {list(t.shape)} {t.dtype} on {t.device}")


def routed_gemv(experts: Sequence[CudaPackedLinear], rows: torch.Tensor, route: torch.Tensor,
                gate: torch.Tensor | None = None) -> torch.Tensor:
    """A mixture of experts' GEMV, one launch, the choice read on the GPU (no host sync, so a CUDA
    graph holds it): route int64 [k] (indices into `experts`, layers of one shape) → [k, out], row s
    = experts[route[s]] applied to rows[s] (rows: [k, in]) or to rows[0] (rows: [1, in]); silu(gate)·rows
    given gate (rows' shape)."""
    if not routes_gemv(experts):
        raise TrimtabError(f"a routed GEMV runs 1 to {cuda_ops.MAX_GEMV_LAYERS} quantized experts of one shape "
                           f"on one GPU, got {len(experts)}")
    return _launch(experts, rows, gate, None, route)[0]


def _launch(linears, rows, gate, residual, route=None, norm=None, sumsq=None) -> list[torch.Tensor]:
    """The checked GEMV or routed GEMV as one launch, its workspace reserved first."""
    reserve_gemv(linears, slots=0 if route is None else route.numel())
    first = linears[0]
    workspace, counters = SplitKWorkspace.tensors(first.device)
    return cuda_ops.qgemv(rows, first.in_features, [la.gemv_layer for la in linears], workspace, counters,
                          first.target_blocks(), gate, residual, route, norm, sumsq)
