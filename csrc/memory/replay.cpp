// Trace files and their replay through a fresh pool, in one C++ loop.
#include <charconv>
#include <chrono>
#include <fstream>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "autoglm_rt/error.h"
#include "autoglm_rt/memory/caching_pool.h"

namespace agrt::memory {
namespace {

// Steps of a native loop between two polls: a few milliseconds at most, a negligible cost.
constexpr std::size_t kPollEvery = 4096;

// A non-negative decimal integer and nothing else: no sign, no spaces, no overflow.
bool parse_u64(const std::string& text, std::uint64_t& out) {
  if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos) return false;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc() && end == text.data() + text.size();
}

}  // namespace

std::vector<TraceRecord> read_trace(const std::string& path, const Poll& poll) {
  std::ifstream in(path);
  AGRT_EXPECTS(in.good(), ValueError, "read_trace: cannot open '", path, "'");
  std::string line;
  AGRT_EXPECTS(static_cast<bool>(std::getline(in, line)), ValueError, "read_trace: '", path, "' is empty");
  if (!line.empty() && line.back() == '\r') line.pop_back();
  AGRT_EXPECTS(line == "op,id,bytes,stream", ValueError, "read_trace: ", path,
               ": expected the header 'op,id,bytes,stream', got '", line, "'");
  std::vector<TraceRecord> out;
  std::size_t lineno = 1;
  while (std::getline(in, line)) {
    ++lineno;
    if (poll && lineno % kPollEvery == 0) poll();
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    std::istringstream ls(line);
    std::string op, id, bytes, stream;
    const bool ok = std::getline(ls, op, ',') && std::getline(ls, id, ',') && std::getline(ls, bytes, ',') &&
                    std::getline(ls, stream) && (op == "alloc" || op == "free");
    TraceRecord r{op == "alloc", 0, 0, 0};
    std::uint64_t n_id = 0, n_bytes = 0, n_stream = 0;
    const bool parsed = ok && parse_u64(id, n_id) && parse_u64(bytes, n_bytes) && parse_u64(stream, n_stream);
    AGRT_EXPECTS(parsed, ValueError, "read_trace: ", path, ":", lineno,
                 ": expected 'alloc|free,<id>,<bytes>,<stream>' with non-negative integers, got '", line, "'");
    AGRT_EXPECTS(!r.is_alloc || (n_bytes >= 1 && n_bytes <= kMaxRequest), ValueError, "read_trace: ", path, ":",
                 lineno, ": an alloc row needs 1..2^48 bytes, got ", n_bytes);
    r.id = n_id;
    r.bytes = static_cast<std::size_t>(n_bytes);
    r.stream = static_cast<std::uintptr_t>(n_stream);
    out.push_back(r);
  }
  return out;
}

namespace {

struct Op {
  bool is_alloc;
  std::uint32_t slot;
  std::size_t bytes;
  std::uintptr_t stream;
};

// Ids become dense slots before timing, so the loop measures the allocator and not a hash map.
// Returns the ops and the number of slots; throws ValueError for inconsistent traces.
std::pair<std::vector<Op>, std::size_t> compile(const std::vector<TraceRecord>& trace) {
  std::vector<Op> ops;
  ops.reserve(trace.size());
  std::unordered_map<std::uint64_t, std::uint32_t> slot_of;
  std::vector<bool> slot_live;
  std::size_t index = 0;
  for (const TraceRecord& r : trace) {
    ++index;
    if (r.is_alloc) {
      AGRT_EXPECTS(r.bytes > 0, ValueError, "replay: record ", index, " allocates 0 bytes");
      auto [it, fresh] = slot_of.emplace(r.id, static_cast<std::uint32_t>(slot_live.size()));
      if (fresh) slot_live.push_back(false);
      AGRT_EXPECTS(!slot_live[it->second], ValueError, "replay: record ", index, " allocates id ", r.id,
                   " which is still live");
      slot_live[it->second] = true;
      ops.push_back({true, it->second, r.bytes, r.stream});
    } else {
      auto it = slot_of.find(r.id);
      AGRT_EXPECTS(it != slot_of.end() && slot_live[it->second], ValueError, "replay: record ", index, " frees id ",
                   r.id, " which is not live");
      slot_live[it->second] = false;
      ops.push_back({false, it->second, r.bytes, r.stream});
    }
  }
  return {std::move(ops), slot_live.size()};
}

}  // namespace

double replay_direct_ns_per_op(const std::vector<TraceRecord>& trace, int repeat, Upstream& upstream,
                               const Poll& poll) {
  AGRT_EXPECTS(repeat >= 1, ValueError, "replay: repeat must be >= 1, got ", repeat);
  const auto [ops, slots] = compile(trace);
  std::vector<void*> ptrs(slots, nullptr);
  std::vector<std::size_t> sizes(slots, 0);
  std::uint64_t n = 0;
  const auto t0 = std::chrono::steady_clock::now();
  // Whatever is still allocated when the loop stops (a poll that throws, an out-of-memory upstream)
  // goes back to the upstream.
  struct Release {
    Upstream& up;
    std::vector<void*>& ptrs;
    std::vector<std::size_t>& sizes;
    ~Release() {
      for (std::size_t s = 0; s < ptrs.size(); ++s)
        if (ptrs[s]) up.deallocate(ptrs[s], sizes[s]);
    }
  } release{upstream, ptrs, sizes};
  std::size_t step = 0;
  for (int pass = 0; pass < repeat; ++pass) {
    for (const Op& op : ops) {
      if (poll && ++step % kPollEvery == 0) poll();
      if (op.is_alloc) {
        ptrs[op.slot] = upstream.allocate(op.bytes);
        AGRT_EXPECTS(ptrs[op.slot] != nullptr, RuntimeError, "replay: the upstream is out of memory");
        sizes[op.slot] = op.bytes;
      } else {
        upstream.deallocate(ptrs[op.slot], sizes[op.slot]);
        ptrs[op.slot] = nullptr;
      }
    }
    n += ops.size();
    for (std::size_t s = 0; s < slots; ++s)
      if (ptrs[s]) {
        upstream.deallocate(ptrs[s], sizes[s]);
        ptrs[s] = nullptr;
        ++n;
      }
  }
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  return ns / double(n ? n : 1);
}

ReplayResult replay(const std::vector<TraceRecord>& trace, int repeat, std::shared_ptr<Upstream> upstream,
                    PoolOptions options, const Poll& poll) {
  AGRT_EXPECTS(repeat >= 1, ValueError, "replay: repeat must be >= 1, got ", repeat);
  const auto [ops, slots] = compile(trace);
  CachingPool pool(std::move(upstream), options);
  std::vector<void*> ptrs(slots, nullptr);
  std::vector<std::uintptr_t> streams(slots, 0);
  ReplayResult res;
  double total_ns = 0;
  // Per op the loop tests one counter: `polling` and the record number are kept out of it.
  const bool polling = static_cast<bool>(poll);
  std::size_t until_poll = kPollEvery;
  for (int pass = 0; pass < repeat; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const Op& op : ops) {
      if (--until_poll == 0) {
        until_poll = kPollEvery;
        if (polling) poll();
      }
      if (op.is_alloc) {
        try {
          ptrs[op.slot] = pool.allocate(op.bytes, op.stream);
        } catch (const OutOfMemoryError& e) {
          const std::size_t record = static_cast<std::size_t>(&op - ops.data()) + 1;
          throw OutOfMemoryError(detail::concat("replay: pass ", pass + 1, ", record ", record, ": ", e.what()));
        }
        streams[op.slot] = op.stream;
      } else {
        pool.deallocate(ptrs[op.slot], streams[op.slot]);
        ptrs[op.slot] = nullptr;
      }
    }
    std::uint64_t n = ops.size();
    for (std::size_t s = 0; s < ptrs.size(); ++s) {
      if (ptrs[s]) {
        pool.deallocate(ptrs[s], streams[s]);
        ptrs[s] = nullptr;
        ++n;
      }
    }
    total_ns += std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    res.ops += n;
    if (pass == 0) res.upstream_allocs_after_first_pass = pool.stats().num_upstream_allocs;
  }
  const PoolStats st = pool.stats();
  res.peak_reserved_bytes = st.peak_reserved_bytes;
  res.peak_requested_bytes = st.peak_requested_bytes;
  res.reserved_to_requested =
      st.peak_requested_bytes ? double(st.peak_reserved_bytes) / double(st.peak_requested_bytes) : 0.0;
  res.upstream_allocs = st.num_upstream_allocs;
  res.pressure_reclaims = st.num_pressure_reclaims;
  res.pressure_reclaimed_bytes = st.pressure_reclaimed_bytes;
  res.upstream_allocs_after_first_pass = st.num_upstream_allocs - res.upstream_allocs_after_first_pass;
  res.ns_per_op = res.ops ? total_ns / double(res.ops) : 0.0;
  return res;
}

}  // namespace agrt::memory
