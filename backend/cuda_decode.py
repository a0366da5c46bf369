"""Batch-1 decode on a CUDA GPU as one CUDA graph per token, over the model's own static KV cache.

    decoder = CudaGraphDecoder(model)          # model: a Transformer on a CUDA device (any linear kinds)
    logits = decoder.prefill(tokens, cache)    # tokens [1, S] int64: chunked prefill → [V] float32 (last token)
    logits = decoder.step(token, cache)        # one token: fills slot cache.length, advances the cache → [V]
                                               # (the model's dtype, overwritten by the next step)
    logits = decoder.step(None, cache)         # greedy: the token is the last step's argmax, already on the device
    token = int(decoder.greedy_token)          # that argmax ([1, 1] int64 on the device)
    for token in decoder.pipelined_tokens(token, cache):  # greedy, pipelined: each step queued before
        ...                                               # the last one's token is read (break: the cache rewinds)
    decoder.pipelined_tokens(token, cache, choose)        # the same, each token picked by choose on the device

Op by op, a decode step is about 36 kernels a layer (RMSNorm, the q/k/v/o and MLP GEMVs, rotary,
the KV write, SDPA, casts and adds); launched one by one from Python that costs more host time than
the GPU needs for the weights (docs/CUDA.md), so the whole step is captured once into a CUDA graph
and replayed per token. Where trimtab's decode kernels serve the model (head_dim 64/128/256, up to 8
query heads per KV head) and its projections are quantized, a layer is 6 kernels: one GEMV for q, k
and v that stages RMSNorm(x)·weight as its input, the attention (rotary, the KV write and attention
split over the cache in one kernel, then the splits' merge), the o GEMV adding the residual, one GEMV for
gate and up (the norm again inside), and the down GEMV that takes silu(gate)·up as its input and
adds the residual. The o and down GEMVs write the residual stream's Σ x² per 128 columns as they
store it, which is all the next norm needs (layer 0's norm, and a float head's, are trimtab's
RMSNorm kernel; float projections: cuBLAS one at a time, and torch ops for SiLU and the adds). A mixture of experts
(Mixtral) chooses its top-k experts on the GPU (router, softmax, top-k) and runs them as three
routed GEMVs, each reading the chosen experts' indices from device memory, so the choice needs no
host sync and stays in the graph. The graph reads the token and the position from device tensors,
attends over the whole static cache under a mask built from the position, writes the logits into a
static tensor (valid until the next step), and ends by writing the next step's inputs itself: the
logits' argmax as the token and the position + 1, so greedy decoding replays the graph and reads one
int per token (host time per token, measured on an H100: docs/CUDA.md); `pipelined_tokens` queues each
replay before it reads the token of the one before, so the GPU never waits for the host. A new cache object is
captured anew. Batch 1, full or sliding-window attention, HF (non-interleaved) rotary. Under tensor
parallelism each rank captures its share of every layer and the two all-reduces of a layer (NCCL,
captured into the graph); the residual adds then follow the all-reduce instead of riding in the GEMV.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F

from trimtab.backend import cuda_ops, ops
from trimtab.backend.errors import TrimtabError
from trimtab.backend.kv_cache import KVCache
from trimtab.backend.quant.cuda_linear import (CudaPackedLinear, RowNorm, gemv, routed_gemv, routes_gemv,
                                               shares_gemv, statistics_shape)


class TokenChooser(Protocol):
    """How pipelined_tokens picks a step's token when it is not the graph's argmax (generation.SamplingOnDevice)."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] of the loop's next step (overwritten by the step after) → [2] int64 on the device: the
        token and its problem (0 for none), queued on the current stream without waiting for it."""

    def error(self, problem: int) -> TrimtabError:
        """The error for a nonzero problem."""


class CudaGraphDecoder:
    def __init__(self, model, prefill_chunk: int = 2048):
        if model.device.type != "cuda":
            raise TrimtabError(f"the CUDA graph decoder needs a model on a CUDA device, not {model.device}")
        problem = unsupported(model)
        if problem is not None:
            raise TrimtabError(f"the CUDA graph decoder cannot run this model: {problem}")
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.cache: KVCache | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.greedy_ready = False
        attn = model.layers[0].self_attn
        self.fused = cuda_ops.attention_supported(attn.head_dim, attn.num_heads // attn.num_kv_heads)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens: [1, S] → logits [V] float32 of the last token; the cache holds all S. In chunks of
        `prefill_chunk` tokens; the first chunk of an empty cache runs causal flash attention."""
        if cache.batch_size != 1 or int(cache.pad[0]) != 0:
            raise TrimtabError("the CUDA graph decoder prefills batch 1 without padding")
        tokens = tokens.to(self.model.device)
        self.greedy_ready = False  # step(None) would continue the sequence before this prefill
        for start in range(0, tokens.shape[1], self.prefill_chunk):
            x = self._prefill_chunk(tokens[:, start:start + self.prefill_chunk], cache)
        m = self.model
        return m.lm_head(m.norm(x[:, -1:])).float().view(-1)

    def _prefill_chunk(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # tokens: [1, S] → hidden states [1, S, D]; writes slots [cache.length, cache.length + S)
        m = self.model
        S, begin = tokens.shape[1], cache.length
        cache.slots(S)  # raises if the cache is full
        positions = torch.arange(begin, begin + S, device=m.device)
        fused = self.fused and positions.is_cuda   # trimtab's kernels for RMSNorm, rotary + cache write, SiLU
        rotary = None if fused else _Rotary(m.rope, m.args.rotary_dim, m.args.head_dim, positions)
        x = m.embed(tokens)                                                 # [1, S, D]
        for layer in m.layers:
            attn = layer.self_attn
            h = _rms_norm(x, layer.input_layernorm, fused)
            keys, values = cache.keys[layer.index], cache.values[layer.index]   # [1, H_kv, T, hd]
            if fused:
                q = cuda_ops.rotary_kv(attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), keys, values, positions[:1],
                                       m.rope.inv_freq, m.rope.attention_scaling, attn.head_dim,
                                       m.args.rotary_dim)[None]                    # [1, H, S, hd]
                k, v = keys[:, :, begin:begin + S], values[:, :, begin:begin + S]
            else:
                q = rotary(attn.q_proj(h).view(1, S, attn.num_heads, attn.head_dim)).transpose(1, 2)
                k = rotary(attn.k_proj(h).view(1, S, attn.num_kv_heads, attn.head_dim)).transpose(1, 2)
                v = attn.v_proj(h).view(1, S, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
                keys[:, :, begin:begin + S] = k
                values[:, :, begin:begin + S] = v
            groups = attn.num_heads // attn.num_kv_heads
            if begin == 0 and layer.sliding_window is None:  # causal over the chunk alone: flash attention, GQA
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
            else:
                slot = torch.arange(begin + S, device=m.device)
                mask = slot[None, :] <= positions[:, None]                    # [S, T]
                if layer.sliding_window is not None:
                    mask &= positions[:, None] - slot[None, :] < layer.sliding_window
                out = F.scaled_dot_product_attention(q, keys[:, :, :begin + S].repeat_interleave(groups, 1),
                                                     values[:, :, :begin + S].repeat_interleave(groups, 1),
                                                     attn_mask=mask[None, None])
            x = x + m.tp.all_reduce(attn.o_proj(out.transpose(1, 2).reshape(1, S, attn.num_heads * attn.head_dim)))
            h = _rms_norm(x, layer.post_attention_layernorm, fused)
            mlp = layer.mlp
            if not _is_gated(mlp):  # a mixture of experts: its own routing, op by op
                x = x + m.tp.all_reduce(mlp(h))
                continue
            gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            x = x + m.tp.all_reduce(mlp.down_proj(cuda_ops.silu_mul(gate, up) if fused else F.silu(gate) * up))
        cache.advance(S)
        return x

    @torch.inference_mode()
    def step(self, token: int | torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Decode one token into slot cache.length → logits [V] in the model's dtype (no cast kernel in the
        graph: the caller converts what it keeps). token: an int, a device tensor holding it,
        or None for `greedy_token`, the argmax of the previous step's logits, which the graph left on the
        device (greedy decoding without a copy to the device). The graph also advances its position, so a
        step that follows the previous one writes nothing before its replay."""
        if cache.batch_size != 1:
            raise TrimtabError(f"the CUDA graph decoder runs batch 1, got a cache of batch {cache.batch_size}")
        cache.ensure_room(1)
        if cache is not self.cache:
            self._capture(cache)
        if token is None:
            if not self.greedy_ready:
                raise TrimtabError("step(None, cache) decodes the previous step's argmax: it needs a step before it "
                                   "on this cache, with no prefill between")
        elif isinstance(token, torch.Tensor):
            self.token.copy_(token.view(1, 1))
        else:
            self.token.fill_(int(token))
        if self.graph_position != cache.length:  # a prefill or a new sequence since the last step
            self.position.fill_(cache.length)
        self.graph.replay()
        cache.advance(1)
        self.graph_position, self.greedy_ready = cache.length, True
        return self.logits

    @property
    def greedy_token(self) -> torch.Tensor:
        """[1, 1] int64 on the device: the argmax of the last step's logits (the first index of the largest),
        which `step(None, cache)` decodes next; valid until the next step."""
        if not self.greedy_ready:
            raise TrimtabError("no greedy token yet: it is the argmax of the last decode step's logits")
        return self.token

    def pipelined_tokens(self, token: int, cache: KVCache, choose: TokenChooser | None = None) -> Iterator[int]:
        """Decoding from `token` (fed into slot cache.length): yields each step's next token, the argmax of its
        logits chosen inside the graph (greedy) or, given `choose`, what choose(logits) picks on the device
        behind the step (the sampler: generation.SamplingOnDevice). Pipelined: a step's replay (and its choice)
        is queued before the token of the step before is read, so the GPU does not wait for the host between
        tokens. Closing the generator (`contextlib.closing`, or the end of a `for` over it that runs to
        exhaustion: it runs until the cache is full) forgets the step queued past the last token taken: the
        cache then holds `token` and every token taken but the last, as step() by step() would leave it. A
        token with a problem (NaN logits; for `choose`, what its `error` says) raises TrimtabError instead. One
        loop at a time per GPU (it reads through one set of buffers per device: _pipeline_reading)."""
        device = self.model.device
        kept, landed, reader = _pipeline_reading(device)
        launched = taken = 0

        def launch(fed: int | torch.Tensor | None) -> torch.Tensor | None:
            """Queue a step and its choice → the chosen token on the device, which the next step reads."""
            nonlocal launched
            logits = self.step(fed, cache)                                         # [V]
            chosen = self.greedy_out if choose is None else choose(logits)  # [2] (token, problem)
            kept[launched % 2].copy_(chosen)   # before the next step overwrites it
            landed[launched % 2].record()
            launched += 1
            return None if choose is None else chosen[:1]

        def read(step: int) -> list[int]:  # waits for that step only, not for the one queued behind it
            with torch.cuda.stream(reader):
                reader.wait_event(landed[step % 2])
                return kept[step % 2].tolist()

        fed = launch(token)
        try:
            while taken < launched:
                if cache.length < cache.max_len:
                    fed = launch(fed)      # queued behind the step whose token is read next
                chosen, problem = read(taken)
                if problem:
                    raise (choose.error(problem) if choose is not None else TrimtabError(
                        "the decode step's logits hold NaN (the model's weights or activations overflowed): "
                        "no token can be chosen"))
                taken += 1
                yield chosen
        finally:
            torch.cuda.current_stream(device).synchronize()
            if launched > taken:  # steps past the last token taken: their slots are forgotten
                cache.truncate(cache.length - (launched - taken))
                self.greedy_ready = False

    def _capture(self, cache: KVCache) -> None:
        device = self.model.device
        self.cache, self.graph = None, None
        # the step's token (input, then argmax) and whether that argmax is NaN (so some logit is): [2] int64
        self.greedy_out = torch.zeros(2, dtype=torch.int64, device=device)
        self.token = self.greedy_out[:1].view(1, 1)                          # [1, 1]
        self.position = torch.zeros(1, dtype=torch.int64, device=device)     # the step's slot: input, then + 1
        self.graph_position, self.greedy_ready = None, False                # the warm-up below moves both
        if self.fused:
            self.greedy_state = cuda_ops.new_greedy_state(device)
        self.slots = torch.arange(cache.max_len, device=device)   # [T]
        if self.fused:  # the GEMVs reserve their workspace in the warm-up, before the capture
            attn = self.model.layers[0].self_attn
            self.first_slot = cache.pad[:1]
            self.attention_workspace = cuda_ops.new_attention_workspace(attn.num_kv_heads, cache.max_len,
                                                                        attn.head_dim, device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture needs
            for _ in range(2):  # keys/values of a dummy token into slot cache.length, which the next real
                self.position.fill_(cache.length)  # step rewrites before anything attends to it
                self._step_ops(cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step_ops(cache)
        self.graph, self.cache = graph, cache

    def _step_ops(self, cache: KVCache) -> torch.Tensor:
        """One decode step as device ops only (no host syncs): captured into the graph. Ends by setting up
        the next step: token ← argmax(logits), position + 1."""
        logits = self._fused_step_ops(cache) if self.fused else self._torch_step_ops(cache)  # [V]
        if self.fused:
            cuda_ops.greedy_next(logits, self.greedy_out, self.position, self.greedy_state)
        else:
            best = logits.argmax().view(1)                 # NaN ranks first: the argmax is NaN where any logit is
            self.greedy_out.copy_(torch.cat([best, logits.gather(0, best).isnan().to(torch.int64)]))
            self.position.add_(1)
        return logits

    def _fused_step_ops(self, cache: KVCache) -> torch.Tensor:
        """The step through trimtab's decode kernels: 6 launches a layer (module docstring)."""
        m = self.model
        rope, rotary_dim = m.rope, m.args.rotary_dim
        x = m.embed(self.token).view(1, -1)                                 # [1, D]
        stats = None                        # x's Σ x² per 128 columns, where the GEMV that made x wrote them
        for layer in m.layers:
            attn = layer.self_attn
            keys, values = cache.keys[layer.index], cache.values[layer.index]  # [1, H_kv, T, hd]
            q, k, v = _normed_projections((attn.q_proj, attn.k_proj, attn.v_proj), x, layer.input_layernorm,
                                          stats)
            out = cuda_ops.decode_attention(q, k, v, keys, values, self.position, self.first_slot, rope.inv_freq,
                                            rope.attention_scaling, rotary_dim, self.attention_workspace,
                                            attn.head_dim ** -0.5, layer.sliding_window or 0)  # [1, H·hd]
            x, stats = _projection_plus(attn.o_proj, out, x, m.tp)
            mlp = layer.mlp
            if _is_gated(mlp):
                gate, up = _normed_projections((mlp.gate_proj, mlp.up_proj), x, layer.post_attention_layernorm, stats)
                x, stats = _projection_plus(mlp.down_proj, up, x, m.tp, gate=gate)
            else:
                h = _rms_norm(x, layer.post_attention_layernorm, fused=True)
                x, stats = x + m.tp.all_reduce(_routed_experts(mlp, h)), None
        return _normed_projections((m.lm_head,), x, m.norm, stats)[0].view(-1)     # [V] in the model's dtype

    def _torch_step_ops(self, cache: KVCache) -> torch.Tensor:
        m = self.model
        args = m.args
        x = m.embed(self.token)                                             # [1, 1, D]
        rotary = _Rotary(m.rope, args.rotary_dim, args.head_dim, self.position)
        masks = {}
        for layer in m.layers:
            window = layer.sliding_window
            if window not in masks:
                masks[window] = self._mask(cache, window)                   # [1, 1, 1, T] bool
            x = x + m.tp.all_reduce(self._attention(layer, _rms_norm(x, layer.input_layernorm), rotary, cache,
                                                    masks[window]))
            h = _rms_norm(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            x = x + m.tp.all_reduce(mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h)))
        return m.lm_head(_rms_norm(x, m.norm)).view(-1)                     # [V] in the model's dtype

    def _mask(self, cache: KVCache, window: int | None) -> torch.Tensor:
        allowed = (self.slots <= self.position) & (self.slots >= cache.pad[0])
        if window is not None:
            allowed &= self.position - self.slots < window
        return allowed.view(1, 1, 1, -1)

    def _attention(self, layer, h, rotary, cache: KVCache, mask) -> torch.Tensor:
        attn = layer.self_attn
        q = attn.q_proj(h).view(1, 1, attn.num_heads, attn.head_dim)
        k = attn.k_proj(h).view(1, 1, attn.num_kv_heads, attn.head_dim)
        v = attn.v_proj(h).view(1, 1, attn.num_kv_heads, attn.head_dim)
        q, k = rotary(q), rotary(k)
        keys, values = cache.keys[layer.index], cache.values[layer.index]  # [1, H_kv, T, hd]
        keys.index_copy_(2, self.position, k.transpose(1, 2))
        values.index_copy_(2, self.position, v.transpose(1, 2))
        # the query heads of one key/value head as that head's rows of queries: [1, H_kv, H / H_kv, hd],
        # so SDPA needs no GQA expansion and takes its memory-efficient kernel with the mask
        q = q.view(1, attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, attn.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return attn.o_proj(out.reshape(1, 1, attn.num_heads * attn.head_dim))


_PIPELINE_READING: dict[torch.device, tuple] = {}


def _pipeline_reading(device: torch.device) -> tuple[torch.Tensor, list, torch.cuda.Stream]:
    """What pipelined_tokens reads tokens with on `device`: two steps' (token, problem) kept on the device
    ([2, 2] int64), the events saying each is there, and a stream that copies one to the host once its event
    has passed. One set per device for the process: no pinned memory (torch's pinned-memory cache queries
    the events of its blocks' copies when it allocates, which a graph capture forbids) and nothing freed
    while a later graph is being captured."""
    if device not in _PIPELINE_READING:
        with torch.cuda.device(device):
            _PIPELINE_READING[device] = (torch.zeros(2, 2, dtype=torch.int64, device=device),
                                       [torch.cuda.Event(), torch.cuda.Event()], torch.cuda.Stream(device))
    return _PIPELINE_READING[device]


def unsupported(model) -> str | None:
    """Why the CUDA graph decoder cannot run `model`, or None. A gated MLP runs anyhow; a mixture of
    experts needs trimtab's attention kernels and its routed GEMV (every expert quantized, at most 8
    experts of one shape a layer), since choosing experts op by op would stop the GPU for the host."""
    mlp = model.layers[0].mlp
    if _is_gated(mlp):
        return None
    if not hasattr(mlp, "experts"):
        return "its MLP is neither gated nor a mixture of experts"
    for layer in model.layers:
        for experts in _expert_groups(layer.mlp):
            if not routes_gemv(experts):
                return (f"the routed GEMV takes 1 to {cuda_ops.MAX_GEMV_LAYERS} quantized experts of one shape "
                        f"a layer; layer {layer.index} has {len(experts)} experts of kinds "
                        f"{sorted({type(e).__name__ for e in experts})}")
    attn = model.layers[0].self_attn
    if not cuda_ops.attention_supported(attn.head_dim, attn.num_heads // attn.num_kv_heads):
        return (f"a mixture of experts runs in the graph with trimtab's attention kernels only (head_dim 64/128/256, "
                f"up to 8 query heads a KV head), not head_dim {attn.head_dim}")
    return None


def _is_gated(mlp) -> bool:
    return hasattr(mlp, "gate_proj")


def _expert_groups(moe) -> tuple[list, list, list]:
    """A mixture of experts' gate, up and down projections, each a list over its experts."""
    gates, ups, downs = zip(*moe.experts)
    return list(gates), list(ups), list(downs)


def _routed_experts(moe, h: torch.Tensor) -> torch.Tensor:
    """h [1, D] → [1, D]: the mixture of experts of one token (this rank's share), its top-k experts
    chosen on the GPU (no host sync) and run by three routed GEMVs; the weights renormalised over
    the chosen few, as SparseMoE does."""
    probs = F.softmax(moe.router(h).float(), dim=-1)                       # [1, E]
    weights, chosen = probs.topk(moe.top_k, dim=-1)                         # [1, k]
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(h.dtype)
    route = chosen.view(-1)
    gates, ups, downs = _expert_groups(moe)
    gate, up = routed_gemv(gates, h, route), routed_gemv(ups, h, route)     # [k, I]
    y = routed_gemv(downs, up, route, gate=gate)                           # [k, D]: down(silu(gate)·up)
    return (y * weights.view(-1, 1)).sum(dim=0, keepdim=True)


def _projections(linears, h: torch.Tensor) -> list[torch.Tensor]:
    """h Wᵀ for each layer: one GEMV launch where they are all quantized (shares_gemv), else one by one."""
    return gemv(linears, h) if shares_gemv(linears) else [linear(h) for linear in linears]


def _normed_projections(linears, x: torch.Tensor, norm, stats: torch.Tensor | None) -> list[torch.Tensor]:
    """RMSNorm(x)·weight Wᵀ for each layer: the norm inside one GEMV launch where x's statistics came
    with it (stats) and the layers share a GEMV, else trimtab's RMSNorm kernel, then the projections."""
    if stats is not None and shares_gemv(linears):
        return gemv(linears, x, norm=RowNorm(norm.weight, norm.eps, stats))
    return _projections(linears, _rms_norm(x, norm, fused=True))


def _projection_plus(linear, x: torch.Tensor, residual: torch.Tensor, tp, gate: torch.Tensor | None = None):
    """(residual + Σ_ranks linear(u), its statistics or None), u = x or silu(gate)·x: the activation
    inside the GEMV where the layer is quantized; where it is also whole (no all-reduce between), the
    residual add too, and the GEMV writes the sum's Σ y² per 128 columns for the next RMSNorm."""
    if not isinstance(linear, CudaPackedLinear):
        return residual + tp.all_reduce(linear(x if gate is None else F.silu(gate) * x)), None
    if tp.active:
        return residual + tp.all_reduce(linear.gemv(x, gate=gate)), None
    stats = torch.empty(statistics_shape(residual.shape[0], linear.out_features), dtype=torch.float32,
                        device=x.device)
    return linear.gemv(x, gate=gate, residual=residual, sumsq=stats), stats


def _rms_norm(x: torch.Tensor, norm, fused: bool = False) -> torch.Tensor:
    """HF RMSNorm (float32 statistics, rounded to x's dtype, times the weight): trimtab's kernel where
    `fused`, else 3 torch ops."""
    if fused:
        return cuda_ops.rms_norm(x.contiguous(), norm.weight, norm.eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=norm.eps).to(x.dtype) * norm.weight


class _Rotary:
    """HF rotary at device-side positions [S]: x·cos + rotate_half(x)·sin, with rotate_half(x)·sin
    computed as roll(x)·[-sin, sin] (3 kernels a tensor); partial rotary goes through ops."""

    def __init__(self, rope, rotary_dim: int, head_dim: int, positions: torch.Tensor):
        self.rope, self.positions = rope, positions
        self.full = rotary_dim == head_dim
        if self.full:
            freqs = positions.float()[:, None] * rope.inv_freq[None, :]                  # [S, R/2]
            cos, sin = freqs.cos() * rope.attention_scaling, freqs.sin() * rope.attention_scaling
            self.cos = torch.cat([cos, cos], -1)[None, :, None, :]                         # [1, S, 1, R]
            self.sin = torch.cat([-sin, sin], -1)[None, :, None, :]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [1, S, H, hd]
        if not self.full:
            return ops.rotary_embedding(x, self.positions.view(1, -1), self.rope.inv_freq, self.rope.attention_scaling)
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), sin)
