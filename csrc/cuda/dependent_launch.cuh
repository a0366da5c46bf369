// Programmatic dependent launch (sm_90 and later; no-ops before): a kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization may start while the kernel before it in the
// stream still runs, once that kernel's blocks have all called allow_next_kernel (or finished). It
// must call grid_dependency_wait before it reads anything the kernel before wrote, or writes
// anything that kernel reads. The GEMV uses it to stream its weights during the previous kernel's
// last microseconds, the decode attention to load the cache's earlier slots during the q/k/v GEMV's,
// the attention's merge to wait for the attention already resident.
#pragma once

#include <cuda_runtime.h>

namespace trimtab_cuda {

__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

inline bool dependent_launch_supported() {  // on the current device
  int device = 0, major = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  return major >= 9;
}

// kernel<<<grid, block, shared, stream>>>(args...), allowed to start before the kernel before it ends
// where the device can (the kernel calls grid_dependency_wait before it touches that kernel's data).
template <typename... Params, typename... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
                             Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute overlap[1];
  overlap[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap[0].val.programmaticStreamSerializationAllowed = 1;
  if (dependent_launch_supported()) {
    config.attrs = overlap;
    config.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&config, kernel, args...);
}

}  // namespace trimtab_cuda
