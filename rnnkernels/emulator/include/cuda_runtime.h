// cuda_runtime.h for the rnnkernels CPU emulator: device code only needs the shim.
#pragma once

#include "cuda_emulator.h"
