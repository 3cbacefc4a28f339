#include "cpu/buffers.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace fastrnn::cpu {
namespace {

// Smaller tensors come from at::empty: glibc's heap reuses them.
constexpr size_t kMinCachedBytes = size_t(1) << 20;
// Blocks are whole multiples of 2 MiB, so that a length or batch a little
// larger than the last reuses its block.
constexpr size_t kGranule = size_t(2) << 20;
constexpr size_t kAlignment = 4096;
// Unused blocks beyond this many bytes are freed, oldest first.
constexpr size_t kMaxCachedBytes = size_t(1) << 30;
// A freed block serves a request of at least 4/5 of its size.
constexpr size_t kMaxWasteFifths = 5;

struct Block {
  void* data;
  size_t bytes;
};

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t bytes = (nbytes + kGranule - 1) / kGranule * kGranule;
    Block* block = take(bytes);
    if (block == nullptr) {
      // A size the cache has not seen lately: its unused blocks go back to
      // the system first, so that the cache never raises the peak memory of
      // a call whose sizes change.
      release(0);
      block = new Block{fresh(bytes), bytes};
    }
    return {block->data, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t unused_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(unused_bytes_);
  }

  void release(size_t keep_bytes) {
    std::vector<Block*> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t drop = 0;
      while (drop < unused_.size() && unused_bytes_ > keep_bytes) {
        unused_bytes_ -= unused_[drop]->bytes;
        freed.push_back(unused_[drop++]);
      }
      unused_.erase(unused_.begin(), unused_.begin() + drop);
    }
    for (Block* block : freed) {
      std::free(block->data);
      delete block;
    }
  }

 private:
  // The smallest unused block that fits `bytes` without wasting a fifth.
  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t best = unused_.size();
    for (size_t i = 0; i < unused_.size(); ++i) {
      const size_t size = unused_[i]->bytes;
      if (size >= bytes && size * (kMaxWasteFifths - 1) <= bytes * kMaxWasteFifths &&
          (best == unused_.size() || size < unused_[best]->bytes)) {
        best = i;
      }
    }
    if (best == unused_.size()) {
      return nullptr;
    }
    Block* block = unused_[best];
    unused_.erase(unused_.begin() + best);
    unused_bytes_ -= block->bytes;
    return block;
  }

  void* fresh(size_t bytes) {
    void* data = nullptr;
    TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&data, kAlignment, bytes) == 0,
                     "fastrnn: out of memory allocating a buffer of ", bytes, " bytes");
    return data;
  }

  // The deleter of every block's DataPtr: the block goes back to the cache.
  static void give_back(void* context);

  void add(Block* block) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      unused_.push_back(block);
      unused_bytes_ += block->bytes;
    }
    release(kMaxCachedBytes);
  }

  std::mutex mutex_;
  std::vector<Block*> unused_;  // oldest first
  size_t unused_bytes_ = 0;
};

BlockCache& cache() {
  // Never destroyed: tensors may outlive static destruction at exit.
  static BlockCache* instance = new BlockCache();
  return *instance;
}

void BlockCache::give_back(void* context) {
  cache().add(static_cast<Block*>(context));
}

}  // namespace

at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const auto dtype = options.dtype();
  if (!options.device().is_cpu() ||
      static_cast<size_t>(c10::multiply_integers(sizes)) * dtype.itemsize() < kMinCachedBytes) {
    return at::empty(sizes, options);
  }
  return at::Tensor(at::detail::empty_generic(sizes, &cache(),
                                              c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              dtype.toScalarType(), std::nullopt));
}

at::Tensor zeros_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_buffer(sizes, options).zero_();
}

at::Tensor contiguous_copy(const at::Tensor& t) {
  auto copy = empty_buffer(t.sizes(), t.options());
  if (!t.is_contiguous()) {
    copy.copy_(t);
  } else if (t.numel() > 0) {
    std::memcpy(copy.data_ptr(), t.const_data_ptr(), t.nbytes());
  }
  return copy;
}

at::Tensor contiguous_buffer(const at::Tensor& t) {
  return t.is_contiguous() ? t : contiguous_copy(t);
}

int64_t cached_bytes() { return cache().unused_bytes(); }

void empty_cache() { cache().release(0); }

}  // namespace fastrnn::cpu
