// The kernels of ms_deform_attn_kernels.cuh as compiled for sm_90 (__CUDA_ARCH__ 900), run on the CPU.
#define MSDA_EMULATED_ARCH 900
#define MSDA_ARCH_NAMESPACE sm90
#include "emulated_launchers.h"
