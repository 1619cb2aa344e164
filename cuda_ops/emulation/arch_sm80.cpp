// The kernels of ms_deform_attn_kernels.cuh as compiled for sm_80 (__CUDA_ARCH__ 800), run on the CPU.
#define MSDA_EMULATED_ARCH 800
#define MSDA_ARCH_NAMESPACE sm80
#include "emulated_launchers.h"
