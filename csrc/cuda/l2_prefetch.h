// Prefetching the next kernel's weights into L2 while this kernel ends (sm_90: cp.async.bulk.prefetch.L2).
//
// A decode step's GEMVs leave DRAM idle at each kernel boundary: while a GEMV's blocks meet over their
// shared tiles and the next GEMV's blocks start, stage x and wait for their first chunks, no weight is
// streaming; the attention between the q/k/v and o GEMVs barely uses DRAM at all. A kernel given an
// L2Prefetch sends the start of each of the next GEMV's block runs to L2 as it ends (the GEMV) or as it
// starts (the attention's merge), so the next GEMV's first chunks come from L2 and its DRAM stream
// starts that much earlier. Weights never depend on a kernel's output: prefetching them is always safe.
#pragma once

#include <stdint.h>

namespace trimtab_cuda {

// `runs` pieces [base + r · stride, + bytes), r < runs (bytes a multiple of 16, base and stride too)
struct L2Run {
  const char* base;
  int64_t stride;
  int32_t bytes;
  int32_t runs;
};

constexpr int kMaxL2Runs = 2 * 8;  // words and scales of up to kMaxGemvLayers layers

struct L2Prefetch {
  L2Run parts[kMaxL2Runs];
  int count;  // 0: nothing to prefetch
};

#ifdef __CUDACC__
constexpr int kL2PrefetchStep = 128;  // bytes a prefetch instruction asks for (an L2 line)

// The lines w, w + workers, ... of the parts' pieces, numbered part after part: worker w's share, for
// `workers` threads. One prefetch.global.L2 a line: fire and forget (cp.async.bulk.prefetch.L2, one
// instruction a piece, made the step 0.7-4.7 ms slower: its blocks waited for their bulk requests).
__device__ __forceinline__ void prefetch_share(const L2Prefetch& p, int worker, int workers) {
  int numbered = 0;  // lines of the parts before
  for (int i = 0; i < p.count; ++i) {
    const L2Run& r = p.parts[i];
    const int per_run = (r.bytes + kL2PrefetchStep - 1) / kL2PrefetchStep, lines = per_run * r.runs;
    int j = (worker - numbered) % workers;
    for (j += j < 0 ? workers : 0; j < lines; j += workers) {
      const int run = j / per_run;
      const char* line = r.base + run * r.stride + (j - run * per_run) * kL2PrefetchStep;
      asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
    }
    numbered += lines;
  }
}
#endif

}  // namespace trimtab_cuda
