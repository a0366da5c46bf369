"""`trimtab convert`: quantize a float model into trimtab's format (ExLlamaV2's flags, same meaning).

    trimtab convert -i MODEL -o OUT_DIR -b 4.5 [-hb 6] [-g 64] [--method rtn] [-ss 8192] [--force]

MODEL is a Hugging Face dir, a .gguf file (dequantized first) or `default` (the embedded model).
"""
from __future__ import annotations

import argparse

from trimtab.backend.quant.convert import (DEFAULT_GROUP_SIZE, DEFAULT_HEAD_BITS, DEFAULT_SHARD_MB, METHODS,
                                           ConvertOptions, convert)


def add_convert_command(commands) -> None:
    p = commands.add_parser("convert", help="quantize a float model (HF dir, .gguf or 'default') to mixed 2-8 bits",
                            description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--in-dir", dest="input", required=True, metavar="IN",
                   help="float model: Hugging Face dir, .gguf file, or 'default' (the embedded SmolLM2-135M)")
    p.add_argument("-o", "--out-dir", dest="output", required=True, metavar="OUT",
                   help="output (and work) directory; refused if it holds files not made by trimtab convert")
    p.add_argument("-b", "--bits", type=float, required=True,
                   help="target bits per weight over the decoder's linear layers, scales included (2-8)")
    p.add_argument("-hb", "--head-bits", type=int, default=DEFAULT_HEAD_BITS,
                   help=f"bits of the output head: 2, 3, 4, 5, 6 or 8 (default {DEFAULT_HEAD_BITS})")
    p.add_argument("-g", "--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help=f"input rows per group, 32-128 (default {DEFAULT_GROUP_SIZE}); a ragged last group "
                        "takes what is left")
    p.add_argument("--method", default="rtn", choices=sorted(METHODS),
                   help="rtn: round-to-nearest with a per-column range search (no calibration)")
    p.add_argument("-ss", "--shard-size", dest="shard_mb", type=int, default=DEFAULT_SHARD_MB,
                   help=f"largest output shard in MB (default {DEFAULT_SHARD_MB})")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty directory (files not made by trimtab convert are never replaced)")
    p.set_defaults(run=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    result = convert(ConvertOptions(input=args.input, output=args.output, bits=args.bits, head_bits=args.head_bits,
                                    group_size=args.group_size, method=args.method, shard_mb=args.shard_mb,
                                    force=args.force))
    print(f"wrote {result.output}: {result.bits_per_weight:.3f} bits per weight over the decoder's linear layers "
          f"(head {result.head_bits_per_weight:.3f}), {result.size_bytes / 1e6:.1f} MB in "
          f"{len(result.files)} files, {result.seconds:.1f} s")
    return 0
