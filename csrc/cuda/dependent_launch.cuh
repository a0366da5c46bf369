// Programmatic dependent launch (sm_90 and later; no-ops before): a kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization may start while the kernel before it in the
// stream still runs, once that kernel's blocks have all called allow_next_kernel (or finished). It
// must call grid_dependency_wait before it reads anything the kernel before wrote, or writes
// anything that kernel reads. The GEMV uses it to stream its weights during the previous kernel's
// last microseconds; the decode step's other kernels only allow it.
#pragma once

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

}  // namespace trimtab_cuda
