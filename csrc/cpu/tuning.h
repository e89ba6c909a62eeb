// The tuning constants of logitkit's CPU kernels, in one place: tile sizes,
// parallel grains, and the buffer sizes of the Top-H selection.
#pragma once

#include <cstdint>

namespace logitkit::cpu {

// Elements per fp32 tile of the row walks (8 KiB: stays in L1).
constexpr int64_t kTile = 2048;

// Row ops: the smallest share of a row given to one thread when a row is
// split over threads (fewer rows than threads).
constexpr int64_t kMinSliceElements = 32768;

// Row ops: output rows at least this long (bytes) are written with
// streaming stores.
constexpr int64_t kStreamingRowBytes = int64_t{1} << 16;

// Row ops: rows up to this long take the one-exp softmax path (its
// per-thread fp32 row buffer is at most 16 MiB).
constexpr int64_t kMaxCachedRow = int64_t{1} << 22;

// Linear CE: elements of work per parallel task, at least.
constexpr int64_t kRowGrain = 32768;

// Top-H, capped rules: the selection buffer is shrunk back to the K best
// tokens when it reaches kSelectionBufferFactor * K + kSelectionBufferSlack.
constexpr int64_t kSelectionBufferFactor = 4;
constexpr int64_t kSelectionBufferSlack = 64;

// Top-H, "exact": bucket of a token by d = z - m <= 0:
// floor(-d * kBucketsPerNat). exp(d) underflows to 0 below d ~ -104, so
// kBucketNats nats cover every token of positive probability (the last
// bucket also takes anything lower).
constexpr float kBucketsPerNat = 16.0f;
constexpr int kBucketNats = 108;
constexpr int kBuckets = kBucketNats * static_cast<int>(kBucketsPerNat);

}  // namespace logitkit::cpu
