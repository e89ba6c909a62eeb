// A fixed merge tree over the tiles of a row, for reductions whose result
// must not depend on how the row was cut into work (thread count, batch
// size; docs/determinism.md) and whose rounding error should grow with
// log(n), not n, over very long rows.
//
// The tree is the pairwise one of a binary counter: leaf t (tile t of the
// row) is merged with its left neighbour subtree whenever the two are the
// halves of an aligned block [j 2^k, (j + 1) 2^k). Every such block is one
// subtree whatever else the row holds, so a worker that reduces any range
// of tiles [a, b) can hand over its aligned blocks (the canonical dyadic
// decomposition of the range), and adding the blocks of consecutive ranges,
// left to right, to another MergeTree builds exactly the tree that adding
// the tiles one by one does: the same merges of the same operands, hence the
// same bits. result() folds the blocks that are left (one per set bit of the
// tile count) from the right. The merges need to be commutative bit for bit
// (core::merge is), not associative.
#pragma once

#include <cstdint>

namespace logitkit::cpu {

template <class State>
class MergeTree {
 public:
  // Adds the block of `leaves` tiles starting at tile `begin`: leaves is a
  // power of two, begin a multiple of it, and blocks come left to right with
  // no gap. merge(State, State) -> State.
  template <class Merge>
  void add(const Merge& merge, State state, int64_t begin, int64_t leaves) {
    while (count_ > 0) {
      const Block& left = blocks_[count_ - 1];
      if (left.leaves != leaves || left.begin % (2 * leaves) != 0) break;  // not the left half of a block
      state = merge(left.state, state);
      begin = left.begin;
      leaves *= 2;
      --count_;
    }
    blocks_[count_++] = Block{state, begin, leaves};
  }

  // Adds every block of `other` (the tree of the range that follows this one).
  template <class Merge>
  void add_all(const Merge& merge, const MergeTree& other) {
    for (int i = 0; i < other.count_; ++i)
      add(merge, other.blocks_[i].state, other.blocks_[i].begin, other.blocks_[i].leaves);
  }

  // The merge of every tile added (`empty` when none was).
  template <class Merge>
  State result(const Merge& merge, const State& empty) const {
    if (count_ == 0) return empty;
    State state = blocks_[count_ - 1].state;
    for (int i = count_ - 2; i >= 0; --i) state = merge(blocks_[i].state, state);
    return state;
  }

 private:
  struct Block {
    State state;
    int64_t begin;
    int64_t leaves;
  };
  // A range of tiles decomposes into at most two blocks per power of two.
  static constexpr int kMaxBlocks = 128;
  Block blocks_[kMaxBlocks];
  int count_ = 0;
};

}  // namespace logitkit::cpu
