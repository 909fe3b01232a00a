// cublas.cpp: the stand-in libcublas.so: the handle calls cudarc makes and SGEMM (single and
// strided-batched), computed by the definition of column-major BLAS with double accumulation.
//
// Strict where cuBLAS is: a current context when a handle is made and used; m, n, k >= 0; the
// leading dimensions at least the rows they describe (lda >= max(1, rows of op(A) as stored),
// likewise ldb, ldc >= max(1, m)); every matrix's elements inside one live allocation; and C not
// read when beta is 0 (it may hold NaN). One handle used from two threads at once is refused,
// as it is not safe on a GPU either. In TF32 math mode (cublasSetMathMode with
// CUBLAS_TF32_TENSOR_OP_MATH) every element of A and B is rounded to TF32 (10 mantissa bits, to
// nearest, ties away from zero, as cvt.rna.tf32.f32) before it is multiplied, as a tensor core
// takes it; the products are summed in double as in the default mode.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <atomic>

#include "fakecuda.h"

typedef int cublasStatus_t;
enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum { CUBLAS_DEFAULT_MATH = 0, CUBLAS_PEDANTIC_MATH = 2, CUBLAS_TF32_TENSOR_OP_MATH = 3 };

struct FakeBlas {
    unsigned magic = 0xb1a5;
    void* stream = nullptr;
    std::atomic<int> busy{0};
    int math = CUBLAS_DEFAULT_MATH;
};
typedef FakeBlas* cublasHandle_t;

namespace {

bool handle_ok(const char* api, cublasHandle_t h) {
    if (h && h->magic == 0xb1a5) return true;
    fakecuda_say(api, "%p is not a live cuBLAS handle", (void*)h);
    return false;
}

// Marks the handle in use for one call; a second thread calling with it meanwhile is refused.
struct InUse {
    cublasHandle_t h;
    bool ok;
    InUse(const char* api, cublasHandle_t h_) : h(h_) {
        ok = h->busy.exchange(1) == 0;
        if (!ok) fakecuda_say(api, "the handle is in use by another thread (a cuBLAS handle must not be used from two threads at once)");
    }
    ~InUse() {
        if (ok) h->busy.store(0);
    }
};

// Element (r, c) of op(X) where X is stored column-major with leading dimension ld.
inline float at(const float* x, int op, int ld, long r, long c) { return op == CUBLAS_OP_N ? x[r + c * (long)ld] : x[c + r * (long)ld]; }

// x rounded to TF32: 10 mantissa bits, to nearest with ties away from zero (NaN and inf kept).
inline float tf32(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
    memcpy(&x, &u, 4);
    return x;
}

// The extent in bytes of a stored rows x cols column-major matrix with leading dimension ld.
inline uint64_t extent(long rows, long cols, int ld) { return rows == 0 || cols == 0 ? 0 : ((uint64_t)(cols - 1) * ld + rows) * 4; }

cublasStatus_t check_gemm(const char* api, cublasHandle_t h, int ta, int tb, int m, int n, int k, const float* alpha, const float* beta, int lda, int ldb,
                          int ldc) {
    if (!handle_ok(api, h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!fakecuda_context_ok(api)) return CUBLAS_STATUS_EXECUTION_FAILED;
    if (!fakecuda_library_stream_ok(api, h->stream)) return CUBLAS_STATUS_EXECUTION_FAILED;
    if ((ta != CUBLAS_OP_N && ta != CUBLAS_OP_T) || (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T)) {
        fakecuda_say(api, "transa %d, transb %d: only N and T are modelled (real data)", ta, tb);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (m < 0 || n < 0 || k < 0) {
        fakecuda_say(api, "negative size m %d n %d k %d", m, n, k);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    const int a_rows = ta == CUBLAS_OP_N ? m : k, b_rows = tb == CUBLAS_OP_N ? k : n;
    if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1)) {
        fakecuda_say(api, "leading dimensions lda %d ldb %d ldc %d for m %d n %d k %d (transa %d, transb %d): each must be at least its matrix's stored rows", lda,
                     ldb, ldc, m, n, k, ta, tb);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (!alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}

bool ranges_ok(const char* api, int ta, int tb, int m, int n, int k, const float* A, int lda, long long sa, const float* B, int ldb, long long sb,
               const float* C, int ldc, long long sc, int batch) {
    const long a_rows = ta == CUBLAS_OP_N ? m : k, a_cols = ta == CUBLAS_OP_N ? k : m;
    const long b_rows = tb == CUBLAS_OP_N ? k : n, b_cols = tb == CUBLAS_OP_N ? n : k;
    const uint64_t ea = extent(a_rows, a_cols, lda), eb = extent(b_rows, b_cols, ldb), ec = extent(m, n, ldc);
    const uint64_t last = (uint64_t)(batch - 1);
    // Every item's matrix lies between the first item's start and the last item's end.
    bool ok = true;
    if (ea) ok &= fakecuda_range_ok(api, "A", (uint64_t)A, last * (uint64_t)sa * 4 + ea, 4) != 0;
    if (eb) ok &= fakecuda_range_ok(api, "B", (uint64_t)B, last * (uint64_t)sb * 4 + eb, 4) != 0;
    if (ec) ok &= fakecuda_range_ok(api, "C", (uint64_t)C, last * (uint64_t)sc * 4 + ec, 4) != 0;
    return ok;
}

void gemm(bool round_tf32, int ta, int tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) {
    auto in = [round_tf32](float v) { return (double)(round_tf32 ? tf32(v) : v); };
    for (long j = 0; j < n; j++) {
        for (long i = 0; i < m; i++) {
            double s = 0.0;
            for (long p = 0; p < k; p++) s += in(at(A, ta, lda, i, p)) * in(at(B, tb, ldb, p, j));
            float& c = C[i + j * (long)ldc];
            // beta == 0: C is written, never read (BLAS semantics: it may hold NaN).
            c = beta == 0.0f ? (float)(alpha * s) : (float)(alpha * s + (double)beta * c);
        }
    }
}

}  // namespace

FAKE_API cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
    if (!h) return CUBLAS_STATUS_INVALID_VALUE;
    if (!fakecuda_context_ok("cublasCreate_v2")) return CUBLAS_STATUS_NOT_INITIALIZED;
    *h = new FakeBlas;
    return CUBLAS_STATUS_SUCCESS;
}

FAKE_API cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    if (!handle_ok("cublasDestroy_v2", h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->magic = 0;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

FAKE_API cublasStatus_t cublasSetStream_v2(cublasHandle_t h, void* stream) {
    if (!handle_ok("cublasSetStream_v2", h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!fakecuda_library_stream_ok("cublasSetStream_v2", stream)) return CUBLAS_STATUS_INVALID_VALUE;
    h->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

FAKE_API cublasStatus_t cublasSetMathMode(cublasHandle_t h, int mode) {
    if (!handle_ok("cublasSetMathMode", h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (mode != CUBLAS_DEFAULT_MATH && mode != CUBLAS_PEDANTIC_MATH && mode != CUBLAS_TF32_TENSOR_OP_MATH) {
        fakecuda_say("cublasSetMathMode", "math mode %d is not modelled (default, pedantic and TF32 are)", mode);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    h->math = mode;
    return CUBLAS_STATUS_SUCCESS;
}

FAKE_API cublasStatus_t cublasGetMathMode(cublasHandle_t h, int* mode) {
    if (!handle_ok("cublasGetMathMode", h) || !mode) return CUBLAS_STATUS_INVALID_VALUE;
    *mode = h->math;
    return CUBLAS_STATUS_SUCCESS;
}

FAKE_API cublasStatus_t cublasSgemm_v2(cublasHandle_t h, int ta, int tb, int m, int n, int k, const float* alpha, const float* A, int lda, const float* B,
                                       int ldb, const float* beta, float* C, int ldc) {
    const char* api = "cublasSgemm_v2";
    if (cublasStatus_t s = check_gemm(api, h, ta, tb, m, n, k, alpha, beta, lda, ldb, ldc)) return s;
    InUse use(api, h);
    if (!use.ok) return CUBLAS_STATUS_EXECUTION_FAILED;
    fakecuda_lock();
    const bool ok = ranges_ok(api, ta, tb, m, n, k, A, lda, 0, B, ldb, 0, C, ldc, 0, 1);
    if (ok) {
        gemm(h->math == CUBLAS_TF32_TENSOR_OP_MATH, ta, tb, m, n, k, *alpha, A, lda, B, ldb, *beta, C, ldc);
        fakecuda_count(api);
    }
    fakecuda_unlock();
    return ok ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

FAKE_API cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, int ta, int tb, int m, int n, int k, const float* alpha, const float* A, int lda,
                                                  long long sa, const float* B, int ldb, long long sb, const float* beta, float* C, int ldc, long long sc,
                                                  int batch) {
    const char* api = "cublasSgemmStridedBatched";
    if (cublasStatus_t s = check_gemm(api, h, ta, tb, m, n, k, alpha, beta, lda, ldb, ldc)) return s;
    if (batch < 0 || sa < 0 || sb < 0 || sc < 0) {
        fakecuda_say(api, "batch %d with strides %lld, %lld, %lld", batch, sa, sb, sc);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (batch == 0) return CUBLAS_STATUS_SUCCESS;
    InUse use(api, h);
    if (!use.ok) return CUBLAS_STATUS_EXECUTION_FAILED;
    fakecuda_lock();
    const bool ok = ranges_ok(api, ta, tb, m, n, k, A, lda, sa, B, ldb, sb, C, ldc, sc, batch);
    if (ok) {
        for (int b = 0; b < batch; b++)
            gemm(h->math == CUBLAS_TF32_TENSOR_OP_MATH, ta, tb, m, n, k, *alpha, A + b * sa, lda, B + b * sb, ldb, *beta, C + b * sc, ldc);
        fakecuda_count(api);
    }
    fakecuda_unlock();
    return ok ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}
