// fakecuda.h: what the three libraries of the CUDA stand-in share (see README.md here).
//
// libcuda.so (driver.cpp + kernels.cpp) owns the state: the one device, its primary context, the
// memory table, the kernels and the call counters. libcublas.so and libcufft.so link against it
// and use the services below, so every pointer they are given is checked against the same table.
#pragma once
#include <stddef.h>
#include <stdint.h>

// CUDA driver types, as cudarc 0.19 (bindgen of the CUDA 13.0 headers) declares them.
typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct FakeContext* CUcontext;
typedef struct FakeStream* CUstream;
typedef struct FakeEvent* CUevent;
typedef struct FakeModule* CUmodule;
typedef struct FakeFunction* CUfunction;
typedef struct FakePool* CUmemoryPool;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_INVALID_ADDRESS_SPACE = 717,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_UNKNOWN = 999,
};

#define FAKE_API extern "C" __attribute__((visibility("default")))

// Services of libcuda.so for the other two libraries.
// Every call of the stand-in holds the device lock: one device; work on the default stream in call
// order, work on a created stream when something waits for it (driver.cpp's on_stream).
FAKE_API void fakecuda_lock();
FAKE_API void fakecuda_unlock();
// 1 when the calling thread has the (retained) primary context current and it has no sticky
// error; otherwise prints why, naming `api`, and returns 0.
FAKE_API int fakecuda_context_ok(const char* api);
// 1 when the stream handle is the default stream (null), the per-thread one or a live created
// stream; else prints why.
FAKE_API int fakecuda_stream_ok(const char* api, const void* stream);
// fakecuda_stream_ok for the libraries, which run their calls when they are made: 0 (saying why)
// for a created stream, whose work waits until something waits for it.
FAKE_API int fakecuda_library_stream_ok(const char* api, const void* stream);
// 1 when [ptr, ptr + bytes) lies inside one live allocation (and ptr is aligned to `align`);
// otherwise prints what `what` of `api` got wrong and returns 0. bytes may be 0.
FAKE_API int fakecuda_range_ok(const char* api, const char* what, uint64_t ptr, uint64_t bytes, uint64_t align);
// 1 unless something wrote into the bytes just before the start of ptr's allocation (the slack
// between its first guard page and its start, filled with NaN bytes); otherwise says so, naming
// `what` of `api`, and returns 0.
FAKE_API int fakecuda_slack_ok(const char* api, const char* what, uint64_t ptr);
// Bytes from ptr to the end of its live allocation (0 when ptr is in none).
FAKE_API uint64_t fakecuda_bytes_after(uint64_t ptr);
// Fills [ptr, ptr + bytes) with NaN bytes (0xff), as memory whose contents are undefined.
FAKE_API void fakecuda_poison(uint64_t ptr, uint64_t bytes);
// Counts one call of `name` (a kernel, or a cuBLAS/cuFFT entry point).
FAKE_API void fakecuda_count(const char* name);
// Prints a diagnostic of the stand-in to stderr: "fakecuda: <api>: <message>".
FAKE_API void fakecuda_say(const char* api, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// For tests (through dlsym): how many times `name` ran since the last reset.
FAKE_API uint64_t fakecuda_calls(const char* name);
FAKE_API void fakecuda_reset_calls();
// Every counter, "name=count\n" each, into buf (at most len bytes with the terminating 0); returns
// the length of the whole text, so a caller can size buf.
FAKE_API size_t fakecuda_counters(char* buf, size_t len);
