// emu_abi.h over the generated kernel registry.
#include "emu_abi.h"

#include <stdio.h>
#include <string.h>

#include "registry.h"

using lcpt_emu::kernel_registry;
using lcpt_emu::kernel_registry_len;

static bool valid(int i) { return i >= 0 && i < kernel_registry_len; }

extern "C" unsigned long long lcpt_emu_vector_accesses(void) { return lcpt_emu::vector_access_count(); }

extern "C" int lcpt_emu_kernel_count(void) { return kernel_registry_len; }
extern "C" const char* lcpt_emu_kernel_name(int i) { return valid(i) ? kernel_registry[i].name : nullptr; }
extern "C" int lcpt_emu_kernel_find(const char* name) {
    for (int i = 0; i < kernel_registry_len; ++i)
        if (strcmp(kernel_registry[i].name, name) == 0) return i;
    return -1;
}
extern "C" int lcpt_emu_kernel_static_smem(int i) { return valid(i) && kernel_registry[i].static_smem > 0 ? kernel_registry[i].static_smem : 0; }
extern "C" int lcpt_emu_kernel_registers(int i, int sm) {
    if (!valid(i)) return 0;
    if (sm >= 90) return kernel_registry[i].registers_sm90;
    if (sm >= 80) return kernel_registry[i].registers_sm80;
    return 0;
}
extern "C" int lcpt_emu_kernel_max_threads(int i) { return valid(i) ? kernel_registry[i].max_threads : 0; }
extern "C" int lcpt_emu_kernel_param_count(int i) { return valid(i) ? kernel_registry[i].param_count : -1; }
extern "C" size_t lcpt_emu_kernel_param_size(int i, int k) {
    return valid(i) && k >= 0 && k < kernel_registry[i].param_count ? kernel_registry[i].param_sizes[k] : 0;
}

extern "C" int lcpt_emu_launch(int i, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned dyn_smem,
                               void** params, char* err, size_t errlen) {
    if (!valid(i)) {
        if (err && errlen) snprintf(err, errlen, "no host kernel with index %d (%d kernels)", i, kernel_registry_len);
        return 400;  // CUDA_ERROR_INVALID_HANDLE
    }
    return lcpt_emu::run_grid(kernel_registry[i].name, kernel_registry[i].run, params, dim3{gx, gy, gz}, dim3{bx, by, bz}, dyn_smem, err, errlen);
}
