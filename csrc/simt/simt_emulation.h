// CPU emulation of the CUDA SIMT execution model, so that logitkit's CUDA
// kernel sources run unchanged on the host inside the test suite.
//
// Model (see docs/emulator.md):
//   * One OS thread per CUDA thread of a block; the blocks of a grid run one
//     after another, so `__shared__` maps to function-local `static` storage.
//   * threadIdx/blockIdx are thread_local, blockDim/gridDim are set per launch.
//   * __syncthreads() is a real barrier across the block's live threads; a
//     thread that returns leaves the barrier (as an exited CUDA thread does).
//   * Warp intrinsics (__shfl_*_sync, __syncwarp, votes) go through a per-warp
//     exchange buffer and a barrier sized to the lanes the warp really has
//     (a partial last warp has fewer than 32).
//
// Checks (a violation fails the launch with a message, it never hangs):
//   * all live threads of a block must reach the same __syncthreads call
//     site in a phase (divergent barriers are reported);
//   * a warp intrinsic's mask must name exactly the warp's live lanes, all of
//     which must call the same intrinsic at the same site (reading a lane
//     outside the mask is undefined on a GPU: here it yields all-ones bits,
//     NaN for floats, so a kernel that uses such a value gives wrong results);
//   * a barrier that waits longer than LOGITKIT_SIMT_TIMEOUT_S (default 30 s)
//     is reported as a deadlock.
//
// Thread schedules: threads of each block can start in order, in reverse
// order, or in a seeded random order, with seeded random yields after
// barriers, to expose missing barriers and shared-memory races.
//
// Only one emulated launch runs at a time (a global mutex), because
// `__shared__` storage is process-wide.
#pragma once

#if defined(__CUDACC__)
#error "simt_emulation.h is for host compilers only"
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <source_location>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------
// CUDA keywords and built-in types.
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
using cudaStream_t = void*;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

namespace logitkit::simt {

enum class Schedule : int { in_order = 0, reversed = 1, random = 2 };

// Process-wide settings of the emulator (set from the test suite).
struct Settings {
  Schedule schedule = Schedule::in_order;
  uint64_t seed = 0;
  double timeout_seconds = 30.0;
};
inline Settings& settings() {
  static Settings s = [] {
    Settings init;
    if (const char* t = std::getenv("LOGITKIT_SIMT_TIMEOUT_S")) init.timeout_seconds = std::atof(t);
    return init;
  }();
  return s;
}

// Thrown inside emulated threads to unwind them once a launch has failed.
struct LaunchAborted {};

class LaunchState {
 public:
  void fail(const std::string& message) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!failed_.load()) {
      message_ = message;
      failed_.store(true);
    }
  }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  std::string message() {
    std::lock_guard<std::mutex> lock(mu_);
    return message_;
  }

 private:
  std::mutex mu_;
  std::atomic<bool> failed_{false};
  std::string message_;
};

inline std::string site_string(const std::source_location& s) {
  return std::string(s.file_name()) + ":" + std::to_string(s.line());
}

// A reusable barrier whose expected count shrinks when a participant exits.
// Every phase checks that all arrivals come from one call site, and the
// last arrival may run a check over the phase (`on_complete`).
class CheckedBarrier {
 public:
  void reset(int expected, LaunchState* launch, const char* what) {
    std::lock_guard<std::mutex> lock(mu_);
    expected_ = expected;
    arrived_ = 0;
    launch_ = launch;
    what_ = what;
  }

  template <class OnComplete>
  void arrive_and_wait(const std::source_location& site, OnComplete&& on_complete) {
    std::unique_lock<std::mutex> lock(mu_);
    if (launch_->failed()) throw LaunchAborted{};
    if (arrived_ == 0) {
      site_ = site;
    } else if (site.line() != site_.line() ||
               std::strcmp(site.file_name(), site_.file_name()) != 0) {
      launch_->fail(std::string("divergent ") + what_ + ": reached at " + site_string(site_) +
                    " and at " + site_string(site) + " in the same phase");
      cv_.notify_all();
      throw LaunchAborted{};
    }
    const uint64_t my_generation = generation_;
    if (++arrived_ == expected_) {
      complete_phase(on_complete);
      return;
    }
    const auto timeout = std::chrono::duration<double>(settings().timeout_seconds);
    const bool released = cv_.wait_for(lock, timeout, [&] {
      return generation_ != my_generation || launch_->failed();
    });
    if (!released) {
      launch_->fail(std::string("deadlock: ") + what_ + " at " + site_string(site_) + " waited " +
                    std::to_string(settings().timeout_seconds) + " s with " +
                    std::to_string(arrived_) + " of " + std::to_string(expected_) +
                    " participants (the others are stuck elsewhere or in another barrier)");
      cv_.notify_all();
    }
    if (launch_->failed()) throw LaunchAborted{};
  }

  // A participant leaves for good (its CUDA thread returned).
  void drop() {
    std::lock_guard<std::mutex> lock(mu_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) complete_phase([] {});
  }

 private:
  template <class OnComplete>
  void complete_phase(OnComplete&& on_complete) {
    on_complete();
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  int expected_ = 0;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  std::source_location site_;
  LaunchState* launch_ = nullptr;
  const char* what_ = "";
};

// State of one warp of the block being executed.
struct WarpState {
  CheckedBarrier barrier;
  unsigned live_mask = 0;            // lanes that exist and have not returned
  unsigned existing_mask = 0;        // lanes that exist (partial last warp)
  unsigned call_mask[32] = {};       // mask argument passed by each lane
  uint64_t slot[32] = {};            // exchange buffer, one value per lane
};

// State of the block being executed, shared by its threads.
struct BlockState {
  CheckedBarrier barrier;
  std::vector<std::unique_ptr<WarpState>> warps;
  std::atomic<int> start_turn{0};
};

struct Launch {
  LaunchState state;
  BlockState block;
  std::vector<int> start_rank;  // start position of each thread in the block
  std::vector<unsigned char> dynamic_shared;
  int threads_per_block = 0;
};

inline Launch*& current_launch() {
  static Launch* launch = nullptr;
  return launch;
}
inline thread_local int tl_linear_thread = 0;
inline thread_local std::minstd_rand tl_rng;

inline Launch& launch_ref() {
  Launch* l = current_launch();
  if (l == nullptr) throw std::logic_error("CUDA intrinsic called outside an emulated launch");
  return *l;
}

// Seeded perturbation after barriers under the random schedule.
inline void perturb_schedule() {
  if (settings().schedule != Schedule::random) return;
  const unsigned r = tl_rng() % 8;
  if (r == 0) {
    std::this_thread::sleep_for(std::chrono::microseconds(tl_rng() % 50));
  } else if (r < 4) {
    std::this_thread::yield();
  }
}

inline int lane_id() { return tl_linear_thread % 32; }
inline WarpState& my_warp() { return *launch_ref().block.warps[tl_linear_thread / 32]; }

inline void sync_block(const std::source_location& site) {
  launch_ref().block.barrier.arrive_and_wait(site, [] {});
  perturb_schedule();
}

// Checks a warp intrinsic's mask against the warp's live lanes.
inline void check_warp_masks(WarpState& w, const char* intrinsic, const std::source_location& site) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!((w.live_mask >> lane) & 1u)) continue;
    if (w.call_mask[lane] != w.live_mask) {
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "%s at %s: lane %d passed mask 0x%08x but the warp's live lanes are 0x%08x "
                    "(a mask must name exactly the lanes that execute the intrinsic)",
                    intrinsic, site_string(site).c_str(), lane, w.call_mask[lane], w.live_mask);
      launch_ref().state.fail(buf);
      return;
    }
  }
}

// Runs one warp-collective exchange: every live lane publishes `value`,
// then `read` computes the lane's result from the exchange buffer.
template <class Read>
inline auto warp_exchange(unsigned mask, uint64_t value, const char* intrinsic,
                          const std::source_location& site, Read&& read) {
  WarpState& w = my_warp();
  const int lane = lane_id();
  if (!((mask >> lane) & 1u)) {
    launch_ref().state.fail(std::string(intrinsic) + " at " + site_string(site) +
                            ": calling lane is not in the mask");
    throw LaunchAborted{};
  }
  w.call_mask[lane] = mask;
  w.slot[lane] = value;
  w.barrier.arrive_and_wait(site, [&] { check_warp_masks(w, intrinsic, site); });
  if (launch_ref().state.failed()) throw LaunchAborted{};
  auto result = read(w, lane);
  w.barrier.arrive_and_wait(site, [] {});  // nobody overwrites a slot still being read
  perturb_schedule();
  return result;
}

template <class T>
inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <class T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// Source-lane rules of the shuffle variants (CUDA Programming Guide, warp
// shuffle functions): lanes form segments of `width`; an out-of-segment
// source returns the caller's own value.
enum class ShuffleKind { index, up, down, bfly };

template <class T>
inline T shuffle(unsigned mask, T var, int arg, int width, ShuffleKind kind, const char* name,
                 const std::source_location& site) {
  return warp_exchange(mask, to_bits(var), name, site, [&](WarpState& w, int lane) {
    const int segment_start = (lane / width) * width;
    int src = lane;
    switch (kind) {
      case ShuffleKind::index: src = segment_start + (arg % width); break;
      case ShuffleKind::up: src = (lane - arg >= segment_start) ? lane - arg : lane; break;
      case ShuffleKind::down: src = (lane + arg < segment_start + width) ? lane + arg : lane; break;
      case ShuffleKind::bfly: src = lane ^ arg; if (src >= segment_start + width) src = lane; break;
    }
    if (src < 0 || src >= 32 || !((mask >> src) & 1u)) {
      // Reading a lane that does not execute the shuffle yields an undefined
      // value on a GPU (not a fault): return all-ones bits (NaN for floats)
      // so that a kernel which uses such a value shows wrong results.
      return from_bits<T>(~uint64_t{0});
    }
    return from_bits<T>(w.slot[src]);
  });
}

inline std::mutex& launch_mutex() {
  static std::mutex mu;
  return mu;
}

// Runs `body` as a CUDA kernel launch <<<grid, block, dynamic_shared_bytes>>>.
inline void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, const std::function<void()>& body) {
  const long long threads = 1LL * block.x * block.y * block.z;
  const long long blocks = 1LL * grid.x * grid.y * grid.z;
  if (threads < 1 || threads > 1024) throw std::invalid_argument("emulated launch: block size must be in [1, 1024]");
  if (blocks < 1) throw std::invalid_argument("emulated launch: empty grid");
  if (grid.y > 65535 || grid.z > 65535) throw std::invalid_argument("emulated launch: gridDim.y/z above 65535");

  std::lock_guard<std::mutex> serial(launch_mutex());
  Launch launch;
  launch.threads_per_block = static_cast<int>(threads);
  launch.dynamic_shared.assign(dynamic_shared_bytes + 16, 0xFF);  // poison: uninitialised reads show as NaN
  const int nwarps = static_cast<int>((threads + 31) / 32);
  for (int w = 0; w < nwarps; ++w) launch.block.warps.push_back(std::make_unique<WarpState>());
  launch.start_rank.resize(threads);
  std::iota(launch.start_rank.begin(), launch.start_rank.end(), 0);
  const Settings cfg = settings();
  if (cfg.schedule == Schedule::reversed) {
    std::reverse(launch.start_rank.begin(), launch.start_rank.end());
  }
  gridDim = grid;
  blockDim = block;
  current_launch() = &launch;

  auto reset_block = [&launch, nwarps, threads]() noexcept {
    launch.block.barrier.reset(static_cast<int>(threads), &launch.state, "__syncthreads");
    for (int w = 0; w < nwarps; ++w) {
      const int lanes = static_cast<int>(std::min<long long>(32, threads - 32LL * w));
      const unsigned mask = lanes == 32 ? 0xFFFFFFFFu : ((1u << lanes) - 1u);
      WarpState& ws = *launch.block.warps[w];
      ws.barrier.reset(lanes, &launch.state, "warp intrinsic");
      ws.live_mask = mask;
      ws.existing_mask = mask;
    }
    launch.block.start_turn.store(0);
  };

  // Between two blocks every thread meets here; the last arrival resets the
  // block state (barriers, live masks, start order) for the next block.
  std::mt19937_64 order_rng(cfg.seed);
  std::mutex between_mu;
  std::condition_variable between_cv;
  int between_arrived = 0;
  uint64_t between_generation = 0;
  auto between_blocks = [&]() {
    std::unique_lock<std::mutex> lock(between_mu);
    const uint64_t gen = between_generation;
    if (++between_arrived == threads) {
      between_arrived = 0;
      reset_block();
      if (cfg.schedule == Schedule::random) {
        std::shuffle(launch.start_rank.begin(), launch.start_rank.end(), order_rng);
      }
      ++between_generation;
      between_cv.notify_all();
    } else {
      between_cv.wait(lock, [&] { return between_generation != gen; });
    }
  };

  std::vector<std::thread> workers;
  workers.reserve(threads);
  std::exception_ptr foreign_error;
  std::mutex foreign_mu;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      tl_linear_thread = t;
      tl_rng.seed(static_cast<unsigned>(cfg.seed * 7919u + static_cast<uint64_t>(t) + 1u));
      threadIdx.x = t % block.x;
      threadIdx.y = (t / block.x) % block.y;
      threadIdx.z = t / (block.x * block.y);
      for (long long b = 0; b < blocks; ++b) {
        between_blocks();
        blockIdx.x = static_cast<unsigned>(b % grid.x);
        blockIdx.y = static_cast<unsigned>((b / grid.x) % grid.y);
        blockIdx.z = static_cast<unsigned>(b / (1LL * grid.x * grid.y));
        if (cfg.schedule != Schedule::in_order) {
          // Start in the order given by start_rank: wait for our turn.
          const int rank = launch.start_rank[t];
          auto& turn = launch.block.start_turn;
          int seen = turn.load();
          while (seen != rank) {
            turn.wait(seen);
            seen = turn.load();
          }
          turn.store(rank + 1);
          turn.notify_all();
          perturb_schedule();
        }
        if (!launch.state.failed()) {
          try {
            body();
          } catch (const LaunchAborted&) {
          } catch (...) {
            std::lock_guard<std::mutex> lock(foreign_mu);
            if (!foreign_error) foreign_error = std::current_exception();
            launch.state.fail("exception thrown inside an emulated kernel");
          }
        }
        // This CUDA thread has returned: it leaves its warp and block barriers.
        WarpState& w = *launch.block.warps[t / 32];
        {
          // live_mask is read by the completion check under the warp barrier's lock
          // only while all live lanes wait, so updating it before dropping is safe.
          w.live_mask &= ~(1u << (t % 32));
        }
        w.barrier.drop();
        launch.block.barrier.drop();
      }
    });
  }
  for (auto& w : workers) w.join();
  current_launch() = nullptr;
  if (foreign_error) std::rethrow_exception(foreign_error);
  if (launch.state.failed()) throw std::runtime_error("emulated CUDA launch failed: " + launch.state.message());
}

inline unsigned active_mask() { return my_warp().live_mask; }

inline void* dynamic_shared_memory() {
  auto& buf = launch_ref().dynamic_shared;
  void* p = buf.data();
  size_t space = buf.size();
  return std::align(16, 1, p, space);
}

}  // namespace logitkit::simt

// ---------------------------------------------------------------------------
// CUDA intrinsics, with their call site captured for the barrier checks.
// ---------------------------------------------------------------------------
inline void __syncthreads(std::source_location site = std::source_location::current()) {
  logitkit::simt::sync_block(site);
}
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu,
                       std::source_location site = std::source_location::current()) {
  logitkit::simt::warp_exchange(mask, 0, "__syncwarp", site, [](logitkit::simt::WarpState&, int) { return 0; });
}
inline unsigned __activemask() { return logitkit::simt::active_mask(); }

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
                     std::source_location site = std::source_location::current()) {
  return logitkit::simt::shuffle(mask, var, src_lane, width, logitkit::simt::ShuffleKind::index, "__shfl_sync", site);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                        std::source_location site = std::source_location::current()) {
  return logitkit::simt::shuffle(mask, var, static_cast<int>(delta), width, logitkit::simt::ShuffleKind::up, "__shfl_up_sync", site);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          std::source_location site = std::source_location::current()) {
  return logitkit::simt::shuffle(mask, var, static_cast<int>(delta), width, logitkit::simt::ShuffleKind::down, "__shfl_down_sync", site);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         std::source_location site = std::source_location::current()) {
  return logitkit::simt::shuffle(mask, var, lane_mask, width, logitkit::simt::ShuffleKind::bfly, "__shfl_xor_sync", site);
}

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location site = std::source_location::current()) {
  return logitkit::simt::warp_exchange(mask, predicate != 0, "__ballot_sync", site, [mask](logitkit::simt::WarpState& w, int) {
    unsigned ballot = 0;
    for (int lane = 0; lane < 32; ++lane)
      if (((mask >> lane) & 1u) && w.slot[lane]) ballot |= 1u << lane;
    return ballot;
  });
}
inline int __any_sync(unsigned mask, int predicate, std::source_location site = std::source_location::current()) {
  return __ballot_sync(mask, predicate, site) != 0;
}
inline int __all_sync(unsigned mask, int predicate, std::source_location site = std::source_location::current()) {
  return __ballot_sync(mask, predicate, site) == mask;
}

// Atomics (device-scope on a GPU; C++20 atomic_ref here).
template <class T>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
namespace logitkit::simt {
// Stores `value` while replaces(old, value) holds (compare-and-swap loop); returns the old value.
template <class T, class Replaces>
inline T atomic_store_if(T* address, T value, Replaces replaces) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (replaces(old, value) && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
}  // namespace logitkit::simt
template <class T>
inline T atomicMax(T* address, T value) {
  return logitkit::simt::atomic_store_if(address, value, [](T old, T v) { return old < v; });
}
template <class T>
inline T atomicMin(T* address, T value) {
  return logitkit::simt::atomic_store_if(address, value, [](T old, T v) { return v < old; });
}
template <class T>
inline T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;
}
template <class T>
inline T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Math intrinsics: the fast device variants map to the accurate host ones.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int x) { return logitkit::simt::from_bits<float>(static_cast<uint64_t>(static_cast<uint32_t>(x))); }
inline int __float_as_int(float x) { return static_cast<int>(static_cast<uint32_t>(logitkit::simt::to_bits(x))); }
template <class T>
inline T __ldg(const T* p) { return *p; }
