// The engine's large buffers (outputs, workspaces, per-step gradients),
// from a cache of blocks kept across calls. A freshly mapped buffer costs a
// page fault per 4 KiB page on first touch (about 1 us each, measured in
// bench/NOTES.md: a third of a long layer's forward), and glibc maps every
// block over 32 MiB afresh on each allocation, and unmaps it when freed.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastrnn::cpu {

// An uninitialised CPU tensor, as at::empty. At 1 MiB and over its memory
// is a block of the cache: reused where a freed block fits, else newly
// allocated, and returned to the cache when the tensor's storage is freed.
at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

// The same, zero-filled.
at::Tensor zeros_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

// A contiguous copy of t in a buffer as above: an allocation and a memcpy
// where t is contiguous, which at a small step's sizes costs a fraction of
// clone()'s dispatch and TensorIterator.
at::Tensor contiguous_copy(const at::Tensor& t);

// t where it is contiguous, else contiguous_copy(t).
at::Tensor contiguous_buffer(const at::Tensor& t);

// Bytes the cache holds in blocks no tensor uses.
int64_t cached_bytes();

// Frees those blocks (as torch.cuda.empty_cache does for CUDA's cache).
void empty_cache();

}  // namespace fastrnn::cpu
