// CPU emulation of the CUDA SIMT execution model, so that logitkit's CUDA
// kernel sources run unchanged on the host inside the test suite.
//
// Model (see docs/emulator.md):
//   * One OS thread per CUDA thread of a block; the blocks of a grid run one
//     after another, so `__shared__` maps to function-local `static` storage.
//   * threadIdx/blockIdx are thread_local, blockDim/gridDim are set per launch.
//     Blocks are 1-D and grids 1-D or 2-D (what logitkit's kernels launch).
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
//
// CPUs: by default (Settings::one_cpu) a launch's threads all run on the CPU
// the launch starts on (Linux; elsewhere the OS places them). A barrier wakes
// every thread of the block, and on a multi-core virtual machine waking
// threads on other cores costs more than taking turns on one (docs/emulator.md:
// about 1.35x on a 2-core KVM guest). The threads still interleave
// preemptively; one_cpu = false spreads them over the process's CPUs so they
// also run in parallel.
//
// The emulator provides the intrinsics logitkit's kernels and the emulator's
// self-test kernels (csrc/emu/selftest.cpp) use, and no others.
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
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <source_location>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

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
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
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
  bool one_cpu = true;  // run a launch's threads on one CPU (see the header comment)
};
inline Settings& settings() {
  static Settings s = [] {
    Settings init;
    if (const char* t = std::getenv("LOGITKIT_SIMT_TIMEOUT_S")) init.timeout_seconds = std::atof(t);
    return init;
  }();
  return s;
}

// Reads of a kernel's input row elements (LK_COUNT_ROW_READ in the kernels'
// load functions), counted while counting is on: reads / (rows * cols) is the
// number of passes a launch made over its rows, which the tests hold to the
// pass budgets of docs/sampling.md. Off by default (one relaxed load per read).
struct RowReadCounter {
  std::atomic<bool> on{false};
  std::atomic<int64_t> reads{0};
};
inline RowReadCounter& row_read_counter() {
  static RowReadCounter counter;
  return counter;
}
inline void count_row_read() {
  auto& c = row_read_counter();
  if (c.on.load(std::memory_order_relaxed)) c.reads.fetch_add(1, std::memory_order_relaxed);
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

inline bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && std::strcmp(a.file_name(), b.file_name()) == 0;
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
    } else if (!same_site(site, site_)) {
      launch_->fail(std::string("divergent ") + what_ + ": reached at " + site_string(site_) + " and at " +
                    site_string(site) + " in the same phase");
      cv_.notify_all();
      throw LaunchAborted{};
    }
    const uint64_t my_generation = generation_;
    if (++arrived_ == expected_) {
      complete_phase(on_complete);
      return;
    }
    const auto timeout = std::chrono::duration<double>(settings().timeout_seconds);
    const bool released =
        cv_.wait_for(lock, timeout, [&] { return generation_ != my_generation || launch_->failed(); });
    if (!released) {
      launch_->fail(std::string("deadlock: ") + what_ + " at " + site_string(site_) + " waited " +
                    std::to_string(settings().timeout_seconds) + " s with " + std::to_string(arrived_) + " of " +
                    std::to_string(expected_) + " participants (the others are stuck elsewhere or in another barrier)");
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
  // Lanes that exist and have not returned. Atomic: a returning lane clears
  // its bit while the others may be reading the mask (__activemask).
  std::atomic<unsigned> live_mask{0};
  unsigned call_mask[32] = {};  // mask argument passed by each lane
  uint64_t slot[32] = {};       // exchange buffer, one value per lane
};

// State of the block being executed, shared by its threads.
struct BlockState {
  CheckedBarrier barrier;
  std::vector<std::unique_ptr<WarpState>> warps;
  std::atomic<int> start_turn{0};
};

// One launch: its failure state, the state of the block being executed, and
// the block's start order and dynamic shared memory.
struct Launch {
  LaunchState state;
  BlockState block;
  std::vector<int> start_rank;  // start position of each thread in the block
  std::vector<unsigned char> dynamic_shared;
  int threads_per_block = 0;

  Launch(int threads, size_t dynamic_shared_bytes, Schedule schedule) : threads_per_block(threads) {
    dynamic_shared.assign(dynamic_shared_bytes + 16, 0xFF);  // poison: uninitialised reads show as NaN
    for (int w = 0; w < (threads + 31) / 32; ++w) block.warps.push_back(std::make_unique<WarpState>());
    start_rank.resize(threads);
    std::iota(start_rank.begin(), start_rank.end(), 0);
    if (schedule == Schedule::reversed) std::reverse(start_rank.begin(), start_rank.end());
  }

  // Barriers, live masks and start turn for the next block.
  void reset_block() noexcept {
    block.barrier.reset(threads_per_block, &state, "__syncthreads");
    for (size_t w = 0; w < block.warps.size(); ++w) {
      const int lanes = std::min(32, threads_per_block - 32 * static_cast<int>(w));
      WarpState& ws = *block.warps[w];
      ws.barrier.reset(lanes, &state, "warp intrinsic");
      ws.live_mask.store(lanes == 32 ? 0xFFFFFFFFu : ((1u << lanes) - 1u));
    }
    block.start_turn.store(0);
  }
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
  const unsigned live = w.live_mask.load();
  for (int lane = 0; lane < 32; ++lane) {
    if (!((live >> lane) & 1u)) continue;
    if (w.call_mask[lane] != live) {
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "%s at %s: lane %d passed mask 0x%08x but the warp's live lanes are 0x%08x "
                    "(a mask must name exactly the lanes that execute the intrinsic)",
                    intrinsic, site_string(site).c_str(), lane, w.call_mask[lane], live);
      launch_ref().state.fail(buf);
      return;
    }
  }
}

// Runs one warp-collective exchange: every live lane publishes `value`,
// then `read` computes the lane's result from the exchange buffer.
template <class Read>
inline auto warp_exchange(unsigned mask, uint64_t value, const char* intrinsic, const std::source_location& site,
                          Read&& read) {
  WarpState& w = my_warp();
  const int lane = lane_id();
  if (!((mask >> lane) & 1u)) {
    launch_ref().state.fail(std::string(intrinsic) + " at " + site_string(site) + ": calling lane is not in the mask");
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

inline int shuffle_source(ShuffleKind kind, int lane, int arg, int width) {
  const int segment_start = (lane / width) * width;
  switch (kind) {
    case ShuffleKind::index: return segment_start + (arg % width);
    case ShuffleKind::up: return (lane - arg >= segment_start) ? lane - arg : lane;
    case ShuffleKind::down: return (lane + arg < segment_start + width) ? lane + arg : lane;
    case ShuffleKind::bfly: {
      const int src = lane ^ arg;
      return src >= segment_start + width ? lane : src;
    }
  }
  return lane;
}

template <class T>
inline T shuffle(unsigned mask, T var, int arg, int width, ShuffleKind kind, const char* name,
                 const std::source_location& site) {
  return warp_exchange(mask, to_bits(var), name, site, [&](WarpState& w, int lane) {
    const int src = shuffle_source(kind, lane, arg, width);
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

// Checks a launch shape: 1-D blocks of 1 to 1024 threads, 1-D or 2-D grids.
inline void check_launch_shape(dim3 grid, dim3 block) {
  if (block.y != 1 || block.z != 1) throw std::invalid_argument("emulated launch: blocks must be 1-D");
  if (block.x < 1 || block.x > 1024) throw std::invalid_argument("emulated launch: block size must be in [1, 1024]");
  if (grid.z != 1) throw std::invalid_argument("emulated launch: grids must be 1-D or 2-D");
  if (grid.x < 1 || grid.y < 1) throw std::invalid_argument("emulated launch: empty grid");
  if (grid.y > 65535) throw std::invalid_argument("emulated launch: gridDim.y above 65535");
}

// Between two blocks every thread meets here; the last arrival resets the
// block state (barriers, live masks, start order) for the next block.
class BlockSequencer {
 public:
  BlockSequencer(Launch& launch, const Settings& cfg) : launch_(launch), cfg_(cfg), order_rng_(cfg.seed) {}

  void next_block() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = generation_;
    if (++arrived_ < launch_.threads_per_block) {
      cv_.wait(lock, [&] { return generation_ != gen; });
      return;
    }
    arrived_ = 0;
    launch_.reset_block();
    if (cfg_.schedule == Schedule::random) {
      std::shuffle(launch_.start_rank.begin(), launch_.start_rank.end(), order_rng_);
    }
    ++generation_;
    cv_.notify_all();
  }

 private:
  Launch& launch_;
  const Settings& cfg_;
  std::mt19937_64 order_rng_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

// Under a non-default schedule, thread t starts in the order given by
// start_rank: it waits for its turn.
inline void wait_for_start_turn(Launch& launch, int t) {
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

// The first exception other than LaunchAborted thrown inside a kernel.
struct ForeignError {
  std::mutex mu;
  std::exception_ptr error;
};

// Runs the kernel body as one CUDA thread of the current block, then leaves
// the block: the thread has returned, so it drops out of its warp's and the
// block's barriers.
inline void run_thread_in_block(Launch& launch, int t, const std::function<void()>& body, ForeignError& foreign) {
  if (!launch.state.failed()) {
    try {
      body();
    } catch (const LaunchAborted&) {
    } catch (...) {
      std::lock_guard<std::mutex> lock(foreign.mu);
      if (!foreign.error) foreign.error = std::current_exception();
      launch.state.fail("exception thrown inside an emulated kernel");
    }
  }
  WarpState& w = *launch.block.warps[t / 32];
  // The completion check reads live_mask under the warp barrier's lock while
  // all live lanes wait, so clearing the bit before dropping out is safe;
  // __activemask may read it at any time (hence the atomic).
  w.live_mask.fetch_and(~(1u << (t % 32)));
  w.barrier.drop();
  launch.block.barrier.drop();
}

// While alive (with Settings::one_cpu, on Linux), the calling thread and the
// threads it creates (which inherit its affinity) run on the CPU it runs on
// now; the caller's own affinity is restored on destruction, the created
// threads keep theirs.
class OneCpuWhileCreatingThreads {
 public:
  explicit OneCpuWhileCreatingThreads(bool on) {
#if defined(__linux__)
    if (!on) return;
    const int cpu = sched_getcpu();
    if (cpu < 0 || pthread_getaffinity_np(pthread_self(), sizeof(saved_), &saved_) != 0) return;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pinned_ = pthread_setaffinity_np(pthread_self(), sizeof(one), &one) == 0;
#else
    (void)on;
#endif
  }
  ~OneCpuWhileCreatingThreads() {
#if defined(__linux__)
    if (pinned_) pthread_setaffinity_np(pthread_self(), sizeof(saved_), &saved_);
#endif
  }
  OneCpuWhileCreatingThreads(const OneCpuWhileCreatingThreads&) = delete;
  OneCpuWhileCreatingThreads& operator=(const OneCpuWhileCreatingThreads&) = delete;

 private:
#if defined(__linux__)
  cpu_set_t saved_;
  bool pinned_ = false;
#endif
};

// Runs `body` as a CUDA kernel launch <<<grid, block, dynamic_shared_bytes>>>.
inline void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, const std::function<void()>& body) {
  check_launch_shape(grid, block);
  std::lock_guard<std::mutex> serial(launch_mutex());
  const Settings cfg = settings();
  const int threads = static_cast<int>(block.x);
  const long long blocks = 1LL * grid.x * grid.y;
  Launch launch(threads, dynamic_shared_bytes, cfg.schedule);
  BlockSequencer sequencer(launch, cfg);
  ForeignError foreign;
  gridDim = grid;
  blockDim = block;
  current_launch() = &launch;

  std::vector<std::thread> workers;
  workers.reserve(threads);
  std::optional<OneCpuWhileCreatingThreads> one_cpu(std::in_place, cfg.one_cpu);
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      tl_linear_thread = t;
      tl_rng.seed(static_cast<unsigned>(cfg.seed * 7919u + static_cast<uint64_t>(t) + 1u));
      threadIdx.x = static_cast<unsigned>(t);
      for (long long b = 0; b < blocks; ++b) {
        sequencer.next_block();
        blockIdx.x = static_cast<unsigned>(b % grid.x);
        blockIdx.y = static_cast<unsigned>(b / grid.x);
        if (cfg.schedule != Schedule::in_order) wait_for_start_turn(launch, t);
        run_thread_in_block(launch, t, body, foreign);
      }
    });
  }
  one_cpu.reset();  // the threads exist: the caller's own affinity back while it waits for them
  for (auto& w : workers) w.join();
  current_launch() = nullptr;
  if (foreign.error) std::rethrow_exception(foreign.error);
  if (launch.state.failed()) throw std::runtime_error("emulated CUDA launch failed: " + launch.state.message());
}

inline unsigned active_mask() { return my_warp().live_mask.load(); }

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
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, std::source_location site = std::source_location::current()) {
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
  return logitkit::simt::shuffle(mask, var, static_cast<int>(delta), width, logitkit::simt::ShuffleKind::up,
                                 "__shfl_up_sync", site);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          std::source_location site = std::source_location::current()) {
  return logitkit::simt::shuffle(mask, var, static_cast<int>(delta), width, logitkit::simt::ShuffleKind::down,
                                 "__shfl_down_sync", site);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         std::source_location site = std::source_location::current()) {
  return logitkit::simt::shuffle(mask, var, lane_mask, width, logitkit::simt::ShuffleKind::bfly, "__shfl_xor_sync",
                                 site);
}

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location site = std::source_location::current()) {
  return logitkit::simt::warp_exchange(mask, predicate != 0, "__ballot_sync", site,
                                       [mask](logitkit::simt::WarpState& w, int) {
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

inline int __popc(unsigned x) { return __builtin_popcount(x); }

// Atomics (device-scope on a GPU; C++20 atomic_ref here).
template <class T>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
inline unsigned atomicMax(unsigned* address, unsigned value) {
  std::atomic_ref<unsigned> word(*address);
  unsigned seen = word.load();
  while (seen < value && !word.compare_exchange_weak(seen, value)) {
  }
  return seen;
}
