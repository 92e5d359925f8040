// The caching pool's machinery. See caching_pool.h for the guarantees.
#include "autoglm_rt/memory/caching_pool.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory_resource>
#include <mutex>
#include <set>
#include <unordered_map>

#include "autoglm_rt/error.h"

namespace agrt::memory {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;
constexpr std::size_t kLargeRound = 2 * kMiB;     // segment mode: large segments in 2 MiB steps
constexpr std::size_t kMinLargeAlloc = 10 * kMiB;  // below this, a large segment is large_segment
// Free blocks of other streams a request inspects (each may record an event) before it grows.
constexpr int kCrossStreamLooks = 8;

// q is always a power of two here (round_bytes, granularity, 2 MiB): a mask, not a division.
inline std::size_t round_up(std::size_t n, std::size_t q) { return (n + q - 1) & ~(q - 1); }
inline bool is_pow2(std::size_t n) { return n != 0 && (n & (n - 1)) == 0; }

struct Segment;

constexpr std::uint64_t kUntraced = ~std::uint64_t{0};      // allocated while not recording
constexpr std::uint64_t kDroppedTrace = kUntraced - 1;      // its alloc record found the buffer full

struct Block {
  std::uintptr_t addr = 0;
  std::size_t size = 0;
  Block* prev = nullptr;  // address neighbours in the segment
  Block* next = nullptr;
  Segment* seg = nullptr;
  std::uintptr_t stream = 0;
  std::size_t requested = 0;
  EventHandle event = nullptr;  // recorded lazily on `stream` when another stream wants the block
  std::uint64_t trace_id = kUntraced;  // kUntraced: allocated while no trace was kept
  std::uint64_t born = 0;  // allocation number while allocated (0: a chunk's carrier, or free)
  bool allocated = false;
  Segment* chunk = nullptr;  // set on a large-arena block that carries a small-class chunk
};

struct BySizeAddr {
  bool operator()(const Block* a, const Block* b) const {
    return a->size != b->size ? a->size < b->size : a->addr < b->addr;
  }
};
using FreeSet = std::pmr::set<Block*, BySizeAddr>;

struct Segment {
  std::uintptr_t base = 0;
  std::size_t mapped = 0;    // bytes backed by memory (the whole segment when not expandable)
  std::size_t capacity = 0;  // reserved address space (== mapped when not expandable)
  bool expandable = false;
  int cls = 0;  // 0 small, 1 large
  Block* carrier = nullptr;  // a small-class chunk: the large-arena block it lives in (no upstream memory)
  // With PoolOptions::decommit: one flag per granule of [base, base + mapped), 1 = unmapped again.
  // Allocated blocks never overlap an unmapped granule; reserved counts mapped - off_bytes.
  std::vector<std::uint8_t> off;
  std::size_t off_bytes = 0;
  Block* first = nullptr;
  Block* last = nullptr;
};

struct StreamLists {
  StreamLists(std::uintptr_t s, std::pmr::memory_resource* mr) : stream(s), sets{FreeSet(mr), FreeSet(mr)} {}
  std::uintptr_t stream;
  FreeSet sets[2];
};

// Live blocks by address: open addressing with linear probing and backward-shift deletion, a
// power-of-two table and a multiplicative hash (no modulo, no node allocation).
class PtrTable {
 public:
  PtrTable() : slots_(64), bits_(6) {}
  Block* find(std::uintptr_t key) const {
    for (std::size_t i = home(key);; i = (i + 1) & mask()) {
      if (slots_[i].key == key) return slots_[i].val;
      if (slots_[i].key == 0) return nullptr;
    }
  }
  void insert(std::uintptr_t key, Block* val) {
    if ((count_ + 1) * 2 > slots_.size()) rehash(bits_ + 1);
    std::size_t i = home(key);
    while (slots_[i].key != 0) i = (i + 1) & mask();
    slots_[i] = {key, val};
    ++count_;
  }
  void erase(std::uintptr_t key) {
    std::size_t i = home(key);
    while (slots_[i].key != key) i = (i + 1) & mask();
    // Shift later members of the probe run back so lookups never stop early.
    for (std::size_t j = (i + 1) & mask(); slots_[j].key != 0; j = (j + 1) & mask()) {
      const std::size_t h = home(slots_[j].key);
      const bool movable = (j > i) ? (h <= i || h > j) : (h <= i && h > j);
      if (movable) {
        slots_[i] = slots_[j];
        i = j;
      }
    }
    slots_[i] = {0, nullptr};
    --count_;
  }
  std::size_t size() const { return count_; }

 private:
  struct Slot {
    std::uintptr_t key;
    Block* val;
  };
  std::size_t mask() const { return slots_.size() - 1; }
  std::size_t home(std::uintptr_t key) const {
    return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> (64 - bits_));
  }
  void rehash(unsigned bits) {
    std::vector<Slot> old(std::size_t{1} << bits, Slot{0, nullptr});
    old.swap(slots_);
    bits_ = bits;
    count_ = 0;
    for (const Slot& s : old)
      if (s.key) insert(s.key, s.val);
  }
  std::vector<Slot> slots_;
  unsigned bits_;
  std::size_t count_ = 0;
};

std::string fmt_bytes(std::size_t n) {
  if (n == kNoLimit) return "none";
  return std::to_string(n);
}

}  // namespace

struct CachingPool::Impl {
  std::shared_ptr<Upstream> up;
  PoolOptions opt;
  bool expand = false;
  std::size_t gran = 0;
  mutable std::mutex mu;
  // Tree and hash nodes come from a pool, so the hot path never calls malloc.
  std::pmr::unsynchronized_pool_resource node_pool;
  std::vector<Segment*> segments;
  Segment* growable[2] = {nullptr, nullptr};
  std::size_t largest[2] = {0, 0};  // largest rounded request per class so far (spare_hole)
  // With arenas whose granularity is large next to the small class (CUDA VMM's 2 MiB against
  // 128 KiB), a small arena of its own would cost at least a whole granule; small blocks then live
  // in chunks of `chunk_bytes` carved from the large arena instead (0: a small arena of its own).
  // The newest chunk is the small class's growable segment: its free tail is the small class's
  // wilderness, as an arena's is (alloc/free pairs at the top stay off the free lists).
  std::size_t chunk_bytes = 0;
  // Free lists of the streams that hold parked free blocks, found in O(1). A list that empties is
  // dropped, except the most recent one (`empty_list`), so a stream whose only free block comes
  // and goes does not rebuild its list every time; at most one empty list exists.
  std::pmr::unordered_map<std::uintptr_t, StreamLists*> lists{&node_pool};
  StreamLists* hot = nullptr;  // the list found last: most calls repeat the previous stream
  StreamLists* empty_list = nullptr;
  std::vector<StreamLists*> spare_lists;
  // Every parked free block of every stream by (size, address), kept once two streams have held
  // free blocks at the same time: a stream whose own lists have no fit finds another stream's
  // candidates with one lower_bound instead of visiting every stream. Single-stream use never pays
  // for it.
  bool indexed = false;
  FreeSet all_free[2] = {FreeSet(&node_pool), FreeSet(&node_pool)};
  PtrTable live;
  PoolStats st;
  bool tracing = false;
  std::size_t trace_max = kDefaultTraceRecords;
  std::vector<TraceRecord> trace;
  std::uint64_t next_trace_id = 0;
  std::vector<Block*> spare_blocks;  // recycled Block objects: no heap traffic on the hot path

  ~Impl() {
    // Work queued on the blocks' streams may still use the memory (a live block, or a free one
    // whose event was never recorded: events are recorded lazily), and unlike cudaFree,
    // cuMemUnmap does not wait for it. One device synchronisation covers every stream.
    if (!segments.empty() && up->has_events()) {
      try {
        up->synchronize();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "autoglm_rt: CachingPool(%s): synchronising the device at destruction failed: %s\n",
                     up->device().c_str(), e.what());
      }
    }
    // Chunks first: their blocks live in arena memory that the second loop gives back.
    for (Segment* s : segments)
      if (s->carrier) delete_blocks(s);
    for (Segment* s : segments) {
      if (s->carrier) continue;
      delete_blocks(s);
      give_segment_back(s);
    }
    for (Segment* s : segments) delete s;
    for (Block* b : spare_blocks) delete b;
    for (auto& [stream, l] : lists) delete l;
    for (StreamLists* l : spare_lists) delete l;
  }

  // ---- small helpers ------------------------------------------------------------------------
  // Destruction only: waits for each block's pending stream event, then frees the Block objects.
  // Never throws (a destructor that throws terminates the process): a failed wait means the
  // device is gone (e.g. the CUDA runtime already unloaded at exit), so nothing is left to wait for.
  void delete_blocks(Segment* s) noexcept {
    for (Block* b = s->first; b;) {
      Block* n = b->next;
      if (b->event) {
        try {
          up->event_wait(b->event);
        } catch (const std::exception& e) {
          std::fprintf(stderr, "autoglm_rt: CachingPool(%s): waiting for a stream event at destruction failed: %s\n",
                       up->device().c_str(), e.what());
        }
        up->event_destroy(b->event);
      }
      delete b;
      b = n;
    }
  }

  // A new segment of `size` bytes at `base`, fully mapped, held by one block on `stream`.
  Block* new_segment(std::uintptr_t base, std::size_t size, int cls, std::uintptr_t stream) {
    auto* s = new Segment();
    s->base = base;
    s->mapped = s->capacity = size;
    s->cls = cls;
    segments.push_back(s);
    Block* b = new_block();
    b->addr = base;
    b->size = size;
    b->seg = s;
    b->stream = stream;
    s->first = s->last = b;
    return b;
  }
  Block* new_block() {
    if (spare_blocks.empty()) return new Block();
    Block* b = spare_blocks.back();
    spare_blocks.pop_back();
    *b = Block();
    return b;
  }
  void recycle(Block* b) {
    drop_event(b);
    spare_blocks.push_back(b);
  }
  void drop_event(Block* b) {
    if (b->event) {
      up->event_destroy(b->event);
      b->event = nullptr;
    }
  }
  // ---- per-stream free lists ----------------------------------------------------------------
  // The hot-list test is all the hot path pays; the hash lookup and list creation stay out of
  // line, so the callers inlining this do not take on their register spills (measured: about
  // 20 instructions per parked block when they were inlined, benches/RESULTS.md issue 17).
  StreamLists* find_list(std::uintptr_t stream) {
    if (hot && hot->stream == stream) return hot;
    return find_list_slow(stream);
  }
  [[gnu::noinline]] StreamLists* find_list_slow(std::uintptr_t stream) {
    auto it = lists.find(stream);
    if (it == lists.end()) return nullptr;
    return hot = it->second;
  }
  StreamLists& lists_for(std::uintptr_t stream) {
    if (hot && hot->stream == stream) return *hot;
    return new_or_found_list(stream);
  }
  [[gnu::noinline]] StreamLists& new_or_found_list(std::uintptr_t stream) {
    if (StreamLists* l = find_list_slow(stream)) return *l;
    // The kept empty list goes first, so two lists mean two streams that hold free blocks.
    if (empty_list) {
      drop_list(empty_list);
      empty_list = nullptr;
    }
    StreamLists* l;
    if (spare_lists.empty()) {
      l = new StreamLists(stream, &node_pool);
    } else {
      l = spare_lists.back();
      spare_lists.pop_back();
      l->stream = stream;
    }
    lists.emplace(stream, l);
    if (!indexed && lists.size() >= 2) build_index();
    return *(hot = l);
  }
  void build_index() {
    indexed = true;
    for (auto& [stream, l] : lists)
      for (int c = 0; c < 2; ++c) all_free[c].insert(l->sets[c].begin(), l->sets[c].end());
  }
  // Parks free block b in its stream's list (and the cross-stream index).
  void list_insert(Block* b) {
    StreamLists& l = lists_for(b->stream);
    l.sets[b->seg->cls].insert(b);
    if (indexed) all_free[b->seg->cls].insert(b);
    if (&l == empty_list) empty_list = nullptr;
  }
  // Takes b out of its stream's list if it is there (the wilderness never is).
  void list_erase(Block* b) {
    StreamLists* l = find_list(b->stream);
    if (!l || l->sets[b->seg->cls].erase(b) == 0) return;
    list_erased(*l, b);
  }
  // The same for the block at `it` in l's set of its class: no second search of the tree.
  void list_erase_at(StreamLists& l, FreeSet::iterator it) {
    Block* b = *it;
    l.sets[b->seg->cls].erase(it);
    list_erased(l, b);
  }
  void list_erased(StreamLists& l, Block* b) {
    if (indexed) all_free[b->seg->cls].erase(b);
    if (l.sets[0].empty() && l.sets[1].empty()) {
      if (empty_list && empty_list != &l) drop_list(empty_list);
      empty_list = &l;
    }
  }
  void drop_list(StreamLists* l) {
    lists.erase(l->stream);
    if (hot == l) hot = nullptr;
    spare_lists.push_back(l);
  }

  // The free tail of a class's growable arena (the "wilderness") stays out of the free lists:
  // holes are filled first and the tail is used, and extended, only when no hole fits. This
  // keeps the arena's top low (measured: 1.16 -> 1.04 peak reserved / requested on the trace).
  bool is_wilderness(const Block* b) const {
    return (b->seg->expandable || b->seg->carrier) && b->seg == growable[b->seg->cls] && b == b->seg->last;
  }
  void park(Block* b) {
    if (!is_wilderness(b)) list_insert(b);
  }
  // Makes `g` the growable arena of its class; the old arena's free tail becomes a normal block.
  void set_growable(int cls, Segment* g) {
    Segment* old = growable[cls];
    growable[cls] = g;
    if (old && old->last && !old->last->allocated) list_insert(old->last);
  }

  void update_peaks() {
    st.peak_allocated_bytes = std::max(st.peak_allocated_bytes, st.allocated_bytes);
    st.peak_reserved_bytes = std::max(st.peak_reserved_bytes, st.reserved_bytes);
    st.peak_requested_bytes = std::max(st.peak_requested_bytes, st.requested_bytes);
  }

  // A free block parked on another stream may be taken once its event completed. The event is
  // recorded on first interest, so frees never call the driver.
  bool reusable_elsewhere(Block* b) {
    if (!up->has_events()) return true;
    if (!b->event) b->event = up->record_event(b->stream);
    return up->event_done(b->event);
  }
  void wait_idle(Block* b) {
    if (!up->has_events()) return;
    if (!b->event) b->event = up->record_event(b->stream);
    up->event_wait(b->event);
  }

  // ---- free-list maintenance ----------------------------------------------------------------
  void unlink(Block* b) {
    if (b->prev) b->prev->next = b->next;
    else b->seg->first = b->next;
    if (b->next) b->next->prev = b->prev;
    else b->seg->last = b->prev;
  }

  // Inserts a free block into its stream's set, merging with free neighbours on the same stream.
  void insert_free(Block* b) {
    Block* n = b->next;
    if (n && !n->allocated && n->stream == b->stream) {
      list_erase(n);
      b->size += n->size;
      unlink(n);
      recycle(n);
      drop_event(b);
    }
    Block* p = b->prev;
    if (p && !p->allocated && p->stream == b->stream) {
      list_erase(p);
      p->size += b->size;
      unlink(b);
      recycle(b);
      drop_event(p);
      b = p;
    }
    park(b);
    if (b->seg->carrier && b == b->seg->first && b == b->seg->last) chunk_emptied(b->seg);
  }

  // ---- small-class chunks carved from the large arena ---------------------------------------
  // The newest chunk stays (its free tail serves the next requests); an older one that empties
  // goes back to the large arena at once, so small blocks never pin more than they use.
  void chunk_emptied(Segment* s) {
    if (s != growable[0]) release_chunk(s);
  }
  bool chunk_is_empty(const Segment* s) const { return s->first == s->last && !s->first->allocated; }

  Block* grow_chunk(std::size_t r, std::uintptr_t stream) {
    if (Segment* g = growable[0]) {
      Block* t = g->last;
      if (!t->allocated && t->size >= r && (t->stream == stream || reusable_elsewhere(t))) {
        drop_event(t);
        t->stream = stream;
        return t;
      }
      // Empty but busy on another stream: back to the large arena (its event goes along).
      if (chunk_is_empty(g)) release_chunk(g);
    }
    Block* c = take_free(chunk_bytes, 1, stream);
    if (!c) c = grow_arena(chunk_bytes, 1, stream);
    if (!c) return nullptr;
    c->allocated = true;  // before split, so the remainder does not merge back into it
    split(c, chunk_bytes);
    if (c->seg->off_bytes && !recommit(c)) {
      c->allocated = false;
      insert_free(c);
      return nullptr;
    }
    drop_event(c);
    Block* b = new_segment(c->addr, chunk_bytes, 0, stream);
    b->seg->carrier = c;
    c->chunk = b->seg;
    set_growable(0, b->seg);  // the previous chunk's free tail joins the free lists
    return b;
  }

  // An entirely free chunk goes back to the large arena as a free block (no upstream call); the
  // block keeps the stream, and pending event, of the chunk's last use.
  void release_chunk(Segment* s) {
    Block* f = s->first;
    list_erase(f);
    Block* c = s->carrier;
    c->stream = f->stream;
    c->event = f->event;
    f->event = nullptr;
    recycle(f);
    if (growable[0] == s) growable[0] = nullptr;
    segments.erase(std::find(segments.begin(), segments.end(), s));
    delete s;
    c->chunk = nullptr;
    c->allocated = false;
    insert_free(c);
  }

  // ---- allocation ---------------------------------------------------------------------------
  Block* take_free(std::size_t r, int cls, std::uintptr_t stream) {
    Block probe;
    probe.size = r;
    probe.addr = 0;
    if (StreamLists* own = find_list(stream)) {
      auto it = own->sets[cls].lower_bound(&probe);
      if (it != own->sets[cls].end()) {
        Block* b = *it;
        list_erase_at(*own, it);
        return b;
      }
    }
    // Another stream's block, smallest fitting first, once its stream's work is done. Without the
    // index at most one list exists, and it belongs to another stream or to this one.
    FreeSet* others = indexed ? &all_free[cls] : nullptr;
    if (!indexed && lists.size() == 1 && lists.begin()->first != stream) others = &lists.begin()->second->sets[cls];
    if (!others) return nullptr;
    int looked = 0;
    for (auto jt = others->lower_bound(&probe); jt != others->end() && looked < kCrossStreamLooks; ++jt) {
      Block* b = *jt;
      if (b->stream == stream) continue;
      ++looked;
      if (reusable_elsewhere(b)) {
        list_erase(b);
        drop_event(b);
        b->stream = stream;
        return b;
      }
    }
    return nullptr;
  }

  // PoolOptions::recent_neighbour_from: whether r bytes from hole b go to its high end.
  bool newer_above(const Block* b, std::size_t r) const {
    if (!expand || chunk_bytes || opt.recent_neighbour_from == 0 || r < opt.recent_neighbour_from ||
        b->size - r < opt.round_bytes)
      return false;
    const std::uint64_t above = b->next && b->next->allocated ? b->next->born : 0;
    const std::uint64_t below = b->prev && b->prev->allocated ? b->prev->born : 0;
    return above > below;
  }
  // PoolOptions::spare_hole_ratio: whether r bytes should come from the free tail of class cls's
  // arena rather than from hole b (best fit), which holds the largest request seen and would not
  // hold it once cut. Only when the tail holds r without growing; b then goes back to the lists.
  bool spare_hole(const Block* b, std::size_t r, int cls, std::uintptr_t stream) {
    if (!expand || chunk_bytes || opt.spare_hole_ratio == 0 || r < opt.recent_neighbour_from) return false;
    const std::size_t big = largest[cls];
    if (b->size < big || b->size - r >= big || b->size / opt.spare_hole_ratio < r) return false;
    Block* t = growable[cls] ? growable[cls]->last : nullptr;
    return t && !t->allocated && t->size >= r && (t->stream == stream || reusable_elsewhere(t));
  }
  // Splits hole b and returns its top r bytes, allocated; the low remainder (b) goes back free.
  Block* split_high(Block* b, std::size_t r) {
    Block* top = new_block();
    top->size = r;
    top->addr = b->addr + b->size - r;
    top->seg = b->seg;
    top->stream = b->stream;
    top->allocated = true;
    top->prev = b;
    top->next = b->next;
    if (b->next) b->next->prev = top;
    else b->seg->last = top;
    b->next = top;
    b->size -= r;
    insert_free(b);
    return top;
  }

  void split(Block* b, std::size_t r) {
    if (b->size - r < opt.round_bytes) return;
    Block* rem = new_block();
    rem->addr = b->addr + r;
    rem->size = b->size - r;
    rem->seg = b->seg;
    rem->stream = b->stream;
    rem->prev = b;
    rem->next = b->next;
    if (b->next) b->next->prev = rem;
    else b->seg->last = rem;
    b->next = rem;
    b->size = r;
    insert_free(rem);
  }

  bool fits(std::size_t bytes) const {
    return st.limit_bytes == kNoLimit || (bytes <= st.limit_bytes && st.reserved_bytes <= st.limit_bytes - bytes);
  }
  // Room for `bytes` more reserved under the limit. Under pressure, cached memory goes back in
  // two steps before the caller gives up: free tails and wholly free segments (never `keep`'s
  // tail, which the caller is extending), then the whole free granules inside the arenas' holes
  // (mapped again only when a block is placed over them). Without pressure nothing is released,
  // so a run that fits makes no upstream call after its first pass.
  bool ensure_room(std::size_t bytes, Segment* keep) {
    if (fits(bytes)) return true;
    if (bytes > st.limit_bytes) return false;
    const std::size_t before = st.reserved_bytes;
    release_cached(st.limit_bytes - bytes, keep);
    if (expand && !fits(bytes)) {
      const std::vector<Segment*> snapshot = segments;  // decommit_free never removes a segment
      for (Segment* s : snapshot) {
        if (fits(bytes)) break;
        if (s->expandable) decommit_free(s, /*with_tail=*/s != keep);
      }
    }
    if (st.reserved_bytes < before) {
      ++st.num_pressure_reclaims;
      st.pressure_reclaimed_bytes += before - st.reserved_bytes;
    }
    return fits(bytes);
  }

  Block* grow(std::size_t r, int cls, std::uintptr_t stream) {
    if (expand && cls == 0 && chunk_bytes) return grow_chunk(r, stream);
    if (expand && growable[0] && growable[0]->carrier && chunk_is_empty(growable[0])) {
      // An empty newest chunk is a cache for small alloc/free pairs, never a reason to grow.
      release_chunk(growable[0]);
      if (Block* b = take_free(r, cls, stream)) return b;
    }
    if (expand) return grow_arena(r, cls, stream);
    return grow_segment(r, cls, stream);
  }

  Block* grow_arena(std::size_t r, int cls, std::uintptr_t stream) {
    Segment* g = growable[cls];
    Block* tail = g ? g->last : nullptr;
    bool use_tail = tail && !tail->allocated && (tail->stream == stream || reusable_elsewhere(tail));
    const std::size_t have = use_tail ? tail->size : 0;
    std::size_t need = have >= r ? 0 : round_up(r - have, gran);
    if (opt.decommit && g && need > 0) decommit_free(g, /*with_tail=*/false);
    if (!g || g->mapped + need > g->capacity) {
      need = round_up(r, gran);
      if (!ensure_room(need, nullptr)) return nullptr;
      const std::size_t cap = std::max(opt.arena_reserve, need);
      void* base = up->reserve(cap);
      if (!base) return nullptr;
      g = new Segment();
      g->base = reinterpret_cast<std::uintptr_t>(base);
      g->capacity = cap;
      g->expandable = true;
      g->cls = cls;
      segments.push_back(g);
      set_growable(cls, g);
      use_tail = false;
    } else if (need > 0 && !ensure_room(need, g)) {
      return nullptr;
    }
    if (need > 0 && !map_tail(g, need)) {
      release_cached(0, g);
      if (!map_tail(g, need)) {
        if (g->mapped == 0) remove_segment(g);
        return nullptr;
      }
    }
    tail = g->last;
    Block* b;
    if (use_tail) {
      drop_event(tail);
      tail->size += need;
      b = tail;
    } else {
      // The old tail (free on a stream that is still busy) stops being the wilderness.
      b = new_block();
      b->addr = g->base + g->mapped - need;
      b->size = need;
      b->seg = g;
      b->prev = tail;
      if (tail) tail->next = b;
      else g->first = b;
      g->last = b;
      if (tail && !tail->allocated) list_insert(tail);
    }
    b->stream = stream;
    return b;
  }

  bool map_tail(Segment* g, std::size_t need) {
    if (!up->map(reinterpret_cast<void*>(g->base + g->mapped), need)) return false;
    g->mapped += need;
    g->off.resize(g->mapped / gran, 0);
    st.reserved_bytes += need;
    ++st.num_upstream_allocs;
    return true;
  }

  // ---- decommit (PoolOptions::decommit) -----------------------------------------------------
  std::size_t off_in(const Segment* s, std::size_t lo, std::size_t hi) const {  // granule offsets
    std::size_t n = 0;
    if (s->off_bytes)
      for (std::size_t i = lo / gran; i < hi / gran; ++i) n += s->off[i];
    return n * gran;
  }
  // Unmaps the mapped granules of [lo, hi) (offsets, multiples of the granularity), marking them
  // off when `mark`; returns the bytes unmapped.
  std::size_t unmap_mapped(Segment* s, std::size_t lo, std::size_t hi, bool mark) {
    std::size_t done = 0;
    for (std::size_t i = lo / gran, end = hi / gran; i < end;) {
      if (s->off_bytes && s->off[i]) {
        ++i;
        continue;
      }
      std::size_t j = i;
      while (j < end && !(s->off_bytes && s->off[j])) ++j;
      up->unmap(reinterpret_cast<void*>(s->base + i * gran), (j - i) * gran);
      if (mark) std::fill(s->off.begin() + i, s->off.begin() + j, std::uint8_t{1});
      done += (j - i) * gran;
      i = j;
    }
    return done;
  }
  // Unmaps the whole free granules inside the free blocks of arena s (its free tail too unless
  // it is about to be extended).
  void decommit_free(Segment* s, bool with_tail) {
    for (Block* b = s->first; b; b = b->next) {
      if (b->allocated || (!with_tail && b == s->last)) continue;
      const std::size_t lo = round_up(b->addr - s->base, gran);
      const std::size_t hi = (b->addr + b->size - s->base) / gran * gran;
      if (hi <= lo || off_in(s, lo, hi) == hi - lo) continue;
      wait_idle(b);
      const std::size_t n = unmap_mapped(s, lo, hi, true);
      s->off_bytes += n;
      st.reserved_bytes -= n;
      ++st.num_upstream_frees;
    }
  }
  // Maps the unmapped granules under allocated block b (after unmapping the free ones elsewhere
  // in its arena). False when the limit or the upstream refuses; b's granules mapped so far stay.
  bool recommit(Block* b) {
    Segment* s = b->seg;
    const std::size_t lo = (b->addr - s->base) / gran * gran;
    const std::size_t hi = round_up(b->addr + b->size - s->base, gran);
    const std::size_t need = off_in(s, lo, hi);
    if (need == 0) return true;
    if (opt.decommit) decommit_free(s, true);
    // b is allocated already: releasing s's free tail or its holes cannot touch b's granules.
    if (!ensure_room(need, nullptr)) return false;
    for (std::size_t i = lo / gran, end = hi / gran; i < end;) {
      if (!s->off[i]) {
        ++i;
        continue;
      }
      std::size_t j = i;
      while (j < end && s->off[j]) ++j;
      if (!up->map(reinterpret_cast<void*>(s->base + i * gran), (j - i) * gran)) return false;
      std::fill(s->off.begin() + i, s->off.begin() + j, std::uint8_t{0});
      s->off_bytes -= (j - i) * gran;
      st.reserved_bytes += (j - i) * gran;
      ++st.num_upstream_allocs;
      i = j;
    }
    return true;
  }

  Block* grow_segment(std::size_t r, int cls, std::uintptr_t stream) {
    std::size_t size;
    if (cls == 0) size = std::max(opt.small_segment, r);
    else if (r < kMinLargeAlloc) size = std::max(opt.large_segment, round_up(r, kLargeRound));
    else size = round_up(r, kLargeRound);
    if (!ensure_room(size, nullptr)) {
      size = round_up(r, opt.round_bytes);  // the policy's slack does not fit: exactly what is needed
      if (!ensure_room(size, nullptr)) return nullptr;
    }
    void* p = up->allocate(size);
    if (!p) {
      release_cached(0, nullptr);
      p = up->allocate(size);
    }
    if (!p && size > round_up(r, opt.round_bytes)) {
      size = round_up(r, opt.round_bytes);  // the upstream is short: drop the policy's slack
      p = up->allocate(size);
    }
    if (!p) return nullptr;
    ++st.num_upstream_allocs;
    st.reserved_bytes += size;
    return new_segment(reinterpret_cast<std::uintptr_t>(p), size, cls, stream);
  }

  // ---- release ------------------------------------------------------------------------------
  void give_segment_back(Segment* s) {
    if (s->expandable) {
      if (s->off_bytes) unmap_mapped(s, 0, s->mapped, false);
      else if (s->mapped) up->unmap(reinterpret_cast<void*>(s->base), s->mapped);
      up->release(reinterpret_cast<void*>(s->base), s->capacity);
    } else {
      up->deallocate(reinterpret_cast<void*>(s->base), s->mapped);
    }
  }

  void remove_segment(Segment* s) {
    if (growable[s->cls] == s) growable[s->cls] = nullptr;
    for (Block* b = s->first; b;) {  // only free blocks can be left here
      Block* n = b->next;
      list_erase(b);
      recycle(b);
      b = n;
    }
    s->first = s->last = nullptr;
    segments.erase(std::find(segments.begin(), segments.end(), s));
    give_segment_back(s);
    delete s;
  }

  // Merges neighbouring free blocks parked on different streams, once their events completed
  // (waiting for them: this runs only when memory goes back to the upstream).
  void consolidate(Segment* s) {
    for (Block* b = s->first; b;) {
      Block* n = b->next;
      if (n && !b->allocated && !n->allocated) {
        wait_idle(b);
        wait_idle(n);
        list_erase(b);
        list_erase(n);
        b->size += n->size;
        unlink(n);
        recycle(n);
        drop_event(b);
        park(b);
        continue;
      }
      b = n;
    }
  }

  // Releases cached free memory until reserved <= target (or nothing more can go), never
  // touching `keep`'s tail. Returns the bytes released.
  std::size_t release_cached(std::size_t target, Segment* keep) {
    std::size_t released = 0;
    if (chunk_bytes && st.reserved_bytes > target) {
      // Free chunks first: their memory returns with the arena's tail below. Never into `keep`,
      // whose tail the caller holds.
      std::vector<Segment*> chunks;
      for (Segment* s : segments)
        if (s->carrier && s->carrier->seg != keep) chunks.push_back(s);
      for (Segment* s : chunks) {
        consolidate(s);
        if (chunk_is_empty(s)) {
          wait_idle(s->first);
          release_chunk(s);
        }
      }
    }
    std::vector<Segment*> snapshot = segments;
    for (Segment* s : snapshot) {
      if (st.reserved_bytes <= target) break;
      if (s == keep || s->carrier) continue;
      consolidate(s);
      if (s->expandable && opt.decommit) {
        const std::size_t before = st.reserved_bytes;
        decommit_free(s, /*with_tail=*/true);
        released += before - st.reserved_bytes;
      }
      Block* t = s->last;
      if (!t || t->allocated) continue;
      if (!s->expandable) {
        if (t != s->first) continue;  // not entirely free
        wait_idle(t);
        list_erase(t);
        recycle(t);
        s->first = s->last = nullptr;
        st.reserved_bytes -= s->mapped;
        released += s->mapped;
        ++st.num_upstream_frees;
        remove_segment(s);
        continue;
      }
      const std::uintptr_t cut = s->base + round_up(t->addr - s->base, gran);
      const std::size_t drop = s->base + s->mapped - cut;
      if (drop == 0) continue;
      wait_idle(t);
      const std::size_t was_off = off_in(s, cut - s->base, s->mapped);
      if (was_off) unmap_mapped(s, cut - s->base, s->mapped, false);
      else up->unmap(reinterpret_cast<void*>(cut), drop);
      if (drop > was_off) ++st.num_upstream_frees;
      s->mapped -= drop;
      s->off_bytes -= was_off;
      s->off.resize(s->mapped / gran);
      st.reserved_bytes -= drop - was_off;
      released += drop - was_off;
      list_erase(t);
      t->size -= drop;
      if (t->size == 0) {
        unlink(t);
        recycle(t);
      } else {
        park(t);
      }
      if (s->mapped == 0) remove_segment(s);
    }
    return released;
  }

  [[noreturn]] void throw_oom(std::size_t nbytes, std::size_t r, const char* why) {
    ++st.num_ooms;
    throw OutOfMemoryError(detail::concat(
        "CachingPool(", up->device(), "): out of memory: ", why, "; requested ", nbytes, " bytes (", r,
        " rounded), limit ", fmt_bytes(st.limit_bytes), ", allocated ", st.allocated_bytes, ", reserved ",
        st.reserved_bytes, ", largest free block ", largest_free(), " bytes"));
  }

  std::size_t largest_free() const {
    std::size_t best = 0;
    for (const Segment* g : growable)
      if (g && g->last && !g->last->allocated) best = std::max(best, g->last->size);
    for (const auto& [stream, l] : lists)
      for (const FreeSet& s : l->sets)
        if (!s.empty()) best = std::max(best, (*s.rbegin())->size);
    return best;
  }

  Block* find_block_containing(std::uintptr_t a) const {
    for (Segment* s : segments) {
      if (a < s->base || a >= s->base + s->mapped) continue;
      for (Block* b = s->first; b; b = b->next)
        if (a >= b->addr && a < b->addr + b->size) {
          if (b->chunk) break;  // a chunk's carrier: the chunk's own segment has the answer
          return b;
        }
    }
    return nullptr;
  }
};

CachingPool::CachingPool(std::shared_ptr<Upstream> upstream, PoolOptions options) : impl_(std::make_unique<Impl>()) {
  AGRT_EXPECTS(upstream != nullptr, ValueError, "CachingPool: upstream is null");
  AGRT_EXPECTS(is_pow2(options.round_bytes) && options.round_bytes >= 256, ValueError,
               "CachingPool: round_bytes must be a power of two >= 256, got ", options.round_bytes);
  // Measured on the six traces in benches/ (benches/RESULTS.md, issue 17): 128 KiB suits growable
  // arenas (every value from 96 to 160 KiB gives the same footprints, at or below 256 KiB's on
  // every trace, 64 KiB costs cnn and mlp), torch's 1 MiB suits fixed 2 MiB / 20 MiB segments.
  if (options.small_size == 0)
    options.small_size = (options.expandable && upstream && upstream->supports_expansion()) ? 128 * 1024 : 1024 * 1024;
  AGRT_EXPECTS(options.small_size >= options.round_bytes, ValueError,
               "CachingPool: small_size must be >= round_bytes (", options.round_bytes, "), got ", options.small_size);
  AGRT_EXPECTS(options.small_segment >= options.small_size && options.small_segment % options.round_bytes == 0,
               ValueError, "CachingPool: small_segment must be a multiple of round_bytes and >= small_size, got ",
               options.small_segment);
  AGRT_EXPECTS(options.large_segment % options.round_bytes == 0, ValueError,
               "CachingPool: large_segment must be a multiple of round_bytes, got ", options.large_segment);
  Impl& m = *impl_;
  m.up = std::move(upstream);
  m.opt = options;
  m.expand = options.expandable && m.up->supports_expansion();
  if (m.expand) {
    m.gran = m.up->granularity();
    AGRT_EXPECTS(is_pow2(m.gran) && m.gran % options.round_bytes == 0, ValueError,
                 "CachingPool: upstream granularity ", m.gran, " must be a power of two multiple of round_bytes");
    AGRT_EXPECTS(options.arena_reserve >= m.gran, ValueError, "CachingPool: arena_reserve must be >= the granularity (",
                 m.gran, "), got ", options.arena_reserve);
    m.opt.arena_reserve = round_up(options.arena_reserve, m.gran);
    // Chunks of 4 small_size (1 MiB by default) pay only where the granule is larger. Measured on
    // the traces in benches/ with 2 MiB granules (benches/RESULTS.md): 4x keeps upstream calls
    // after the first pass at 0 everywhere; 2x needed one more in transformer_train's second pass.
    const std::size_t chunk = round_up(4 * m.opt.small_size, m.opt.round_bytes);
    if (m.gran > chunk) m.chunk_bytes = chunk;
  }
  m.st.limit_bytes = options.limit;
}

CachingPool::~CachingPool() = default;

void* CachingPool::allocate(std::size_t nbytes, std::uintptr_t stream) {
  Impl& m = *impl_;
  AGRT_EXPECTS(nbytes > 0, ValueError, "CachingPool.allocate: nbytes must be > 0, got 0");
  AGRT_EXPECTS(nbytes <= kMaxRequest, ValueError, "CachingPool.allocate: nbytes=", nbytes,
               " is absurd (more than 2^48 bytes)");
  const std::size_t r = round_up(nbytes, m.opt.round_bytes);
  const int cls = r <= m.opt.small_size ? 0 : 1;
  std::lock_guard<std::mutex> lock(m.mu);
  const std::uint64_t upstream_before = m.st.num_upstream_allocs;
  Block* b = m.take_free(r, cls, stream);
  if (b && m.spare_hole(b, r, cls, stream)) {
    m.insert_free(b);
    b = nullptr;  // grow() below takes r from the tail without mapping
  }
  if (b && m.newer_above(b, r)) {
    b = m.split_high(b, r);
  } else if (!b) {
    if (m.st.limit_bytes != kNoLimit && r > m.st.limit_bytes) m.throw_oom(nbytes, r, "request exceeds the limit");
    b = m.grow(r, cls, stream);
    if (!b) {
      const bool limit_bound = m.st.limit_bytes != kNoLimit;
      m.throw_oom(nbytes, r, limit_bound ? "no cached block fits and growth would exceed the limit or the upstream "
                                           "refused"
                                         : "no cached block fits and the upstream refused");
    }
  }
  if (!b->allocated) {
    b->allocated = true;  // before split, so the remainder does not merge back into it
    m.split(b, r);
  }
  if (b->seg->off_bytes && !m.recommit(b)) {
    b->allocated = false;
    m.insert_free(b);
    m.throw_oom(nbytes, r, "the limit or the upstream refused to map a decommitted block again");
  }
  b->requested = nbytes;
  b->born = m.st.num_allocs + 1;
  m.drop_event(b);
  m.live.insert(b->addr, b);
  m.st.allocated_bytes += b->size;
  m.st.requested_bytes += nbytes;
  m.largest[cls] = std::max(m.largest[cls], r);
  ++m.st.num_allocs;
  if (m.st.num_upstream_allocs == upstream_before) ++m.st.num_cache_hits;
  m.update_peaks();
  if (m.tracing) {
    // A full buffer keeps its prefix: the frees of kept allocations after it are dropped too, and
    // replay frees what is still live at the end of a pass, so the kept trace stays consistent.
    if (m.trace.size() < m.trace_max) {
      b->trace_id = m.next_trace_id++;
      m.trace.push_back({true, b->trace_id, nbytes, stream});
    } else {
      b->trace_id = kDroppedTrace;
      ++m.st.num_trace_dropped;
    }
  }
  return reinterpret_cast<void*>(b->addr);
}

void CachingPool::deallocate(void* ptr) {
  Impl& m = *impl_;
  std::uintptr_t stream = 0;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    if (Block* b = m.live.find(reinterpret_cast<std::uintptr_t>(ptr))) stream = b->stream;
  }
  deallocate(ptr, stream);
}

void CachingPool::deallocate(void* ptr, std::uintptr_t stream) {
  Impl& m = *impl_;
  const auto a = reinterpret_cast<std::uintptr_t>(ptr);
  std::lock_guard<std::mutex> lock(m.mu);
  Block* b = m.live.find(a);
  if (!b) {
    b = m.find_block_containing(a);
    if (b && !b->allocated && b->addr == a) AGRT_EXPECTS(false, ValueError, "CachingPool.deallocate: double free of ", ptr);
    if (b && b->allocated)
      AGRT_EXPECTS(false, ValueError, "CachingPool.deallocate: ", ptr, " points inside a block at ",
                   reinterpret_cast<void*>(b->addr), "; pass the address allocate() returned");
    AGRT_EXPECTS(false, ValueError, "CachingPool.deallocate: ", ptr,
                 " was not allocated by this pool (or was already freed)");
  }
  AGRT_EXPECTS(b->stream == stream, ValueError, "CachingPool.deallocate: ", ptr, " was allocated on stream ",
               b->stream, ", not ", stream, "; free it on the stream it was allocated on");
  m.live.erase(a);
  b->allocated = false;
  m.st.allocated_bytes -= b->size;
  m.st.requested_bytes -= b->requested;
  ++m.st.num_frees;
  if (m.tracing && b->trace_id != kUntraced) {
    if (b->trace_id != kDroppedTrace && m.trace.size() < m.trace_max)
      m.trace.push_back({false, b->trace_id, b->requested, b->stream});
    else
      ++m.st.num_trace_dropped;
  }
  b->trace_id = kUntraced;
  b->requested = 0;
  b->born = 0;
  m.insert_free(b);
}

void CachingPool::set_limit(std::size_t bytes) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  m.st.limit_bytes = bytes;
  if (bytes != kNoLimit && m.st.reserved_bytes > bytes) {
    if (m.release_cached(bytes, nullptr) > 0) ++m.st.num_trims;
  }
}

std::size_t CachingPool::limit() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->st.limit_bytes;
}

std::size_t CachingPool::trim() {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  ++m.st.num_trims;
  return m.release_cached(0, nullptr);
}

PoolStats CachingPool::stats() const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  PoolStats s = m.st;
  s.largest_free_block_bytes = m.largest_free();
  const std::size_t cached = s.reserved_bytes - s.allocated_bytes;
  // With decommit a free block may span unmapped granules and outgrow the cached bytes: clamp.
  s.fragmentation_ratio =
      cached == 0 ? 0.0 : std::max(0.0, 1.0 - double(s.largest_free_block_bytes) / double(cached));
  s.num_segments = m.segments.size();
  s.num_live_blocks = m.live.size();
  for (const auto& [stream, l] : m.lists) s.num_free_blocks += l->sets[0].size() + l->sets[1].size();
  s.num_stream_lists = m.lists.size();
  for (const Segment* g : m.growable)
    if (g && g->last && !g->last->allocated) ++s.num_free_blocks;
  return s;
}

void CachingPool::reset_peak_stats() {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  m.st.peak_allocated_bytes = m.st.allocated_bytes;
  m.st.peak_reserved_bytes = m.st.reserved_bytes;
  m.st.peak_requested_bytes = m.st.requested_bytes;
}

void CachingPool::check() const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  auto fail = [](const std::string& what) { throw RuntimeError("CachingPool.check: " + what); };
  std::size_t reserved = 0, allocated = 0, requested = 0, live = 0, free_blocks = 0;
  std::size_t chunks = 0, carriers = 0;
  for (const Segment* s : m.segments) {
    if (s->carrier) {
      ++chunks;
      const Block* c = s->carrier;
      if (c->chunk != s || !c->allocated || c->addr != s->base || c->size != s->mapped || s->cls != 0 ||
          s->expandable || c->seg->cls != 1)
        fail("a small-class chunk and its carrier block disagree");
    }
    if (s->mapped > s->capacity) fail("segment mapped beyond its reservation");
    if (s->expandable && s->mapped % m.gran) fail("arena mapped size not a multiple of the granularity");
    if (!s->expandable && s->mapped == 0) fail("empty plain segment");
    if (!s->carrier) reserved += s->mapped - s->off_bytes;
    if (s->off_bytes || !s->off.empty()) {
      if (!s->expandable || s->off.size() != s->mapped / m.gran) fail("decommit flags do not cover the arena");
      std::size_t off = 0;
      for (std::uint8_t f : s->off) off += f;
      if (off * m.gran != s->off_bytes) fail("decommitted bytes differ from the flags");
    }
    std::uintptr_t at = s->base;
    const Block* prev = nullptr;
    for (const Block* b = s->first; b; prev = b, b = b->next) {
      if (b->seg != s) fail("block points to the wrong segment");
      if (b->prev != prev) fail("broken prev link");
      if (b->addr != at) fail(detail::concat("gap or overlap at ", reinterpret_cast<void*>(at)));
      if (b->size == 0 || b->size % m.opt.round_bytes) fail("block size not a positive multiple of round_bytes");
      if (b->addr % m.opt.round_bytes) fail("misaligned block");
      at += b->size;
      if (b->allocated && s->off_bytes &&
          m.off_in(s, (b->addr - s->base) / m.gran * m.gran, round_up(b->addr + b->size - s->base, m.gran)))
        fail("an allocated block lies on a decommitted granule");
      if (b->allocated && b->chunk) {
        ++carriers;
        if (b->chunk->carrier != b) fail("a carrier block points to a chunk that is not its own");
      } else if (b->allocated) {
        ++live;
        allocated += b->size;
        requested += b->requested;
        if (b->requested == 0 || b->requested > b->size) fail("requested bytes out of range");
        if (m.live.find(b->addr) != b) fail("live block missing from the pointer table");
      } else {
        ++free_blocks;
        if (prev && !prev->allocated && prev->stream == b->stream) fail("adjacent free blocks not coalesced");
        const auto it = m.lists.find(b->stream);
        const bool found = it != m.lists.end() && it->second->sets[s->cls].count(const_cast<Block*>(b)) == 1;
        if (m.is_wilderness(b)) {
          if (found) fail("the arena's free tail is in a free list");
          --free_blocks;
        } else if (!found) {
          fail("free block missing from its stream's free list");
        }
      }
    }
    if (prev != s->last) fail("segment tail pointer is stale");
    if (at != s->base + s->mapped) fail("blocks do not cover the segment");
  }
  std::size_t listed = 0, empty_lists = 0;
  for (const auto& [stream, l] : m.lists) {
    if (l->stream != stream) fail("a stream's free lists are filed under another stream");
    if (l->sets[0].empty() && l->sets[1].empty()) {
      ++empty_lists;
      if (l != m.empty_list) fail("an empty stream list other than the most recent one is kept");
    }
    for (int c = 0; c < 2; ++c)
      for (const Block* b : l->sets[c]) {
        ++listed;
        if (b->allocated || b->stream != l->stream || b->seg->cls != c) fail("free list holds a wrong block");
        if (m.indexed && m.all_free[c].count(const_cast<Block*>(b)) != 1)
          fail("a free block is missing from the cross-stream index");
      }
  }
  if (empty_lists > 1) fail("more than one empty stream list is kept");
  if (m.indexed && m.all_free[0].size() + m.all_free[1].size() != listed)
    fail("the cross-stream index holds blocks that are in no stream's list");
  if (!m.indexed && m.lists.size() > 1) fail("two streams hold free lists but the cross-stream index is off");
  if (listed != free_blocks) fail("free lists hold blocks that are not in any segment");
  if (chunks != carriers) fail("a carrier block's chunk is not among the segments");
  for (const Segment* s : m.segments)
    if (s->carrier && s != m.growable[0] && m.chunk_is_empty(s)) fail("an empty chunk other than the newest is kept");
  if (live != m.live.size()) fail("pointer table size differs from live blocks");
  if (reserved != m.st.reserved_bytes) fail("reserved_bytes differs from the segments' sum");
  if (allocated != m.st.allocated_bytes) fail("allocated_bytes differs from the live blocks' sum");
  if (requested != m.st.requested_bytes) fail("requested_bytes differs from the live blocks' sum");
  if (m.st.peak_reserved_bytes < m.st.reserved_bytes || m.st.peak_allocated_bytes < m.st.allocated_bytes ||
      m.st.peak_requested_bytes < m.st.requested_bytes)
    fail("a peak is below the current value");
  if (m.st.num_frees > m.st.num_allocs) fail("more frees than allocations");
}

std::size_t CachingPool::block_size(const void* ptr) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  const Block* b = impl_->live.find(reinterpret_cast<std::uintptr_t>(ptr));
  AGRT_EXPECTS(b != nullptr, ValueError, "CachingPool.block_size: ", ptr, " is not a live block");
  return b->size;
}

void CachingPool::record_trace(bool on, std::size_t max_records) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->tracing = on;
  impl_->trace_max = max_records;
}

std::vector<TraceRecord> CachingPool::trace() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->trace;
}

void CachingPool::dump_trace(const std::string& path) const {
  const std::vector<TraceRecord> t = trace();
  std::ofstream out(path);
  AGRT_EXPECTS(out.good(), RuntimeError, "CachingPool.dump_trace: cannot open '", path, "' for writing");
  out << "op,id,bytes,stream\n";
  for (const TraceRecord& r : t) out << (r.is_alloc ? "alloc," : "free,") << r.id << ',' << r.bytes << ',' << r.stream << '\n';
  out.flush();
  AGRT_EXPECTS(out.good(), RuntimeError, "CachingPool.dump_trace: writing '", path, "' failed");
}

const Upstream& CachingPool::upstream() const { return *impl_->up; }
const PoolOptions& CachingPool::options() const { return impl_->opt; }

}  // namespace agrt::memory
