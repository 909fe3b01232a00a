// cufft.cpp: the stand-in libcufft.so: plans made with cufftMakePlanMany (2-D, the basic
// contiguous layout), caller-supplied work areas, and R2C / C2R / C2C executions computed as
// direct DFTs in double precision.
//
// Strict where cuFFT is: a current context to make and run a plan; auto-allocation switched off
// before the plan is made (afterwards it has no effect, so it is refused); a work area of at
// least the reported size, inside a live allocation, set before every execution that needs one;
// the input and output inside live allocations; and a C2R transform overwrites its input with NaN,
// as cuFFT may (its documentation: "the input array is overwritten").
// Conventions: forward (R2C, C2C with -1) is unnormalised exp(-i ...); inverse (C2R, C2C with +1)
// is unnormalised exp(+i ...). C2R reads the half spectrum [H, W/2+1] and treats it as the half
// of a Hermitian spectrum: the imaginary parts of its DC and Nyquist columns are ignored after
// the inverse along H, as a real-output transform does.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <complex>
#include <map>
#include <mutex>
#include <vector>

#include "fakecuda.h"

typedef int cufftHandle;
typedef int cufftResult;
enum {
    CUFFT_SUCCESS = 0,
    CUFFT_INVALID_PLAN = 1,
    CUFFT_ALLOC_FAILED = 2,
    CUFFT_INVALID_TYPE = 3,
    CUFFT_INVALID_VALUE = 4,
    CUFFT_EXEC_FAILED = 6,
    CUFFT_SETUP_FAILED = 7,
    CUFFT_INVALID_SIZE = 8,
    CUFFT_NOT_SUPPORTED = 16,
};
enum { CUFFT_R2C = 0x2a, CUFFT_C2R = 0x2c, CUFFT_C2C = 0x29 };

namespace {

struct Plan {
    bool made = false, auto_alloc = true;
    int type = 0, h = 0, w = 0, batch = 0;
    size_t work_size = 0;
    uint64_t work = 0;
    void* stream = nullptr;
};
std::mutex g_plans_lock;
std::map<cufftHandle, Plan> g_plans;
int g_next = 1;

typedef std::complex<double> cd;

Plan* plan_of(const char* api, cufftHandle h) {
    auto it = g_plans.find(h);
    if (it != g_plans.end()) return &it->second;
    fakecuda_say(api, "%d is not a live plan", h);
    return nullptr;
}

// In place over n values spaced `stride` apart: X[k] = sum_j x[j] e^{sign 2 pi i j k / n}.
void dft(cd* x, int n, long stride, int sign, std::vector<cd>& tmp) {
    std::vector<cd> tw(n);
    for (int m = 0; m < n; m++) tw[m] = std::polar(1.0, sign * 2.0 * M_PI * m / n);
    tmp.assign(n, cd(0, 0));
    for (int k = 0; k < n; k++) {
        cd s(0, 0);
        for (int j = 0; j < n; j++) s += x[j * stride] * tw[(long)j * k % n];
        tmp[k] = s;
    }
    for (int k = 0; k < n; k++) x[k * stride] = tmp[k];
}

// The checks every execution makes; returns the plan or null.
Plan* ready(const char* api, cufftHandle h, int type, uint64_t in, uint64_t in_bytes, uint64_t out, uint64_t out_bytes) {
    Plan* p = plan_of(api, h);
    if (!p) return nullptr;
    if (!p->made) {
        fakecuda_say(api, "the plan has not been made (cufftMakePlanMany)");
        return nullptr;
    }
    if (p->type != type) {
        fakecuda_say(api, "a plan of type 0x%x executed as 0x%x", p->type, type);
        return nullptr;
    }
    if (!fakecuda_context_ok(api) || !fakecuda_library_stream_ok(api, p->stream)) return nullptr;
    if (!p->auto_alloc && p->work_size > 0) {
        if (p->work == 0) {
            fakecuda_say(api, "auto-allocation is off and no work area was set");
            return nullptr;
        }
        if (!fakecuda_range_ok(api, "work area", p->work, p->work_size, 1)) return nullptr;
    }
    if (!fakecuda_range_ok(api, "input", in, in_bytes, 4) || !fakecuda_range_ok(api, "output", out, out_bytes, 4)) return nullptr;
    return p;
}

}  // namespace

FAKE_API cufftResult cufftCreate(cufftHandle* h) {
    if (!h) return CUFFT_INVALID_VALUE;
    if (!fakecuda_context_ok("cufftCreate")) return CUFFT_SETUP_FAILED;
    std::lock_guard<std::mutex> g(g_plans_lock);
    *h = g_next++;
    g_plans[*h] = Plan{};
    return CUFFT_SUCCESS;
}

FAKE_API cufftResult cufftDestroy(cufftHandle h) {
    std::lock_guard<std::mutex> g(g_plans_lock);
    if (!plan_of("cufftDestroy", h)) return CUFFT_INVALID_PLAN;
    g_plans.erase(h);
    return CUFFT_SUCCESS;
}

FAKE_API cufftResult cufftSetAutoAllocation(cufftHandle h, int on) {
    std::lock_guard<std::mutex> g(g_plans_lock);
    Plan* p = plan_of("cufftSetAutoAllocation", h);
    if (!p) return CUFFT_INVALID_PLAN;
    if (p->made) {
        fakecuda_say("cufftSetAutoAllocation", "called after the plan was made: cuFFT has already allocated its work area");
        return CUFFT_INVALID_VALUE;
    }
    p->auto_alloc = on != 0;
    return CUFFT_SUCCESS;
}

FAKE_API cufftResult cufftMakePlanMany(cufftHandle h, int rank, int* n, int* inembed, int istride, int idist, int* onembed, int ostride, int odist, int type,
                                       int batch, size_t* work_size) {
    const char* api = "cufftMakePlanMany";
    if (!fakecuda_context_ok(api)) return CUFFT_SETUP_FAILED;
    std::lock_guard<std::mutex> g(g_plans_lock);
    Plan* p = plan_of(api, h);
    if (!p) return CUFFT_INVALID_PLAN;
    if (type != CUFFT_R2C && type != CUFFT_C2R && type != CUFFT_C2C) return CUFFT_INVALID_TYPE;
    if (rank != 2 || !n) {
        fakecuda_say(api, "rank %d: the stand-in models 2-D plans", rank);
        return CUFFT_NOT_SUPPORTED;
    }
    if (inembed || onembed) {
        fakecuda_say(api, "advanced layouts (inembed/onembed) are not modelled by the stand-in");
        return CUFFT_NOT_SUPPORTED;
    }
    (void)istride, (void)idist, (void)ostride, (void)odist;  // ignored with null embeds, as in cuFFT
    if (n[0] < 1 || n[1] < 1 || batch < 1) return CUFFT_INVALID_SIZE;
    p->made = true;
    p->type = type;
    p->h = n[0];
    p->w = n[1];
    p->batch = batch;
    // A work area as large as one complex copy of the data: enough to make the caller allocate
    // and pass a real one.
    p->work_size = (size_t)batch * n[0] * n[1] * 8;
    if (work_size) *work_size = p->work_size;
    return CUFFT_SUCCESS;
}

FAKE_API cufftResult cufftSetStream(cufftHandle h, void* stream) {
    std::lock_guard<std::mutex> g(g_plans_lock);
    Plan* p = plan_of("cufftSetStream", h);
    if (!p) return CUFFT_INVALID_PLAN;
    if (!fakecuda_library_stream_ok("cufftSetStream", stream)) return CUFFT_INVALID_VALUE;
    p->stream = stream;
    return CUFFT_SUCCESS;
}

FAKE_API cufftResult cufftSetWorkArea(cufftHandle h, void* work) {
    std::lock_guard<std::mutex> g(g_plans_lock);
    Plan* p = plan_of("cufftSetWorkArea", h);
    if (!p) return CUFFT_INVALID_PLAN;
    if (p->made && !fakecuda_range_ok("cufftSetWorkArea", "work area", (uint64_t)work, p->work_size, 1)) return CUFFT_INVALID_VALUE;
    p->work = (uint64_t)work;
    return CUFFT_SUCCESS;
}

namespace {

// An execution: the plan, its checks, then `body(plan)` under the device lock.
template <typename F>
cufftResult exec(const char* api, cufftHandle h, int type, uint64_t in, uint64_t out, F body) {
    std::lock_guard<std::mutex> g(g_plans_lock);
    Plan* p = plan_of(api, h);
    if (!p) return CUFFT_INVALID_PLAN;
    const uint64_t real = (uint64_t)p->batch * p->h * p->w * 4, half = (uint64_t)p->batch * p->h * (p->w / 2 + 1) * 8,
                   full = (uint64_t)p->batch * p->h * p->w * 8;
    const uint64_t in_bytes = type == CUFFT_R2C ? real : (type == CUFFT_C2R ? half : full);
    const uint64_t out_bytes = type == CUFFT_R2C ? half : (type == CUFFT_C2R ? real : full);
    fakecuda_lock();
    bool ok = ready(api, h, type, in, in_bytes, out, out_bytes) != nullptr;
    if (ok && type != CUFFT_C2C && in == out) {
        fakecuda_say(api, "in-place real transforms (padded layout) are not modelled by the stand-in");
        ok = false;
    }
    if (ok) {
        body(*p);
        fakecuda_count(api);
    }
    fakecuda_unlock();
    return ok ? CUFFT_SUCCESS : CUFFT_EXEC_FAILED;
}

}  // namespace

FAKE_API cufftResult cufftExecR2C(cufftHandle h, float* in, float* out) {
    return exec("cufftExecR2C", h, CUFFT_R2C, (uint64_t)in, (uint64_t)out, [&](const Plan& p) {
        const long H = p.h, W = p.w, Wh = W / 2 + 1;
        std::vector<cd> buf(H * W), tmp;
        for (long b = 0; b < p.batch; b++) {
            const float* x = in + b * H * W;
            for (long i = 0; i < H * W; i++) buf[i] = cd(x[i], 0);
            for (long r = 0; r < H; r++) dft(&buf[r * W], W, 1, -1, tmp);
            for (long c = 0; c < Wh; c++) dft(&buf[c], H, W, -1, tmp);
            float* y = out + b * H * Wh * 2;
            for (long r = 0; r < H; r++) {
                for (long c = 0; c < Wh; c++) {
                    y[(r * Wh + c) * 2] = (float)buf[r * W + c].real();
                    y[(r * Wh + c) * 2 + 1] = (float)buf[r * W + c].imag();
                }
            }
        }
    });
}

FAKE_API cufftResult cufftExecC2R(cufftHandle h, float* in, float* out) {
    return exec("cufftExecC2R", h, CUFFT_C2R, (uint64_t)in, (uint64_t)out, [&](const Plan& p) {
        const long H = p.h, W = p.w, Wh = W / 2 + 1;
        std::vector<cd> z(H * Wh), tmp, tw(W);
        for (long m = 0; m < W; m++) tw[m] = std::polar(1.0, 2.0 * M_PI * m / W);
        for (long b = 0; b < p.batch; b++) {
            const float* zi = in + b * H * Wh * 2;
            for (long i = 0; i < H * Wh; i++) z[i] = cd(zi[2 * i], zi[2 * i + 1]);
            for (long c = 0; c < Wh; c++) dft(&z[c], H, Wh, +1, tmp);
            float* y = out + b * H * W;
            for (long r = 0; r < H; r++) {
                for (long x = 0; x < W; x++) {
                    // Hermitian extension along W: c_k = 1 on DC and Nyquist, 2 elsewhere.
                    double s = 0;
                    for (long k = 0; k < Wh; k++) {
                        const double ck = (k == 0 || (W % 2 == 0 && k == W / 2)) ? 1.0 : 2.0;
                        const cd e = tw[k * x % W];
                        s += ck * (z[r * Wh + k].real() * e.real() - z[r * Wh + k].imag() * e.imag());
                    }
                    y[r * W + x] = (float)s;
                }
            }
        }
        // cuFFT's C2R may overwrite its input; the stand-in always does.
        fakecuda_poison((uint64_t)in, (uint64_t)(p.batch * H * Wh * 8));
    });
}

FAKE_API cufftResult cufftExecC2C(cufftHandle h, float* in, float* out, int direction) {
    if (direction != -1 && direction != 1) return CUFFT_INVALID_VALUE;
    return exec("cufftExecC2C", h, CUFFT_C2C, (uint64_t)in, (uint64_t)out, [&](const Plan& p) {
        const long H = p.h, W = p.w;
        std::vector<cd> buf(H * W), tmp;
        for (long b = 0; b < p.batch; b++) {
            const float* zi = in + b * H * W * 2;
            for (long i = 0; i < H * W; i++) buf[i] = cd(zi[2 * i], zi[2 * i + 1]);
            for (long r = 0; r < H; r++) dft(&buf[r * W], W, 1, direction, tmp);
            for (long c = 0; c < W; c++) dft(&buf[c], H, W, direction, tmp);
            float* y = out + b * H * W * 2;
            for (long i = 0; i < H * W; i++) {
                y[2 * i] = (float)buf[i].real();
                y[2 * i + 1] = (float)buf[i].imag();
            }
        }
    });
}
