// kernels.h: the kernels of kernels/*.cu as libcuda.so of the stand-in knows them (kernels.cpp).
#pragma once
#include <functional>

#include "fakecuda.h"

struct FakeKernel {
    const char* name;
    // Reads the kernel's arguments from kernelParams with the kernel's own C types, checks every
    // pointer among them, then runs `grid` blocks of `block` threads (tests/host/fno_host_shim.h).
    CUresult (*launch)(const FakeKernel* k, void** params, unsigned grid, unsigned block);
    // Reads the arguments now (kernelParams may be gone when the launch runs) and returns the
    // launch, to run later as `launch` would: a launch queued on a created stream.
    std::function<CUresult(unsigned grid, unsigned block)> (*bind)(const FakeKernel* k, void** params);
};

// The kernel of that name, or null.
const FakeKernel* fakecuda_kernel(const char* name);
// After a fault jumped out of a launch: forget its threads.
void fakecuda_abandon_launch();
// Hooks run before and after each block of the launches that follow (null: none).
void fakecuda_set_block_hooks(void (*begin)(unsigned), void (*end)(unsigned));
