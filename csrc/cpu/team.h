// The threads of one sweep, started once for all its steps.
//
// A sweep's steps depend on each other, so its threads must meet between
// them. A parallel region per step (at::parallel_for) starts the threads and
// joins them every step, and libgomp's join makes a futex call each time: at
// mid sizes (LSTM, B=16, H=64) the threads spent a quarter of their time
// there. A team starts once per sweep, and its threads meet at a barrier
// that spins, then yields the core.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastrnn::cpu {

// The part of a step one thread computes: sequences [b0, b1), units [j0, j1).
struct Block {
  int64_t b0, b1, j0, j1;
};

// The threads a team may have: the intra-op threads, but no more than the
// CPUs this process may run on (a barrier's waiters would otherwise wait for
// threads the system has swapped out: 4 threads on 2 cores ran an LSTM
// training step 35% slower than 2).
int64_t team_threads();

// Below this many multiply-adds in all, a sweep or a product runs on the
// calling thread alone: starting the others (an OpenMP region) costs some
// microseconds, more than sharing so little work saves (an RNNCell step at
// B=32, H=64 took 21 us on one thread and 31 us on two).
constexpr int64_t kMinParallelWork = int64_t{1} << 18;

// team_threads(), or 1 for less than kMinParallelWork multiply-adds.
int64_t team_threads(int64_t work);

// How one step's B sequences x H units split into blocks, at most one per
// thread, where the step's work (work_per_row for each sequence) pays for
// the split. By sequences, each thread multiplies its own rows by all of
// W_hh. By units, in whole blocks of `unit_block` (the packed weights'
// panels), each thread multiplies the whole batch by its slice of W_hh,
// reading only that slice, and the threads exchange the states every step.
// Large batches split by sequences; so do batches of a full kernel block of
// rows a thread (8, the AVX-512 kernel's) where W_hh is packed (packed_bytes;
// 0 if not, or not to be weighed) and small enough to stay in cache from
// step to step (bench/NOTES.md). Smaller batches split by units, where a
// split by rows would leave each thread too few rows for an efficient
// product.
std::vector<Block> split_step(int64_t B, int64_t H, int64_t work_per_row, int64_t unit_block,
                              int64_t threads, int64_t packed_bytes);

// Meets `size` threads: each wait() returns once all have called it.
// Waiting spins for a while (a step takes microseconds), then yields the
// core, so that an oversubscribed machine still runs the thread awaited.
// abort() releases every wait for good (a thread failed).
class Barrier {
 public:
  void resize(int size) { size_.store(size, std::memory_order_relaxed); }
  void wait();
  void abort() { aborted_.store(true, std::memory_order_release); }

 private:
  std::atomic<int> size_{1};
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
  std::atomic<bool> aborted_{false};
};

// One thread's view of a running team.
class Team {
 public:
  Team(int thread, int threads, Barrier& barrier)
      : thread_(thread), threads_(threads), barrier_(barrier) {}

  // Calls fn(block) for each of this thread's blocks (the i-th of `blocks`
  // goes to thread i modulo the team's size) at a step where only the first
  // `rows` sequences still run (sorted by length). A split by sequences
  // (every block takes the same units) is moved so that those rows are
  // shared evenly, the last block also taking the sequences that have
  // ended: as cut for the whole batch, the first thread would run most of
  // them alone.
  template <typename F>
  void each(const std::vector<Block>& blocks, int64_t rows, const F& fn) const {
    const int64_t count = static_cast<int64_t>(blocks.size());
    const bool moved = count > 1 && rows < blocks.back().b1 &&
                       std::all_of(blocks.begin(), blocks.end(), [&](const Block& k) {
                         return k.j0 == blocks[0].j0 && k.j1 == blocks[0].j1;
                       });
    for (int64_t i = thread_; i < count; i += threads_) {
      Block k = blocks[i];
      if (moved) {
        k.b0 = rows * i / count;
        k.b1 = i + 1 == count ? k.b1 : rows * (i + 1) / count;
      }
      fn(k);
    }
  }

  // Waits for every thread of the team.
  void sync() const {
    if (threads_ > 1) barrier_.wait();
  }

  // Runs body(team) on up to `size` threads at once (the intra-op threads;
  // one inside a parallel region). body must run the same syncs on every
  // thread. An exception from any thread is rethrown once all have stopped.
  template <typename F>
  static void run(int64_t size, const F& body) {
    size = std::min<int64_t>(size, team_threads());
    Barrier barrier;
    if (size <= 1 || at::in_parallel_region()) {
      body(Team(0, 1, barrier));
      return;
    }
#ifdef _OPENMP
    std::atomic_flag failed = ATOMIC_FLAG_INIT;
    std::exception_ptr error;
    // No num_threads clause, as in at::parallel_for (libgomp's thread pool
    // misbehaves with one): the threads past `size` leave at once.
#pragma omp parallel
    {
      const int threads = static_cast<int>(std::min<int64_t>(size, omp_get_num_threads()));
      const int thread = omp_get_thread_num();
      if (thread < threads) {
        barrier.resize(threads);
        at::internal::ThreadIdGuard id(thread);
        c10::ParallelGuard marked(true);  // as at::parallel_for marks its threads
        try {
          body(Team(thread, threads, barrier));
        } catch (...) {
          if (!failed.test_and_set()) error = std::current_exception();
          barrier.abort();
        }
      }
    }
    if (error) std::rethrow_exception(error);
#else
    body(Team(0, 1, barrier));
#endif
  }

 private:
  int thread_, threads_;
  Barrier& barrier_;
};

}  // namespace fastrnn::cpu
