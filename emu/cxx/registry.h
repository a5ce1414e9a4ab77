// One entry of the kernel registry that emu/build.rs generates from the kernels themselves
// ($OUT_DIR/kernels_host.cpp): every `extern "C" __global__` of cuda/*.cu with its typed trampoline.
#pragma once
#include "cuda_emu.h"

namespace lcpt_emu {

struct KernelEntry {
    const char* name;
    BlockThreadFn run;          // Trampoline<&kernel>::run
    int param_count;
    const size_t* param_sizes;  // sizeof of each parameter, in order
    int max_threads;            // __launch_bounds__, else 1024
    int static_smem;            // ptxas' smem bytes (sm_90 build), -1 when unknown
    int registers_sm80;         // ptxas' registers per thread, 0 when unknown
    int registers_sm90;
};

extern const KernelEntry kernel_registry[];
extern const int kernel_registry_len;

template <auto F>
constexpr KernelEntry entry(const char* name, int max_threads, int static_smem, int regs80, int regs90) {
    return KernelEntry{name, &Trampoline<F>::run, Trampoline<F>::param_count, Trampoline<F>::param_sizes, max_threads, static_smem, regs80, regs90};
}

}  // namespace lcpt_emu
