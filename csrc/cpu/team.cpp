#include "cpu/team.h"

#ifdef __linux__
#include <sched.h>
#endif

namespace fastrnn::cpu {
namespace {

int64_t divup(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// [0, n) in at most `threads` contiguous chunks of at least `grain` where
// there is more than one: each chunk's (begin, end).
std::vector<std::pair<int64_t, int64_t>> chunks(int64_t n, int64_t grain, int64_t threads) {
  const int64_t count = n <= grain ? 1 : std::min(threads, divup(n, grain));
  const int64_t size = divup(n, std::max<int64_t>(1, count));
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t begin = 0; begin < n; begin += size) out.emplace_back(begin, std::min(n, begin + size));
  return out;
}

}  // namespace

int64_t team_threads() {
  static const int64_t cpus = [] {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return static_cast<int64_t>(CPU_COUNT(&set));
#endif
    return static_cast<int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), cpus));
}

int64_t team_threads(int64_t work) {
  return work < kMinParallelWork ? 1 : team_threads();
}

std::vector<Block> split_step(int64_t B, int64_t H, int64_t work_per_row, int64_t unit_block,
                              int64_t threads, int64_t packed_bytes) {
  // Below this many multiply-adds a thread's share does not pay for the meeting.
  constexpr int64_t kMinWork = 16384;
  constexpr int64_t kMinRowsPerThread = 32;
  constexpr int64_t kMinPackedRowsPerThread = 8;  // the AVX-512 kernel's block
  // Measured on the AMD EPYC (1 MiB of L2 a core, 32 MiB of L3): a packed
  // W_hh of 1-4 MiB read whole by each thread every step gained, 9-16 MiB
  // lost (bench/NOTES.md).
  constexpr int64_t kMaxCachedBytes = int64_t{4} << 20;
  threads = std::max<int64_t>(1, threads);
  const bool cached = packed_bytes > 0 && packed_bytes <= kMaxCachedBytes &&
                      B >= kMinPackedRowsPerThread * threads;
  std::vector<Block> blocks;
  if (B >= kMinRowsPerThread * threads || cached) {
    const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_row));
    for (const auto& [b0, b1] : chunks(B, grain, threads)) blocks.push_back({b0, b1, 0, H});
    return blocks;
  }
  const int64_t units = divup(H, unit_block);
  const int64_t block_work = std::max<int64_t>(1, B * work_per_row / std::max<int64_t>(1, units));
  const int64_t grain = std::max<int64_t>(1, kMinWork / block_work);
  for (const auto& [u0, u1] : chunks(units, grain, threads)) {
    blocks.push_back({0, B, u0 * unit_block, std::min(H, u1 * unit_block)});
  }
  if (blocks.empty()) blocks.push_back({0, B, 0, H});  // H = 0: one empty block
  return blocks;
}

void Barrier::wait() {
  // Pauses (each some tens of cycles) before yielding: tens of microseconds.
  constexpr int kSpins = 4000;
  const int generation = generation_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == size_.load(std::memory_order_relaxed)) {
    arrived_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    return;
  }
  for (int spin = 0; generation_.load(std::memory_order_acquire) == generation; ++spin) {
    if (aborted_.load(std::memory_order_acquire)) return;
    if (spin < kSpins) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace fastrnn::cpu
