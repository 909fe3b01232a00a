//! The stand-in's fake NCCL (tests/host/fakecuda/nccl.cpp), which the data-parallel GPU tests run
//! on: ranks (threads here) meet through the id, sums come in rank order, and collectives that do
//! not match, or a rank that left, are errors on every rank instead of a hang. Where a real GPU and
//! NCCL are present, one rank over the real NCCL does the collectives fnokern's GPU ranks make.

mod common;

use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, DevicePtr, DevicePtrMut};
use libloading::Library;

#[repr(C)]
#[derive(Clone, Copy)]
struct Id {
    internal: [c_char; 128],
}

type Comm = *mut c_void;
const FLOAT32: i32 = 7;
const SUM: i32 = 0;
const INVALID_USAGE: i32 = 5;
const REMOTE_ERROR: i32 = 6;

/// The fake's entry points.
struct Nccl {
    lib: Library,
}

impl Nccl {
    fn get<T: Copy>(&self, name: &[u8]) -> T {
        // SAFETY: each name is looked up with the C signature nccl.cpp defines for it.
        unsafe { *self.lib.get::<T>(name).unwrap() }
    }
    fn unique_id(&self) -> Id {
        let f: unsafe extern "C" fn(*mut Id) -> i32 = self.get(b"ncclGetUniqueId\0");
        let mut id = Id { internal: [0; 128] };
        assert_eq!(unsafe { f(&mut id) }, 0);
        id
    }
    fn init(&self, n: i32, id: Id, rank: i32) -> Comm {
        let f: unsafe extern "C" fn(*mut Comm, i32, Id, i32) -> i32 = self.get(b"ncclCommInitRank\0");
        let mut c: Comm = std::ptr::null_mut();
        assert_eq!(unsafe { f(&mut c, n, id, rank) }, 0, "rank {rank} joins");
        c
    }
    fn all_reduce(&self, send: u64, recv: u64, count: usize, comm: Comm) -> i32 {
        let f: unsafe extern "C" fn(*const c_void, *mut c_void, usize, i32, i32, Comm, *mut c_void) -> i32 = self.get(b"ncclAllReduce\0");
        unsafe { f(send as *const c_void, recv as *mut c_void, count, FLOAT32, SUM, comm, std::ptr::null_mut()) }
    }
    fn all_gather(&self, send: u64, recv: u64, count: usize, comm: Comm) -> i32 {
        let f: unsafe extern "C" fn(*const c_void, *mut c_void, usize, i32, Comm, *mut c_void) -> i32 = self.get(b"ncclAllGather\0");
        unsafe { f(send as *const c_void, recv as *mut c_void, count, FLOAT32, comm, std::ptr::null_mut()) }
    }
    fn destroy(&self, comm: Comm) {
        let f: unsafe extern "C" fn(Comm) -> i32 = self.get(b"ncclCommDestroy\0");
        assert_eq!(unsafe { f(comm) }, 0);
    }
}

/// The fake, when the tests run on the stand-in (None, printed, otherwise).
fn fake(test: &str) -> Option<Arc<Nccl>> {
    let s = match common::standin::cuda() {
        common::standin::Cuda::Standin(s) => s,
        _ => {
            eprintln!("{test}: skipped: the fake NCCL runs on the driver stand-in only");
            return None;
        }
    };
    // SAFETY: our own test library (tests/host/fakecuda/nccl.cpp), linked to the loaded stand-in.
    let lib = unsafe { Library::new(s.dir.join("libnccl.so.2")) }.unwrap();
    Some(Arc::new(Nccl { lib }))
}

/// Runs `body(rank, comm)` on `n` threads, one rank each, and returns their results in rank order.
fn ranks<T: Send + 'static>(nccl: &Arc<Nccl>, n: i32, body: impl Fn(&Nccl, i32, Comm) -> T + Send + Sync + 'static) -> Vec<T> {
    let id = nccl.unique_id();
    let body = Arc::new(body);
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let (nccl, body) = (nccl.clone(), body.clone());
            std::thread::spawn(move || {
                let comm = nccl.init(n, id, r);
                body(&nccl, r, comm)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn ranks_meet_and_sum_in_rank_order() {
    let Some(nccl) = fake("ranks_meet_and_sum_in_rank_order") else { return };
    let out = ranks(&nccl, 3, |nccl, r, comm| {
        let stream = CudaContext::new(0).unwrap().default_stream();
        // 1e8 + 1 + ... : a sum whose rounding depends on its order.
        let mine: Vec<f32> = vec![if r == 0 { 1e8 } else { 3.0 }, r as f32];
        let send = stream.clone_htod(&mine).unwrap();
        let mut sum = stream.alloc_zeros::<f32>(2).unwrap();
        let mut all = stream.alloc_zeros::<f32>(6).unwrap();
        let (s, _g1) = send.device_ptr(&stream);
        let (d, _g2) = sum.device_ptr_mut(&stream);
        assert_eq!(nccl.all_reduce(s, d, 2, comm), 0);
        drop(_g2);
        let (a, _g3) = all.device_ptr_mut(&stream);
        assert_eq!(nccl.all_gather(s, a, 2, comm), 0);
        drop((_g1, _g3));
        nccl.destroy(comm);
        let got = (stream.clone_dtoh(&sum).unwrap(), stream.clone_dtoh(&all).unwrap());
        // A copy to the host is complete only once the stream is (the stand-in holds it to that).
        stream.synchronize().unwrap();
        got
    });
    let ordered = (1e8f32 + 3.0) + 3.0;
    for (r, (sum, all)) in out.iter().enumerate() {
        assert_eq!(sum, &vec![ordered, 3.0], "rank {r}'s sum, in rank order");
        assert_eq!(all, &vec![1e8, 0.0, 3.0, 1.0, 3.0, 2.0], "rank {r}'s gather");
    }
}

#[test]
fn collectives_that_differ_are_refused_on_every_rank() {
    let Some(nccl) = fake("collectives_that_differ_are_refused_on_every_rank") else { return };
    let t0 = Instant::now();
    // Rank 1 sums one element more than rank 0; then rank 1 gathers while rank 0 sums.
    let out = ranks(&nccl, 2, |nccl, r, comm| {
        let stream = CudaContext::new(0).unwrap().default_stream();
        let send = stream.alloc_zeros::<f32>(8).unwrap();
        let mut recv = stream.alloc_zeros::<f32>(16).unwrap();
        let (s, _g1) = send.device_ptr(&stream);
        let (d, _g2) = recv.device_ptr_mut(&stream);
        let count = if r == 0 { 4 } else { 5 };
        let first = nccl.all_reduce(s, d, count, comm);
        let second = if r == 0 { nccl.all_reduce(s, d, 4, comm) } else { nccl.all_gather(s, d, 4, comm) };
        drop((_g1, _g2));
        nccl.destroy(comm);
        (first, second)
    });
    assert_eq!(out, vec![(INVALID_USAGE, INVALID_USAGE); 2], "every rank is refused, twice");
    assert!(t0.elapsed() < Duration::from_secs(30), "no rank hangs");
}

#[test]
fn a_rank_that_left_is_an_error_not_a_hang() {
    let Some(nccl) = fake("a_rank_that_left_is_an_error_not_a_hang") else { return };
    let t0 = Instant::now();
    let out = ranks(&nccl, 2, |nccl, r, comm| {
        if r == 1 {
            nccl.destroy(comm);
            return 0;
        }
        std::thread::sleep(Duration::from_millis(200));
        let stream = CudaContext::new(0).unwrap().default_stream();
        let send = stream.alloc_zeros::<f32>(4).unwrap();
        let mut recv = stream.alloc_zeros::<f32>(4).unwrap();
        let (s, _g1) = send.device_ptr(&stream);
        let (d, _g2) = recv.device_ptr_mut(&stream);
        let code = nccl.all_reduce(s, d, 4, comm);
        drop((_g1, _g2));
        nccl.destroy(comm);
        code
    });
    assert_eq!(out[0], REMOTE_ERROR, "rank 0 learns that rank 1 left");
    assert!(t0.elapsed() < Duration::from_secs(30));
}

/// A real GPU with NCCL: a communicator of one rank, through cudarc as fnokern makes it, gathers
/// and sums as the collectives say (what only a card can show; skipped elsewhere).
#[test]
fn one_rank_over_the_real_nccl() {
    if !matches!(common::standin::cuda(), common::standin::Cuda::Real) || !unsafe { cudarc::nccl::sys::is_culib_present() } {
        eprintln!("one_rank_over_the_real_nccl: skipped: needs a GPU and NCCL (libnccl.so on the loader's path)");
        return;
    }
    let stream = CudaContext::new(0).unwrap().default_stream();
    let comm = cudarc::nccl::Comm::from_rank(stream.clone(), 0, 1, cudarc::nccl::Id::new().unwrap()).unwrap();
    let send = stream.clone_htod(&[1.5f32, -2.0, 3.25]).unwrap();
    let mut all = stream.alloc_zeros::<f32>(3).unwrap();
    comm.all_gather(&send, &mut all).unwrap();
    let mut sum = stream.alloc_zeros::<f32>(3).unwrap();
    comm.all_reduce(&send, &mut sum, &cudarc::nccl::ReduceOp::Sum).unwrap();
    let (all, sum) = (stream.clone_dtoh(&all).unwrap(), stream.clone_dtoh(&sum).unwrap());
    stream.synchronize().unwrap();
    assert_eq!(all, vec![1.5, -2.0, 3.25]);
    assert_eq!(sum, vec![1.5, -2.0, 3.25]);
}
