// Stands in for CUDA's <cuda_bf16.h> when the kernels are compiled for the host (emu/build.rs puts
// this folder first on the include path): everything device code needs comes from cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
