// Read bandwidth of one core from a buffer of each size, read again and
// again, as a sweep reads its share of the packed W_hh every step. Every
// thread reads its own buffer at once. Used by batch1_bound.py.
//
//   g++ -O3 -mavx512f -fopenmp -o read_bandwidth read_bandwidth.cpp
//   ./read_bandwidth THREADS > bandwidth.csv
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  std::printf("KiB per thread,GB/s per thread\n");
  for (long kib : {8L, 16L, 24L, 64L, 128L, 256L, 512L, 768L, 1024L, 2048L, 4096L, 8192L}) {
    const long n = kib * 1024 / 4;
    double best = 1e9;
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> buffer(n, 1.0f);
      // Eight independent sums, so that the adds' latency does not bound the loads.
      __m512 sum[8];
      for (auto& s : sum) s = _mm512_setzero_ps();
      const long passes = std::max(1L, (256L << 20) / (n * 4));
      for (int repeat = 0; repeat < 7; ++repeat) {
#pragma omp barrier
        const auto start = std::chrono::steady_clock::now();
        for (long pass = 0; pass < passes; ++pass) {
          // Each pass must read the buffer again: the sums live on in registers.
          asm volatile("" : "+v"(sum[0]), "+v"(sum[1]), "+v"(sum[2]), "+v"(sum[3]),
                       "+v"(sum[4]), "+v"(sum[5]), "+v"(sum[6]), "+v"(sum[7])::"memory");
          for (long i = 0; i < n; i += 128) {
            for (int k = 0; k < 8; ++k) sum[k] = _mm512_add_ps(sum[k], _mm512_loadu_ps(&buffer[i + 16 * k]));
          }
        }
#pragma omp barrier
        const double seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / passes;
#pragma omp critical
        best = std::min(best, seconds);
      }
      __m512 total = sum[0];
      for (int k = 1; k < 8; ++k) total = _mm512_add_ps(total, sum[k]);
      volatile float sink = _mm512_reduce_add_ps(total);
      (void)sink;
    }
    std::printf("%ld,%.1f\n", kib, kib * 1024.0 / best / 1e9);
  }
}
