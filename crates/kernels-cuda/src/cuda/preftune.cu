// preftune's CUDA kernels, one PTX module (`preftune`). Each family's header documents its
// kernels; crates/kernels-cuda/src/lib.rs lists the entry points and their launch shapes.
#include "norm.cuh"
#include "elementwise.cuh"
#include "logsoftmax.cuh"
#include "flash.cuh"
#include "flash_tc.cuh"
#include "decode.cuh"
#include "rng.cuh"
#include "optim.cuh"
