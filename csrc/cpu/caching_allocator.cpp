// A caching CPU allocator for training steps: large tensor blocks are kept for reuse instead of
// being handed back to the operating system, so later steps run without page faults, and the
// process gives them all back when training ends.
//
// Why not glibc's heap (the earlier way, optimum_lcqat/_heap.py's mallopt mode): with mmap and
// trimming off, one brk heap holds every block of the step, and blocks of different lifetimes
// (activations, gradients, optimizer state created at the first step) interleave; the heap grows
// to about twice the step's live peak (SmolLM2-135M QAT at 4x512: 6.0 GiB retained for a 2.6 GiB
// live peak, benchmarks/results/memory.md). With mmap on (glibc's default) the peak is the live
// peak but every step pays a page fault per 4 KiB (half the speed).
//
// Here each block of at least `min_bytes` gets pages of its own (mmap) and, when its tensor dies,
// waits in a size-ordered free list for the next request of about its size (best fit, at most
// 1/8 larger). A training step repeats the same sizes, so after the first step nearly every
// request is served from the list, and blocks never share pages, so nothing fragments. Smaller
// requests go to the allocator that was in place (torch's default, glibc malloc).
//
// torch.ops.lcqat.cpu_cache_enable(True, min_bytes) installs it as torch's CPU allocator;
// cpu_cache_enable(False, 0) puts the previous one back and unmaps every cached block (blocks
// still alive are unmapped when their tensors die). Tensors allocated by either allocator stay
// valid across the switch: each DataPtr carries its own deleter.

#include <sys/mman.h>

#include <algorithm>
#include <iterator>

#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

namespace lcqat {
namespace {

constexpr size_t kPage = 4096;

struct CacheStats {
  int64_t live_bytes = 0;    // blocks owned by tensors now
  int64_t cached_bytes = 0;  // blocks waiting in the free list
  int64_t peak_bytes = 0;    // highest live + cached since enabled (what RSS can reach by this cache)
  int64_t live_peak_bytes = 0;  // highest live since enabled (what any allocator must hold at least)
  int64_t hits = 0;
  int64_t misses = 0;
};

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes_ || fallback_ == nullptr) {
      return fallback_ ? fallback_->allocate(n) : c10::GetDefaultCPUAllocator()->allocate(n);
    }
    size_t size = (n + kPage - 1) / kPage * kPage;
    void* ptr = nullptr;
    std::lock_guard<std::mutex> g(mu_);
    auto it = free_.lower_bound(size);
    if (it != free_.end() && it->first <= size + size / 8) {  // a cached block of about this size
      size = it->first;
      ptr = it->second;
      free_.erase(it);
      stats_.cached_bytes -= size;
      stats_.hits++;
    } else {
      ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(ptr != MAP_FAILED, "lcqat caching CPU allocator: out of memory allocating ", size, " bytes");
      gather_into(ptr, size);
      stats_.misses++;
    }
    live_[ptr] = size;
    stats_.live_bytes += size;
    stats_.peak_bytes = std::max(stats_.peak_bytes, stats_.live_bytes + stats_.cached_bytes);
    stats_.live_peak_bytes = std::max(stats_.live_peak_bytes, stats_.live_bytes);
    // context == data (a "simple" DataPtr, which raw_allocate and copy-on-write require)
    return {ptr, ptr, &CachingCPUAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CachingCPUAllocator::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  CacheStats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return stats_;
  }

  static CachingCPUAllocator& get() {
    static CachingCPUAllocator* instance = new CachingCPUAllocator();  // never destroyed: deleters outlive exit
    return *instance;
  }

  bool enable(bool on, int64_t min_bytes) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (on) {
        TORCH_CHECK(min_bytes >= (int64_t)kPage, "cpu_cache_enable: min_bytes must be at least ", kPage);
        min_bytes_ = (size_t)min_bytes;
        if (enabled_) return true;
        fallback_ = c10::GetCPUAllocator();
        c10::SetCPUAllocator(this, /*priority=*/0);
        if (c10::GetCPUAllocator() != this) {  // another allocator was installed at a higher priority
          fallback_ = nullptr;
          return false;
        }
        enabled_ = true;
        stats_ = CacheStats{stats_.live_bytes, stats_.cached_bytes, stats_.live_bytes + stats_.cached_bytes, stats_.live_bytes, 0, 0};
        return true;
      }
      if (enabled_) {
        c10::SetCPUAllocator(fallback_, /*priority=*/0);
        enabled_ = false;  // fallback_ stays: small blocks handed out meanwhile still go through it
      }
    }
    empty();
    return false;
  }

 private:
  // Unmaps every cached block (outside the lock: munmap of gigabytes takes a while).
  void empty() {
    std::vector<std::pair<void*, size_t>> unmap;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto& [size, ptr] : free_) unmap.emplace_back(ptr, size);
      free_.clear();
      stats_.cached_bytes = 0;
    }
    for (auto& [ptr, size] : unmap) munmap(ptr, size);
  }

  static void release(void* ptr) { get().free_block(ptr); }

  void free_block(void* ptr) {
    size_t size = 0;  // stays 0 for a block that is not ours: a small one raw_allocate'd through the fallback
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = live_.find(ptr);
      if (it != live_.end()) {
        size = it->second;
        live_.erase(it);
        stats_.live_bytes -= size;
        if (enabled_) {
          free_.emplace(size, ptr);
          stats_.cached_bytes += size;
          return;
        }
      }
    }
    if (size) {
      munmap(ptr, size);
    } else {
      c10::Allocator* fb = fallback_ ? fallback_ : c10::GetDefaultCPUAllocator();
      fb->raw_deleter()(ptr);
    }
  }

  // No cached block fits: move the pages of cached blocks (largest first) into the new range
  // with mremap, which moves page-table entries (no copy, no fault), so the request is served from
  // pages the process already holds and only the rest of it is fresh. A cached block larger than
  // what is missing is split (its tail stays cached). Without this, blocks of sizes the step does
  // not ask for at the moment sit cached beside fresh ones and the cache holds ~1.4x the live peak.
  void gather_into(void* dst, size_t size) {
    size_t off = 0;
    while (off < size && !free_.empty()) {
      auto last = std::prev(free_.end());
      size_t bsz = last->first;
      char* bp = static_cast<char*>(last->second);
      size_t take = std::min(bsz, size - off);
      void* r = mremap(bp, take, take, MREMAP_MAYMOVE | MREMAP_FIXED, static_cast<char*>(dst) + off);
      if (r == MAP_FAILED) return;  // (e.g. the map count limit): the rest of the range stays fresh pages
      free_.erase(last);
      stats_.cached_bytes -= take;
      if (take < bsz) free_.emplace(bsz - take, bp + take);
      off += take;
    }
  }

  std::mutex mu_;
  bool enabled_ = false;
  size_t min_bytes_ = 1 << 20;
  c10::Allocator* fallback_ = nullptr;
  std::unordered_map<void*, size_t> live_;
  std::multimap<size_t, void*> free_;
  CacheStats stats_;
};

bool cpu_cache_enable(bool on, int64_t min_bytes) { return CachingCPUAllocator::get().enable(on, min_bytes); }

std::vector<int64_t> cpu_cache_stats() {
  CacheStats s = CachingCPUAllocator::get().stats();
  return {s.live_bytes, s.cached_bytes, s.peak_bytes, s.live_peak_bytes, s.hits, s.misses};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lcqat, m) {
  m.def("cpu_cache_enable(bool on, int min_bytes) -> bool", &cpu_cache_enable);
  m.def("cpu_cache_stats() -> int[]", &cpu_cache_stats);
}

}  // namespace lcqat
