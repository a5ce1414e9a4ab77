// The C ABI between the Rust driver (emu/src/kernels.rs) and the host-compiled kernels
// (emu/cxx/). Kept tiny: the driver knows kernels only by name and index.
#pragma once
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

// Number of kernel entry points compiled for the host, and the name of entry i.
int lcpt_emu_kernel_count(void);
const char* lcpt_emu_kernel_name(int i);
// 16- and 8-byte global accesses (lcpt::load_pack and the like) made by this thread's launches.
unsigned long long lcpt_emu_vector_accesses(void);
// The byte device memory and shared memory hold before anything writes them: 0xff (NaN as f32
// and bf16), or LLAMA_CPT_EMU_POISON (0..255, e.g. 0x7f: 3.4e38, a value that fmaxf and
// comparisons do not skip as they skip NaN); an invalid value stops the process.
unsigned char lcpt_emu_poison_byte(void);
// Index of the entry named `name`, or -1.
int lcpt_emu_kernel_find(const char* name);
// Static shared memory bytes of entry i (what ptxas reports as smem), registers per thread on
// `sm` (80 or 90, from ptxas' report at build time; 0 when unknown), max threads per block
// (__launch_bounds__, else 1024).
int lcpt_emu_kernel_static_smem(int i);
int lcpt_emu_kernel_registers(int i, int sm);
int lcpt_emu_kernel_max_threads(int i);
// Number of parameters of entry i and the size in bytes of parameter k (from the kernel's C++
// signature), so that cuLaunchKernel can copy kernelParams before the launch runs on its stream.
int lcpt_emu_kernel_param_count(int i);
size_t lcpt_emu_kernel_param_size(int i, int k);

// Runs entry i to completion on the calling thread: grid (gx,gy,gz) of blocks of (bx,by,bz)
// threads, `dyn_smem` bytes of dynamic shared memory per block (allocated at exactly that size),
// arguments as cuLaunchKernel's kernelParams (params[k] points at argument k, typed by the
// kernel's own C++ signature). Returns 0, or a CUresult code with a message in err[0..errlen)
// (a warp collective whose mask names a lane that never arrives, a barrier deadlock, ...).
// Launch-configuration limits are the driver's job, checked before this is called.
int lcpt_emu_launch(int i, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                    unsigned dyn_smem, void** params, char* err, size_t errlen);

// The emulator's own unit tests (emu/src/kernels.rs), outside the kernel registry:
// - lcpt_emu_test_mma: one warp, lane l passes a[4l..4l+4), b[2l..2l+2) and accumulators
//   d[4l..4l+4), which receive its four results of mma.m16n8k16 (row.col, bf16 in, f32 out).
// - lcpt_emu_self_test: one block of `threads` threads of the named test kernel of
//   emu/cxx/self_test.cpp, writing `out` (see there); returns what lcpt_emu_launch returns.
int lcpt_emu_test_mma(float* d, const uint32_t* a, const uint32_t* b, char* err, size_t errlen);
int lcpt_emu_self_test(const char* which, unsigned threads, float* out, char* err, size_t errlen);

#ifdef __cplusplus
}
#endif
