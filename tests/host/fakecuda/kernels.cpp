// kernels.cpp: every kernel of kernels/*.cu compiled for the host (through tests/host/
// fno_host_shim.h), and the table cuLaunchKernel looks them up in.
//
// The harness that builds the stand-in (tests/common/standin.rs) writes two files next to the
// build: all_kernels.inc, which includes every kernels/*.cu, and registry.inc, one
// FAKECUDA_KERNEL(name) per `extern "C" __global__` function it found there. A kernel's arguments
// are read from kernelParams with the types of its own C signature (decltype of the function), so
// a launcher that pushes an argument of another size or in another place reads as garbage, and
// every pointer argument must be null or point into a live allocation, aligned for its type.
#include <stdio.h>
#include <string.h>

#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "fno_host_shim.h"
#include "kernels.h"

#include "all_kernels.inc"

namespace {

// "float*", "const __half*": the C type as the compiler spells it.
template <typename T>
const char* type_name() {
    static const std::string name = [](const std::string f) {
        const size_t at = f.find("T = ") + 4;
        return f.substr(at, f.find_first_of(";]", at) - at);
    }(__PRETTY_FUNCTION__);
    return name.c_str();
}

template <typename T>
bool arg_ok(const char*, int, const T&) {
    return true;
}
template <typename T>
bool slack_ok(const char*, int, const T&) {
    return true;
}
template <typename T>
bool slack_ok(const char* kernel, int i, T* const& p) {
    if (p == nullptr) return true;
    char what[160];
    snprintf(what, sizeof what, "argument %d (%s)", i, type_name<T*>());
    return fakecuda_slack_ok(kernel, what, (uint64_t)(uintptr_t)p) != 0;
}
template <typename T>
bool arg_ok(const char* kernel, int i, T* const& p) {
    if (p == nullptr) return true;  // optional buffers are passed as null; the kernels test for it
    char what[160];
    snprintf(what, sizeof what, "argument %d (%s)", i, type_name<T*>());
    return fakecuda_range_ok(kernel, what, (uint64_t)(uintptr_t)p, 0, alignof(T)) != 0;
}

template <typename F>
struct Launcher;
template <typename... A>
struct Launcher<void (*)(A...)> {
    using Args = std::tuple<std::decay_t<A>...>;

    template <void (*K)(A...)>
    static CUresult launch(const FakeKernel* k, void** params, unsigned grid, unsigned block) {
        return run<K>(k, params, grid, block, std::index_sequence_for<A...>{});
    }

    template <void (*K)(A...)>
    static std::function<CUresult(unsigned, unsigned)> bind(const FakeKernel* k, void** params) {
        return bind_args<K>(k, params, std::index_sequence_for<A...>{});
    }

    template <void (*K)(A...), size_t... I>
    static std::function<CUresult(unsigned, unsigned)> bind_args(const FakeKernel* k, void** params, std::index_sequence<I...>) {
        auto args = std::make_shared<Args>(*static_cast<const std::decay_t<A>*>(params[I])...);
        return [k, args](unsigned grid, unsigned block) { return run_args<K>(k, *args, grid, block, std::index_sequence<I...>{}); };
    }

    template <void (*K)(A...), size_t... I>
    static CUresult run(const FakeKernel* k, void** params, unsigned grid, unsigned block, std::index_sequence<I...>) {
        Args args{*static_cast<const std::decay_t<A>*>(params[I])...};
        return run_args<K>(k, args, grid, block, std::index_sequence<I...>{});
    }

    template <void (*K)(A...), size_t... I>
    static CUresult run_args(const FakeKernel* k, Args& args, unsigned grid, unsigned block, std::index_sequence<I...>) {
        bool ok = true;
        ((ok = arg_ok(k->name, (int)I, std::get<I>(args)) && ok), ...);
        // On a GPU such a launch faults when the pointer is used.
        if (!ok) return CUDA_ERROR_ILLEGAL_ADDRESS;
        fno_host_run(grid, block, [](const void* c) { std::apply(K, *static_cast<const Args*>(c)); }, &args);
        // A write just before a buffer's start lands in its slack (not a guard page): found here.
        ((ok = slack_ok(k->name, (int)I, std::get<I>(args)) && ok), ...);
        return ok ? CUDA_SUCCESS : CUDA_ERROR_ILLEGAL_ADDRESS;
    }
};

#define FAKECUDA_KERNEL(name) {#name, &Launcher<decltype(&name)>::template launch<&name>, &Launcher<decltype(&name)>::template bind<&name>},
const FakeKernel g_kernels[] = {
#include "registry.inc"
};

}  // namespace

const FakeKernel* fakecuda_kernel(const char* name) {
    for (const FakeKernel& k : g_kernels) {
        if (strcmp(k.name, name) == 0) return &k;
    }
    return nullptr;
}

void fakecuda_abandon_launch() { fno_scheduler.abandon(); }

void fakecuda_set_block_hooks(void (*begin)(unsigned), void (*end)(unsigned)) {
    fno_block_begin = begin;
    fno_block_end = end;
}
