"""`trimtab convert`: quantize a float model into trimtab's format (ExLlamaV2's flags, same meaning).

    trimtab convert -i MODEL -o OUT_DIR [-b 4.125] [-hb 6] [-c TEXT] [-l 2048] [-r 100] [-mr 16] [-ml 2048]
                    [-m measurement.json] [-om] [-ss 8192] [-g 128] [--method gptq|rtn] [--force]

MODEL is a Hugging Face dir, a .gguf file (dequantized first) or `default` (the embedded model). OUT_DIR is
also the work dir: run the same command again after an interruption and it resumes.
"""
from __future__ import annotations

import argparse
import math

from trimtab.backend.quant.allocate import ALLOCATORS
from trimtab.backend.quant.convert import (DEFAULT_GROUP_SIZE, DEFAULT_HEAD_BITS, DEFAULT_SHARD_MB, METHODS,
                                           ConvertOptions, convert)

DEFAULTS = ConvertOptions(input="", output="")


def add_convert_command(commands) -> None:
    p = commands.add_parser("convert", help="quantize a float model (HF dir, .gguf or 'default') to mixed 2-8 bits",
                            description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--in-dir", dest="input", required=True, metavar="IN",
                   help="float model: Hugging Face dir, .gguf file, or 'default' (the embedded SmolLM2-135M)")
    p.add_argument("-o", "--out-dir", dest="output", required=True, metavar="OUT",
                   help="output and work directory; an interrupted convert run again with the same flags resumes; "
                        "refused if it holds files not made by trimtab convert")
    p.add_argument("-b", "--bits", type=float, default=DEFAULTS.bits,
                   help=f"target bits per weight over the decoder's linear layers, scales included, 2-8 "
                        f"(default {DEFAULTS.bits})")
    p.add_argument("-hb", "--head-bits", type=int, default=DEFAULT_HEAD_BITS,
                   help=f"bits of the output head: 2, 3, 4, 5, 6 or 8 (default {DEFAULT_HEAD_BITS})")
    p.add_argument("-c", "--cal-dataset", dest="calibration", metavar="TEXT",
                   help="calibration text: .txt, .jsonl ('text' field) or .parquet ('text' column); default: "
                        "this Python's standard library source (docs/CONVERT.md)")
    p.add_argument("-l", "--length", type=int, default=DEFAULTS.length,
                   help=f"tokens per calibration row (default {DEFAULTS.length})")
    p.add_argument("-r", "--dataset-rows", dest="rows", type=int, default=DEFAULTS.rows,
                   help=f"calibration rows (default {DEFAULTS.rows})")
    p.add_argument("-mr", "--measurement-rows", dest="measure_rows", type=int, default=DEFAULTS.measure_rows,
                   help=f"rows of the measurement pass (default {DEFAULTS.measure_rows})")
    p.add_argument("-ml", "--measurement-length", dest="measure_length", type=int, default=DEFAULTS.measure_length,
                   help=f"tokens per measurement row (default {DEFAULTS.measure_length})")
    p.add_argument("-m", "--measurement", metavar="JSON", help="reuse a measurement.json of this model")
    p.add_argument("-om", "--measurement-only", dest="measure_only", action="store_true",
                   help="measure only: write OUT/measurement.json and stop")
    p.add_argument("-g", "--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help=f"input rows per group, 32-128 (default {DEFAULT_GROUP_SIZE}); gptq also measures its "
                        "halves down to 32 and picks per layer")
    p.add_argument("--method", default=DEFAULTS.method, choices=sorted(METHODS),
                   help="gptq: calibrated, measured widths (default); rtn: round-to-nearest, no calibration")
    p.add_argument("--allocation", default=DEFAULTS.allocation, choices=sorted(ALLOCATORS),
                   help=f"how gptq picks each layer's layout from the measurement (default {DEFAULTS.allocation})")
    p.add_argument("-ss", "--shard-size", dest="shard_mb", type=int, default=DEFAULT_SHARD_MB,
                   help=f"largest output shard in MB (default {DEFAULT_SHARD_MB})")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty directory (files not made by trimtab convert are never replaced)")
    p.set_defaults(run=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    result = convert(ConvertOptions(
        input=args.input, output=args.output, bits=args.bits, head_bits=args.head_bits, group_size=args.group_size,
        method=args.method, shard_mb=args.shard_mb, force=args.force, length=args.length, rows=args.rows,
        measure_rows=args.measure_rows, measure_length=args.measure_length, calibration=args.calibration,
        measurement=args.measurement, measure_only=args.measure_only, allocation=args.allocation))
    if result.resumed:
        print("resumed an interrupted convert: its finished layers were kept")
    if result.starved:
        print(f"{len(result.starved)} experts saw fewer calibration tokens than their input width and were "
              f"rounded to nearest (isotropic Hessian): {', '.join(result.starved)}")
    if math.isnan(result.bits_per_weight):
        print(f"wrote {result.output / 'measurement.json'} in {result.seconds:.1f} s")
        return 0
    print(f"wrote {result.output}: {result.bits_per_weight:.3f} bits per weight over the decoder's linear layers "
          f"(head {result.head_bits_per_weight:.3f}), {result.size_bytes / 1e6:.1f} MB in "
          f"{len(result.files)} files, {result.seconds:.1f} s")
    return 0
