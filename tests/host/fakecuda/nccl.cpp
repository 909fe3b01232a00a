// nccl.cpp -> libnccl.so.2: the NCCL calls fnokern makes (through cudarc 0.19's `nccl` module),
// between processes on one machine, for the data-parallel tests on the stand-in.
//
// Ranks meet in a rendezvous directory named by the unique id: ncclGetUniqueId makes a fresh one,
// or, with NCCL_COMM_ID set (NCCL's own bootstrap without a broadcast of the id), every rank gets
// the same id from that variable. Each collective is a file per rank (a header: the operation,
// count, data type, reduction, root, and the rank's sequence number; then its send buffer); every
// rank waits for all ranks' files, checks that all headers agree, and computes the result in rank
// order (an ordered sum: the same bits on every rank and in every run). A mismatch (another
// operation, count, type, reduction or root) is refused with ncclInvalidUsage on every rank and a
// message naming both sides; a rank that left (ncclCommDestroy/Abort) or never comes
// (FAKENCCL_TIMEOUT_S, default 60 s) is ncclRemoteError or ncclSystemError: never a hang.
// Collectives run when they are called, on the default stream only (a created stream is refused: its
// work waits until something waits for it, see driver.cpp); a group runs its operations
// as they are called, which is right for the collectives (not for send/recv pairs).
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "fakecuda.h"

typedef int ncclResult_t;
enum { ncclSuccess = 0, ncclUnhandledCudaError = 1, ncclSystemError = 2, ncclInternalError = 3, ncclInvalidArgument = 4, ncclInvalidUsage = 5, ncclRemoteError = 6 };
enum { ncclInt8 = 0, ncclUint8 = 1, ncclInt32 = 2, ncclUint32 = 3, ncclInt64 = 4, ncclUint64 = 5, ncclFloat16 = 6, ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9 };
enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 };
enum Kind { AllReduce = 1, AllGather = 2, Broadcast = 3, Reduce = 4, ReduceScatter = 5 };

typedef struct {
    char internal[128];
} ncclUniqueId;

struct FakeComm {
    std::string dir;
    int rank, nranks;
    uint64_t seq;
    std::string last_error;
};
typedef FakeComm* ncclComm_t;

struct Header {
    uint32_t magic, kind, dtype, op;
    int32_t root, nranks;
    uint64_t count, seq;
};
static const uint32_t MAGIC = 0x6e63636cu;

static const char* kind_name(uint32_t k) {
    switch (k) {
        case AllReduce: return "AllReduce";
        case AllGather: return "AllGather";
        case Broadcast: return "Broadcast";
        case Reduce: return "Reduce";
        case ReduceScatter: return "ReduceScatter";
        default: return "?";
    }
}

static size_t dtype_size(uint32_t t) {
    switch (t) {
        case ncclInt8: case ncclUint8: return 1;
        case ncclFloat16: case ncclBfloat16: return 2;
        case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
        case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
        default: return 0;
    }
}

static thread_local std::string g_last;

static void say(FakeComm* c, const char* api, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
static void say(FakeComm* c, const char* api, const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    g_last = buf;
    if (c) c->last_error = buf;
    fprintf(stderr, "fakenccl: %s: %s\n", api, buf);
}

static double timeout_s() {
    const char* t = getenv("FAKENCCL_TIMEOUT_S");
    double v = t ? atof(t) : 60.0;
    return v > 0 ? v : 60.0;
}

static double now_s() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static bool exists(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0;
}

// Writes `bytes` to `path` whole: a temporary file renamed into place, so a reader sees all or nothing.
static bool write_file(const std::string& path, const std::vector<char>& bytes) {
    std::string tmp = path + ".tmp" + std::to_string(getpid());
    FILE* f = fopen(tmp.c_str(), "wb");
    if (!f) return false;
    bool ok = fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
    ok = fclose(f) == 0 && ok;
    return ok && rename(tmp.c_str(), path.c_str()) == 0;
}

static bool read_file(const std::string& path, std::vector<char>& out) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return false;
    out.clear();
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) out.insert(out.end(), buf, buf + n);
    fclose(f);
    return true;
}

static std::string rank_file(FakeComm* c, uint64_t seq, int rank) {
    return c->dir + "/s" + std::to_string(seq) + ".r" + std::to_string(rank);
}

FAKE_API ncclResult_t ncclGetVersion(int* version) {
    if (!version) return ncclInvalidArgument;
    *version = 23000;
    return ncclSuccess;
}

FAKE_API const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclSystemError: return "unhandled system error (fakenccl: a rank did not come)";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclInvalidUsage: return "invalid usage (fakenccl: the ranks' collectives differ)";
        case ncclRemoteError: return "remote process exited or there was a network error";
        default: return "unknown result code";
    }
}

FAKE_API const char* ncclGetLastError(ncclComm_t comm) {
    return comm ? comm->last_error.c_str() : g_last.c_str();
}

FAKE_API ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return ncclInvalidArgument;
    memset(id->internal, 0, sizeof id->internal);
    std::string dir;
    if (const char* cid = getenv("NCCL_COMM_ID")) {
        dir = "/tmp/fakenccl-";
        for (const char* p = cid; *p; ++p) dir += (isalnum((unsigned char)*p) ? *p : '_');
        mkdir(dir.c_str(), 0700);
    } else {
        char tmpl[] = "/tmp/fakenccl-XXXXXX";
        if (!mkdtemp(tmpl)) {
            say(nullptr, "ncclGetUniqueId", "cannot create a rendezvous directory: %s", strerror(errno));
            return ncclSystemError;
        }
        dir = tmpl;
    }
    if (dir.size() >= sizeof id->internal) return ncclInternalError;
    memcpy(id->internal, dir.c_str(), dir.size());
    return ncclSuccess;
}

// Waits until every rank's file `name(k)` exists; a rank that left ends the wait with
// ncclRemoteError, the timeout with ncclSystemError.
template <class Name>
static ncclResult_t wait_all(FakeComm* c, const char* api, Name name, bool joining = false) {
    double t0 = now_s(), limit = timeout_s();
    for (;;) {
        int missing = -1;
        for (int k = 0; k < c->nranks; ++k) {
            if (!exists(name(k))) {
                missing = k;
                break;
            }
        }
        if (missing < 0) return ncclSuccess;
        if (!joining && exists(c->dir + "/gone." + std::to_string(missing))) {
            say(c, api, "rank %d left the communicator before this collective (rank %d waits for it)", missing, c->rank);
            return ncclRemoteError;
        }
        if (now_s() - t0 > limit) {
            say(c, api, "rank %d did not come within %.0f s (FAKENCCL_TIMEOUT_S); rank %d gives up", missing, limit, c->rank);
            return ncclSystemError;
        }
        usleep(200);
    }
}

FAKE_API ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    if (!comm || nranks < 1 || rank < 0 || rank >= nranks) {
        say(nullptr, "ncclCommInitRank", "rank %d of %d is not a rank of the communicator", rank, nranks);
        return ncclInvalidArgument;
    }
    id.internal[sizeof id.internal - 1] = 0;
    FakeComm* c = new FakeComm{id.internal, rank, nranks, 0, ""};
    if (c->dir.rfind("/tmp/fakenccl-", 0) != 0) {
        say(c, "ncclCommInitRank", "the unique id names no rendezvous directory (was it made by ncclGetUniqueId?)");
        delete c;
        return ncclInvalidArgument;
    }
    mkdir(c->dir.c_str(), 0700);
    std::string me = std::to_string(rank);
    // What this rank left in a directory used before (NCCL_COMM_ID names the same one each time).
    if (DIR* d = opendir(c->dir.c_str())) {
        std::string suffix = ".r" + me;
        while (struct dirent* e = readdir(d)) {
            std::string n = e->d_name;
            if (n.size() > suffix.size() && n[0] == 's' && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0) unlink((c->dir + "/" + n).c_str());
        }
        closedir(d);
    }
    unlink((c->dir + "/gone." + me).c_str());
    std::vector<char> n(sizeof(int));
    memcpy(n.data(), &nranks, sizeof(int));
    if (!write_file(c->dir + "/join." + me, n)) {
        say(c, "ncclCommInitRank", "cannot write to %s: %s", c->dir.c_str(), strerror(errno));
        delete c;
        return ncclSystemError;
    }
    ncclResult_t r = wait_all(c, "ncclCommInitRank", [&](int k) { return c->dir + "/join." + std::to_string(k); }, true);
    if (r != ncclSuccess) {
        delete c;
        return r;
    }
    for (int k = 0; k < nranks; ++k) {
        std::vector<char> b;
        int theirs = 0;
        if (read_file(c->dir + "/join." + std::to_string(k), b) && b.size() == sizeof(int)) memcpy(&theirs, b.data(), sizeof(int));
        if (theirs != nranks) {
            say(c, "ncclCommInitRank", "rank %d joined a communicator of %d ranks, rank %d one of %d", k, theirs, rank, nranks);
            delete c;
            return ncclInvalidUsage;
        }
    }
    *comm = c;
    return ncclSuccess;
}

// Marks this rank gone; the last rank to leave removes the directory (the others may still read
// a rank's last files until they leave too).
static void leave(FakeComm* c) {
    std::vector<char> none;
    write_file(c->dir + "/gone." + std::to_string(c->rank), none);
    for (int k = 0; k < c->nranks; ++k)
        if (!exists(c->dir + "/gone." + std::to_string(k))) return;
    if (DIR* d = opendir(c->dir.c_str())) {
        while (struct dirent* e = readdir(d)) {
            std::string n = e->d_name;
            if (n != "." && n != "..") unlink((c->dir + "/" + n).c_str());
        }
        closedir(d);
    }
    rmdir(c->dir.c_str());
}

FAKE_API ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return ncclInvalidArgument;
    leave(comm);
    delete comm;
    return ncclSuccess;
}
FAKE_API ncclResult_t ncclCommAbort(ncclComm_t comm) { return ncclCommDestroy(comm); }
FAKE_API ncclResult_t ncclCommFinalize(ncclComm_t comm) { return comm ? ncclSuccess : ncclInvalidArgument; }
FAKE_API ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
    if (!comm || !count) return ncclInvalidArgument;
    *count = comm->nranks;
    return ncclSuccess;
}
FAKE_API ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
    if (!comm || !rank) return ncclInvalidArgument;
    *rank = comm->rank;
    return ncclSuccess;
}
FAKE_API ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device) {
    if (!comm || !device) return ncclInvalidArgument;
    *device = 0;
    return ncclSuccess;
}
FAKE_API ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* err) {
    if (!comm || !err) return ncclInvalidArgument;
    *err = ncclSuccess;
    return ncclSuccess;
}
FAKE_API ncclResult_t ncclGroupStart() { return ncclSuccess; }
FAKE_API ncclResult_t ncclGroupEnd() { return ncclSuccess; }

template <class T>
static void reduce_into(T* acc, const T* x, uint64_t n, uint32_t op) {
    for (uint64_t i = 0; i < n; ++i) {
        switch (op) {
            case ncclSum: case ncclAvg: acc[i] = acc[i] + x[i]; break;
            case ncclProd: acc[i] = acc[i] * x[i]; break;
            case ncclMax: acc[i] = x[i] > acc[i] ? x[i] : acc[i]; break;
            case ncclMin: acc[i] = x[i] < acc[i] ? x[i] : acc[i]; break;
        }
    }
}

// acc (op)= x over n elements of `dtype`; false for a type the fake does not reduce.
static bool reduce_typed(void* acc, const void* x, uint64_t n, uint32_t dtype, uint32_t op) {
    switch (dtype) {
        case ncclInt8: reduce_into((int8_t*)acc, (const int8_t*)x, n, op); return true;
        case ncclUint8: reduce_into((uint8_t*)acc, (const uint8_t*)x, n, op); return true;
        case ncclInt32: reduce_into((int32_t*)acc, (const int32_t*)x, n, op); return true;
        case ncclUint32: reduce_into((uint32_t*)acc, (const uint32_t*)x, n, op); return true;
        case ncclInt64: reduce_into((int64_t*)acc, (const int64_t*)x, n, op); return true;
        case ncclUint64: reduce_into((uint64_t*)acc, (const uint64_t*)x, n, op); return true;
        case ncclFloat32: reduce_into((float*)acc, (const float*)x, n, op); return true;
        case ncclFloat64: reduce_into((double*)acc, (const double*)x, n, op); return true;
        default: return false;
    }
}

template <class T>
static void divide(T* acc, uint64_t n, int by) {
    for (uint64_t i = 0; i < n; ++i) acc[i] = acc[i] / (T)by;
}

static ncclResult_t collective(const char* api, Kind kind, const void* send, void* recv, uint64_t count, uint32_t dtype, uint32_t op, int root, FakeComm* c) {
    if (!c) {
        say(nullptr, api, "no communicator");
        return ncclInvalidArgument;
    }
    size_t es = dtype_size(dtype);
    if (es == 0) {
        say(c, api, "data type %u is not one the fake knows", dtype);
        return ncclInvalidArgument;
    }
    if ((kind == Broadcast || kind == Reduce) && (root < 0 || root >= c->nranks)) {
        say(c, api, "root %d is not a rank of %d", root, c->nranks);
        return ncclInvalidArgument;
    }
    // What each rank sends, and what this rank receives, in elements.
    uint64_t n_send = kind == ReduceScatter ? count * c->nranks : count;
    uint64_t n_recv = kind == AllGather ? count * c->nranks : count;
    bool sends = kind != Broadcast || c->rank == root;
    bool receives = kind != Reduce || c->rank == root;
    fakecuda_lock();
    bool ok = (!sends || fakecuda_range_ok(api, "sendbuff", (uint64_t)send, n_send * es, es)) &&
              (!receives || fakecuda_range_ok(api, "recvbuff", (uint64_t)recv, n_recv * es, es));
    std::vector<char> mine(sizeof(Header) + (sends ? n_send * es : 0));
    uint64_t seq = c->seq + 1;
    Header h = {MAGIC, (uint32_t)kind, dtype, op, root, c->nranks, count, seq};
    memcpy(mine.data(), &h, sizeof h);
    if (ok && sends) memcpy(mine.data() + sizeof h, send, n_send * es);
    fakecuda_unlock();
    if (!ok) return ncclInvalidArgument;
    c->seq = seq;
    if (!write_file(rank_file(c, seq, c->rank), mine)) {
        say(c, api, "cannot write to %s: %s", c->dir.c_str(), strerror(errno));
        return ncclSystemError;
    }
    ncclResult_t r = wait_all(c, api, [&](int k) { return rank_file(c, seq, k); });
    if (r != ncclSuccess) return r;
    // Every rank is at this collective: none reads the previous one's files any more.
    if (seq > 1) unlink(rank_file(c, seq - 1, c->rank).c_str());
    std::vector<std::vector<char>> all(c->nranks);
    for (int k = 0; k < c->nranks; ++k) {
        if (!read_file(rank_file(c, seq, k), all[k]) || all[k].size() < sizeof(Header)) {
            say(c, api, "rank %d's data for collective #%llu is unreadable", k, (unsigned long long)seq);
            return ncclSystemError;
        }
        Header t;
        memcpy(&t, all[k].data(), sizeof t);
        bool same = t.magic == MAGIC && t.kind == h.kind && t.dtype == h.dtype && t.count == h.count && t.nranks == h.nranks &&
                    ((kind != AllReduce && kind != Reduce && kind != ReduceScatter) || t.op == h.op) && ((kind != Broadcast && kind != Reduce) || t.root == h.root);
        if (!same) {
            say(c, api, "collective #%llu differs between ranks: rank %d calls %s(count %llu, type %u, op %u, root %d), rank %d calls %s(count %llu, type %u, op %u, root %d)",
                (unsigned long long)seq, c->rank, kind_name(h.kind), (unsigned long long)h.count, h.dtype, h.op, h.root, k, kind_name(t.kind),
                (unsigned long long)t.count, t.dtype, t.op, t.root);
            return ncclInvalidUsage;
        }
    }
    if (!receives) return ncclSuccess;
    std::vector<char> out(n_recv * es);
    const char* base0 = nullptr;
    switch (kind) {
        case AllGather:
            for (int k = 0; k < c->nranks; ++k) memcpy(out.data() + k * count * es, all[k].data() + sizeof(Header), count * es);
            break;
        case Broadcast:
            memcpy(out.data(), all[root].data() + sizeof(Header), count * es);
            break;
        case AllReduce: case Reduce: case ReduceScatter: {
            // The sum in rank order: ((x0 + x1) + x2) + ...
            uint64_t off = kind == ReduceScatter ? (uint64_t)c->rank * count * es : 0;
            base0 = all[0].data() + sizeof(Header) + off;
            memcpy(out.data(), base0, count * es);
            for (int k = 1; k < c->nranks; ++k) {
                if (!reduce_typed(out.data(), all[k].data() + sizeof(Header) + off, count, dtype, op)) {
                    say(c, api, "the fake does not reduce data type %u", dtype);
                    return ncclInvalidArgument;
                }
            }
            if (op == ncclAvg) {
                if (dtype == ncclFloat32) divide((float*)out.data(), count, c->nranks);
                else if (dtype == ncclFloat64) divide((double*)out.data(), count, c->nranks);
                else {
                    say(c, api, "ncclAvg of an integer type");
                    return ncclInvalidArgument;
                }
            }
            break;
        }
    }
    fakecuda_lock();
    ok = fakecuda_range_ok(api, "recvbuff", (uint64_t)recv, n_recv * es, es);
    if (ok) memcpy(recv, out.data(), out.size());
    fakecuda_unlock();
    fakecuda_count(api);
    return ok ? ncclSuccess : ncclInvalidArgument;
}

FAKE_API ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int dtype, int op, ncclComm_t comm, void* stream) {
    if (!fakecuda_library_stream_ok("nccl", stream)) return ncclInvalidArgument;
    return collective("ncclAllReduce", AllReduce, send, recv, count, dtype, op, 0, comm);
}
FAKE_API ncclResult_t ncclAllGather(const void* send, void* recv, size_t sendcount, int dtype, ncclComm_t comm, void* stream) {
    if (!fakecuda_library_stream_ok("nccl", stream)) return ncclInvalidArgument;
    return collective("ncclAllGather", AllGather, send, recv, sendcount, dtype, 0, 0, comm);
}
FAKE_API ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, int dtype, int root, ncclComm_t comm, void* stream) {
    if (!fakecuda_library_stream_ok("nccl", stream)) return ncclInvalidArgument;
    return collective("ncclBroadcast", Broadcast, send, recv, count, dtype, 0, root, comm);
}
FAKE_API ncclResult_t ncclBcast(void* buff, size_t count, int dtype, int root, ncclComm_t comm, void* stream) {
    if (!fakecuda_library_stream_ok("nccl", stream)) return ncclInvalidArgument;
    return collective("ncclBcast", Broadcast, buff, buff, count, dtype, 0, root, comm);
}
FAKE_API ncclResult_t ncclReduce(const void* send, void* recv, size_t count, int dtype, int op, int root, ncclComm_t comm, void* stream) {
    if (!fakecuda_library_stream_ok("nccl", stream)) return ncclInvalidArgument;
    return collective("ncclReduce", Reduce, send, recv, count, dtype, op, root, comm);
}
FAKE_API ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recvcount, int dtype, int op, ncclComm_t comm, void* stream) {
    if (!fakecuda_library_stream_ok("nccl", stream)) return ncclInvalidArgument;
    return collective("ncclReduceScatter", ReduceScatter, send, recv, recvcount, dtype, op, 0, comm);
}
