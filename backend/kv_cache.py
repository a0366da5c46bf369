"""A preallocated key/value cache for a batch of sequences of different lengths.

Sequences are left-padded so that every row writes its next token into the same slot. Row b's
first `pad[b]` slots hold padding that no query ever attends to; the token in slot j of row b
sits at position j - pad[b].
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, *, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.pad = torch.zeros(batch_size, dtype=torch.int64, device=device)  # [B]
        self.max_len = max_len
        self.length = 0  # slots filled, the same for every row

    @property
    def batch_size(self) -> int:
        return self.pad.shape[0]

    def ensure_room(self, new_tokens: int) -> None:
        """Raise unless `new_tokens` more tokens fit (no device work: a decode step checks this per token)."""
        if self.length + new_tokens > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {new_tokens} tokens > {self.max_len} slots")

    def slots(self, new_tokens: int) -> torch.Tensor:
        """Slot indices of the next `new_tokens` tokens: [S]."""
        self.ensure_room(new_tokens)
        return torch.arange(self.length, self.length + new_tokens, device=self.pad.device)

    def positions(self, new_tokens: int) -> torch.Tensor:
        """Rope positions of the next tokens: [B, S] (padding slots get 0)."""
        return (self.slots(new_tokens)[None, :] - self.pad[:, None]).clamp_min(0)

    def attention_mask(self, new_tokens: int, sliding_window: int | None = None) -> torch.Tensor:
        """Which cached slots each new token may attend to: bool [B, 1, S, length + S]."""
        query = self.slots(new_tokens)[:, None]                                    # [S, 1]
        key = torch.arange(self.length + new_tokens, device=self.pad.device)[None, :]  # [1, T]
        allowed = (key <= query)[None] & (key[None] >= self.pad[:, None, None])     # [B, S, T]
        if sliding_window is not None:
            allowed &= (query - key < sliding_window)[None]
        # A padding query sees no real key; letting it see itself keeps its output finite
        # (an all-masked softmax row is NaN, and NaN times a zero weight is still NaN).
        allowed |= (key == query)[None]
        return allowed[:, None]

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Write the new tokens' keys/values [B, H_kv, S, hd]; return all filled slots [B, H_kv, T, hd]."""
        end = self.length + keys.shape[2]
        self.keys[layer][:, :, self.length:end] = keys
        self.values[layer][:, :, self.length:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def truncate(self, length: int) -> None:
        """Keep the first `length` slots and forget the rest (the next tokens overwrite them): a rewind."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of {self.length} slots to {length}")
        self.length = length
