// CachingPool over host and limiting upstreams: policy, limits, errors, streams, traces, and a
// randomized multi-threaded stress that fills and verifies every allocation.
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "agrt_test.h"
#include "autoglm_rt/build_info.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/memory/caching_pool.h"
#ifdef AGRT_WITH_CUDA
#include "memory/torch_pools.h"
#endif

using namespace agrt;
using namespace agrt::memory;

namespace {

constexpr std::size_t KiB = 1024, MiB = 1024 * 1024;

std::shared_ptr<LimitingUpstream> limiting(std::size_t capacity, bool expandable = true, bool events = false,
                                           std::size_t granularity = 64 * KiB) {
  return std::make_shared<LimitingUpstream>(make_host_upstream(expandable, granularity), capacity, events);
}

PoolOptions small_arenas() {
  PoolOptions o;
  o.arena_reserve = 256 * MiB;
  return o;
}

bool throws_oom_with_details(CachingPool& pool, std::size_t n) {
  try {
    pool.allocate(n);
  } catch (const OutOfMemoryError& e) {
    const std::string msg = e.what();
    return msg.find("requested " + std::to_string(n)) != std::string::npos && msg.find("limit") != std::string::npos &&
           msg.find("allocated") != std::string::npos && msg.find("reserved") != std::string::npos &&
           msg.find("largest free block") != std::string::npos;
  }
  return false;
}

}  // namespace

TEST(allocations_are_aligned_distinct_and_cached) {
  for (bool expandable : {true, false}) {
    auto up = limiting(1ull << 34, expandable);
    {
      CachingPool pool(up, small_arenas());
      std::vector<void*> ps;
      for (std::size_t n : {1, 255, 256, 257, 4096, 300 * 1024, 3 * 1024 * 1024}) {
        void* p = pool.allocate(n);
        CHECK(reinterpret_cast<std::uintptr_t>(p) % 256 == 0);
        CHECK(pool.block_size(p) >= n && pool.block_size(p) % 256 == 0);
        std::memset(p, 0xAB, n);
        ps.push_back(p);
      }
      pool.check();
      const auto before = pool.stats();
      CHECK(before.num_allocs == 7 && before.allocated_bytes <= before.reserved_bytes);
      for (void* p : ps) pool.deallocate(p);
      pool.check();
      // Everything again: all from the cache, no upstream call.
      for (std::size_t n : {1, 255, 256, 257, 4096, 300 * 1024, 3 * 1024 * 1024}) ps.push_back(pool.allocate(n));
      const auto after = pool.stats();
      CHECK(after.num_upstream_allocs == before.num_upstream_allocs);
      CHECK(after.num_cache_hits >= 7);
      for (std::size_t i = 7; i < ps.size(); ++i) pool.deallocate(ps[i]);
      pool.check();
      CHECK(pool.stats().allocated_bytes == 0 && pool.stats().requested_bytes == 0);
    }
    CHECK(up->outstanding() == 0);  // the destructor returned everything
  }
}

TEST(best_fit_split_and_coalesce) {
  CachingPool pool(limiting(1ull << 34, false), small_arenas());
  // Three neighbours carved from one segment; freeing all of them leaves one free block.
  void* a = pool.allocate(1024);
  void* b = pool.allocate(1024);
  void* c = pool.allocate(1024);
  CHECK(static_cast<char*>(b) == static_cast<char*>(a) + 1024);
  CHECK(static_cast<char*>(c) == static_cast<char*>(b) + 1024);
  pool.deallocate(b);
  pool.check();
  CHECK(pool.stats().num_free_blocks == 2);  // the hole and the segment's tail
  // Best fit: a 1 KiB request takes the 1 KiB hole, not the large tail.
  void* d = pool.allocate(1000);
  CHECK(d == b);
  pool.deallocate(a);
  pool.deallocate(d);
  pool.deallocate(c);
  pool.check();
  const auto s = pool.stats();
  CHECK(s.num_free_blocks == 1 && s.num_segments == 1);
  CHECK(s.largest_free_block_bytes == s.reserved_bytes);
  CHECK(s.fragmentation_ratio == 0.0);
}

TEST(large_blocks_from_a_hole_go_beside_the_newer_neighbour_unless_turned_off) {
  // a 1 MiB @0, b 2 MiB @1, c 1 MiB @3 (MiB offsets); free b: the hole [1, 3) lies between a and
  // the newer c, so a 1 MiB request goes to its top (@2), or its bottom (@1) with the rule off.
  for (const std::size_t from : {std::size_t{1} << 20, std::size_t{0}}) {
    PoolOptions o = small_arenas();
    o.recent_neighbour_from = from;
    CachingPool pool(limiting(1ull << 34), o);
    char* a = static_cast<char*>(pool.allocate(MiB));
    void* b = pool.allocate(2 * MiB);
    char* c = static_cast<char*>(pool.allocate(MiB));
    CHECK(c == a + 3 * MiB);
    pool.deallocate(b);
    char* d = static_cast<char*>(pool.allocate(MiB));
    CHECK(d == a + (from ? 2 : 1) * MiB);
    char* e = static_cast<char*>(pool.allocate(MiB));  // the rest of the hole, exactly
    CHECK(e == a + (from ? 1 : 2) * MiB);
    pool.check();
    pool.deallocate(d);
    pool.deallocate(e);
    pool.deallocate(a);
    pool.deallocate(c);
    pool.check();
    CHECK(pool.stats().num_free_blocks <= 1);  // everything merged back into the arena's tail
  }
}

TEST(a_hole_that_holds_the_largest_request_is_spared_for_it_while_the_tail_has_room) {
  // MiB offsets: a 1 @0, b 8 @1, c 1 @9, d (tail_mib) @10; free d (the free tail) and b (the hole
  // [1, 9), which holds the largest request so far, 8). e 1: with ratio 6 (8 / 6 >= 1) and a 2 MiB
  // tail, e takes the tail (@10) and f 8 fits the hole (@1): nothing grows, 12 MiB reserved. With
  // the rule off, a ratio of 9 (8 / 9 < 1), or a tail too short for e (0.5 MiB), e goes into the
  // hole beside c, its newer neighbour (@8), and f grows the arena from the tail.
  struct Case {
    std::size_t ratio, tail_kib;
    bool spared;
  };
  for (const Case k : {Case{6, 2048, true}, Case{0, 2048, false}, Case{9, 2048, false}, Case{6, 512, false}}) {
    PoolOptions o = small_arenas();
    o.spare_hole_ratio = k.ratio;
    CachingPool pool(limiting(1ull << 34), o);
    char* a = static_cast<char*>(pool.allocate(MiB));
    void* b = pool.allocate(8 * MiB);
    void* c = pool.allocate(MiB);
    void* d = pool.allocate(k.tail_kib * 1024);
    CHECK(static_cast<char*>(d) == a + 10 * MiB);
    pool.deallocate(d);
    pool.deallocate(b);
    const auto upstream = pool.stats().num_upstream_allocs;
    char* e = static_cast<char*>(pool.allocate(MiB));
    CHECK(e == a + (k.spared ? 10 : 8) * MiB);
    CHECK(pool.stats().num_upstream_allocs == upstream);  // e never grows the arena
    char* f = static_cast<char*>(pool.allocate(8 * MiB));
    CHECK(f == a + (k.spared ? 1 : 10) * MiB);
    CHECK(pool.stats().reserved_bytes == (k.spared ? 12 : 18) * MiB);
    pool.check();
    pool.deallocate(e);
    pool.deallocate(f);
    pool.deallocate(c);
    pool.deallocate(a);
    pool.check();
    CHECK(pool.stats().num_free_blocks <= 1);
  }
}

TEST(fragmentation_ratio_and_largest_free_block) {
  CachingPool pool(limiting(1ull << 34, false), small_arenas());
  std::vector<void*> ps;
  for (int i = 0; i < 8; ++i) ps.push_back(pool.allocate(4096));
  for (int i = 0; i < 8; i += 2) pool.deallocate(ps[i]);  // four 4 KiB holes
  const auto s = pool.stats();
  const std::size_t cached = s.reserved_bytes - s.allocated_bytes;
  CHECK(s.largest_free_block_bytes == s.reserved_bytes - 8 * 4096);  // the tail
  CHECK(std::abs(s.fragmentation_ratio - (1.0 - double(s.largest_free_block_bytes) / double(cached))) < 1e-12);
  CHECK(s.fragmentation_ratio > 0.0);
  for (int i = 1; i < 8; i += 2) pool.deallocate(ps[i]);
}

TEST(expandable_arena_grows_in_place_without_stranding) {
  auto up = limiting(1ull << 34, true);
  CachingPool pool(up, small_arenas());
  void* a = pool.allocate(1 * MiB);
  void* b = pool.allocate(1 * MiB);
  CHECK(static_cast<char*>(b) == static_cast<char*>(a) + MiB);  // one contiguous large arena
  pool.deallocate(b);
  // A 3 MiB request extends the free tail (1 MiB) by 2 MiB instead of mapping 3 MiB elsewhere.
  void* c = pool.allocate(3 * MiB);
  CHECK(c == b);
  CHECK(pool.stats().reserved_bytes == 4 * MiB);
  CHECK(pool.stats().num_segments == 1);
  pool.deallocate(a);
  pool.deallocate(c);
  CHECK(pool.trim() == 4 * MiB);
  CHECK(up->outstanding() == 0 && pool.stats().reserved_bytes == 0);
  pool.check();
}

TEST(limit_refuses_growth_with_a_detailed_error_and_leaves_pool_intact) {
  for (bool expandable : {true, false}) {
    PoolOptions o = small_arenas();
    o.limit = 4 * MiB;
    CachingPool pool(limiting(1ull << 34, expandable), o);
    void* a = pool.allocate(3 * MiB);
    const auto before = pool.stats();
    CHECK(throws_oom_with_details(pool, 2 * MiB));
    CHECK(throws_oom_with_details(pool, 5 * MiB));  // larger than the limit itself
    const auto after = pool.stats();
    CHECK(after.num_ooms == before.num_ooms + 2);
    CHECK(after.allocated_bytes == before.allocated_bytes && after.reserved_bytes == before.reserved_bytes);
    CHECK(after.reserved_bytes <= 4 * MiB);
    pool.check();
    std::memset(a, 1, 3 * MiB);
    pool.deallocate(a);
    void* b = pool.allocate(4 * MiB);  // fits once the 3 MiB block is back (cached or trimmed)
    pool.deallocate(b);
    pool.check();
  }
}

TEST(lowering_the_limit_trims_at_once_and_never_touches_live_blocks) {
  for (bool expandable : {true, false}) {
    auto up = limiting(1ull << 34, expandable);
    CachingPool pool(up, small_arenas());
    std::vector<void*> keep, drop;
    for (int i = 0; i < 4; ++i) keep.push_back(pool.allocate(2 * MiB));
    for (int i = 0; i < 8; ++i) drop.push_back(pool.allocate(2 * MiB));
    for (void* p : keep) std::memset(p, 0x5A, 2 * MiB);
    for (void* p : drop) pool.deallocate(p);
    const std::size_t reserved = pool.stats().reserved_bytes;
    CHECK(reserved >= 24 * MiB);
    pool.set_limit(10 * MiB);
    const auto s = pool.stats();
    CHECK(s.limit_bytes == 10 * MiB);
    CHECK(s.allocated_bytes == 8 * MiB);
    // Arena: the free tail goes back at once. Segments: the 20 MiB segment holding the live
    // blocks cannot go, the fully free one did.
    CHECK(s.reserved_bytes <= (expandable ? 10 * MiB : 20 * MiB));
    CHECK(s.reserved_bytes < reserved);
    CHECK(s.num_trims >= 1);
    CHECK(up->outstanding() == s.reserved_bytes);
    // A limit below live usage frees nothing live and refuses growth until usage falls.
    pool.set_limit(1 * MiB);
    CHECK(pool.stats().allocated_bytes == 8 * MiB);
    for (void* p : keep) {
      const auto* c = static_cast<const unsigned char*>(p);
      bool intact = true;
      for (std::size_t i = 0; i < 2 * MiB; i += 4096) intact = intact && c[i] == 0x5A;
      CHECK(intact);
    }
    const std::size_t cached = pool.stats().largest_free_block_bytes;
    CHECK_THROWS(OutOfMemoryError, pool.allocate(cached + 2 * MiB));
    if (cached >= 2 * MiB) pool.deallocate(pool.allocate(2 * MiB));  // cached memory is still usable
    CHECK(pool.stats().reserved_bytes == s.reserved_bytes);
    for (void* p : keep) pool.deallocate(p);
    pool.set_limit(kNoLimit);
    void* p = pool.allocate(4 * MiB);
    pool.deallocate(p);
    pool.check();
  }
}

TEST(upstream_refusal_trims_and_retries_then_raises) {
  for (bool expandable : {true, false}) {
    auto up = limiting(8 * MiB, expandable);
    CachingPool pool(up, small_arenas());
    void* a = pool.allocate(6 * MiB);
    pool.deallocate(a);
    // The upstream has 8 MiB: a 7 MiB request only fits if the pool gives its cache back first.
    void* b = pool.allocate(7 * MiB);
    CHECK(b != nullptr);
    pool.deallocate(b);
    pool.check();
    up->fail_next(4);
    pool.trim();
    const auto before = pool.stats();
    CHECK_THROWS(OutOfMemoryError, pool.allocate(1 * MiB));
    const auto after = pool.stats();
    CHECK(after.num_ooms == before.num_ooms + 1 && after.allocated_bytes == 0);
    pool.check();
    up->fail_next(0);
    pool.deallocate(pool.allocate(1 * MiB));
    pool.check();
  }
}

TEST(bad_input_raises_and_leaves_pool_intact) {
  CachingPool pool(limiting(1ull << 34), small_arenas());
  void* a = pool.allocate(1000);
  CHECK_THROWS(ValueError, pool.allocate(0));
  CHECK_THROWS(ValueError, pool.allocate(kMaxRequest + 1));
  CHECK_THROWS(ValueError, pool.allocate(~std::size_t{0}));
  int local = 0;
  CHECK_THROWS(ValueError, pool.deallocate(&local));
  CHECK_THROWS(ValueError, pool.deallocate(static_cast<char*>(a) + 8));  // interior pointer
  CHECK_THROWS(ValueError, pool.deallocate(a, 7));                       // wrong stream
  pool.check();
  CHECK(pool.stats().num_live_blocks == 1);
  pool.deallocate(a);
  CHECK_THROWS(ValueError, pool.deallocate(a));  // double free
  pool.check();
  CHECK(pool.stats().num_frees == 1);
  PoolOptions bad;
  bad.round_bytes = 100;
  CHECK_THROWS(ValueError, CachingPool(make_host_upstream(), bad));
  bad = PoolOptions();
  bad.small_size = 128;
  CHECK_THROWS(ValueError, CachingPool(make_host_upstream(), bad));
  CHECK_THROWS(ValueError, CachingPool(nullptr));
}

TEST(two_mib_granules_carve_small_chunks_from_the_large_arena) {
  auto up = limiting(1ull << 34, true, /*manual_events=*/false, 2 * MiB);
  PoolOptions o = small_arenas();
  o.small_size = 256 * KiB;  // chunks of 4 x 256 KiB = 1 MiB (the default 128 KiB makes 512 KiB)
  CachingPool pool(up, o);
  auto* s1 = static_cast<char*>(pool.allocate(4 * KiB));
  CHECK(pool.stats().reserved_bytes == 2 * MiB);  // one granule, not one per size class
  auto* l1 = static_cast<char*>(pool.allocate(512 * KiB));
  CHECK(pool.stats().reserved_bytes == 2 * MiB);
  CHECK(l1 == s1 + MiB);  // after the 1 MiB chunk, in the same granule
  std::vector<char*> quarter;
  for (int i = 0; i < 3; ++i) quarter.push_back(static_cast<char*>(pool.allocate(256 * KiB)));
  CHECK(quarter[0] == s1 + 4 * KiB && quarter[2] == s1 + 4 * KiB + 512 * KiB);
  pool.check();
  // The chunk is full: a second one comes from the large arena's tail (one more granule).
  auto* s2 = static_cast<char*>(pool.allocate(256 * KiB));
  CHECK(s2 == l1 + 512 * KiB);
  CHECK(pool.stats().reserved_bytes == 4 * MiB);
  std::string msg;
  try {
    pool.deallocate(s2 + 256);
  } catch (const ValueError& e) {
    msg = e.what();
  }
  CHECK(msg.find("points inside a block") != std::string::npos);
  pool.deallocate(s2);  // the newest chunk stays, empty, for the next small requests
  msg.clear();
  try {
    pool.deallocate(s2);
  } catch (const ValueError& e) {
    msg = e.what();
  }
  CHECK(msg.find("double free") != std::string::npos);
  pool.check();
  // Emptying the older chunk gives its megabyte back to the large class at once.
  pool.deallocate(s1);
  for (char* q : quarter) pool.deallocate(q);
  pool.check();
  auto* l2 = static_cast<char*>(pool.allocate(MiB));
  CHECK(l2 == s1);
  CHECK(pool.stats().reserved_bytes == 4 * MiB && pool.stats().num_upstream_allocs == 2);
  // Small blocks and large ones never overlap: fill all, verify all.
  std::vector<std::pair<char*, std::size_t>> blocks{{l1, 512 * KiB}, {l2, MiB}};
  for (int i = 0; i < 40; ++i) {
    const std::size_t n = (i % 5 == 0) ? 300 * KiB : (KiB << (i % 8));
    blocks.emplace_back(static_cast<char*>(pool.allocate(n)), n);
  }
  for (std::size_t i = 0; i < blocks.size(); ++i) std::memset(blocks[i].first, int(i), blocks[i].second);
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    bool intact = true;
    for (std::size_t k = 0; k < blocks[i].second; ++k) intact = intact && blocks[i].first[k] == char(i);
    CHECK(intact);
  }
  pool.check();
  for (auto& b : blocks) pool.deallocate(b.first);
  pool.check();
  const std::size_t reserved = pool.stats().reserved_bytes;
  CHECK(pool.trim() == reserved);  // the newest chunk goes too: everything returns
  CHECK(pool.stats().reserved_bytes == 0 && up->outstanding() == 0);
  pool.check();
}

TEST(chunks_follow_the_limit_and_stream_events) {
  auto up = limiting(1ull << 34, true, /*manual_events=*/true, 2 * MiB);
  CachingPool pool(up, small_arenas());
  void* a = pool.allocate(8 * KiB, /*stream=*/1);
  pool.deallocate(a, 1);
  void* b = pool.allocate(8 * KiB, 2);  // stream 1's event is not done: not the same bytes
  CHECK(b != a);
  pool.check();
  pool.deallocate(b, 2);
  pool.set_limit(0);  // releases every chunk and the arena's free tail, waiting for the events
  CHECK(pool.stats().reserved_bytes == 0 && up->outstanding() == 0);
  CHECK_THROWS(OutOfMemoryError, pool.allocate(8 * KiB));
  pool.set_limit(kNoLimit);
  void* c = pool.allocate(8 * KiB, 2);
  CHECK(pool.stats().reserved_bytes == 2 * MiB);
  pool.deallocate(c, 2);
  pool.check();
}

TEST(decommit_unmaps_free_granules_instead_of_growing) {
  auto up = limiting(1ull << 34);
  PoolOptions o = small_arenas();
  o.decommit = true;
  CachingPool pool(up, o);
  auto* a = static_cast<char*>(pool.allocate(MiB));
  auto* b = static_cast<char*>(pool.allocate(MiB));
  auto* c = static_cast<char*>(pool.allocate(MiB));
  pool.deallocate(a);
  auto* d = static_cast<char*>(pool.allocate(MiB));  // fills a's hole
  CHECK(d == a);
  pool.deallocate(b);
  // 2 MiB fit no hole: b's free megabyte is unmapped before the arena grows by 2 MiB, so
  // reserved is 4 MiB (live 4 MiB), not 5 MiB as without decommit.
  const auto before = pool.stats();
  auto* e = static_cast<char*>(pool.allocate(2 * MiB));
  CHECK(e == c + MiB);
  auto s = pool.stats();
  CHECK(s.reserved_bytes == 4 * MiB && up->outstanding() == 4 * MiB);
  CHECK(s.num_upstream_frees == before.num_upstream_frees + 1);
  CHECK(s.fragmentation_ratio >= 0.0 && s.fragmentation_ratio <= 1.0);
  pool.check();
  std::memset(d, 1, MiB);
  std::memset(c, 2, MiB);
  std::memset(e, 3, 2 * MiB);
  // A block placed over the unmapped megabyte maps it again (one upstream call).
  pool.deallocate(d);
  auto* f = static_cast<char*>(pool.allocate(2 * MiB));
  CHECK(f == a);
  s = pool.stats();
  CHECK(s.reserved_bytes == 5 * MiB && up->outstanding() == 5 * MiB);
  std::memset(f, 4, 2 * MiB);  // every byte of it is mapped
  bool intact = true;
  for (std::size_t k = 0; k < MiB; ++k) intact = intact && c[k] == 2 && e[k] == 3 && e[MiB + k] == 3;
  CHECK(intact);
  pool.check();
  // Under a limit that forbids mapping it again, the request fails and the pool is unchanged.
  pool.deallocate(f);
  pool.deallocate(c);
  auto* g = static_cast<char*>(pool.allocate(MiB));  // somewhere in the 3 MiB now free below e
  pool.deallocate(g);
  pool.set_limit(pool.stats().reserved_bytes);
  const auto held = pool.stats();
  auto* h = static_cast<char*>(pool.allocate(3 * MiB));  // unmaps first, so it fits the limit
  CHECK(h == a);
  CHECK(pool.stats().reserved_bytes <= held.limit_bytes);
  pool.deallocate(h);
  pool.set_limit(2 * MiB + 0);  // e alone is 2 MiB: nothing else may be mapped
  CHECK(throws_oom_with_details(pool, MiB));
  CHECK(pool.stats().allocated_bytes == 2 * MiB && pool.stats().num_live_blocks == 1);
  CHECK(pool.stats().fragmentation_ratio >= 0.0 && pool.stats().fragmentation_ratio <= 1.0);
  pool.check();
  pool.deallocate(e);
  pool.set_limit(kNoLimit);
  pool.trim();
  CHECK(pool.stats().reserved_bytes == 0 && up->outstanding() == 0);
  pool.check();
}

TEST(cross_stream_reuse_waits_for_the_event) {
  for (bool expandable : {true, false}) {
    auto up = limiting(1ull << 34, expandable, /*manual_events=*/true);
    {
      CachingPool pool(up, small_arenas());
      void* a = pool.allocate(64 * KiB, /*stream=*/1);
      pool.deallocate(a, 1);
      void* same = pool.allocate(64 * KiB, 1);  // same stream: reused at once (stream order)
      CHECK(same == a);
      pool.deallocate(same, 1);
      void* other = pool.allocate(64 * KiB, 2);  // stream 2: the event on stream 1 is not done yet
      CHECK(other != a);
      CHECK(up->live_events() >= 1);
      pool.deallocate(other, 2);
      pool.check();
      up->complete_events();
      void* again = pool.allocate(64 * KiB, 3);  // now stream 1's block may move
      bool took_completed = (again == a) || (again != other);
      CHECK(took_completed);
      pool.deallocate(again, 3);
      pool.check();
    }
    CHECK(up->live_events() == 0);
    CHECK(up->outstanding() == 0);
  }
}

TEST(trace_records_dumps_reads_and_replays) {
  CachingPool pool(limiting(1ull << 34), small_arenas());
  pool.record_trace(true);
  void* a = pool.allocate(100, 0);
  void* b = pool.allocate(5000, 2);
  pool.deallocate(a, 0);
  void* c = pool.allocate(1 << 20, 0);
  pool.deallocate(b, 2);
  pool.record_trace(false);
  pool.deallocate(c, 0);
  const auto t = pool.trace();
  CHECK(t.size() == 5);
  CHECK(t[0].is_alloc && t[0].bytes == 100 && t[1].stream == 2 && !t[2].is_alloc && t[2].id == t[0].id);
  const std::string path = "test_memory_trace.csv";
  pool.dump_trace(path);
  const auto back = read_trace(path);
  CHECK(back.size() == t.size());
  for (std::size_t i = 0; i < back.size() && i < t.size(); ++i)
    CHECK(back[i].is_alloc == t[i].is_alloc && back[i].id == t[i].id && back[i].bytes == t[i].bytes &&
          back[i].stream == t[i].stream);
  const ReplayResult r = replay(back, 3, make_host_upstream(), small_arenas());
  CHECK(r.peak_requested_bytes == 100 + 5000 + (1 << 20) - 100 || r.peak_requested_bytes == 5000 + (1 << 20));
  CHECK(r.upstream_allocs_after_first_pass == 0);
  CHECK(r.ops == 3 * 6);  // five records plus the still-live c freed at the end of each pass
  CHECK(r.reserved_to_requested >= 1.0);
  std::remove(path.c_str());
  {
    std::ofstream bad("test_memory_bad.csv");
    bad << "op,id,bytes,stream\nalloc,1,10,0\nfree,2,10,0\n";
  }
  CHECK_THROWS(ValueError, replay(read_trace("test_memory_bad.csv"), 1, make_host_upstream(), small_arenas()));
  {
    std::ofstream bad("test_memory_bad.csv");
    bad << "op,id,bytes,stream\nalloc,1,x,0\n";
  }
  CHECK_THROWS(ValueError, read_trace("test_memory_bad.csv"));
  std::remove("test_memory_bad.csv");
  CHECK_THROWS(ValueError, read_trace("/nonexistent/trace.csv"));
}

TEST(pressure_unmaps_free_granules_in_holes_before_failing) {
  for (bool limited : {true, false}) {
    auto up = limiting(1ull << 34);
    CachingPool pool(up, small_arenas());  // decommit off: the default
    auto* a = static_cast<char*>(pool.allocate(MiB));
    auto* b = static_cast<char*>(pool.allocate(MiB));
    auto* c = static_cast<char*>(pool.allocate(MiB));
    auto* d = static_cast<char*>(pool.allocate(MiB));
    std::memset(b, 2, MiB);
    std::memset(d, 4, MiB);
    pool.deallocate(a);
    pool.deallocate(c);  // two 1 MiB holes, 2 MiB free but no 2 MiB block
    if (limited) pool.set_limit(4 * MiB);
    const auto before = pool.stats();
    CHECK(before.reserved_bytes == 4 * MiB && before.num_trims == 0);
    auto* e = static_cast<char*>(pool.allocate(2 * MiB));  // before: OutOfMemoryError under the limit
    std::memset(e, 5, 2 * MiB);
    const auto s = pool.stats();
    if (limited) {
      // The holes' granules went back (2 MiB), then the arena grew by 2 MiB: 4 MiB, as the limit says.
      CHECK(s.num_pressure_reclaims == 1 && s.pressure_reclaimed_bytes == 2 * MiB);
      CHECK(s.reserved_bytes == 4 * MiB && up->outstanding() == 4 * MiB);
      CHECK(s.num_upstream_frees == before.num_upstream_frees + 2);
    } else {
      // No pressure: nothing is released, the arena simply grows.
      CHECK(s.num_pressure_reclaims == 0 && s.pressure_reclaimed_bytes == 0);
      CHECK(s.reserved_bytes == 6 * MiB && s.num_upstream_frees == before.num_upstream_frees);
    }
    pool.check();
    // A block placed over an unmapped hole maps it again, still under the limit.
    if (limited) pool.set_limit(5 * MiB);
    auto* f = static_cast<char*>(pool.allocate(MiB));
    std::memset(f, 6, MiB);
    CHECK(pool.stats().reserved_bytes <= (limited ? 5 * MiB : 6 * MiB));
    bool intact = true;
    for (std::size_t k = 0; k < MiB; ++k) intact = intact && b[k] == 2 && d[k] == 4 && e[k] == 5 && e[MiB + k] == 5;
    CHECK(intact);
    pool.check();
    // What cannot fit even after reclaiming everything still raises, and changes nothing.
    if (limited) {
      const auto held = pool.stats();
      CHECK(throws_oom_with_details(pool, MiB + 1));
      CHECK(pool.stats().allocated_bytes == held.allocated_bytes);
      pool.check();
    }
    for (void* p : {static_cast<void*>(b), static_cast<void*>(d), static_cast<void*>(e), static_cast<void*>(f)})
      pool.deallocate(p);
    pool.set_limit(kNoLimit);
    pool.trim();
    CHECK(pool.stats().reserved_bytes == 0 && up->outstanding() == 0);
  }
}

TEST(replay_under_a_tight_limit_reclaims_and_names_the_record_when_it_cannot) {
  // Three 1 MiB blocks, the middle one freed, then 2 MiB: fits 4 MiB only by unmapping the hole.
  std::vector<TraceRecord> t = {{true, 0, MiB, 0},  {true, 1, MiB, 0},  {true, 2, MiB, 0},
                                {false, 1, MiB, 0}, {true, 3, 2 * MiB, 0}, {false, 0, MiB, 0},
                                {false, 2, MiB, 0}, {false, 3, 2 * MiB, 0}};
  PoolOptions o = small_arenas();
  const ReplayResult free_run = replay(t, 3, make_host_upstream(), o);
  CHECK(free_run.pressure_reclaims == 0 && free_run.upstream_allocs_after_first_pass == 0);
  CHECK(free_run.peak_reserved_bytes == 5 * MiB);
  o.limit = 4 * MiB;
  const ReplayResult tight = replay(t, 3, make_host_upstream(), o);
  CHECK(tight.peak_reserved_bytes == 4 * MiB && tight.pressure_reclaims >= 1);
  o.limit = 4 * MiB - 64 * KiB;
  bool named = false;
  try {
    replay(t, 3, make_host_upstream(), o);
  } catch (const OutOfMemoryError& e) {
    named = std::string(e.what()).find("pass 1, record 5") != std::string::npos;
  }
  CHECK(named);
}

TEST(many_streams_use_hashed_lists_and_drop_empty_ones) {
  auto up = limiting(1ull << 34);
  {
    CachingPool pool(up, small_arenas());
    // A hole below a pinned block, passed from stream to stream: each stream takes the block the
    // previous one freed (no events on the host), so one upstream map in all, and one stream list
    // at a time (the emptied list goes when the next stream makes its own).
    void* hole = pool.allocate(4 * KiB, 0);
    void* pin = pool.allocate(4 * KiB, 0);
    pool.deallocate(hole, 0);
    bool one_list = true;
    for (std::uintptr_t s = 1; s <= 3000; ++s) {
      void* p = pool.allocate(4 * KiB, s);
      one_list = one_list && p == hole;
      pool.deallocate(p, s);
      one_list = one_list && pool.stats().num_stream_lists == 1;
    }
    CHECK(one_list);
    pool.deallocate(pin, 0);
    CHECK(pool.stats().num_upstream_allocs == 1);
    pool.check();
    // 3000 live blocks on 3000 streams, freed: 3000 lists; trim merges them and drops the lists.
    std::vector<void*> ps;
    for (std::uintptr_t s = 1; s <= 3000; ++s) ps.push_back(pool.allocate(4 * KiB, s));
    for (std::uintptr_t s = 1; s <= 3000; ++s) pool.deallocate(ps[s - 1], s);
    CHECK(pool.stats().num_stream_lists >= 2999);
    pool.check();
    // A new stream finds another stream's free block through the index, without growing.
    const auto before = pool.stats().num_upstream_allocs;
    pool.deallocate(pool.allocate(4 * KiB, 99999), 99999);
    CHECK(pool.stats().num_upstream_allocs == before);
    pool.trim();
    CHECK(pool.stats().num_stream_lists <= 1 && pool.stats().reserved_bytes == 0);
    pool.check();
  }
  CHECK(up->outstanding() == 0);
}

TEST(trace_buffer_is_bounded_and_keeps_a_consistent_prefix) {
  CachingPool pool(limiting(1ull << 34), small_arenas());
  void* early = pool.allocate(512);  // allocated before recording: its free is never recorded
  pool.record_trace(true, 3);
  void* a = pool.allocate(100);
  void* b = pool.allocate(200);
  pool.deallocate(early);
  pool.deallocate(a);
  void* c = pool.allocate(300);  // the buffer is full: dropped, and so is its free
  pool.deallocate(b);
  pool.deallocate(c);
  const auto t = pool.trace();
  CHECK(t.size() == 3);
  CHECK(t[0].is_alloc && t[0].bytes == 100 && t[1].is_alloc && t[1].bytes == 200);
  CHECK(!t[2].is_alloc && t[2].id == t[0].id);
  CHECK(pool.stats().num_trace_dropped == 3);  // c's alloc, b's free, c's free
  const ReplayResult r = replay(t, 2, make_host_upstream(), small_arenas());  // b stays live: freed at pass end
  CHECK(r.ops == 2 * 4);
}

TEST(trace_files_reject_signs_spaces_and_absurd_sizes_naming_the_line) {
  const std::string path = "test_memory_signs.csv";
  for (const char* row : {"alloc,-1,10,0", "alloc,1,-10,0", "alloc,1,10,-3", "free,1,10,+3", "alloc,1, 10,0",
                          "alloc,1,0,0", "alloc,1,281474976710657,0", "alloc,18446744073709551616,10,0"}) {
    {
      std::ofstream f(path);
      f << "op,id,bytes,stream\nalloc,7,10,0\n" << row << "\n";
    }
    bool named = false;
    try {
      read_trace(path);
    } catch (const ValueError& e) {
      named = std::string(e.what()).find(path + ":3:") != std::string::npos;
    }
    CHECK(named);
  }
  std::remove(path.c_str());
}

TEST(a_poll_that_throws_stops_replay_and_releases_everything) {
  std::vector<TraceRecord> t;
  for (std::uint64_t i = 0; i < 20000; ++i) t.push_back({true, i, 4096 + i % 7 * 256, 0});
  auto up = limiting(1ull << 34);
  int polls = 0;
  bool stopped = false;
  try {
    replay(t, 100, up, small_arenas(), [&] {
      if (++polls == 3) throw RuntimeError("stop");
    });
  } catch (const RuntimeError&) {
    stopped = true;
  }
  CHECK(stopped && polls == 3);
  CHECK(up->outstanding() == 0);
  polls = 0;
  stopped = false;
  try {
    replay_direct_ns_per_op(t, 100, *up, [&] {
      if (++polls == 2) throw RuntimeError("stop");
    });
  } catch (const RuntimeError&) {
    stopped = true;
  }
  CHECK(stopped && up->outstanding() == 0);
}

// Randomized stress: 4 threads over 3 streams; alloc, free, set_limit, trim; every allocation is
// filled with a pattern and verified on free; check() runs throughout. 1,000,000 operations in a
// normal build; fewer under sanitizers (AGRT_STRESS_OPS overrides).
TEST(randomized_stress_four_threads_three_streams) {
#if defined(__SANITIZE_ADDRESS__)
  std::size_t total_ops = 250000;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
  std::size_t total_ops = 250000;
#else
  std::size_t total_ops = 1000000;
#endif
#else
  std::size_t total_ops = 1000000;
#endif
  if (const char* env = std::getenv("AGRT_STRESS_OPS")) total_ops = std::strtoull(env, nullptr, 10);
  // Arenas in 64 KiB steps, arenas in 2 MiB steps (small blocks in chunks carved from the large
  // arena, as over CUDA VMM), plain segments.
  // The same with decommit (64 KiB and 2 MiB steps).
  struct Mode {
    std::size_t granularity;
    bool decommit;
  };
  for (const Mode mode : {Mode{64 * KiB, false}, Mode{2 * MiB, false}, Mode{0, false}, Mode{64 * KiB, true},
                          Mode{2 * MiB, true}}) {
    const std::size_t granularity = mode.granularity;
    const bool expandable = granularity != 0;
    auto up = limiting(1ull << 34, expandable, /*manual_events=*/true, expandable ? granularity : 64 * KiB);
    PoolOptions options = small_arenas();
    options.decommit = mode.decommit;
    CachingPool pool(up, options);
    std::atomic<std::size_t> corrupt{0}, ooms{0}, check_failures{0}, done_ops{0};
    const int threads = 4;
    auto worker = [&](int tid) {
      std::mt19937_64 rng(1234 + tid + granularity + (mode.decommit ? 7 : 0));
      struct Live {
        std::uint64_t* p;
        std::size_t n;
        std::uintptr_t stream;
        std::uint64_t tag;
      };
      std::vector<Live> live;
      std::uint64_t next_tag = std::uint64_t(tid) << 56;
      auto verify_and_free = [&](std::size_t i) {
        Live l = live[i];
        const std::size_t words = l.n / 8;
        for (std::size_t w = 0; w < words; ++w)
          if (l.p[w] != (l.tag ^ w)) {
            ++corrupt;
            break;
          }
        pool.deallocate(l.p, l.stream);
        live[i] = live.back();
        live.pop_back();
      };
      const std::size_t my_ops = total_ops / threads;
      for (std::size_t op = 0; op < my_ops; ++op) {
        const unsigned roll = rng() % 1000;
        if (roll < 2) {
          const std::size_t lim = (rng() % 4 == 0) ? kNoLimit : (8 + rng() % 56) * MiB;
          pool.set_limit(lim);
        } else if (roll < 3) {
          pool.trim();
        } else if (roll < 4) {
          up->complete_events();
        } else if (roll < 5 && tid == 0) {
          try {
            pool.check();
          } catch (const std::exception& e) {
            std::fprintf(stderr, "  %s\n", e.what());
            ++check_failures;
          }
        } else if (roll < 520 && live.size() < 96) {
          // Log-uniform sizes 8 B .. 32 KiB, and rarely 256 KiB .. 2 MiB.
          std::size_t n = (rng() % 500 == 0) ? (256 * KiB + rng() % (1792 * KiB)) : (std::size_t{8} << (rng() % 13));
          n = (n + rng() % n) & ~std::size_t{7};
          if (n == 0) n = 8;
          const std::uintptr_t stream = rng() % 3;
          try {
            auto* p = static_cast<std::uint64_t*>(pool.allocate(n, stream));
            const std::uint64_t tag = next_tag++ * 0x9E3779B97F4A7C15ull;
            for (std::size_t w = 0; w < n / 8; ++w) p[w] = tag ^ w;
            live.push_back({p, n, stream, tag});
          } catch (const OutOfMemoryError&) {
            ++ooms;
          }
        } else if (!live.empty()) {
          verify_and_free(rng() % live.size());
        }
        ++done_ops;
      }
      while (!live.empty()) verify_and_free(live.size() - 1);
    };
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) ts.emplace_back(worker, t);
    for (auto& t : ts) t.join();
    pool.check();
    const auto s = pool.stats();
    std::printf("  stress(%s%s): %zu ops, %zu ooms, %llu upstream allocs, peak reserved %zu\n",
                !expandable ? "segments" : granularity == 64 * KiB ? "arena" : "arena, 2 MiB, chunks",
                mode.decommit ? ", decommit" : "", done_ops.load(), ooms.load(),
                static_cast<unsigned long long>(s.num_upstream_allocs), s.peak_reserved_bytes);
    CHECK(done_ops.load() == total_ops / threads * threads);
    CHECK(corrupt.load() == 0);
    CHECK(check_failures.load() == 0);
    CHECK(s.allocated_bytes == 0 && s.requested_bytes == 0 && s.num_live_blocks == 0);
    CHECK(s.num_allocs == s.num_frees);
    pool.set_limit(kNoLimit);
    pool.trim();
    CHECK(pool.stats().reserved_bytes == 0);
    CHECK(up->outstanding() == 0);
  }
}

// An upstream whose event waits fail, as they do once the CUDA runtime has unloaded at exit.
class FailingWaitUpstream : public LimitingUpstream {
 public:
  using LimitingUpstream::LimitingUpstream;
  void event_wait(EventHandle) override { throw RuntimeError("event wait failed: the runtime is gone"); }
};

TEST(destruction_survives_failing_event_waits) {
  auto up = std::make_shared<FailingWaitUpstream>(make_host_upstream(true, 64 * KiB), 1ull << 34, true);
  {
    CachingPool pool(up, small_arenas());
    void* a = pool.allocate(64 * KiB, 1);
    pool.deallocate(a, 1);
    void* b = pool.allocate(64 * KiB, 2);  // records an event on a's block (not complete)
    CHECK(b != a);
    CHECK(up->live_events() >= 1);
    pool.deallocate(b, 2);
  }  // ~CachingPool waits for that event: the failure must not escape the destructor
  CHECK(up->live_events() == 0);
  CHECK(up->outstanding() == 0);
}

// Counts what goes back to the upstream before the first device synchronisation.
class SyncOrderUpstream : public LimitingUpstream {
 public:
  using LimitingUpstream::LimitingUpstream;
  void deallocate(void* p, std::size_t n) noexcept override {
    if (synchronize_calls() == 0) ++released_before_sync;
    LimitingUpstream::deallocate(p, n);
  }
  void unmap(void* p, std::size_t n) noexcept override {
    if (synchronize_calls() == 0) ++released_before_sync;
    LimitingUpstream::unmap(p, n);
  }
  long released_before_sync = 0;
};

TEST(destruction_synchronises_the_device_before_giving_memory_back) {
  // Live blocks and free blocks without an event: work queued on their streams may still use them,
  // and cuMemUnmap does not wait for it as cudaFree does.
  for (bool expandable : {true, false}) {
    auto up = std::make_shared<SyncOrderUpstream>(make_host_upstream(expandable, 64 * KiB), 1ull << 34, true);
    {
      CachingPool pool(up, small_arenas());
      pool.allocate(MiB, 1);                    // still live at destruction
      pool.deallocate(pool.allocate(3 * MiB, 2), 2);  // free, no event ever recorded
      CHECK(up->live_events() == 0);
    }
    CHECK(up->synchronize_calls() == 1);
    CHECK(up->released_before_sync == 0);
    CHECK(up->outstanding() == 0);
  }
  // Without events (the host) there is nothing to wait for.
  auto host = std::make_shared<SyncOrderUpstream>(make_host_upstream(true, 64 * KiB), 1ull << 34, false);
  { CachingPool(host, small_arenas()).allocate(MiB); }
  CHECK(host->synchronize_calls() == 0 && host->outstanding() == 0);
}

#ifdef AGRT_WITH_CUDA
// The entry points torch.cuda.memory.CUDAPluggableAllocator calls. torch stores whatever malloc
// returns without a check, so a real request must never come back as nullptr.
extern "C" void* agrt_torch_malloc(std::size_t size, int device, void* stream);
extern "C" void agrt_torch_free(void* ptr, std::size_t size, int device, void* stream);

TEST(torch_entry_points_throw_instead_of_returning_null) {
  CHECK(agrt_torch_malloc(0, 0, nullptr) == nullptr);  // size 0: no memory, as torch's allocators
  agrt_torch_free(nullptr, 0, 0, nullptr);              // a no-op
  if (build_info().cuda_device_count == 0) {
    CHECK_THROWS(RuntimeError, agrt_torch_malloc(1024, 0, nullptr));  // no device: an error, not NULL
    return;
  }
  void* p = agrt_torch_malloc(1024, 0, nullptr);
  CHECK(p != nullptr);
  set_torch_pools_limit(4 * MiB);
  CHECK_THROWS(std::bad_alloc, agrt_torch_malloc(64 * MiB, 0, nullptr));  // over the limit
  bool names_the_limit = false;
  try {
    agrt_torch_malloc(64 * MiB, 0, nullptr);
  } catch (const TorchOutOfMemory& e) {
    names_the_limit = std::string(e.what()).find("out of memory") != std::string::npos;
  }
  CHECK(names_the_limit);
  set_torch_pools_limit(kNoLimit);
  agrt_torch_free(p, 1024, 0, nullptr);
  CHECK(torch_device_pool(0)->stats().allocated_bytes == 0);
}
#endif

AGRT_TEST_MAIN()
